"""Orbax checkpoints of the train state: bit-exact round trips across shardings, keep-N, async
saves, completeness (interrupted saves are ignored), meta JSON, clear errors, and a SIGTERM'd
training loop that checkpoints and exits 0. Small arrays; every result is blocked on (the CPU
collective deadlock trap, see ENVIRONMENT.md)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from opdjax.train.checkpoint import (COMMIT_FILE, MARKER_FILE, TMP_SUFFIX, CheckpointMismatchError, Checkpointer,
                                     NotACheckpointDirError, PreemptionGuard)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape), devices=jax.devices()[:int(np.prod(shape))])


def make_state(mesh=None, *, w_shape=(8, 4)):
    """A small train state: sharded params, an adamw state after one update, step, rng key data."""
    k = jax.random.key(0)
    params = {
        "embed": jax.random.normal(k, w_shape, jnp.float32),
        "layers": {"0": {"w": jnp.arange(16, dtype=jnp.float32).reshape(4, 4) / 7.0,
                         "scale": jnp.linspace(-1, 1, 4).astype(jnp.bfloat16)}},
    }
    if mesh is not None:
        specs = {"embed": P("fsdp", "tensor"), "layers": {"0": {"w": P("data", None), "scale": P()}}}
        params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.5, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    state = {"params": params, "opt_state": opt_state, "step": jnp.int32(7),
             "rng": jax.random.key_data(jax.random.fold_in(k, 3))}
    return jax.block_until_ready(state)


def abstract_on(state, sharding_fn):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(x)), state)


def assert_bit_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_round_trip_onto_other_shardings_is_bit_exact(tmp_path):
    mesh = make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    state = make_state(mesh)
    meta = {"data": {"epoch": 1, "position": 123}, "config": {"lr": 1e-2, "name": "demo"}, "wall_s": 12.5}
    ckpt = Checkpointer(tmp_path / "ckpt", keep=3)
    assert ckpt.save(7, state, meta)
    ckpt.wait()
    assert ckpt.latest_step() == 7 and ckpt.all_steps() == [7]

    # a different mesh and layout: everything over one 4-way axis where it divides, else replicated
    mesh2 = make_mesh((4,), ("x",))

    def other(x):
        return NamedSharding(mesh2, P("x") if x.ndim and x.shape[0] % 4 == 0 else P())

    restored, meta2 = ckpt.restore(7, abstract_on(state, other))
    assert_bit_equal(restored, state)
    assert meta2 == meta
    assert restored["params"]["embed"].sharding == NamedSharding(mesh2, P("x"))
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)  # namedtuples come back as such

    # and onto a single device
    dev = jax.devices()[3]
    restored1, _ = ckpt.restore(None, abstract_on(state, lambda x: SingleDeviceSharding(dev)))
    assert_bit_equal(restored1, state)
    assert all(leaf.sharding == SingleDeviceSharding(dev) for leaf in jax.tree.leaves(restored1))
    ckpt.close()


def test_keep_n_deletes_old_checkpoints(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path, keep=2, async_save=True) as ckpt:
        for s in (1, 2, 3, 4):
            assert ckpt.save(s, state, {"s": s})
        ckpt.wait()
        assert ckpt.all_steps() == [3, 4]
    names = sorted(os.listdir(tmp_path))
    assert names == ["3", "4", MARKER_FILE]


def test_async_save_then_wait_and_save_rules(tmp_path):
    state = make_state()
    ckpt = Checkpointer(tmp_path, keep=3, async_save=True)
    assert ckpt.save(10, state, {"a": 1})
    # save returned once the arrays were copied off the devices: a donating step may now reuse
    # the buffers (here: delete them) while the write goes on in the background
    expect = jax.tree.map(np.asarray, state)
    donated = jax.tree.map(lambda x: x.copy(), state)  # keep `state` for later saves
    ckpt.save(11, donated, {"a": 1})
    for leaf in jax.tree.leaves(donated):
        leaf.delete()
    ckpt.wait()
    assert ckpt.all_steps() == [10, 11]
    got, _ = ckpt.restore(11, abstract_on(state, lambda x: x.sharding))
    assert_bit_equal(got, expect)
    assert ckpt.latest_step() == 11
    assert os.path.exists(tmp_path / "10" / COMMIT_FILE)
    assert not any(TMP_SUFFIX in n for n in os.listdir(tmp_path))
    # same or older step: not saved unless forced; force replaces
    assert ckpt.save(10, state, {"a": 2}) is False
    assert ckpt.save(5, state, {"a": 2}) is False
    assert ckpt.all_steps() == [10, 11]
    assert ckpt.save(10, state, {"a": 3}, force=True)
    ckpt.wait()
    _, meta = ckpt.restore(10, abstract_on(state, lambda x: x.sharding))
    assert meta == {"a": 3}
    ckpt.close()
    ckpt.close()  # idempotent


def test_sync_save(tmp_path):
    state = make_state()
    ckpt = Checkpointer(tmp_path, keep=1, async_save=False)
    assert ckpt.save(1, state, {})
    assert ckpt.latest_step() == 1  # committed on return
    ckpt.close()


def test_latest_step_ignores_incomplete_checkpoints(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path, keep=5, async_save=False) as ckpt:
        ckpt.save(5, state, {"s": 5})
    # 1) what orbax leaves when a save is cut off: the tmp dir it writes into before the rename
    shutil.copytree(tmp_path / "5", tmp_path / f"7{TMP_SUFFIX}")
    os.remove(tmp_path / f"7{TMP_SUFFIX}" / COMMIT_FILE)
    # 2) a step dir without its finalization marker (commit-file mode on GCS, or a partial copy)
    shutil.copytree(tmp_path / "5", tmp_path / "9")
    os.remove(tmp_path / "9" / COMMIT_FILE)
    md_path = tmp_path / "9" / "_CHECKPOINT_METADATA"
    md = json.loads(md_path.read_text())
    md["commit_timestamp_nsecs"] = None
    md_path.write_text(json.dumps(md))

    ckpt = Checkpointer(tmp_path, keep=5)
    assert ckpt.latest_step() == 5
    assert ckpt.all_steps() == [5]
    # the leftovers do not block saving those steps again, and are cleaned up (orbax removes its
    # tmp dirs in the background, at the latest before the first save)
    assert ckpt.save(9, state, {"s": 9})
    ckpt.wait()
    assert not (tmp_path / f"7{TMP_SUFFIX}").exists()
    assert ckpt.all_steps() == [5, 9]
    _, meta = ckpt.restore(9, abstract_on(state, lambda x: x.sharding))
    assert meta == {"s": 9}
    ckpt.close()


def test_meta_json_round_trip(tmp_path):
    state = {"w": jnp.ones((2,)), "step": jnp.int32(1)}
    meta = {
        "data": {"epoch": 2, "position": 4096, "shuffle_seed": 17},
        "config": {"model": {"path": "/m", "layers": 2}, "k": [1, 4], "tags": ("a", "b")},
        "wall_time_s": 1234.5, "resumed": True, "note": None, "unicode": "δ→ok",
        "np_int": np.int64(3), "np_float": np.float32(0.25), "jax_scalar": jnp.int32(9),
    }
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, meta)
        ckpt.wait()
        _, got = ckpt.restore(1, abstract_on(state, lambda x: x.sharding))
    want = dict(meta, config={"model": {"path": "/m", "layers": 2}, "k": [1, 4], "tags": ["a", "b"]},
                np_int=3, np_float=0.25, jax_scalar=9)
    assert got == want
    with pytest.raises(TypeError, match="JSON"):
        Checkpointer(tmp_path / "other").save(1, state, {"bad": object()})


def test_mismatched_restore_names_the_key_and_shapes(tmp_path):
    state = make_state(w_shape=(8, 4))
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state, {})
        ckpt.wait()
        other = make_state(w_shape=(8, 6))
        with pytest.raises(CheckpointMismatchError) as e:
            ckpt.restore(3, abstract_on(other, lambda x: x.sharding))
        msg = str(e.value)
        assert "params/embed" in msg and "(8, 4)" in msg and "(8, 6)" in msg
        assert "different model/optimizer config" in msg and str(tmp_path) in msg
        # a missing / an extra leaf
        fewer = jax.tree.map(lambda x: x, state)
        del fewer["rng"]
        with pytest.raises(CheckpointMismatchError, match="'rng' is in the checkpoint"):
            ckpt.restore(3, abstract_on(fewer, lambda x: x.sharding))
        more = dict(state, extra=jnp.zeros((2,)))
        with pytest.raises(CheckpointMismatchError, match="'extra' is in the current state"):
            ckpt.restore(3, abstract_on(more, lambda x: x.sharding))
        # a dtype change (orbax would cast silently)
        f32_step = dict(state, step=jnp.float32(7))
        with pytest.raises(CheckpointMismatchError, match="'step' has dtype int32"):
            ckpt.restore(3, abstract_on(f32_step, lambda x: x.sharding))
        with pytest.raises(FileNotFoundError, match="step 4"):
            ckpt.restore(4, abstract_on(state, lambda x: x.sharding))


def test_foreign_directory_is_refused(tmp_path):
    d = tmp_path / "notckpt"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    with pytest.raises(NotACheckpointDirError, match="not an opdjax checkpoint directory"):
        Checkpointer(d)
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(NotACheckpointDirError, match="is a file"):
        Checkpointer(f)
    (tmp_path / "empty").mkdir()
    Checkpointer(tmp_path / "empty").close()  # an empty directory is fine
    assert (tmp_path / "empty" / MARKER_FILE).exists()
    with pytest.raises(FileNotFoundError):
        Checkpointer(tmp_path / "empty").restore(None, {})


def test_preemption_guard_sets_flag_and_restores_handler():
    seen = []
    prev = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        with PreemptionGuard(sigint=True) as guard:
            assert not guard.should_stop(0)
            os.kill(os.getpid(), signal.SIGTERM)
            assert guard.requested and guard.should_stop(1) and guard.signal_name == "SIGTERM"
            with pytest.raises(KeyboardInterrupt):  # second signal while pending: Ctrl-C stops now
                os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # the previous handler is back
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, prev)


def test_preemption_guard_sync_point_mode_on_one_process():
    # the multi-host mode (JAX's preemption service owns SIGTERM) degrades to the flag on one process
    prev = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard(sync_point=True) as guard:
        assert signal.getsignal(signal.SIGTERM) is prev  # no handler installed in this mode
        assert not guard.should_stop(5)
        guard.request("test")
        assert guard.should_stop(6)
    with pytest.raises(ValueError, match="keep"):
        Checkpointer("/tmp/unused-opdjax-ckpt", keep=0)


LOOP = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp
    from opdjax.train.checkpoint import Checkpointer, PreemptionGuard

    ckpt = Checkpointer(sys.argv[1], keep=2)
    state = {"w": jnp.zeros((4,)), "step": jnp.int32(0)}
    step_fn = jax.jit(lambda s: {"w": s["w"] + 1.0, "step": s["step"] + 1})
    with PreemptionGuard() as guard:
        step = 0
        while step < 100000:
            state = jax.block_until_ready(step_fn(state))
            step += 1
            if step % 50 == 0:
                ckpt.save(step, state, {"step": step, "reason": "periodic"})
            if step == 3:
                print("READY", flush=True)
            if guard.should_stop(step):
                ckpt.save(step, state, {"step": step, "reason": guard.signal_name}, force=True)
                ckpt.wait()
                ckpt.close()
                print("SAVED", step, flush=True)
                sys.exit(0)
            time.sleep(0.002)
    sys.exit(3)
""")


def test_sigterm_in_guarded_loop_saves_and_exits_zero(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ckpt")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    ready = threading.Event()
    lines = []

    def reader():
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith("READY"):
                ready.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        assert ready.wait(120), f"loop never started: {proc.stderr.read() if proc.poll() is not None else ''}"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    t.join(5)
    err = proc.stderr.read()
    assert rc == 0, err[-3000:]
    saved = [ln for ln in lines if ln.startswith("SAVED")]
    assert saved, lines
    step = int(saved[0].split()[1])
    ckpt = Checkpointer(tmp_path / "ckpt")
    assert ckpt.latest_step() == step
    assert os.path.exists(tmp_path / "ckpt" / str(step) / COMMIT_FILE)
    abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=SingleDeviceSharding(jax.devices()[0])),
                "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=SingleDeviceSharding(jax.devices()[0]))}
    state, meta = ckpt.restore(step, abstract)
    assert meta == {"step": step, "reason": "SIGTERM"}
    assert int(state["step"]) == step and np.all(np.asarray(state["w"]) == step)
    ckpt.close()


def test_restore_needs_shardings(tmp_path):
    state = {"w": jnp.ones((2,))}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {})
        ckpt.wait()
        with pytest.raises(ValueError, match="'w' has no sharding"):
            ckpt.restore(1, {"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
