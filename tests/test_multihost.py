"""Multi-host: the same code under jax.distributed.initialize(), on this CPU.

Two processes with 4 CPU devices each join one JAX job over localhost (coordinator on a free
127.0.0.1 port, gloo TCP collectives) and run tests/multihost_worker.py: a (2,2,2) mesh over the
8 global devices, `hf_io.load_pretrained(plan=...)` (each process checks its addressable
shards against the checkpoint), the sharded forward on a batch both hold (`put_global_batch`),
logits gathered with `process_allgather` and checked against transformers and the
single-process forward, then `save_pretrained` from both processes (process 0 writes). Here
we check what they wrote: transformers loads it and reproduces the logits.
"""
import os
import socket
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from hf_oracle import hf_logits, make_hf_model
from opdjax.models import hf_io, qwen

pytestmark = pytest.mark.integration  # jax.distributed across processes: the second CI stage

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
NUM_PROCESSES = 2
DEADLINE_S = 90  # for both workers together; they take ~10-20 s on 2 cores
TOL = 1e-4


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy")  # gRPC to 127.0.0.1 must not go through a proxy
           and not k.startswith(("JAX_", "XLA_", "TPU_", "OPDJAX_"))}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4 "
                  "--xla_cpu_collective_call_terminate_timeout_seconds=5",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


def _run_workers(workdir) -> list[str]:
    """Run the workers to completion; on any failure kill both and fail with both logs."""
    port = _free_port()
    logs = [workdir / f"worker{i}.log" for i in range(NUM_PROCESSES)]
    procs = []

    def read_logs():
        return [p.read_text() if p.exists() else "" for p in logs]

    def fail(why):
        text = "\n".join(f"----- worker {i} (rc={p.returncode}) stdout+stderr -----\n{t}"
                         for i, (p, t) in enumerate(zip(procs, read_logs())))
        pytest.fail(f"{why}\n{text}", pytrace=False)

    try:
        for i in range(NUM_PROCESSES):
            with open(logs[i], "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, WORKER, str(i), str(port), str(workdir)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=_worker_env(), cwd=str(workdir)))
        deadline = time.monotonic() + DEADLINE_S
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                fail("a worker failed (the other was killed)")
            if time.monotonic() > deadline:
                fail(f"workers still running after {DEADLINE_S} s (killed)")
            time.sleep(0.05)
        if any(p.returncode != 0 for p in procs):
            fail("a worker failed")
        return read_logs()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            try:
                p.communicate(timeout=10)  # reap
            except subprocess.TimeoutExpired:
                pass


def _batch(vocab):
    rs = np.random.RandomState(0)
    toks = rs.randint(3, vocab, (4, 16))  # 4 rows: one per (data, fsdp) shard
    mask = np.ones(toks.shape, bool)
    mask[1, :5] = False  # left-padded row
    mask[2, 11:] = False  # right-padded row
    toks[~mask] = 0
    return toks, mask


def _hf_rows(model, toks, mask):
    """transformers logits of each row without its padding, placed at the row's real positions."""
    out = np.zeros(toks.shape + (model.config.vocab_size,), np.float32)
    for i in range(len(toks)):
        out[i, mask[i]] = hf_logits(model, toks[i:i + 1, mask[i]])[0]
    return out


@pytest.mark.timeout(150)
def test_load_forward_save_under_jax_distributed(tmp_path):
    # Sizes every mesh axis (2 each) divides: 4 heads / 2 KV heads / mlp 96 / vocab 128 on
    # tensor, hidden 64 on fsdp, batch 4 on data x fsdp.
    model = make_hf_model("qwen3", hidden=64, layers=2, heads=4, kv_heads=2, inter=96, vocab=128,
                          bias=True)
    model.save_pretrained(tmp_path / "hf")
    toks, mask = _batch(128)
    ref_hf = _hf_rows(model, toks, mask)

    # single-process reference (this process), and the checkpoint's tensors in our layout
    params, cfg = hf_io.load_pretrained(str(tmp_path / "hf"))
    single = np.asarray(qwen.jit_forward(cfg)(params, jnp.asarray(toks), jnp.asarray(mask)))
    assert np.abs(single[mask] - ref_hf[mask]).max() <= TOL
    flat = {}
    for name, sub in params.items():
        for k, v in (sub.items() if isinstance(sub, dict) else [(None, sub)]):
            flat["param/" + (name if k is None else f"{name}/{k}")] = np.asarray(v)
    np.savez(tmp_path / "ref.npz", tokens=toks, mask=mask, hf_logits=ref_hf, single_logits=single, **flat)

    t0 = time.monotonic()
    logs = _run_workers(tmp_path)
    elapsed = time.monotonic() - t0
    print(f"workers took {elapsed:.1f} s\n" + "\n".join(logs))
    for i, log in enumerate(logs):  # each worker got through both layouts and the export
        assert log.count("shards match the checkpoint") == 2 and "save_pretrained done; ok" in log, log

    # both processes gathered the same global logits, which match transformers
    gathered = [np.load(tmp_path / f"logits{i}.npy") for i in range(NUM_PROCESSES)]
    np.testing.assert_array_equal(gathered[0], gathered[1])
    assert np.abs(gathered[0][mask] - ref_hf[mask]).max() <= TOL

    # the multi-host export: one writer, transformers loads it and reproduces the logits
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    written = load_file(str(out / "model.safetensors"))
    original = {k: v.numpy() for k, v in model.state_dict().items()}
    assert sorted(written) == sorted(original)
    for k in original:  # gathered from 8 shards on 2 processes, bit for bit
        np.testing.assert_array_equal(written[k], original[k], err_msg=k)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    again = _hf_rows(reloaded, toks, mask)
    assert np.abs(again[mask] - gathered[0][mask]).max() <= TOL


@pytest.mark.timeout(120)
def test_boundary_functions_across_two_processes(tmp_path):
    """opdjax/multihost.py on a real 2-process job: whole arrays gathered, each process's own rows
    (disjoint, covering the batch), global arrays built from those rows, Python objects gathered,
    host work split with an error on one process raised on both, config agreement."""
    import pod
    logs = pod.start([str(tmp_path)], tmp_path, script=os.path.join(os.path.dirname(__file__),
                                                                    "boundary_worker.py")).wait()
    assert all("boundary checks ok" in log for log in logs)
    a, b = np.load(tmp_path / "process0.npz"), np.load(tmp_path / "process1.npz")
    np.testing.assert_array_equal(a["gathered"], b["gathered"])
    assert sorted(a["mine"].tolist() + b["mine"].tolist()) == list(range(8))
