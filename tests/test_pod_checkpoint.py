"""Checkpoints on a pod: `launch/tpu_run.py` (or a small worker) as a 2-process JAX job (2 x 4
simulated CPU devices, gloo over loopback; see tests/pod.py), with one checkpoint directory that
both processes write.

- A damaged latest step: both processes verify it, agree that it is lost, resume together from
  the newest intact one and finish; a step that only ONE process cannot read (its shards are
  overwritten: damage no index shows) makes both fall back together instead of leaving one
  waiting in a collective.
- A checkpoint directory the processes do not share (a relative path, different working
  directories) is refused at start-up, on every process, naming the processes and the fix.
- SIGTERM on one worker only (a TPU preemption notice reaches one host): every worker saves the
  same step and exits 0, through JAX's preemption service (on by default) and through the
  guard's own fallback (the flag OR-ed across processes each step) when the service is off; a
  resumed run continues from that step.

Tiny batches and 16-token rollouts: each 2-process run takes 15-35 s on a 2-core CPU.
"""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import pod

pytestmark = pytest.mark.integration  # multi-process pod jobs: the second CI stage (tests/pytest.ini)

OPD = [f"--config={pod.ROOT / 'configs' / 'opd_demo.py'}", "--config.job=opd", "--config.mesh.shape=(2,2,2)",
       "--config.batch.prompts_per_step=4", "--config.rollout.samples_per_prompt=2",
       "--config.rollout.max_new_tokens=16", "--config.eval.num_problems=0", "--config.eval.before=False",
       "--config.metrics.pictures_every=0", "--config.metrics.tensorboard=False"]
SAVED = re.compile(r"opdjax\.train\.loop: (.+?): saved the checkpoint at step (\d+); exiting cleanly")


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _train_steps(workdir):
    return [r["step"] for r in _records(workdir) if "loss/total" in r]


def _largest_file(directory):
    found = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
    return max(found, key=os.path.getsize)


# ----------------------------------------------------------------------------- damaged checkpoints

@pytest.mark.timeout(300)
def test_pod_resumes_from_the_newest_intact_step_when_the_latest_is_damaged(tmp_path):
    run = tmp_path / "run"
    args = OPD + [f"--config.workdir={run}", "--config.checkpoint.every=1", "--config.checkpoint.keep=10"]
    t0 = time.monotonic()
    pod.run(args + ["--config.train.steps=3"], tmp_path / "first")
    first_s = time.monotonic() - t0
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["1", "2", "3"]
    damaged = _largest_file(ckpts / "3")
    with open(damaged, "r+b") as f:
        f.truncate(os.path.getsize(damaged) // 3)

    t0 = time.monotonic()
    logs = pod.run(args + ["--config.train.steps=5"], tmp_path / "resumed")
    print(f"2-process runs: first {first_s:.1f} s, resumed {time.monotonic() - t0:.1f} s")
    for log in logs:
        assert "checkpoint step 3 in" in log and "is damaged" in log and os.path.basename(damaged) in log, log[-3000:]
        assert "resuming from checkpoint step 2, the newest intact one" in log, log[-3000:]
        assert f"resumed from {ckpts} at step 2" in log, log[-3000:]
        assert "Event loop is closed" not in log and "Traceback" not in log
    # process 0 wrote the metrics: steps 1-2 from the first run, 3-5 retrained, none twice
    assert _train_steps(run) == [1, 2, 3, 4, 5]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["start_step"] == 2 and summary["final_step"] == 5
    # the damaged step was set aside and saved again by the resumed run, from both processes
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["1", "2", "3", "3.damaged", "4", "5"]
    assert (ckpts / "OPDJAX_CHECKPOINTS_RUN").exists()  # the shared-directory check ran, and passed
    assert sorted(p.name for p in (ckpts / "3" / "state").glob("ocdbt.process_*")) == ["ocdbt.process_0",
                                                                                      "ocdbt.process_1"]


WORKER = textwrap.dedent("""
    # A 2-process checkpoint round trip without a model: `save DIR` writes steps 1 and 2 of an
    # array sharded over all 8 devices (each process writes its own half into ocdbt.process_<i>);
    # `restore DIR` resumes with restore_latest and checks its own shards.
    import logging, sys
    sys.path.insert(0, sys.argv[3])
    from opdjax import sharding
    sharding.maybe_initialize_distributed()
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from opdjax.train.checkpoint import Checkpointer

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    mode, directory = sys.argv[1], sys.argv[2]
    mesh = jax.make_mesh((8,), ("x",))
    rows, replicated = NamedSharding(mesh, P("x")), NamedSharding(mesh, P())

    def full(step):
        return np.random.default_rng(step).standard_normal((64, 512)).astype(np.float32)

    def state(step):
        w = full(step)
        return {"w": jax.make_array_from_callback(w.shape, rows, lambda i: w[i]),
                "step": jax.make_array_from_callback((), replicated, lambda i: np.int32(step))}

    if mode == "save":
        with Checkpointer(directory, keep=10, async_save=False) as ckpt:
            for s in (1, 2):
                ckpt.save(s, state(s), {"step": s})
        print("SAVED", flush=True)
    else:
        abstract = {"w": jax.ShapeDtypeStruct((64, 512), np.float32, sharding=rows),
                    "step": jax.ShapeDtypeStruct((), np.int32, sharding=replicated)}
        with Checkpointer(directory, keep=10) as ckpt:
            step, got, meta = ckpt.restore_latest(abstract)
            ok = all(np.array_equal(np.asarray(s.data), full(step)[s.index]) for s in got["w"].addressable_shards)
            ok = ok and int(got["step"].addressable_data(0)) == step == meta["step"]
            print("RESTORED", step, ok, ckpt.all_steps(), flush=True)
""")


@pytest.mark.timeout(180)
def test_pod_processes_fall_back_together_when_only_one_cannot_read_a_step(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    d = tmp_path / "ckpt"
    pod.run(["save", d, pod.ROOT], tmp_path / "save", script=worker, timeout=120)
    # Overwrite process 1's data files of step 2 with zeros, sizes unchanged: the verification
    # (index + file sizes) passes, process 0 reads its shards fine, and only process 1's read fails,
    # inside orbax. Both must learn it and move on to step 1 together.
    shards = d / "2" / "state" / "ocdbt.process_1" / "d"
    assert any(shards.iterdir())
    for f in shards.iterdir():
        f.write_bytes(b"\0" * f.stat().st_size)
    logs = pod.run(["restore", d, pod.ROOT], tmp_path / "restore", script=worker, timeout=120)
    for log in logs:
        assert "RESTORED 1 True [1]" in log, log[-3000:]
        assert "checkpoint step 2 in" in log and "(process 1) reading its arrays failed" in log, log[-3000:]
        assert "resuming from checkpoint step 1" in log
        assert "Event loop is closed" not in log and "Traceback" not in log, log[-3000:]
    assert sorted(p.name for p in d.iterdir() if p.is_dir()) == ["1", "2.damaged"]


# ----------------------------------------------------------------------------- shared directory

@pytest.mark.timeout(180)
def test_pod_checkpoint_directory_not_shared_is_refused_on_every_process(tmp_path):
    # The same command on both workers (the launcher compares the configs), but a RELATIVE
    # checkpoint directory and a different working directory on each: two different directories.
    args = OPD + ["--config.workdir=run", "--config.checkpoint.directory=ckpt", "--config.train.steps=2"]
    port = pod.free_port()
    procs, logs = [], []
    for i in range(2):
        cwd = tmp_path / f"worker{i}"
        cwd.mkdir()
        env = pod.process_env(pod.DEVICES // 2, dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
        logs.append(tmp_path / f"process{i}.log")
        with open(logs[-1], "w") as f:
            procs.append(subprocess.Popen([sys.executable, str(pod.TPU_RUN), *args], stdout=f,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd))
    job = pod.Job(procs, logs, time.monotonic(), timeout=150)
    texts = job.wait(expect_ok=False)
    assert job.returncodes[0] != 0 and job.returncodes[1] != 0, job.describe()
    d0, d1 = tmp_path / "worker0" / "ckpt", tmp_path / "worker1" / "ckpt"
    for text in texts:
        line = [ln for ln in text.splitlines() if "CheckpointError" in ln]
        assert line, text[-3000:]
        msg = line[-1]
        assert "is not shared by the 2 processes of this job" in msg, msg
        assert f"process 0: {d0}; process 1: {d1}" in msg and "process 1 (no such directory)" in msg, msg
        assert "shared storage visible from every worker" in msg and "gs://" in msg and "NFS" in msg, msg
        assert "config.checkpoint.directory" in msg and "give an absolute one" in msg, msg
        assert "saved the checkpoint" not in text
    # stopped at start-up: process 0's directory holds only what the check wrote, process 1 has none
    assert sorted(p.name for p in d0.iterdir()) == ["OPDJAX_CHECKPOINTS", "OPDJAX_CHECKPOINTS_RUN"]
    assert not d1.exists()


# ----------------------------------------------------------------------------- SIGTERM on one worker

@pytest.mark.timeout(300)
@pytest.mark.parametrize("service", ["jax_preemption_service", "guard_fallback"])
def test_pod_sigterm_on_one_worker_saves_the_same_step_everywhere(tmp_path, service):
    run = tmp_path / "run"
    args = OPD + [f"--config.workdir={run}", "--config.checkpoint.every=1000", "--config.checkpoint.keep=3"]
    env = {"JAX_ENABLE_PREEMPTION_SERVICE": "false"} if service == "guard_fallback" else None
    job = pod.start(args + ["--config.train.steps=200"], tmp_path / "first", timeout=180, env=env)

    def two_steps_done(_):
        return (run / "metrics.jsonl").exists() and len(_train_steps(run)) >= 2

    job.wait(until=two_steps_done)
    job.signal(1, signal.SIGTERM)  # the preemption notice reaches one worker only
    t0 = time.monotonic()
    logs = job.wait()  # every process exits 0
    print(f"{service}: both stopped {time.monotonic() - t0:.1f} s after the SIGTERM")
    saved = [SAVED.findall(log) for log in logs]
    assert all(len(s) == 1 for s in saved), [log[-2000:] for log in logs]
    (why0, step0), (why1, step1) = saved[0][0], saved[1][0]
    assert step0 == step1, saved
    step = int(step0)
    if service == "jax_preemption_service":  # JAX's service owns SIGTERM and picks the step
        assert why0 == why1 == "preemption sync point", saved
    else:  # the guard's handler on process 1, the all-gathered flag on process 0
        assert (why0, why1) == ("another host", "SIGTERM"), saved
        assert "SIGTERM received" in logs[1] and "SIGTERM received" not in logs[0]
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == [str(step)]
    assert (ckpts / str(step) / "commit_success.txt").exists()
    assert _train_steps(run) == list(range(1, step + 1))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["preempted"] is True and summary["final_step"] == step
    if service == "guard_fallback":
        return
    # a resumed run (same command, more steps) continues from the preemption checkpoint
    logs = pod.run(args + [f"--config.train.steps={step + 2}"], tmp_path / "resumed", timeout=180)
    for log in logs:
        assert f"resumed from {ckpts} at step {step}" in log, log[-3000:]
    assert _train_steps(run) == list(range(1, step + 3))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["start_step"] == step and summary["final_step"] == step + 2 and summary["preempted"] is False
