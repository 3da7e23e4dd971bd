"""Launch paths: the gcloud TPU script (syntax, dry-run commands, the remote command's quoting)
and the Colab notebook, executed on the CPU in its tiny mode."""
import json
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "gcloud_tpu.sh")
NOTEBOOK = os.path.join(ROOT, "launch", "colab_tpu_demo.ipynb")
ENV = {"PROJECT": "my-proj", "ZONE": "us-east5-a", "TPU_NAME": "opd-v5p", "ACCELERATOR_TYPE": "v5p-32"}


def dry_run(*args, **env):
    e = {k: v for k, v in os.environ.items() if k not in ENV and k not in ("RUNTIME_VERSION", "QR_NAME")}
    e.update(ENV, **env)
    proc = subprocess.run(["bash", SCRIPT, "--dry-run", "--run-name=r1", *args], env=e, capture_output=True,
                          text=True, timeout=30)
    return proc


def gcloud_lines(proc):
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if line.startswith("gcloud ")]


def test_scripts_parse():
    assert subprocess.run(["bash", "-n", SCRIPT], capture_output=True).returncode == 0
    assert os.access(SCRIPT, os.X_OK)
    head = open(SCRIPT).read().splitlines()[:30]
    assert "set -euo pipefail" in head


def test_create_plain_and_queued():
    (line,) = gcloud_lines(dry_run("create"))
    assert line == ("gcloud compute tpus tpu-vm create opd-v5p --zone=us-east5-a --project=my-proj "
                    "--accelerator-type=v5p-32 --version=v2-alpha-tpuv5")
    (line,) = gcloud_lines(dry_run("create", "--queued", "--spot", ACCELERATOR_TYPE="v6e-8"))
    assert line == ("gcloud alpha compute tpus queued-resources create opd-v5p-qr --node-id=opd-v5p "
                    "--zone=us-east5-a --project=my-proj --accelerator-type=v6e-8 "
                    "--runtime-version=v2-alpha-tpuv6e --spot")
    (line,) = gcloud_lines(dry_run("create", "--runtime-version=v2-alpha-tpuv5-lite", "--tpu-name=x",
                                   ACCELERATOR_TYPE="v5litepod-16"))
    assert "tpu-vm create x " in line and "--version=v2-alpha-tpuv5-lite" in line


def test_install_copies_checkout_and_pins_jax_tpu():
    scp, ssh = gcloud_lines(dry_run("install"))
    assert scp.startswith("gcloud compute tpus tpu-vm scp ") and scp.endswith(
        "opd-v5p:opdjax-src.tar.gz --zone=us-east5-a --project=my-proj --worker=all")
    args = shlex.split(ssh)
    assert args[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "opd-v5p"] and "--worker=all" in args
    remote = args[-1].removeprefix("--command=")
    assert "tar -xzf opdjax-src.tar.gz -C opdjax" in remote
    assert "-e '.[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html" in remote
    assert "uv venv --python 3.11 .venv" in remote  # TPU VM images ship Python 3.10
    (ssh,) = gcloud_lines(dry_run("install", "--repo-url=https://example.com/opdjax.git", "--branch=dev"))
    assert "git clone --branch dev https://example.com/opdjax.git opdjax" in ssh


def test_run_on_all_workers_with_per_worker_logs(tmp_path):
    overrides = ["--config", "configs/opd_qwen3_8b_to_1p7b_v5p.py", "--config.student.path=ckpt/Qwen3-1.7B",
                 "--config.data.system_prompt=Think. Then answer, it's \\boxed{x} $HOME"]
    (line,) = gcloud_lines(dry_run("run", *overrides))
    args = shlex.split(line)
    assert args[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "opd-v5p"] and "--worker=all" in args
    remote = args[-1].removeprefix("--command=")
    assert "LOG=logs/r1.worker$W.log" in remote and "tee $LOG" in remote
    # Execute the remote command here against a fake checkout: each override reaches
    # launch/tpu_run.py unchanged, whatever its quotes, and the log file is written.
    home = tmp_path / "home"
    fake = home / "opdjax" / ".venv" / "bin"
    fake.mkdir(parents=True)
    (fake / "python").write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    (fake / "python").chmod(0o755)
    env = dict(os.environ, HOME=str(home), PATH="/usr/bin:/bin")
    proc = subprocess.run(["bash", "-c", remote], cwd=home, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    logs = list((home / "opdjax" / "logs").glob("r1.worker*.log"))
    pids = list((home / "opdjax" / "logs").glob("r1.worker*.pid"))
    assert len(logs) == 1 and len(pids) == 1  # no metadata server here: the worker is named by hostname
    assert logs[0].read_text().splitlines() == ["launch/tpu_run.py", *overrides]

    (line,) = gcloud_lines(dry_run("run", "--detach", "--config", "c.py"))
    assert "(trap '' HUP;" in shlex.split(line)[-1] and "> $LOG 2>&1 < /dev/null &" in line
    assert dry_run("run").returncode == 2  # no --config


def test_logs_status_delete_exec():
    (line,) = gcloud_lines(dry_run("logs", "--worker=3", "--follow"))
    assert "--worker=3" in line and "tail -n 200 -f" in line and ".worker3.log" in line
    assert gcloud_lines(dry_run("status")) == [
        "gcloud compute tpus tpu-vm describe opd-v5p --zone=us-east5-a --project=my-proj"]
    assert gcloud_lines(dry_run("delete")) == [
        "gcloud compute tpus tpu-vm delete opd-v5p --zone=us-east5-a --project=my-proj --quiet"]
    assert gcloud_lines(dry_run("delete", "--queued")) == [
        "gcloud alpha compute tpus queued-resources delete opd-v5p-qr --zone=us-east5-a --project=my-proj "
        "--force --quiet"]
    (line,) = gcloud_lines(dry_run("exec", "nproc"))
    assert line.endswith("--worker=all --command=nproc")
    (line,) = gcloud_lines(dry_run("stop"))
    assert "kill $(cat $P)" in line


def test_missing_settings_and_unknown_command():
    e = {k: v for k, v in os.environ.items() if k not in ENV}
    proc = subprocess.run(["bash", SCRIPT, "--dry-run", "create"], env=e, capture_output=True, text=True)
    assert proc.returncode == 2 and "PROJECT is not set" in proc.stderr
    proc = dry_run("launch")
    assert proc.returncode == 2 and "unknown command 'launch'" in proc.stderr


@pytest.mark.integration
@pytest.mark.timeout(150)
def test_notebook_runs_tiny_on_cpu(tmp_path, monkeypatch):
    import nbclient
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    # A kernel spec naming this interpreter (the venv's), so the notebook runs where opdjax is installed.
    spec_dir = tmp_path / "kernels" / "opdjax-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "opdjax (test venv)", "language": "python"}))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    km = KernelManager(kernel_name="opdjax-test", kernel_spec_manager=ksm)

    workdir = tmp_path / "work"
    monkeypatch.setenv("OPDJAX_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("OPDJAX_NOTEBOOK_WORKDIR", str(workdir))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device, not the test suite's 8
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, km=km, timeout=120, resources={"metadata": {"path": os.path.join(ROOT, "launch")}})
    client.execute()

    out = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert sys.executable in out and "tiny=True" in out
    assert "opdjax already installed from" in out  # a checkout: no pip install
    assert "cpu 1" in out  # the device cell
    assert "OPD comparison done" in out and "--config.train.steps=2" in out
    for f in ("report.md", "report.html", "curves.png", "accuracy.png", "compare.json"):
        assert (workdir / f).exists(), f
