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
from etils import epath
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from opdjax.train.checkpoint import (COMMIT_FILE, MARKER_FILE, TMP_SUFFIX, CheckpointError, CheckpointMismatchError,
                                     Checkpointer, DamagedCheckpointError, NotACheckpointDirError, PreemptionGuard)

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


# ----------------------------------------------------------------------------- damaged checkpoints

def step_state(s):
    """A state whose arrays are big and random enough to be stored out of line (OCDBT data files,
    not inlined into its index), and tell the step they were saved at."""
    ws = {f"w{i}": jax.random.normal(jax.random.key(100 * s + i), (128, 64), jnp.float32) for i in range(8)}
    return jax.block_until_ready({**ws, "step": jnp.int32(s)})


def save_steps(directory, steps=(1, 2, 3, 4)):
    with Checkpointer(directory, keep=10, async_save=False) as ckpt:
        for s in steps:
            assert ckpt.save(s, step_state(s), {"step": s})
    return {s: step_state(s) for s in steps}


def files_by_size(step_dir):
    found = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
    return sorted(found, key=os.path.getsize, reverse=True)


def truncate_largest(step_dir):
    path = files_by_size(step_dir)[0]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return path


def delete_largest(step_dir):
    path = files_by_size(step_dir)[0]
    os.remove(path)
    return path


def zero_largest(step_dir):
    """Same size, wrong bytes: the index cannot show it; orbax's own read fails on it."""
    path = files_by_size(step_dir)[0]
    n = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(b"\0" * n)
    return path


def delete_tree_metadata(step_dir):
    path = os.path.join(step_dir, "state", "_METADATA")
    os.remove(path)
    return path


def local_abstract(state):
    return abstract_on(state, lambda x: SingleDeviceSharding(jax.devices()[0]))


@pytest.fixture
def unraisable(monkeypatch):
    """Every unraisable exception Python reports during the test (where orbax's closed-event-loop
    noise lands, printed as dozens of tracebacks by the default hook)."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    return seen


def settle():
    """Let reads orphaned by a failed restore finish (their callbacks are the noise)."""
    import gc
    import time
    time.sleep(1.0)
    gc.collect()


@pytest.mark.parametrize("damage", [truncate_largest, delete_largest, zero_largest, delete_tree_metadata],
                         ids=["truncated", "deleted-data-file", "overwritten", "deleted-tree-metadata"])
def test_damaged_latest_step_falls_back_to_the_newest_intact_one(tmp_path, damage, caplog, capfd, unraisable):
    d = tmp_path / "ckpt"
    states = save_steps(d)
    damaged_file = damage(d / "4")
    ckpt = Checkpointer(d, keep=10)
    assert ckpt.all_steps() == [1, 2, 3, 4]  # complete: the damage shows only when read
    with caplog.at_level("WARNING", logger="opdjax.train.checkpoint"):
        step, state, meta = ckpt.restore_latest(local_abstract(states[4]))
    settle()
    assert step == 3 and meta == {"step": 3}
    assert_bit_equal(state, states[3])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("checkpoint step 4" in w and "damaged" in w for w in warnings), warnings
    if damage is not zero_largest:  # found by the verification, which names the file
        assert any(os.path.basename(damaged_file) in w for w in warnings), warnings
    assert any("resuming from checkpoint step 3" in w and "4.damaged" in w for w in warnings), warnings
    # no traceback storm: orbax's closed-loop errors never reach the default hook / stderr
    assert not unraisable, unraisable  # no closed-loop errors, no orphaned read coroutines
    assert "Event loop is closed" not in capfd.readouterr().err
    # the damaged step is set aside, out of every listing; its number can be saved again
    assert (d / "4.damaged").is_dir() and not (d / "4").exists()
    assert ckpt.all_steps() == [1, 2, 3] and ckpt.latest_step() == 3
    assert ckpt.save(4, states[4], {"step": 4, "again": True})
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2, 3, 4]
    ckpt.close()
    # and a later run sees the new step 4 (the set-aside one is accepted, even without the marker)
    os.remove(d / MARKER_FILE)
    with Checkpointer(d, keep=10) as again:
        step, state, meta = again.restore_latest(local_abstract(states[4]))
        assert step == 4 and meta == {"step": 4, "again": True}
        assert_bit_equal(state, states[4])


def test_several_damaged_steps_are_skipped_and_set_aside_under_free_names(tmp_path, caplog):
    d = tmp_path / "ckpt"
    states = save_steps(d)
    (d / "4.damaged").mkdir()  # left by an earlier incident
    truncate_largest(d / "4")
    delete_largest(d / "3")
    with Checkpointer(d, keep=10) as ckpt, caplog.at_level("WARNING", logger="opdjax.train.checkpoint"):
        step, state, _ = ckpt.restore_latest(local_abstract(states[4]))
        assert step == 2
        assert_bit_equal(state, states[2])
        assert ckpt.all_steps() == [1, 2]
    assert sorted(p.name for p in d.iterdir() if "damaged" in p.name) == ["3.damaged", "4.damaged", "4.damaged.1"]
    msg = [r.getMessage() for r in caplog.records if "resuming from" in r.getMessage()]
    assert len(msg) == 1 and "step 2" in msg[0] and "4, 3" in msg[0]


def test_every_step_damaged_is_one_clear_error_line(tmp_path, capfd, unraisable):
    d = tmp_path / "ckpt"
    states = save_steps(d, steps=(1, 2))
    truncate_largest(d / "2")
    zero_largest(d / "1")
    capfd.readouterr()
    ckpt = Checkpointer(d, keep=10)
    with pytest.raises(CheckpointError) as e:
        ckpt.restore_latest(local_abstract(states[2]))
    settle()
    msg = str(e.value)
    assert type(e.value) is CheckpointError and "\n" not in msg
    assert f"no intact checkpoint in {d}" in msg and "step 2:" in msg and "step 1:" in msg
    assert "Delete the damaged step directories (2, 1)" in msg and "new workdir" in msg
    assert not unraisable, unraisable
    assert "Event loop is closed" not in capfd.readouterr().err
    # nothing was renamed: the user decides
    assert sorted(p.name for p in d.iterdir()) == ["1", "2", MARKER_FILE]
    ckpt.close()


def test_restore_of_a_damaged_step_names_it_and_the_file(tmp_path):
    d = tmp_path / "ckpt"
    states = save_steps(d, steps=(1, 2))
    path = truncate_largest(d / "2")
    with Checkpointer(d) as ckpt:
        with pytest.raises(DamagedCheckpointError) as e:
            ckpt.restore(2, local_abstract(states[2]))
        assert e.value.step == 2
        assert f"checkpoint step 2 in {d} is damaged" in str(e.value) and os.path.basename(path) in str(e.value)
        assert "is truncated" in str(e.value)
        state, _ = ckpt.restore(1, local_abstract(states[1]))  # the others are untouched
        assert_bit_equal(state, states[1])
        assert ckpt.all_steps() == [1, 2]  # restore() itself never renames


def test_a_config_mismatch_is_not_damage(tmp_path):
    # a checkpoint of another model must stop the run, not send it back to an older step
    d = tmp_path / "ckpt"
    save_steps(d, steps=(1, 2))
    with Checkpointer(d) as ckpt:
        other = dict(step_state(0), w3=jnp.zeros((128, 32)))
        with pytest.raises(CheckpointMismatchError, match="'w3' has shape"):
            ckpt.restore_latest(local_abstract(other))
        assert ckpt.all_steps() == [1, 2]
    assert not any("damaged" in p.name for p in d.iterdir())


def test_a_failed_orbax_read_leaves_no_event_loop_noise(tmp_path, unraisable, capfd):
    # Several MB in several OCDBT data files: when the first read fails, orbax closes its event loop
    # with other reads still in flight (measured: 2-6 "Event loop is closed" reports without the filter).
    def big(s):
        ws = {f"w{i}": jax.random.normal(jax.random.key(10 * s + i), (512, 512)) for i in range(4)}
        return jax.block_until_ready(ws)

    d = tmp_path / "ckpt"
    with Checkpointer(d, keep=10, async_save=False) as ckpt:
        for s in (1, 2):
            ckpt.save(s, big(s), {"step": s})
    zero_largest(d / "2")  # same size: only orbax's read can tell
    with Checkpointer(d, keep=10) as ckpt:
        step, state, _ = ckpt.restore_latest(local_abstract(big(2)))
        settle()
    assert step == 1
    assert_bit_equal(state, big(1))
    assert not unraisable, unraisable  # no closed-loop errors, no orphaned read coroutines
    assert "Event loop is closed" not in capfd.readouterr().err


def test_the_event_loop_noise_filter_drops_only_that_error(unraisable):
    import asyncio
    import types
    from opdjax.train import checkpoint as ckpt_mod

    from orbax.checkpoint._src.serialization import serialization

    def report(exc, obj=None):
        sys.unraisablehook(types.SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=exc.__traceback__,
                                                 err_msg=None, object=obj))

    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)  # what a late tensorstore callback does
    except RuntimeError as e:
        closed = e
    try:
        raise RuntimeError("Event loop is closed")  # same text, raised elsewhere: kept
    except RuntimeError as e:
        lookalike = e
    # orbax's per-shard read coroutine, left suspended by the failed gather and closed when collected
    orphan = serialization._read_array_index_and_device_put(None, None, None, global_shape=None, new_shard_shape=None,
                                                           dtype=None, byte_limiter=None, strict=True, dll=None,
                                                           memory_kind=None)
    orphan.close()

    async def elsewhere():
        pass

    other_coro = elsewhere()
    other_coro.close()
    ckpt_mod._quiet_closed_event_loop_noise()
    ckpt_mod._quiet_closed_event_loop_noise()  # idempotent: one filter
    report(closed)
    report(Exception("Encountered error while reading array index"), orphan)
    report(lookalike)
    report(ValueError("other"), other_coro)
    assert [type(e).__name__ for e in unraisable] == ["RuntimeError", "ValueError"]
    assert unraisable[0] is lookalike


def test_data_pipeline_state_restores_across_process_counts(tmp_path):
    """The Grain iterator state item: a checkpoint written by a 2-process slice (files
    process_0-of-2.json, process_1-of-2.json) restores into a 1-process run from process 0's file,
    since the state is the global step; a step without the item is a named error."""
    import json as _json

    from opdjax.data.pipeline import DataPipeline
    from opdjax.train.checkpoint import CheckpointError, _restore_data

    written = DataPipeline(range(10), 3, seed=4)
    for _ in range(5):
        next(written)
    item = tmp_path / "7" / "data"
    item.mkdir(parents=True)
    for p in range(2):
        (item / f"process_{p}-of-2.json").write_text(_json.dumps(written.iterator.get_state()))
    resumed = DataPipeline(range(10), 3, seed=4)
    _restore_data(epath.Path(item), resumed.iterator)
    assert resumed.next_step == 5
    np.testing.assert_array_equal(next(resumed).indices, next(written).indices)
    with pytest.raises(CheckpointError, match="no data pipeline state"):
        _restore_data(epath.Path(tmp_path / "8" / "data"), resumed.iterator)
