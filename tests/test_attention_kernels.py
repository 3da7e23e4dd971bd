"""model.attention: the splash kernel (Pallas interpret mode) and the cudnn path's plumbing (with
jax.nn.dot_product_attention's XLA implementation; cuDNN itself needs a GPU) against the XLA
reference `qwen._attend`, in values and gradients; end to end through `qwen.apply`, with and
without a ShardingPlan; and how config.model.attention resolves.

Tolerances come from float32 arithmetic, not from a run: both sides sum the same products in a
different order (blockwise online softmax vs one pass), and a sum of n float32 terms is off by at
most ~n ulps of the largest term. Values: n = the padded sequence (256 keys) -> 256 ulps of the
reference's largest magnitude. Gradients pass through softmax backward and (end to end) two
layers: a backward runs two such sums in a row (dP = dO V^T, then dQ = dS K), so 2x that.
Only real (unpadded) positions are compared.
"""
import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opdjax import multihost, sharding
from opdjax.dail.config import dail_config
from opdjax.models import attention, qwen
from opdjax.models.config import ConfigError, ModelConfig
from opdjax.train import validate
from opdjax.train.config import opd_config

pytestmark = pytest.mark.timeout(300)

EPS = float(np.finfo(np.float32).eps)
VALUE_ULPS = 256
GRAD_ULPS = 2 * VALUE_ULPS
T = 130  # not a multiple of the kernel's 128-row blocks: padded to 256 and cut back


def _mask(B, T):
    m = np.ones((B, T), bool)
    m[0, :9] = False  # left padding (a prompt)
    m[1, :3] = False  # a different amount of left padding ...
    m[1, T - 17:] = False  # ... and right padding (a response)
    m[2:] = False  # rows of padding only (a batch padded to divide the mesh): finite, never NaN
    return jnp.asarray(m)


def _cfg(heads, kv_heads, kind="xla", layers=1, head_dim=128):
    return ModelConfig("qwen3", vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                       attention=kind, attention_interpret=kind != "xla")


def _assert_close(ours, ref, ulps, where=None, what=""):
    ours, ref = (np.asarray(x, np.float64) for x in multihost.to_host((ours, ref)))
    assert np.isfinite(ours).all(), what
    if where is not None:
        ours, ref = ours[where], ref[where]
    scale = np.abs(ref).max()
    err = np.abs(ours - ref).max()
    assert err <= ulps * EPS * scale, f"{what}: max error {err:.3g} = {err / (EPS * scale):.0f} ulps of {scale:.3g}"


# ------------------------------------------------------------------------ the kernels alone
@pytest.mark.parametrize("kind", ["splash", "cudnn"])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_kernel_matches_reference_values_and_grads(kind, groups):
    K, B, hd = 2, 3, 128
    cfg = _cfg(K * groups, K, kind)
    ks = jax.random.split(jax.random.key(groups), 4)
    q = jax.random.normal(ks[0], (B, T, K * groups, hd))
    k, v = (jax.random.normal(s, (B, T, K, hd)) for s in ks[1:3])
    valid = _mask(B, T)
    w = jax.random.normal(ks[3], q.shape) * valid[:, :, None, None]  # cotangent: real positions only

    def ref_fn(q, k, v):
        return qwen._attend(q, k, v, valid, jnp.arange(T), cfg, None)

    def our_fn(q, k, v):
        return attention.attend_full(q, k, v, valid, cfg)

    ref, ref_grads = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(ref_fn(*a) * w), argnums=(0, 1, 2)))(q, k, v)
    ours, our_grads = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(our_fn(*a) * w), argnums=(0, 1, 2)))(q, k, v)
    out_ref, out = jax.jit(ref_fn)(q, k, v), jax.jit(our_fn)(q, k, v)
    assert out.shape == out_ref.shape and out.dtype == q.dtype
    _assert_close(out, out_ref, VALUE_ULPS, multihost.to_host(valid), f"{kind} G={groups} output")
    for name, g, gr in zip("qkv", our_grads, ref_grads):
        _assert_close(g, gr, GRAD_ULPS, what=f"{kind} G={groups} d{name}")


def test_splash_bf16_under_highest_precision():
    """bfloat16 through the kernel while tests run with matmul precision HIGHEST (Mosaic refuses
    that for bf16 on TPU; the kernel runs at default precision, backward included). Within 8
    bfloat16 ulps (2^-8 each) of the largest magnitude: the reference rounds the probabilities to
    bf16 before P V, the kernel keeps them float32."""
    assert str(jax.config.jax_default_matmul_precision) == "highest"  # tests/conftest.py
    cfg = _cfg(4, 2, "splash")
    ks = jax.random.split(jax.random.key(7), 4)
    q = jax.random.normal(ks[0], (2, T, 4, 128), jnp.bfloat16)
    k, v = (jax.random.normal(s, (2, T, 2, 128), jnp.bfloat16) for s in ks[1:3])
    valid = _mask(2, T)
    w = (jax.random.normal(ks[3], q.shape) * valid[:, :, None, None]).astype(jnp.bfloat16)
    grad = lambda f: jax.jit(jax.value_and_grad(lambda *a: jnp.sum((f(*a) * w).astype(jnp.float32)), argnums=(0, 1, 2)))
    ref_fn = lambda q, k, v: qwen._attend(q, k, v, valid, jnp.arange(T), cfg, None)
    our_fn = lambda q, k, v: attention.attend_full(q, k, v, valid, cfg)
    _, ref = grad(ref_fn)(q, k, v)
    _, ours = grad(our_fn)(q, k, v)
    bf16_eps = 2.0 ** -8
    out = jax.jit(our_fn)(q, k, v)
    assert out.dtype == jnp.bfloat16
    _assert_close(out, jax.jit(ref_fn)(q, k, v), 8 * bf16_eps / EPS, multihost.to_host(valid), "bf16 output")
    for name, g, gr in zip("qkv", ours, ref):
        assert g.dtype == jnp.bfloat16
        _assert_close(g, gr, 8 * bf16_eps / EPS, what=f"bf16 d{name}")


# ------------------------------------------------------------------------ qwen.apply end to end
def _apply_loss(cfg, tokens, mask, plan):
    # A random linear read-out of the real positions (sum of squares would be degenerate: the final
    # RMSNorm makes it nearly constant, and its tiny gradient all cancellation).
    w = jax.random.normal(jax.random.key(2), (*tokens.shape, cfg.hidden_size)) * mask[..., None]

    def loss(params):
        hidden, _ = qwen.apply(params, tokens, cfg, mask=mask, plan=plan, remat=True)
        return jnp.sum(hidden * w), hidden
    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.fixture(scope="module")
def model():
    cfg = _cfg(4, 2, layers=2)
    params = qwen.init_params(cfg, jax.random.key(0), std=0.1)
    B, L = 4, 200  # > qwen.ATTN_BLOCK: the reference runs its causal block path
    tokens = jax.random.randint(jax.random.key(1), (B, L), 0, cfg.vocab_size)
    mask = jnp.concatenate([_mask(2, L), _mask(2, L)[::-1]])
    (_, hidden), grads = _apply_loss(cfg, tokens, mask, None)(params)
    return cfg, params, tokens, mask, hidden, grads


@pytest.mark.parametrize("kind,mesh", [("splash", None), ("splash", (2, 2, 2)), ("splash", (1, 2, 4)),
                                       ("cudnn", None)], ids=["splash", "splash-mesh222", "splash-mesh124", "cudnn"])
def test_apply_matches_xla(model, kind, mesh):
    """(2, 2, 2): KV heads shard over tensor with the query heads; (1, 2, 4): tensor=4 divides the
    4 query heads, not the 2 KV heads (each query head gets its KV head)."""
    cfg, params, tokens, mask, hidden, grads = model
    plan = None if mesh is None else sharding.ShardingPlan(sharding.make_mesh(mesh))
    ours = dataclasses.replace(cfg, attention=kind, attention_interpret=True)
    (_, h), g = _apply_loss(ours, tokens, mask, plan)(params)
    _assert_close(h, hidden, VALUE_ULPS, multihost.to_host(mask), f"{kind} {mesh} hidden")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(grads)):
        _assert_close(a, b, GRAD_ULPS, what=f"{kind} {mesh} grad {jax.tree_util.keystr(path)}")


def test_decode_with_a_cache_stays_on_xla(model):
    """With a KV cache (prefill / decode) the kernel is not used: identical to attention='xla'."""
    cfg, params, tokens, mask, _, _ = model
    ours = dataclasses.replace(cfg, attention="splash", attention_interpret=True)
    cache = qwen.init_cache(cfg, 4, 16)
    a, _ = jax.jit(qwen.apply, static_argnames="cfg")(params, tokens[:, :8], cfg, cache=cache)
    b, _ = jax.jit(qwen.apply, static_argnames="cfg")(params, tokens[:, :8], ours, cache=cache)
    np.testing.assert_array_equal(*multihost.to_host((a, b)))


# ------------------------------------------------------------------------ config.model.attention
def test_config_sections_default_to_auto():
    assert opd_config().model.attention == "auto"
    assert dail_config().model.attention == "auto"


def test_auto_resolves_to_xla_on_cpu_and_changes_nothing(caplog):
    cfg = _cfg(4, 2)
    with caplog.at_level(logging.INFO, logger="opdjax.models.attention"):
        got = attention.resolve(cfg, "auto", "float32", name="auto-cpu")
    assert got == cfg and got.attention == "xla" and not got.attention_interpret
    assert "attention (auto-cpu): xla" in caplog.text


@pytest.mark.parametrize("backend,dtype,head_dim,want", [
    ("tpu", "bfloat16", 128, "splash"), ("tpu", "float32", 64, "splash"), ("tpu", "bfloat16", 24, "xla"),
    ("gpu", "bfloat16", 128, "cudnn"), ("gpu", "float32", 128, "xla"), ("cpu", "bfloat16", 128, "xla")])
def test_auto_per_backend_logs_the_choice(caplog, backend, dtype, head_dim, want):
    name = f"auto-{backend}-{dtype}-{head_dim}"
    with caplog.at_level(logging.INFO, logger="opdjax.models.attention"):
        got = attention.resolve(_cfg(4, 2, head_dim=head_dim), "auto", dtype, name=name, backend=backend)
    assert got.attention == want and not got.attention_interpret
    assert f"attention ({name}): {want}" in caplog.text
    if want == "xla" and backend != "cpu":  # the reason it is not the kernel is said
        assert "head_dim=24" in caplog.text or "bfloat16/float16" in caplog.text


def test_explicit_kernels_on_cpu_are_emulated_and_say_so(caplog):
    with caplog.at_level(logging.INFO, logger="opdjax.models.attention"):
        s = attention.resolve(_cfg(4, 2), "splash", "float32", name="explicit-splash")
        c = attention.resolve(_cfg(4, 2), "cudnn", "float32", name="explicit-cudnn")
    assert (s.attention, s.attention_interpret, c.attention, c.attention_interpret) == ("splash", True, "cudnn", True)
    assert "interpret mode, slow, for testing" in caplog.text and "XLA implementation" in caplog.text


@pytest.mark.parametrize("backend,choice,dtype,head_dim", [
    ("gpu", "splash", "bfloat16", 128), ("tpu", "cudnn", "bfloat16", 128), ("gpu", "cudnn", "float32", 128),
    ("tpu", "splash", "bfloat16", 24)])
def test_explicit_kernel_the_backend_cannot_run_is_an_error(backend, choice, dtype, head_dim):
    with pytest.raises(attention.AttentionConfigError, match="config.model.attention"):
        attention.resolve(_cfg(4, 2, head_dim=head_dim), choice, dtype, name="x", backend=backend)


def test_bad_value_names_the_field_and_the_choices():
    c = opd_config()
    c.model.attention = "flash"
    with pytest.raises(validate.ConfigError, match=r"config\.model\.attention='flash'.*auto, xla, splash, cudnn"):
        validate.validate_config(c)  # first thing checked: before any file, model or compile
    with pytest.raises(validate.ConfigError, match=r"config\.model\.attention"):
        validate.model_cfg(dail_config().model, "model", attention="Splash")
    with pytest.raises(ConfigError, match="attention='auto'"):
        _cfg(4, 2, kind="auto")  # a ModelConfig holds a resolved kernel only


def test_attention_is_not_part_of_the_hf_config():
    cfg = _cfg(4, 2, kind="splash")
    d = cfg.to_hf_dict()
    assert d == _cfg(4, 2).to_hf_dict() and not any("attention_interpret" in k or k == "attention" for k in d)
    back = ModelConfig.from_hf_dict({**d, "attention": "splash"})
    assert back.attention == "xla" and back == dataclasses.replace(cfg, attention="xla", attention_interpret=False)
