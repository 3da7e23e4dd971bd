"""Sharded forward on 8 simulated CPU devices equals the single-device forward; mesh errors."""
import math

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


# --- the rules resolution (flax's logical_to_mesh_axes + our replicate-if-indivisible wrapper) ---

def _oracle_spec(mesh, rules, names, shape=None):
    """The resolution sharding.py did by hand before it used flax (kept as the oracle)."""
    table, used, out = dict(rules), set(), []
    for i, name in enumerate(names):
        if name is None:
            out.append(None)
            continue
        axes = tuple(a for a in sharding._as_tuple(table[name]) if a not in used and mesh.shape[a] > 1)
        if shape is not None and axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
            axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return jax.sharding.PartitionSpec(*out)


def _names_the_code_uses():
    """Every logical-name tuple passed to plan.sharding / plan.spec / plan.constrain / constrain."""
    literal = [(), ("batch",), ("batch", "length"), ("batch", "length", None), ("batch", "length", None, None),
               ("batch", "length", "act_embed"), ("batch", "length", "act_mlp"), ("batch", "length", "act_vocab"),
               ("batch", "length", "act_heads", "head_dim"), ("batch", "length", "act_kv_heads", "head_dim"),
               ("batch", "act_heads", "length", None), ("batch", "act_vocab"), ("batch", "cache_length"),
               ("vocab", None), ("vocab", "embed"), ("embed",), ("norm",), ("vocab",), qwen.CACHE_AXES]
    layer = [names for names in qwen.LAYER_AXES.values()]
    lora = [t for names in layer for n in names[1:] for t in (("layers", n, None), ("layers", None, n))]
    params = jax.tree.leaves(qwen.param_axes(CFG), is_leaf=lambda x: isinstance(x, tuple))
    return sorted(set(literal + layer + [n[1:] for n in layer] + lora + params), key=str)


MESHES = [(1, 8, 1), (2, 2, 2), (1, 2, 4), (8, 1, 1), (1, 1, 8), (4, 1, 2), (1, 1, 1), (2, 16, 4), (4, 8, 8)]


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_flax_resolution_equals_the_hand_written_one(mesh_shape):
    """Same PartitionSpec as before flax, for every name tuple in the code, divisible or not."""
    mesh = jax.sharding.AbstractMesh(mesh_shape, sharding.MESH_AXES)
    plan = sharding.ShardingPlan(mesh)
    rs = np.random.RandomState(sum(mesh_shape))
    for names in _names_the_code_uses():
        assert plan.spec(names) == _oracle_spec(mesh, sharding.DEFAULT_RULES, names), names
        shapes = [tuple(rs.choice([1, 2, 3, 4, 6, 8, 12, 16, 136]) for _ in names) for _ in range(40)]
        for shape in shapes + [tuple(64 for _ in names)]:
            assert plan.spec(names, shape) == _oracle_spec(mesh, sharding.DEFAULT_RULES, names, shape), (names, shape)


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 1, 8)])
def test_named_shardings_unchanged_on_devices(mesh_shape):
    mesh = sharding.make_mesh(mesh_shape)
    plan = sharding.ShardingPlan(mesh)
    for names in _names_the_code_uses():
        for shape in (None, tuple(6 for _ in names), tuple(8 for _ in names)):
            want = jax.sharding.NamedSharding(mesh, _oracle_spec(mesh, sharding.DEFAULT_RULES, names, shape))
            assert plan.sharding(names, shape) == want, (names, shape)


def test_flax_semantics_we_keep_or_guard():
    plan = sharding.ShardingPlan(jax.sharding.AbstractMesh((2, 2, 2), sharding.MESH_AXES))
    P = jax.sharding.PartitionSpec
    # flax alone replicates a name it has no rule for; a typo must not silently unshard an array
    with pytest.raises(sharding.ShardingError, match="'embd' has no sharding rule"):
        plan.spec(("embd",))
    # two names competing for a mesh axis: the earlier *rule* wins ("embed" precedes "batch"), and
    # a rule whose axes are partly taken is skipped whole. No name tuple in the code competes.
    assert plan.spec(("batch", "embed")) == P(None, "fsdp")
    # size-1 mesh axes are dropped before flax resolves, so they never block a rule
    plan1 = sharding.ShardingPlan(jax.sharding.AbstractMesh((2, 1, 2), sharding.MESH_AXES))
    assert plan1.spec(("batch", "embed")) == P("data", None)
    assert plan.batch_shards == 4 and plan1.batch_shards == 2


def test_rules_from_config():
    assert sharding.rules_from_config(()) == sharding.DEFAULT_RULES
    custom = [[n, list(a) if isinstance(a, tuple) else a] for n, a in sharding.DEFAULT_RULES]
    custom[[n for n, _ in custom].index("act_embed")][1] = "tensor"
    rules = sharding.rules_from_config(custom)
    plan = sharding.ShardingPlan(sharding.make_mesh((1, 2, 4)), rules=rules)
    hash(plan)  # a static jit argument
    assert plan.spec(("batch", "length", "act_embed")) == jax.sharding.PartitionSpec("fsdp", None, "tensor")
    field = r"config\.mesh\.sharding_rules"
    bad = [
        ((("embed",),), f"{field}: \\('embed',\\) must be a \\(logical name, mesh axes\\) pair"),
        (((1, "fsdp"),), f"{field}: \\(1, 'fsdp'\\) must be"),
        ((("embed", 3),), f"{field}: \\('embed', 3\\) must be"),
        ((("embed", "model"),), f"{field}: rule 'embed' -> 'model' names mesh axis 'model'"),
        ((("embed", "fsdp"), ("embed", None)), f"{field} name \\['embed'\\] more than once"),
        ((("embed", "fsdp"),), f"{field} has no rule for \\['act_embed', "),
    ]
    for pairs, match in bad:
        with pytest.raises(sharding.ShardingError, match=match):
            sharding.rules_from_config(pairs)


def test_plan_from_config_uses_the_configs_rules():
    """mesh.sharding_rules reaches the plan: moving `vocab` off `tensor` changes the embedding's
    sharding; an empty table is the default one."""
    import ml_collections
    mesh_section = ml_collections.ConfigDict({"shape": (1, 1, -1), "sharding_rules": ()})
    default = sharding.plan_from_config(mesh_section)
    assert default.rules == sharding.DEFAULT_RULES
    custom_rules = tuple((name, None if name == "vocab" else axes) for name, axes in sharding.DEFAULT_RULES)
    mesh_section.sharding_rules = custom_rules
    custom = sharding.plan_from_config(mesh_section)
    n = custom.mesh.shape["tensor"]
    assert default.spec(("vocab", "embed"), (8 * n, 16))[0] == ("tensor" if n > 1 else None)
    assert custom.spec(("vocab", "embed"), (8 * n, 16))[0] is None
