"""Config sections every job shares, each defined once: model roles, mesh, optimizer, batch, loss,
rollout, data, checkpoint, metrics. The OPD schema (opdjax/train/config.py) and the DAIL schema
(opdjax/dail/config.py) are built from these and add only what is specific to their job; one knob
has one name in both. opdjax/train/validate.py checks every section.
"""
from __future__ import annotations

import ml_collections

from opdjax.aot.config import compile_section

MESH_AXES = ("data", "fsdp", "tensor")  # opdjax.sharding's mesh axes, in mesh.shape order

# Names that moved to the shared vocabulary: an old name is an error that names the new one.
MOVED = {
    "train.microbatches": "batch.microbatches",
    "train.sequences_per_step": "batch.sequences_per_step",
    "train.chunk_tokens": "loss.chunk_tokens",
    "prompts.max_prompt_tokens": "data.max_prompt_tokens",
    "synthesis.cache_dtype": "rollout.cache_dtype",
    "synthesis.max_new_tokens": "rollout.max_new_tokens",
}


def runlocal_arg(arg) -> bool:
    """get_config(arg) of a real-scale config: "runlocal" (`--config configs/x.py:runlocal`) shrinks
    it to a CPU check of the same job on the embedded toy models (big_vision's habit)."""
    if arg not in (None, "", "runlocal"):
        raise ValueError(f"config argument {arg!r}: the only one is 'runlocal' (--config configs/<name>.py:runlocal).")
    return arg == "runlocal"


def common(c: ml_collections.ConfigDict, job: str, workdir: str) -> None:
    """The top-level fields of every training-type config."""
    c.job = job  # opdjax.jobs: what launch/tpu_run.py runs
    c.workdir = workdir
    c.seed = 0
    # accelerator the memory estimate is checked against (opdjax.train.memory.CHIPS): cpu | v4 |
    # v5e | v5p | v6e | h100 | h200. "cpu" skips the check.
    c.chip = "cpu"
    c.mesh = mesh_section()
    c.compile = compile_section()  # job=compile: every phase compiled for a TPU topology (opdjax.aot)


def model_role(path: str = "", dtype: str = "float32") -> ml_collections.ConfigDict:
    """One model's weights (OPD: student, teacher; DAIL: model)."""
    m = ml_collections.ConfigDict()
    m.path = path  # Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer files)
    m.gguf = ""  # or a GGUF file (qwen2/qwen3); converted on load
    m.dtype = dtype  # float32 | bfloat16 (params; logits and losses are always float32)
    return m


# How full-sequence forwards attend (scoring, the train step; sampling always decodes with XLA):
# auto | xla | splash | cudnn. auto = splash (Pallas) on TPU, cudnn on GPU for bfloat16 params, xla
# otherwise (opdjax.models.attention). Set as config.model.attention in every job.
ATTENTION = "auto"


def mesh_section(shape=(1, -1, 1)) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.shape = tuple(shape)  # (data, fsdp, tensor); -1 fills with the remaining devices
    # (logical axis name, mesh axes) pairs mapping the model's logical axes ("embed", "mlp",
    # "heads", "batch", ...) to mesh axes: a name of MESH_AXES, a tuple of them, or None
    # (replicated). () = opdjax.sharding.DEFAULT_RULES; a table replaces it whole.
    m.sharding_rules = ()
    return m


def optimizer_section(learning_rate: float = 1e-5, schedule: str = "constant", warmup_steps: int = 0,
                      weight_decay: float = 0.0) -> ml_collections.ConfigDict:
    """AdamW after global-norm clipping (opdjax.train.loop.make_optimizer reads it)."""
    o = ml_collections.ConfigDict()
    o.learning_rate = learning_rate
    o.schedule = schedule  # constant | cosine | linear (all after linear warmup)
    o.warmup_steps = warmup_steps
    o.b1 = 0.9
    o.b2 = 0.999
    o.eps = 1e-8
    o.weight_decay = weight_decay
    o.grad_clip = 1.0  # global-norm clipping; 0 = off
    return o


def batch_section() -> ml_collections.ConfigDict:
    """What one step trains on; each job adds its per-step size (OPD prompts_per_step, DAIL
    sequences_per_step)."""
    b = ml_collections.ConfigDict()
    b.microbatches = 1  # gradient accumulation: the step's batch is split this many ways
    return b


def loss_section() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.chunk_tokens = 256  # full-vocabulary losses: positions per chunk (no [B,T,V] in float32)
    return s


def rollout_section(max_new_tokens: int) -> ml_collections.ConfigDict:
    """Generation from the model being trained (OPD's sampler, DAIL's mixed rollout)."""
    r = ml_collections.ConfigDict()
    r.max_new_tokens = max_new_tokens
    r.cache_dtype = ""  # KV cache: "" = the params' dtype | bfloat16 | float32
    return r


def data_section(max_prompt_tokens: int) -> ml_collections.ConfigDict:
    """Where records come from (opdjax.data.sources: a .jsonl(.gz) / .parquet / ArrayRecord file or
    glob, a TFDS or save_to_disk directory, or "tfds:NAME" under data_dir; local or gs://) and how
    long a rendered prompt may be. Each job adds its file and field names."""
    d = ml_collections.ConfigDict()
    d.data_dir = ""  # TFDS data_dir for tfds:NAME; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    d.answer_field = "answer"  # "" = no grading
    d.max_prompt_tokens = max_prompt_tokens  # a longer rendered prompt is an error naming the record, never cut
    return d


def checkpoint_section(keep: int = 3) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.directory = ""  # "" = workdir/checkpoints; any path orbax can write (gs://... on a pod)
    c.every = 50  # steps; 0 = only at the end (and on SIGTERM)
    c.keep = keep
    c.async_save = True
    c.export_hf = True  # the final trained model as a Hugging Face checkpoint in workdir/student_hf
    return c


def metrics_section() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.tensorboard = True
    m.progress = True  # progress bar with tokens/s and ETA
    return m
