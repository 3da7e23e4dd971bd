"""The one entry point: `python launch/tpu_run.py --config configs/<name>.py[:arg] [--config.a.b=value ...]`.

`:arg` goes to the file's get_config(arg): `:runlocal` shrinks a real-scale config to a CPU check
on the embedded toy models (opdjax.schema.runlocal_arg).

Same command on a laptop CPU, a GPU, or every worker of a TPU VM pod slice (where it first
joins the multi-host job with jax.distributed.initialize()). The config file's `job` field
picks what runs (opdjax.jobs).
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from absl import app  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (get_config()).",
                                          lock_config=True)


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    from opdjax import jobs, multihost, sharding

    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config configs/<name>.py is required")
    if config.job == "compile" and config.compile.topology and not os.environ.get("JAX_PLATFORMS"):
        # compiling for a named TPU slice needs no local accelerator: keep JAX on the CPU (no
        # TPU runtime start-up, which would fail or wait on a machine without a TPU)
        import jax
        jax.config.update("jax_platforms", "cpu")
    sharding.maybe_initialize_distributed()  # before any other JAX call
    try:
        multihost.agree_on_config(config)  # a pod: every worker must have been given the same config
        jobs.get_job(config.job)(config)
    except _user_errors() as e:
        # Bad input (a config field, a file, a checkpoint, workers that disagree): its message says
        # what and how to fix it; a traceback would only bury it. OPDJAX_TRACEBACK=1 shows it.
        if os.environ.get("OPDJAX_TRACEBACK") == "1":
            raise
        print(f"opdjax: error ({type(e).__name__}): {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def _user_errors() -> tuple[type, ...]:
    from opdjax import multihost, sharding
    from opdjax.aot import chips, report
    from opdjax.data.records import PromptDataError
    from opdjax.data.tokenizer import TokenizerMismatchError
    from opdjax import errors
    from opdjax.teachability.segments import PunktModelMissingError
    return (errors.ConfigError, errors.CheckpointError,
            sharding.ShardingError, multihost.MultiHostError, PromptDataError, TokenizerMismatchError,
            PunktModelMissingError, chips.TopologyError, report.DoesNotFitError)


def check_moved_names(argv) -> None:
    """An override under a renamed field fails with the new name (before flag parsing, which would
    only call the old one unknown)."""
    from opdjax.train import validate
    try:
        validate.check_moved_overrides(argv)
    except validate.ConfigError as e:
        print(f"opdjax: error (ConfigError): {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    check_moved_names(sys.argv[1:])
    app.run(main)
