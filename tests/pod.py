"""Run `launch/tpu_run.py` as a multi-process JAX job on this CPU, the way the workers of a TPU
slice run it (a helper for the tests, not a test module).

    job = start(["--config", "configs/opd_demo.py", "--config.train.steps=2"], tmp_path)  # 2 x 4 devices
    job.wait()                       # fails the test, with every process's log, on error or timeout
    one = run([...], tmp_path / "single", processes=1)                                    # 1 x 8 devices

Every process gets `JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID` (what `launch/gcloud_tpu.sh` arranges on a pod) and its share of the simulated
CPU devices; `opdjax.sharding.maybe_initialize_distributed` joins them over loopback (gloo).
XLA's collective terminate timeout turns a cross-process deadlock into an abort, and a process
that fails takes the others down with it (unless the test expects failures), so a broken job
fails in seconds, not at pytest's timeout.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TPU_RUN = ROOT / "launch" / "tpu_run.py"
DEVICES = 8  # global devices: 2 processes x 4, or 1 x 8 (the same mesh either way)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices: int, extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy")  # gRPC to 127.0.0.1 must not go through a proxy
           and not k.startswith(("JAX_", "XLA_", "TPU_", "OPDJAX_"))}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                  "--xla_cpu_collective_call_terminate_timeout_seconds=5",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        MPLBACKEND="Agg",
    )
    env.update(extra or {})
    return env


@dataclasses.dataclass
class Job:
    procs: list
    logs: list
    started: float
    timeout: float

    def read_logs(self) -> list[str]:
        return [p.read_text(errors="replace") if p.exists() else "" for p in self.logs]

    def describe(self) -> str:
        return "\n".join(f"----- process {i} (rc={p.returncode}) -----\n{_tail(t)}"
                         for i, (p, t) in enumerate(zip(self.procs, self.read_logs())))

    def signal(self, process: int, sig=signal.SIGTERM) -> None:
        self.procs[process].send_signal(sig)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def wait(self, *, expect_ok: bool = True, until=None) -> list[str]:
        """Wait for every process (or for `until(logs)` to become true: then the job is left
        running). expect_ok: any non-zero exit kills the rest and fails the test. Returns the logs."""
        try:
            while any(p.poll() is None for p in self.procs):
                if expect_ok and any(p.returncode not in (None, 0) for p in self.procs):
                    self.kill()
                    pytest.fail(f"a process failed (the others were killed)\n{self.describe()}", pytrace=False)
                if until is not None and until(self.read_logs()):
                    return self.read_logs()
                if time.monotonic() - self.started > self.timeout:
                    self.kill()
                    pytest.fail(f"still running after {self.timeout:.0f} s (killed)\n{self.describe()}",
                                pytrace=False)
                time.sleep(0.1)
        except BaseException:
            self.kill()
            raise
        if until is not None and not until(self.read_logs()):
            pytest.fail(f"the job ended before the awaited point\n{self.describe()}", pytrace=False)
        if expect_ok and any(p.returncode != 0 for p in self.procs):
            pytest.fail(f"a process failed\n{self.describe()}", pytrace=False)
        return self.read_logs()

    @property
    def returncodes(self) -> list:
        return [p.returncode for p in self.procs]


def start(args, logdir, *, processes: int = 2, timeout: float = 240, cwd=None, per_process_args=None,
          env: dict | None = None, script=TPU_RUN) -> Job:
    """Start `launch/tpu_run.py ARGS` (or another `script`) as `processes` processes sharing DEVICES
    simulated devices. per_process_args[i]: extra arguments for process i only. Logs go to
    logdir/process<i>.log."""
    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    devices = DEVICES // processes
    port = free_port()
    procs, logs = [], []
    for i in range(processes):
        extra = dict(env or {})
        if processes > 1:
            extra.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                         JAX_PROCESS_ID=str(i))
        log = logdir / f"process{i}.log"
        argv = [sys.executable, str(script), *map(str, args), *map(str, (per_process_args or {}).get(i, ()))]
        with open(log, "w") as f:
            procs.append(subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=process_env(devices, extra), cwd=str(cwd or ROOT)))
        logs.append(log)
    return Job(procs, logs, time.monotonic(), timeout)


def run(args, logdir, **kw) -> list[str]:
    """start(...).wait(): every process must exit 0; returns their logs."""
    return start(args, logdir, **kw).wait()


def _tail(text: str, lines: int = 60) -> str:
    keep = [ln for ln in text.splitlines() if "[Gloo]" not in ln]
    return "\n".join(keep[-lines:])
