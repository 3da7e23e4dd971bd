"""The README's main command (launch/tpu_run.py with configs/smoke.py) works end to end."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_job_sharded_in_process(tmp_path):
    import importlib.util

    from opdjax import smoke

    spec = importlib.util.spec_from_file_location("smoke_config", os.path.join(ROOT, "configs", "smoke.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.workdir = str(tmp_path)
    config.mesh.shape = (2, 2, 2)  # 8 simulated devices: params and batch really sharded
    config.max_new_tokens = 8
    result = smoke.run(config)
    assert result["kv_cache_matches_full_forward"] and result["new_tokens"] > 0
    assert result["rows"] == 4  # 3 prompts padded to the 4 batch shards; outputs only for the 3
    assert len(result["outputs"]) == 3


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_entry_point_cli_with_overrides(tmp_path):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.join(ROOT, "launch", "tpu_run.py"), "--config",
           os.path.join(ROOT, "configs", "smoke.py"), f"--config.workdir={tmp_path}",
           "--config.max_new_tokens=5"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "smoke OK" in proc.stdout
    with open(tmp_path / "smoke.json") as f:
        assert json.load(f)["rows"] == 3

    bad = subprocess.run(cmd[:4] + ["--config.mesh.shape=(2,2,2)", f"--config.workdir={tmp_path}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    assert bad.returncode != 0
    assert "mesh.shape=(2, 2, 2)" in bad.stderr and "needs 8 devices but 1" in bad.stderr
