"""The OPD-side jobs as a pod runs them: `launch/tpu_run.py` started as a 2-process JAX job (2 x 4
simulated CPU devices, one (2,2,2) mesh over both, gloo over loopback), each compared with the
same job run by one process on the same 8-device mesh.

What "the same" means: the sampled tokens, sentence splits and release decisions are identical
(integers, so any difference would change later numbers by far more than rounding); the float
metrics may differ by the order in which a cross-process all-reduce adds its terms. A sum of n
float32 terms in another order differs by at most about n * 2^-24 of the sum of their magnitudes;
the largest reductions here run over one batch's response tokens (8 rows x 64 columns = 512), and
a few updates carry such a difference forward, so RTOL = 512 * 2^-24 ~ 3e-5 with an absolute
floor for values near zero. Measured: ~1e-7 relative.

Process 0 alone writes the shared files (metrics, pictures, reports, the exported student);
orbax writes the checkpoint from both processes.
"""
import json
import os
import signal
import time

import jax
import numpy as np
import pytest

import pod

pytestmark = pytest.mark.integration  # multi-process pod jobs: the second CI stage (tests/pytest.ini)
from opdjax.models import hf_io

RTOL, ATOL = 512 * 2.0 ** -24, 1e-6
NOT_COMPARED = ("time",)  # wall clock
NOT_COMPARED_PREFIX = ("timing/", "perf/", "eval/seconds")

OPD = ["--config", "configs/opd_demo.py", "--config.job=opd", "--config.mesh.shape=(2,2,2)",
       "--config.train.steps=4", "--config.batch.prompts_per_step=4", "--config.rollout.samples_per_prompt=2",
       "--config.rollout.max_new_tokens=64", "--config.eval.num_problems=4", "--config.eval.samples=2",
       "--config.eval.k=(1,2)", "--config.eval.max_new_tokens=64", "--config.eval.every=2",
       "--config.eval.before=False", "--config.checkpoint.every=2", "--config.checkpoint.keep=5",
       "--config.metrics.pictures_every=2", "--config.metrics.pictures_per_step=2",
       "--config.data.num_train=8", "--config.data.trace_reads=True"]  # 4 steps x 4 prompts = 2 epochs


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _by_step(records):
    """step -> merged record (a step's train record and its eval record share the step)."""
    out = {}
    for r in records:
        out.setdefault(r["step"], {}).update(r)
    return out


def assert_same_metrics(got_dir, want_dir):
    got, want = _records(got_dir), _records(want_dir)
    steps = [r["step"] for r in got]
    assert steps == [r["step"] for r in want], (steps, [r["step"] for r in want])  # none lost, none twice
    got, want = _by_step(got), _by_step(want)
    compared = 0
    for step in want:
        keys = [k for k in want[step] if k not in NOT_COMPARED and not k.startswith(NOT_COMPARED_PREFIX)]
        assert sorted(keys) == sorted(k for k in got[step] if k not in NOT_COMPARED
                                      and not k.startswith(NOT_COMPARED_PREFIX)), step
        for k in keys:
            a, b = got[step][k], want[step][k]
            if a is None or b is None:
                assert a is None and b is None, (step, k, a, b)
                continue
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=f"step {step} {k}")
            compared += 1
    assert compared > 50 * len(want) // 2  # the comparison really covered the records


def assert_same_student(got_dir, want_dir):
    a, _ = hf_io.load_pretrained(os.path.join(got_dir, "student_hf"))
    b, _ = hf_io.load_pretrained(os.path.join(want_dir, "student_hf"))
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL, err_msg=str(path))


WRITES = ("writing metrics to", "wrote the release pictures", "wrote the Hugging Face checkpoint",
          "wrote the run summary", "report:")


def assert_written_by_process_0_only(logs, workdir):
    """Every shared file is logged by the process that writes it: process 0 logs them, process 1
    none; and process 1 made no output folder of its own."""
    for name in os.listdir(workdir):
        assert not name.startswith("process"), name
    assert "writing metrics to" in logs[0]
    for line in logs[1].splitlines():
        assert not any(w in line for w in WRITES), line


@pytest.fixture(scope="module")
def single_opd(tmp_path_factory):
    d = tmp_path_factory.mktemp("single_opd")
    pod.run(OPD + [f"--config.workdir={d / 'run'}"], d, processes=1)
    return d / "run"


@pytest.mark.timeout(420)
def test_opd_as_two_processes_killed_and_resumed_equals_one_process(single_opd, tmp_path):
    run = tmp_path / "run"
    args = OPD + [f"--config.workdir={run}"]
    job = pod.start(args, tmp_path / "first")

    def after_checkpoint_2(_):  # step 3 is under way and checkpoint 2 is final (orbax renamed it)
        steps = [r["step"] for r in _records(run) if "loss/total" in r] if (run / "metrics.jsonl").exists() else []
        return max(steps, default=0) >= 3 and (run / "checkpoints" / "2").is_dir()

    job.wait(until=after_checkpoint_2)
    for i in range(2):
        job.signal(i, signal.SIGKILL)  # both workers lost at once: a preempted slice
    job.kill()
    assert (run / "metrics.jsonl").exists()

    t0 = time.monotonic()
    logs = pod.run(args, tmp_path / "resumed")
    print(f"resumed 2-process run: {time.monotonic() - t0:.1f} s")
    for log in logs:
        assert "resumed from" in log and "at step 2" in log, log[-2000:]
    assert_same_metrics(run, single_opd)
    assert_same_student(run, single_opd)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_step"] == 4 and summary["start_step"] == 2
    pics = sorted(os.listdir(run / "pictures"))
    assert pics == sorted(os.listdir(single_opd / "pictures")) == ["release_step0000002", "release_step0000004"]
    assert_written_by_process_0_only(logs, run)
    # orbax wrote the checkpoint from both processes into the one shared directory
    state = run / "checkpoints" / "4" / "state"
    assert sorted(p.name for p in state.glob("ocdbt.process_*")) == ["ocdbt.process_0", "ocdbt.process_1"]
    # Grain's iterator state, one file per process, and the data each process read
    data = run / "checkpoints" / "4" / "data"
    assert sorted(p.name for p in data.glob("process_*")) == ["process_0-of-2.json", "process_1-of-2.json"]
    assert_reads_cover_each_epoch_once(run, single_opd, processes=2, num_train=8, per_step=4, steps=4)


def _reads(run, process):
    """step -> (global batch, records read) from the process's data trace; a step read again
    after the resume replaces the killed run's read (the same records)."""
    out = {}
    for line in (run / "data_reads" / f"process_{process}.jsonl").read_text().splitlines():
        r = json.loads(line)
        assert out.get(r["step"], (r["batch"], r["read"])) == (r["batch"], r["read"])  # a resume reads the same
        out[r["step"]] = (r["batch"], r["read"])
    return out


def assert_reads_cover_each_epoch_once(run, single, *, processes, num_train, per_step, steps):
    """Every process saw the same global batches as one process did; the processes read disjoint
    shares of each batch (this mesh's rows split over the processes), together the whole batch;
    each epoch covers every prompt exactly once."""
    reads = [_reads(run, p) for p in range(processes)]
    alone = _reads(single, 0)
    assert sorted(alone) == list(range(steps))
    for step in range(steps):
        batch = alone[step][0]
        assert all(r[step][0] == batch for r in reads), step  # one global order, whatever the process count
        shares = [r[step][1] for r in reads]
        assert all(0 < len(s) < per_step for s in shares), shares  # each process reads only part of it
        assert sorted(sum(shares, [])) == sorted(batch), (step, shares)
    per_epoch = num_train // per_step
    for e in range(steps // per_epoch):
        served = sum((alone[s][0] for s in range(e * per_epoch, (e + 1) * per_epoch)), [])
        assert sorted(served) == list(range(num_train)), (e, served)


@pytest.mark.timeout(420)
def test_compare_job_as_two_processes_equals_one_process(tmp_path):
    args = ["--config", "configs/opd_demo.py", "--config.mesh.shape=(2,2,2)", "--config.train.steps=2",
            "--config.compare.arms=('bic','full')", "--config.batch.prompts_per_step=4",
            "--config.rollout.samples_per_prompt=2", "--config.rollout.max_new_tokens=64",
            "--config.eval.num_problems=4", "--config.eval.samples=2", "--config.eval.k=(1,2)",
            "--config.eval.max_new_tokens=64", "--config.eval.every=0", "--config.checkpoint.every=0",
            "--config.metrics.pictures_every=0",
            "--config.compare.diagnose_first=False"]  # the pod diagnosis has its own tests (test_diagnose_job)
    pod.run(args + [f"--config.workdir={tmp_path / 'one'}"], tmp_path / "one_logs", processes=1)
    logs = pod.run(args + [f"--config.workdir={tmp_path / 'two'}"], tmp_path / "two_logs")
    for arm in ("bic", "full"):
        assert_same_metrics(tmp_path / "two" / arm, tmp_path / "one" / arm)
    one = json.loads((tmp_path / "one" / "compare.json").read_text())
    two = json.loads((tmp_path / "two" / "compare.json").read_text())
    for arm in ("bic", "full"):
        for k in ("eval_after",):
            for m, v in one["arms"][arm][k].items():
                if m != "eval/seconds":
                    np.testing.assert_allclose(two["arms"][arm][k][m], v, rtol=RTOL, atol=ATOL, err_msg=f"{arm} {m}")
    assert (tmp_path / "two" / "report.md").exists()
    assert_written_by_process_0_only(logs, tmp_path / "two")


@pytest.mark.timeout(300)
def test_diagnose_and_smoke_as_two_processes_equal_one_process(tmp_path):
    args = ["--config", "configs/diagnose_toy_pair.py", "--config.mesh.shape=(2,2,2)",
            "--config.rollout.max_new_tokens=96", "--config.batch.prompts_per_step=4",
            "--config.diagnose.num_prompts=8", "--config.release.permutations=50"]
    pod.run(args + [f"--config.workdir={tmp_path / 'one'}"], tmp_path / "one_logs", processes=1)
    logs = pod.run(args + [f"--config.workdir={tmp_path / 'two'}"], tmp_path / "two_logs")
    one = json.loads((tmp_path / "one" / "diagnosis" / "diagnosis.json").read_text())
    two = json.loads((tmp_path / "two" / "diagnosis" / "diagnosis.json").read_text())
    one.pop("timings"), two.pop("timings")
    assert two == one  # rollouts, sentences and every statistic: identical
    with np.load(tmp_path / "one" / "diagnosis" / "arrays.npz") as a, \
            np.load(tmp_path / "two" / "diagnosis" / "arrays.npz") as b:
        assert a.files == b.files
        for k in a.files:
            np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    assert one["verdict"]["text"] in logs[1]  # every process returns the verdict process 0 computed

    smoke = ["--config", "configs/smoke.py", "--config.mesh.shape=(2,2,2)"]
    pod.run(smoke + [f"--config.workdir={tmp_path / 'smoke1'}"], tmp_path / "smoke1_logs", processes=1)
    logs = pod.run(smoke + [f"--config.workdir={tmp_path / 'smoke2'}"], tmp_path / "smoke2_logs")
    a = json.loads((tmp_path / "smoke1" / "smoke.json").read_text())
    b = json.loads((tmp_path / "smoke2" / "smoke.json").read_text())
    assert b["outputs"] == a["outputs"] and b["new_tokens"] == a["new_tokens"]
    assert all("smoke OK" in log for log in logs)


@pytest.mark.timeout(120)
def test_processes_with_different_configs_stop_naming_the_fields(tmp_path):
    job = pod.start(["--config", "configs/smoke.py", f"--config.workdir={tmp_path / 'w'}"], tmp_path,
                    per_process_args={1: ["--config.max_new_tokens=7"]})
    logs = job.wait(expect_ok=False)
    assert job.returncodes[0] != 0 and job.returncodes[1] != 0
    for log in logs:
        assert "were given different configs" in log and "config.max_new_tokens: process 0: 24, process 1: 7" in log
    assert not (tmp_path / "w" / "smoke.json").exists()  # stopped before any work


@pytest.mark.timeout(120)
def test_mesh_that_does_not_match_the_global_device_count(tmp_path):
    job = pod.start(["--config", "configs/smoke.py", "--config.mesh.shape=(1,4,1)",
                     f"--config.workdir={tmp_path / 'w'}"], tmp_path)
    logs = job.wait(expect_ok=False)
    for log in logs:
        assert "mesh.shape=(1, 4, 1)" in log and "8 are present" in log and "2 processes" in log, log[-2000:]
