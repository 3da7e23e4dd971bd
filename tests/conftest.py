"""Test-wide setup: 8 simulated CPU devices (for the sharding tests) and fail-fast collectives.

Must run before JAX starts its backend, hence environment variables at import time.
XLA's CPU collectives can deadlock when several sharded calls are in flight; the terminate
timeout turns such a hang into an abort after ~5 s, and pytest-timeout bounds every test.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "xla_cpu_collective_call_terminate_timeout_seconds" not in _flags:
    _flags += " --xla_cpu_collective_call_terminate_timeout_seconds=5"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The shipped TFDS datasets (data.task=toy_arithmetic, the DAIL demo) are prepared once per test
# session here, never in the user's ~/tensorflow_datasets; subprocess jobs (pod tests) inherit it.
import tempfile  # noqa: E402

os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="opdjax-tests-tfds-")
# One persistent XLA compilation cache per test session (subprocess jobs inherit it; the pod tests'
# workers do not: tests/pod.py gives them a clean environment). The programs that
# _release_compiled_programs below drops are often compiled again by a later module or job (a run
# and its resume, one config at several step counts): those now load from disk. A hit runs the
# executable the compiler would have produced (the key covers the program, the devices and the
# compile options), so no test sees a different number. JAX_COMPILATION_CACHE_DIR="" turns it off.
_OWN_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_XLA_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="opdjax-tests-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module. Every XLA CPU executable keeps ~3.5
    memory mappings (its code, constants and data) while a cache holds it, and one pytest process
    compiles ~15,000 programs over the fast stage: kept, they pass the kernel's limit of 65,530
    mappings per process (vm.max_map_count), and the next compile segfaults inside XLA. Freed
    here, a module's programs unmap; a program another module needs again is recompiled."""
    yield
    jax.clear_caches()
    gc.collect()


def pytest_sessionfinish(session, exitstatus):
    """Remove the session's compilation cache (hundreds of MB after the integration stage)."""
    if _OWN_XLA_CACHE:
        import shutil
        shutil.rmtree(_OWN_XLA_CACHE, ignore_errors=True)
