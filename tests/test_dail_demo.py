"""The DAIL demo through the one entry point, shrunk: problems are written, synthesis, training
and evaluation run in a row on the shipped toy model, and the report names what each produced."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_dail_demo_runs_end_to_end_tiny(tmp_path):
    work = tmp_path / "demo"
    cmd = [sys.executable, "launch/tpu_run.py", "--config", "configs/dail_demo.py", f"--config.workdir={work}",
           "--config.demo.num_problems=6", "--config.demo.num_eval_problems=4", "--config.synthesis.num_samples=2",
           "--config.synthesis.problems_per_batch=3", "--config.train.epochs=1", "--config.batch.sequences_per_step=4",
           "--config.eval.samples=2", "--config.metrics.progress=False"]
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert out.returncode == 0, out.stderr[-3000:]
    traces = [json.loads(line) for line in open(work / "traces.jsonl")]
    assert [t["id"] for t in traces] == [f"toy-train-0-{i}" for i in range(6)]  # every problem, in order
    for t in traces:
        assert t["trace"] is None or 0.0 <= t["fallback_rate"] <= 1.0
    summary = json.load(open(work / "demo_summary.json"))
    passk = json.load(open(work / "eval" / "passk.json"))
    assert set(passk["models"]) >= {"base", "trained"}
    report = (work / "report.md").read_text()
    for section in ("Synthesis", "Contrastive training", "pass@k"):
        assert section in report
    assert os.path.isdir(work / "student_hf") and os.path.isdir(work / "adapter")
    assert summary["timings"]["total_s"] > 0
