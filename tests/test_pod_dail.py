"""The DAIL jobs as a pod runs them: `launch/tpu_run.py` started as a 2-process JAX job (2 x 4
simulated CPU devices, one (2,2,2) mesh over both, gloo over loopback), compared with the same job
run by one process on the same 8-device mesh.

One shrunk demo (job dail_demo: problem files, dail_synthesize, dail_train, dail_eval, report in a
row, each the function its own job runs) per process count is shared by the tests; then the
synthesis is resumed from a damaged output, and a training run is stopped by SIGTERM sent to one
worker and resumed, each as a 2-process job.

What "the same" means: the synthesised traces (sampled token ids, selection, fallback rates),
the pass@k tables and every other integer outcome are identical; the float training metrics may
differ by the order in which a cross-process all-reduce adds its terms. A sum of n float32 terms
in another order differs by at most about n * 2^-24 of the sum of their magnitudes; the largest
reductions here run over one step's response tokens (4 traces x at most 96 positions, < 512), and
both KL terms are sums of non-negative per-token terms, so RTOL = 512 * 2^-24 ~ 3e-5, with an
absolute floor for values near zero; a few AdamW updates carry such a difference forward.
Measured: <= 1.1e-7 relative.

Process 0 alone writes the shared files (problems, traces, metrics, curves, summaries, the
exported student and adapter, the pass@k reports, the demo report): every such file is logged by
the process that writes it, process 1 logs none, and the output folder holds exactly what a
1-process run writes. Orbax writes the checkpoint from both processes.
"""
import json
import os
import re
import signal
import time

import jax
import numpy as np
import pytest

import pod

pytestmark = pytest.mark.integration  # multi-process pod jobs: the second CI stage (tests/pytest.ini)
from opdjax.models import hf_io

RTOL, ATOL = 512 * 2.0 ** -24, 1e-7
STEPS = 12  # 8 traces at most (more than 4), 4 per step, 6 epochs
PROBLEMS = 8
TRAIN = ["--config.train.epochs=6", "--config.batch.sequences_per_step=4"]
DEMO = ["--config", "configs/dail_demo.py", "--config.mesh.shape=(2,2,2)", "--config.metrics.progress=False",
        f"--config.demo.num_problems={PROBLEMS}", "--config.demo.num_eval_problems=4",
        "--config.synthesis.num_samples=4", "--config.synthesis.problems_per_batch=8",
        "--config.eval.samples=4", "--config.eval.budgets=(64,)", "--config.eval.rows_per_call=16", *TRAIN]
NOT_COMPARED = ("time",)
NOT_COMPARED_PREFIX = ("timing/", "perf/")
# what process 0 logs for each shared file it writes (the other processes log none of them)
WRITER_LINE = re.compile(r"INFO opdjax\.[\w.]+: (wrote|writing) ")
DEMO_WRITES = ("wrote 8 trace record(s)", "wrote the synthesis summary",
               "writing metrics to", "wrote the Hugging Face checkpoint", "wrote the LoRA adapter",
               "wrote the training summary", "wrote the pass@k reports", "wrote the demo report")


def _run(args, logdir, processes):
    t0 = time.monotonic()
    logs = pod.run(args, logdir, processes=processes)
    seconds = time.monotonic() - t0
    print(f"{processes}-process run {' '.join(a for a in args if 'job' in a) or 'dail_demo'}: {seconds:.1f} s")
    return logs, seconds


def _demo(tmp_path_factory, name, processes):
    d = tmp_path_factory.mktemp(name)
    logs, seconds = _run(DEMO + [f"--config.workdir={d / 'run'}"], d, processes)
    return {"dir": d / "run", "logs": logs, "seconds": seconds}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _demo(tmp_path_factory, "dail_single", 1)


@pytest.fixture(scope="module")
def double(tmp_path_factory):
    return _demo(tmp_path_factory, "dail_double", 2)


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _traces(run):
    """The trace records, with `record` (the problem file's path, which names the workdir) cut to its
    file name and line."""
    return [dict(r, record=os.path.basename(r["record"])) for r in _jsonl(os.path.join(run, "traces.jsonl"))]


def assert_same_losses(got_dir, want_dir, steps=range(1, STEPS + 1)):
    got, want = _jsonl(os.path.join(got_dir, "metrics.jsonl")), _jsonl(os.path.join(want_dir, "metrics.jsonl"))
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(steps)  # none lost, none twice
    worst = 0.0
    for a, b in zip(got, want):
        keys = sorted(k for k in b if k not in NOT_COMPARED and not k.startswith(NOT_COMPARED_PREFIX))
        assert keys == sorted(k for k in a if k not in NOT_COMPARED and not k.startswith(NOT_COMPARED_PREFIX))
        assert {"loss/total", "loss/kl_positive", "loss/kl_negative", "loss/grad_norm"} <= set(keys)
        for k in keys:
            np.testing.assert_allclose(a[k], b[k], rtol=RTOL, atol=ATOL, err_msg=f"step {b['step']} {k}")
            if b[k]:
                worst = max(worst, abs(a[k] - b[k]) / abs(b[k]))
    print(f"largest relative difference of a training metric: {worst:.2e}")


def assert_same_student(got_dir, want_dir):
    for sub in ("student_hf",):
        a, _ = hf_io.load_pretrained(os.path.join(got_dir, sub))
        b, _ = hf_io.load_pretrained(os.path.join(want_dir, sub))
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL, err_msg=str(path))


def assert_written_by_process_0_only(logs, expected=()):
    for line in expected:
        assert line in logs[0], line
    for log in logs[1:]:
        wrote = [line for line in log.splitlines() if WRITER_LINE.search(line)]
        assert not wrote, wrote


@pytest.mark.timeout(420)  # the two shared demo runs start here
def test_demo_as_two_processes_equals_one_process(single, double):
    one, two = single["dir"], double["dir"]
    # synthesis: the same traces, record for record, each problem once
    traces = _traces(two)
    assert traces == _traces(one)
    assert [r["id"] for r in traces] == [f"toy-train-0-{i}" for i in range(PROBLEMS)]
    assert sum(r["trace_ids"] is not None for r in traces) > PROBLEMS // 2
    skip = ("wall_s", "tokens_per_s", "output")
    s1, s2 = (json.loads((d / "synthesis_summary.json").read_text()) for d in (one, two))
    assert {k: v for k, v in s2.items() if k not in skip} == {k: v for k, v in s1.items() if k not in skip}
    # training: the same losses at every step, the same exported student
    assert_same_losses(two, one)
    assert_same_student(two, one)
    t1, t2 = (json.loads((d / "train_summary.json").read_text()) for d in (one, two))
    assert t2["final_step"] == t1["final_step"] == t2["steps"] == STEPS and not t2["preempted"]
    for k in ("first", "last"):
        for m, v in t1[k].items():
            np.testing.assert_allclose(t2[k][m], v, rtol=RTOL, atol=ATOL)
    # evaluation: the same pass@k of both models (same keys, same rows, identical samples)
    p1, p2 = (json.loads((d / "eval" / "passk.json").read_text()) for d in (one, two))
    assert set(p2["models"]) == set(p1["models"]) == {"base", "trained"}
    for name in p1["models"]:
        e1, e2 = p1["models"][name]["64"], p2["models"][name]["64"]
        for k in ("pass_at_k", "correct_counts", "accuracy", "mean_thinking_tokens", "mean_total_tokens",
                  "forced_share", "example"):
            assert e2[k] == e1[k], (name, k)
    assert 0 < p1["models"]["base"]["64"]["forced_share"] < 1  # both the budget and the forced paths ran
    # process 0 alone wrote the shared files: it logs each, process 1 none, and the run folder
    # holds exactly what the 1-process run wrote (no per-process copies)
    assert_written_by_process_0_only(double["logs"], DEMO_WRITES)
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))
    # the problems came from the shipped TFDS dataset (process 0 prepared it once), not files here
    assert not (two / "problems.jsonl").exists()
    demo = json.loads((two / "demo_summary.json").read_text())
    assert demo["training"]["steps"] == STEPS and "pass@k" in (two / "report.md").read_text()
    state = two / "checkpoints" / str(STEPS) / "state"
    assert sorted(p.name for p in state.glob("ocdbt.process_*")) == ["ocdbt.process_0", "ocdbt.process_1"]
    print(f"demo: 1 process {single['seconds']:.1f} s, 2 processes {double['seconds']:.1f} s")


@pytest.mark.timeout(300)
def test_synthesis_resumed_as_two_processes_redoes_only_what_is_missing(double, tmp_path):
    """A killed synthesis left its output short of two problems and with a torn last line: the
    2-process re-run reads it on both processes, agrees on what is done, and process 0 alone cuts
    the torn line and appends exactly the missing records."""
    src = double["dir"]
    out = tmp_path / "traces.jsonl"
    lines = (src / "traces.jsonl").read_text().splitlines(keepends=True)
    drop = {"toy-train-0-2", "toy-train-0-5"}
    keep = [line for line in lines if json.loads(line)["id"] not in drop]
    out.write_text("".join(keep) + lines[2][: len(lines[2]) // 2])
    args = ["--config", "configs/dail_demo.py", "--config.job=dail_synthesize", "--config.mesh.shape=(2,2,2)",
            "--config.metrics.progress=False", "--config.synthesis.num_samples=4",
            "--config.synthesis.problems_per_batch=8", "--config.data.problems=tfds:opdjax_dail_toy/seed0",
            f"--config.data.split=train[:{PROBLEMS}]",
            f"--config.synthesis.output={out}", f"--config.workdir={tmp_path / 'work'}"]
    logs, _ = _run(args, tmp_path / "logs", 2)
    got = _jsonl(out)
    assert [r["id"] for r in got[:len(keep)]] == [json.loads(line)["id"] for line in keep]  # untouched
    assert sorted(r["id"] for r in got[len(keep):]) == sorted(drop)  # only the missing ones, once
    assert sorted(got, key=lambda r: r["id"]) == sorted(_jsonl(src / "traces.jsonl"), key=lambda r: r["id"])
    summary = json.loads((tmp_path / "work" / "synthesis_summary.json").read_text())
    assert summary["already_done"] == PROBLEMS - 2 and summary["processed"] == 2
    assert "dropping a torn last line" in logs[0] and "dropping a torn last line" not in logs[1]
    assert_written_by_process_0_only(logs, ("wrote 2 trace record(s)", "wrote the synthesis summary"))


@pytest.mark.timeout(420)
def test_training_sigterm_to_one_worker_saves_on_both_and_resumes(single, tmp_path):
    """SIGTERM to process 1 only (one preempted VM): JAX's preemption service makes both processes
    stop at the same step, save it, skip the export and exit 0; the re-run resumes there and ends
    with the losses of the uninterrupted (1-process) run."""
    run = tmp_path / "run"
    args = ["--config", "configs/dail_demo.py", "--config.job=dail_train", "--config.mesh.shape=(2,2,2)",
            "--config.metrics.progress=False", f"--config.train.traces={single['dir'] / 'traces.jsonl'}",
            "--config.checkpoint.every=2", f"--config.workdir={run}", *TRAIN]
    t0 = time.monotonic()
    job = pod.start(args, tmp_path / "first")
    job.wait(until=lambda _: (run / "checkpoints" / "2").is_dir())  # in the loop, step 2 saved
    job.signal(1, signal.SIGTERM)
    logs = job.wait()
    print(f"2-process dail_train stopped by SIGTERM: {time.monotonic() - t0:.1f} s")
    assert job.returncodes == [0, 0]
    saved = [re.findall(r"saved the checkpoint at step (\d+); exiting cleanly", log) for log in logs]
    assert saved[0] and saved[0] == saved[1], saved  # the same step on both processes
    stop = int(saved[0][0])
    assert 2 < stop < STEPS
    assert (run / "checkpoints" / str(stop) / "state").is_dir()
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["preempted"] and summary["final_step"] == stop and "exported" not in summary
    assert not (run / "student_hf").exists() and not (run / "adapter").exists()  # no export when preempted
    assert [r["step"] for r in _jsonl(run / "metrics.jsonl")] == list(range(1, stop + 1))
    assert_written_by_process_0_only(logs, ("writing metrics to", "wrote the training summary"))

    logs, _ = _run(args, tmp_path / "second", 2)
    for log in logs:
        assert f"at step {stop}" in log and "resumed from" in log, log[-2000:]
    assert_same_losses(run, single["dir"])  # none lost or doubled across the stop; same values
    assert_same_student(run, single["dir"])
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["start_step"] == stop and summary["final_step"] == STEPS and not summary["preempted"]
    assert_written_by_process_0_only(logs, ("wrote the Hugging Face checkpoint", "wrote the LoRA adapter",
                                            "wrote the training summary"))
