"""One process of the 2-process check of opdjax/multihost.py in test_multihost.py (a script).

    python boundary_worker.py OUTDIR

Joined through `sharding.maybe_initialize_distributed` (the launcher's environment), on a
(2,2,2) mesh over 2 x 4 CPU devices: every boundary function against what it must return; the
results a process computed are saved to OUTDIR/process<i>.npz for the parent to compare. Any
failed check exits non-zero with the reason.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(outdir):
    from opdjax import multihost, sharding
    assert sharding.maybe_initialize_distributed()
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    pid = jax.process_index()
    assert jax.process_count() == 2 and jax.device_count() == 8
    plan = sharding.ShardingPlan(sharding.make_mesh((2, 2, 2)))
    full = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)

    # host -> device from whole data, back whole (a gather across processes)
    x = multihost.to_global(plan, full, ("batch", "length"))
    assert not x.is_fully_addressable
    np.testing.assert_array_equal(multihost.to_host(x), full)
    doubled = multihost.to_host(jax.jit(lambda a: a * 2)(x))
    np.testing.assert_array_equal(doubled, full * 2)

    # this process's rows: exactly the ones it must feed, disjoint from the other process's
    mine = multihost.feeding_rows(plan, full.shape, ("batch", "length"))
    local = multihost.local_rows(x)
    np.testing.assert_array_equal(local.index, mine)
    np.testing.assert_array_equal(local.data, full[mine])
    np.testing.assert_array_equal(multihost.rows_of(x, mine[::-1]), full[mine[::-1]])
    both = multihost.gather_objects(mine.tolist())
    assert sorted(both[0] + both[1]) == list(range(8)) and not set(both[0]) & set(both[1]), both
    try:
        multihost.rows_of(x, np.asarray(both[1 - pid][:1]))
        raise AssertionError("rows_of returned a row another process holds")
    except ValueError as e:
        assert "not held by process" in str(e)

    # host -> device from each process's own rows only; a reduction over all of them
    y = multihost.from_local_rows(plan, full[mine] + 100, ("batch", "length"), full.shape)
    np.testing.assert_array_equal(multihost.to_host(y), full + 100)
    total = multihost.to_host(jax.jit(jnp.sum)(y))
    assert float(total) == float((full + 100).sum()), total

    # objects, split host work, an error on one process raised on both
    assert multihost.gather_objects({"p": pid}) == [{"p": 0}, {"p": 1}]
    assert multihost.broadcast_object(f"from {pid}") == "from 0"
    assert multihost.map_split(lambda v: v * v, range(7)) == [v * v for v in range(7)]
    assert multihost.map_split(lambda share: [len(share)] * len(share), list("abcde"), batched=True) == \
        [2, 2, 3, 3, 3]
    try:
        multihost.map_split(lambda v: 1 // (v - 5), range(7), "dividing")  # item 5 is process 1's
        raise AssertionError("no error")
    except ZeroDivisionError:
        assert pid == 1
    except multihost.MultiHostError as e:
        assert pid == 0 and "dividing failed on process 1 (ZeroDivisionError)" in str(e), e

    # configs: equal passes; different stops both, naming the field
    c = ml_collections.ConfigDict({"a": 1, "b": {"c": "x"}})
    multihost.agree_on_config(c)
    c.b.c = f"x{pid}"
    try:
        multihost.agree_on_config(c)
        raise AssertionError("no error")
    except multihost.MultiHostError as e:
        assert "config.b.c: process 0: 'x0', process 1: 'x1'" in str(e), e
    np.savez(os.path.join(outdir, f"process{pid}.npz"), mine=mine, gathered=multihost.to_host(x))
    multihost.sync("boundary worker done")
    print("boundary checks ok", flush=True)


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # skip jax's shutdown barrier: the peer may be gone
