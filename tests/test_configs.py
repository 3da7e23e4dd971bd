"""The shared config vocabulary (opdjax.schema), its one validator (opdjax.train.validate), and the
real-scale configs shrunk by `:runlocal` to a CPU check of their own job."""
import importlib.util
import os
import subprocess
import sys

import pytest

from opdjax import schema
from opdjax.dail.config import dail_config
from opdjax.train import validate
from opdjax.train.config import opd_config
from opdjax.train.validate import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPD_REAL = ("opd_qwen3_8b_to_1p7b_v5p", "opd_qwen3_8b_to_0p6b_v6e", "opd_qwen3_8b_to_0p6b_h100")
DAIL_REAL = ("dail_synthesize_qwen3_8b", "dail_synthesize_qwen2p5_7b", "dail_train_qwen3_8b", "dail_train_qwen2p5_7b")


def get_config(name, arg=None):
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_shared_sections_have_one_name_in_both_schemas():
    opd, dail = opd_config(), dail_config()
    for field in ("batch.microbatches", "loss.chunk_tokens", "data.max_prompt_tokens", "rollout.cache_dtype",
                  "rollout.max_new_tokens", "mesh.shape", "mesh.sharding_rules", "model.attention", "data.data_dir",
                  "checkpoint.keep", "metrics.progress", "optimizer.learning_rate"):
        section, name = field.split(".")
        assert name in opd[section] and name in dail[section], field
    for old, new in schema.MOVED.items():
        section, name = old.split(".")
        assert name not in dail[section], old
        assert new.split(".")[1] in dail[new.split(".")[0]], new


@pytest.mark.parametrize("old", sorted(schema.MOVED))
def test_a_moved_name_names_the_new_one(old):
    c = dail_config()
    section, name = old.split(".")
    c[section][name] = 1
    with pytest.raises(ConfigError, match=rf"^{old} moved to {schema.MOVED[old]}"):
        validate.check_unknown_fields(c, dail_config(), kind="a DAIL")


def test_a_moved_name_on_the_command_line():
    env = dict(os.environ, XLA_FLAGS="")
    proc = subprocess.run([sys.executable, "launch/tpu_run.py", "--config", "configs/dail_train_qwen3_8b.py",
                           "--config.train.microbatches=2"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "train.microbatches moved to batch.microbatches" in proc.stderr


@pytest.mark.parametrize("rules, message", [
    ((("embed",),), r"must be a \(logical name, mesh axes\) pair"),
    ((("embed", "model"),), r"names mesh axis 'model'"),
    (((3, "fsdp"),), r"must be a \(logical name, mesh axes\) pair"),
])
def test_sharding_rules_form(rules, message):
    c = opd_config().mesh
    c.sharding_rules = rules
    with pytest.raises(ConfigError, match=r"config\.mesh\.sharding_rules.*" + message):
        validate.check_mesh(c, num_devices=1)


def test_sharding_rules_default_and_custom():
    from opdjax.sharding import DEFAULT_RULES
    c = opd_config().mesh
    assert validate.check_mesh(c, num_devices=4) == (1, 4, 1)
    c.sharding_rules = tuple((n, None if n == "embed" else a) for n, a in DEFAULT_RULES)  # replicate embed
    assert validate.check_mesh(c, num_devices=4) == (1, 4, 1)


@pytest.mark.parametrize("name", OPD_REAL + DAIL_REAL)
def test_real_configs_build_and_reject_unknown_args(name):
    c = get_config(name)
    assert c.chip != "cpu" and not c.workdir.endswith("_runlocal")
    with pytest.raises(ValueError, match="runlocal"):
        get_config(name, "tiny")


@pytest.mark.parametrize("name", OPD_REAL)
def test_opd_runlocal_validates(name):
    c = get_config(name, "runlocal")
    assert c.chip == "cpu" and tuple(c.mesh.shape) == (1, -1, 1) and c.workdir.endswith("_runlocal")
    checked = validate.validate_config(c, num_devices=1)
    assert checked.rollout_rows <= 4


@pytest.mark.parametrize("name", DAIL_REAL)
def test_dail_runlocal_validates(name, tmp_path):
    c = get_config(name, "runlocal")
    assert c.chip == "cpu" and tuple(c.mesh.shape) == (1, -1, 1) and c.workdir.endswith("_runlocal")
    if c.job == "dail_train":
        c.train.traces = str(tmp_path / "traces.jsonl")  # the synthesis check's output, in a real run
        (tmp_path / "traces.jsonl").write_text("{}\n")
        validate.validate_dail_train(c, num_devices=1)
    else:
        validate.validate_dail_synthesis(c, num_devices=1)


def _run(config, workdir, timeout=120):
    """launch/tpu_run.py as a user runs it, on one CPU device."""
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "launch/tpu_run.py", "--config", config, f"--config.workdir={workdir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.integration
@pytest.mark.timeout(200)
def test_opd_runlocal_runs(tmp_path):
    _run("configs/opd_qwen3_8b_to_0p6b_h100.py:runlocal", tmp_path)
    assert (tmp_path / "summary.json").exists() and (tmp_path / "student_hf" / "config.json").exists()


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_dail_runlocal_runs(tmp_path):
    _run("configs/dail_synthesize_qwen3_8b.py:runlocal", tmp_path)
    _run("configs/dail_train_qwen3_8b.py:runlocal", tmp_path)
    assert (tmp_path / "traces.jsonl").exists() and (tmp_path / "adapter").is_dir()
