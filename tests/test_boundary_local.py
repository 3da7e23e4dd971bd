"""opdjax/multihost.py on one process (8 simulated devices): every boundary function is the plain
local operation, and the CPU-only blocking is CPU-only. (The 2-process behaviour:
test_multihost.py::test_boundary_functions_across_two_processes.)"""
import jax
import numpy as np
import pytest

from opdjax import multihost, sharding


@pytest.fixture(scope="module")
def plan():
    return sharding.ShardingPlan(sharding.make_mesh((2, 2, 2)))


def test_one_process_round_trips(plan):
    full = np.arange(8 * 5, dtype=np.int32).reshape(8, 5)
    x = multihost.to_global(plan, full, ("batch", "length"))
    assert x.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    np.testing.assert_array_equal(multihost.to_host(x), full)
    rows = multihost.feeding_rows(plan, full.shape, ("batch", "length"))
    np.testing.assert_array_equal(rows, np.arange(8))  # one process feeds every row
    local = multihost.local_rows(x)
    np.testing.assert_array_equal(local.index, np.arange(8))
    np.testing.assert_array_equal(local.data, full)
    np.testing.assert_array_equal(multihost.rows_of(x, [5, 1]), full[[5, 1]])
    y = multihost.from_local_rows(plan, full, ("batch", "length"), full.shape)
    assert y.sharding.is_equivalent_to(x.sharding, 2)
    np.testing.assert_array_equal(multihost.to_host(y), full)
    with pytest.raises(ValueError, match="must supply 8 rows"):
        multihost.from_local_rows(plan, full[:4], ("batch", "length"), full.shape)
    assert multihost.gather_objects("a") == ["a"] and multihost.broadcast_object(3) == 3
    assert multihost.map_split(str, [1, 2]) == ["1", "2"]
    with pytest.raises(ZeroDivisionError):  # one process: the error itself
        multihost.map_split(lambda v: 1 // v, [1, 0])


def test_row_blocks_refuse_an_array_split_along_other_dimensions(plan):
    """Rows can be taken only from shards that hold whole rows (here the tensor axis splits dim 1)."""
    x = multihost.to_global(plan, np.zeros((8, 4), np.float32), ("batch", "act_mlp"))
    with pytest.raises(ValueError, match="dimension 1 is split"):
        multihost._row_blocks({s.device: s.index for s in x.addressable_shards}, x.shape)
    row_sharded = multihost.to_global(plan, np.zeros((8, 4), np.float32), ("batch", None))
    blocks = multihost._row_blocks({s.device: s.index for s in row_sharded.addressable_shards}, (8, 4))
    assert blocks == [(0, 2), (2, 4), (4, 6), (6, 8)]  # replicas over the tensor axis counted once


def test_blocking_is_for_the_cpu_only(monkeypatch):
    calls = []
    monkeypatch.setattr(jax, "block_until_ready", lambda t: calls.append(t) or t)
    multihost.block_on_cpu("step")
    assert calls == ["step"]  # this machine: CPU, so the loops wait for each step
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert multihost.block_on_cpu("step") == "step"
    assert calls == ["step"]  # on an accelerator the step stays in flight
