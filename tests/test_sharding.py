"""Sharded forward on 8 simulated CPU devices equals the single-device forward; mesh errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opdjax import sharding
from opdjax.models import qwen
from opdjax.models.config import ModelConfig

pytestmark = pytest.mark.timeout(120)

CFG = ModelConfig("qwen3", vocab_size=136, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=8, num_kv_heads=4, head_dim=16)


def _batch(b=8, t=12):
    rs = np.random.RandomState(0)
    toks = rs.randint(0, CFG.vocab_size, (b, t))
    mask = np.ones((b, t), bool)
    mask[1, :5] = False  # one left-padded row
    mask[2, 9:] = False  # one right-padded row
    return toks, mask


@pytest.fixture(scope="module")
def reference():
    params = qwen.init_params(CFG, jax.random.key(0), std=0.1)
    toks, mask = _batch()
    ref = qwen.jit_forward(CFG)(params, jnp.asarray(toks), jnp.asarray(mask))
    return params, np.asarray(ref)


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2), (1, 2, 4), (8, 1, 1), (1, 1, 8)])
def test_sharded_forward_equals_single_device(reference, shape):
    assert jax.device_count() == 8
    params, ref = reference
    plan = sharding.ShardingPlan(sharding.make_mesh(shape))
    sharded_params = jax.device_put(params, qwen.param_shardings(CFG, plan))
    toks, mask = _batch()
    out = qwen.jit_forward(CFG, plan)(sharded_params, jnp.asarray(toks), jnp.asarray(mask))
    out = np.asarray(out)  # block: back-to-back sharded calls can deadlock XLA:CPU collectives
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)


def test_param_specs_follow_rules():
    plan = sharding.ShardingPlan(sharding.make_mesh((1, 2, 4)))
    sh = qwen.param_shardings(CFG, plan)
    P = jax.sharding.PartitionSpec
    assert sh["layers"]["q"].spec == P(None, "fsdp", "tensor", None)
    assert sh["layers"]["down"].spec == P(None, "tensor", "fsdp")
    assert sh["embed"].spec == P("tensor", "fsdp")
    # 4 KV heads on tensor=8: not divisible -> that dimension is replicated, still correct
    plan8 = sharding.ShardingPlan(sharding.make_mesh((1, 1, 8)))
    assert qwen.param_shardings(CFG, plan8)["layers"]["k"].spec == P(None, None, None, None)


def test_mesh_errors_name_the_field():
    with pytest.raises(sharding.ShardingError, match=r"mesh.shape=\(2, 2, 3\).*needs 12 devices but 8"):
        sharding.make_mesh((2, 2, 3))
    with pytest.raises(sharding.ShardingError, match=r"fixed axes multiply to 3, which does not divide the 8"):
        sharding.make_mesh((3, -1, 1))
    with pytest.raises(sharding.ShardingError, match="3 entries"):
        sharding.make_mesh((8, 1))
    assert sharding.make_mesh((2, -1, 2)).shape == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(sharding.ShardingError, match="names mesh axis 'model'"):
        sharding.ShardingPlan(sharding.make_mesh((1, 8, 1)), rules=(("embed", "model"),))


def test_indivisible_batch_error(reference):
    params, _ = reference
    plan = sharding.ShardingPlan(sharding.make_mesh((2, 2, 2)))
    toks, mask = _batch(b=6)
    with pytest.raises(ValueError, match="batch size 6 is not divisible by the 4 batch shards"):
        qwen.jit_forward(CFG, plan)(params, jnp.asarray(toks), jnp.asarray(mask))


def test_distributed_init_needs_all_three_variables(monkeypatch):
    for k in ("TPU_WORKER_HOSTNAMES", "OPDJAX_MULTIHOST", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert sharding.maybe_initialize_distributed() is False  # one host: nothing to join
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(sharding.ShardingError, match="JAX_PROCESS_ID is not"):
        sharding.maybe_initialize_distributed()
