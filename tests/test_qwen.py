"""opdjax.models.qwen against transformers' PyTorch Qwen3/Qwen2 (the independent oracle)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_oracle import VOCAB, hf_logits, make_hf_model
from opdjax.models import hf_io, qwen
from opdjax.models.config import ModelConfig

forward = jax.jit(qwen.forward, static_argnames=("cfg", "plan"))
chunk_forward = jax.jit(qwen.forward, static_argnames=("cfg", "plan", "attn_chunk"))

SHAPES = {
    # name: (model_type, kwargs) — GQA ratios 1/2/4, tied/untied, head_dim != hidden/heads,
    # bias on/off, rope theta and scaled ropes
    "qwen3_gqa2_untied": ("qwen3", dict(heads=4, kv_heads=2)),
    "qwen3_mha_tied": ("qwen3", dict(heads=4, kv_heads=4, tied=True)),
    "qwen3_gqa4_headdim24_bias": ("qwen3", dict(heads=8, kv_heads=2, head_dim=24, bias=True)),
    "qwen3_theta1e6_yarn": ("qwen3", dict(heads=4, kv_heads=1, rope_parameters=dict(
        rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=32))),
    "qwen3_linear_rope": ("qwen3", dict(rope_parameters=dict(rope_type="linear", rope_theta=5e4, factor=2.0))),
    "qwen3_llama3_rope": ("qwen3", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "qwen2_gqa2_tied_bias": ("qwen2", dict(heads=4, kv_heads=2, tied=True)),
    "qwen2_gqa4_untied": ("qwen2", dict(heads=8, kv_heads=2, hidden=64)),
}


def load(tmp_path, model_type, kw, dtype=None):
    model = make_hf_model(model_type, **kw)
    model.save_pretrained(tmp_path)
    params, cfg = hf_io.load_pretrained(str(tmp_path), dtype=dtype)
    return model, params, cfg


def tokens(shape, seed=0):
    return np.random.RandomState(seed).randint(3, VOCAB, shape)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_logits_match_transformers_fp32(tmp_path, name):
    model_type, kw = SHAPES[name]
    model, params, cfg = load(tmp_path, model_type, kw)
    toks = tokens((2, 80))  # longer than original_max_position_embeddings: scaled ropes matter
    ours, _ = forward(params, jnp.asarray(toks), cfg)
    assert ours.dtype == jnp.float32
    assert np.abs(np.asarray(ours) - hf_logits(model, toks)).max() <= 1e-4


def test_bf16_params_within_stated_bound(tmp_path):
    """bf16 params and activations vs the float32 reference: logits within 0.08 absolute (the
    logits here have std ~1; bf16 has 8 bits of mantissa, errors add up over 2 layers)."""
    model, params, cfg = load(tmp_path, "qwen3", SHAPES["qwen3_gqa2_untied"][1], dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    toks = tokens((2, 40))
    ours, _ = forward(params, jnp.asarray(toks), cfg)
    assert ours.dtype == jnp.float32
    ref = hf_logits(model, toks)
    err = np.abs(np.asarray(ours) - ref).max()
    assert err <= 0.08, err
    assert np.mean(np.argmax(ours, -1) == np.argmax(ref, -1)) > 0.9


def _pad(rows, width, left):
    toks = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        toks[i, sl], mask[i, sl] = r, True
    return toks, mask


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_padded_rows_equal_unpadded_rows(tmp_path, left):
    model, params, cfg = load(tmp_path, "qwen3", SHAPES["qwen3_gqa4_headdim24_bias"][1])
    rows = [tokens((n,), seed=n)[:n] for n in (5, 17, 12)]
    toks, mask = _pad(rows, 20, left)
    ours, _ = forward(params, jnp.asarray(toks), cfg, mask=jnp.asarray(mask))
    for i, r in enumerate(rows):
        ref = hf_logits(model, r[None])[0]
        got = np.asarray(ours[i])[mask[i]]
        assert np.abs(got - ref).max() <= 1e-4


@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_query_chunked_attention_equals_one_block(tmp_path, left):
    """T = 45 > attn_chunk = 8, not a multiple (the last query block is padded): the same logits
    as all queries in one block, padded rows included, and as transformers per real row; also
    for a chunked prefill into a larger KV cache (S != T). Equal up to float32 rounding (~1 ulp:
    XLA picks different dot kernels for the block shapes), not bit for bit."""
    model, params, cfg = load(tmp_path, "qwen3", SHAPES["qwen3_gqa4_headdim24_bias"][1])
    rows = [tokens((n,), seed=n)[:n] for n in (45, 30, 11)]
    toks, mask = map(jnp.asarray, _pad(rows, 45, left))
    one, _ = chunk_forward(params, toks, cfg, mask=mask, attn_chunk=None)
    chunked, _ = chunk_forward(params, toks, cfg, mask=mask, attn_chunk=8)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(one), atol=1e-6, rtol=0)
    for i, r in enumerate(rows):
        got = np.asarray(chunked[i])[np.asarray(mask[i])]
        assert np.abs(got - hf_logits(model, r[None])[0]).max() <= 1e-4

    cache = qwen.init_cache(cfg, batch=3, size=64)
    one_c, one_cache = chunk_forward(params, toks, cfg, mask=mask, cache=cache, attn_chunk=None)
    chunked_c, chunked_cache = chunk_forward(params, toks, cfg, mask=mask, cache=cache, attn_chunk=8)
    np.testing.assert_allclose(np.asarray(chunked_c), np.asarray(one_c), atol=1e-6, rtol=0)
    real = np.asarray(mask)  # padding queries see nothing: their logits differ with S
    np.testing.assert_allclose(np.asarray(chunked_c)[real], np.asarray(one)[real], atol=1e-5, rtol=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0),
                 chunked_cache, one_cache)


@pytest.mark.parametrize("name", ["qwen3_gqa2_untied", "qwen2_gqa2_tied_bias"])
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_kv_cache_decode_equals_full_forward(tmp_path, name, left):
    """Prefill prompts of different lengths (padded), then decode token by token: each step's
    logits equal the full forward over the row's real tokens."""
    model_type, kw = SHAPES[name]
    _, params, cfg = load(tmp_path, model_type, kw)
    prompts = [tokens((n,), seed=n) for n in (3, 9, 6)]
    toks, mask = _pad(prompts, 9, left)
    cont = tokens((3, 7), seed=99)
    cache = qwen.init_cache(cfg, batch=3, size=16)
    prefill_logits, cache = forward(params, jnp.asarray(toks), cfg, mask=jnp.asarray(mask), cache=cache)
    step_logits = []
    for t in range(cont.shape[1]):
        lg, cache = forward(params, jnp.asarray(cont[:, t:t + 1]), cfg, cache=cache)
        step_logits.append(np.asarray(lg[:, 0]))
    assert int(cache.index) == 16
    for i, p in enumerate(prompts):
        full = np.concatenate([p, cont[i]])
        ref, _ = forward(params, jnp.asarray(full[None]), cfg)
        ref = np.asarray(ref[0])
        np.testing.assert_allclose(np.asarray(prefill_logits[i])[mask[i]], ref[:len(p)], atol=1e-5)
        np.testing.assert_allclose(np.stack([s[i] for s in step_logits]), ref[len(p):], atol=1e-5)


def _prefill_then_decode(params, cfg, toks, mask, cont, size):
    """Prefill (toks, mask) into a cache of `size` slots, then feed cont [B, N] one column per
    jitted step: (prefill logits, [B, N, V] step logits, the cache left)."""
    cache = qwen.init_cache(cfg, toks.shape[0], size)
    first, cache = forward(params, jnp.asarray(toks), cfg, mask=jnp.asarray(mask), cache=cache)
    step = jax.jit(lambda p, t, c: forward(p, t, cfg, cache=c))
    steps = []
    for t in range(cont.shape[1]):
        lg, cache = step(params, jnp.asarray(cont[:, t:t + 1]), cache)
        steps.append(np.asarray(lg[:, 0]))
    return first, np.stack(steps, 1), cache


@pytest.mark.parametrize("name", ["qwen3_gqa2_untied", "qwen2_gqa2_tied_bias"])
def test_per_layer_weights_decode_equals_full_forward(tmp_path, name):
    """The decode loop's layout (qwen.unstack_layers: a Python loop over per-layer weights, issue 17):
    prefill and every decode step equal the full forward over the row's real tokens; the cache it
    leaves equals the layer scan's; layer_transform is refused with it."""
    model_type, kw = SHAPES[name]
    _, params, cfg = load(tmp_path, model_type, kw)
    per_layer = qwen.unstack_layers(params)
    assert len(per_layer["layers"]) == cfg.num_layers and qwen.unstack_layers(per_layer) is per_layer
    prompts = [tokens((n,), seed=n) for n in (3, 9, 6)]
    toks, mask = _pad(prompts, 9, True)
    cont = tokens((3, 5), seed=7)
    caches = {}
    for label, p in (("scan", params), ("per_layer", per_layer)):
        first, steps, caches[label] = _prefill_then_decode(p, cfg, toks, mask, cont, 14)
        for i, pr in enumerate(prompts):
            ref = np.asarray(forward(params, jnp.asarray(np.concatenate([pr, cont[i]])[None]), cfg)[0][0])
            np.testing.assert_allclose(np.asarray(first[i])[mask[i]], ref[:len(pr)], atol=1e-5)
            np.testing.assert_allclose(steps[i], ref[len(pr):], atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0),
                 caches["per_layer"], caches["scan"])
    with pytest.raises(ValueError, match="stacked"):
        qwen.apply(per_layer, jnp.asarray(toks), cfg, remat=True)


@pytest.mark.parametrize("per_layer", [False, True], ids=["scan", "per_layer"])
def test_decode_over_a_long_cache_reads_the_live_prefix(per_layer):
    """A cache longer than KV_BLOCK: decode steps attend to the filled prefix in blocks
    (`_attend_live`, a running softmax), including a last block that runs past the cache end, rows
    with long left padding and a row whose prompt is one token. Every step's logits equal the full
    forward; `_attend_live` alone equals `_attend` over all slots, zeros for a query that sees none."""
    cfg = ModelConfig("qwen3", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    params = qwen.init_params(cfg, jax.random.key(0), std=0.3)
    B, P, N = 3, qwen.KV_BLOCK + 44, 30  # S = 330: blocks [0, 256) and [74, 330) (slots < 256 masked)
    toks = np.asarray(jax.random.randint(jax.random.key(1), (B, P), 0, 97))
    mask = np.arange(P)[None] >= np.array([[0], [120], [P - 1]])
    cont = np.asarray(jax.random.randint(jax.random.key(2), (B, N), 0, 97))
    p = qwen.unstack_layers(params) if per_layer else params
    _, got, _ = _prefill_then_decode(p, cfg, toks, mask, cont, P + N)
    full = np.concatenate([toks, cont], 1)
    fmask = np.concatenate([mask, np.ones((B, N), bool)], 1)
    ref = np.asarray(forward(params, jnp.asarray(full), cfg, mask=jnp.asarray(fmask))[0])[:, P:]
    np.testing.assert_allclose(got, ref, atol=2e-5 * max(1.0, np.abs(ref).max()))

    S, K, hd = 600, cfg.num_kv_heads, cfg.head_dim
    ks = jax.random.normal(jax.random.key(3), (2, B, K, S, hd))
    vs = jax.random.normal(jax.random.key(4), (2, B, K, S, hd))
    q = jax.random.normal(jax.random.key(5), (B, 1, cfg.num_heads, hd))
    valid = jnp.asarray(np.random.default_rng(0).random((B, S)) < 0.7).at[2].set(False)  # row 2 sees nothing
    live = 517  # the query sits at slot 516; slots after it must not count
    ref = qwen._attend(q, ks[1].swapaxes(1, 2), vs[1].swapaxes(1, 2), valid, jnp.asarray([live - 1]), cfg, None)
    out = qwen._attend_live(q, ks, vs, 1, valid, jnp.asarray([live - 1]), jnp.asarray(live), cfg, None)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    assert np.all(np.asarray(out)[2] == 0)


def test_explicit_positions_override(tmp_path):
    """Positions given by the caller are used (here: an offset shifts every row the same way
    a prefix would for RoPE), and equal what transformers computes with position_ids."""
    model, params, cfg = load(tmp_path, "qwen3", SHAPES["qwen3_gqa2_untied"][1])
    toks = tokens((1, 10))
    pos = np.arange(10)[None] + 7
    ours, _ = forward(params, jnp.asarray(toks), cfg, positions=jnp.asarray(pos))
    ref = hf_logits(model, toks, position_ids=pos)
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4


def test_init_params_shapes_and_axes_agree():
    cfg = ModelConfig("qwen2", vocab_size=50, hidden_size=16, intermediate_size=24, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=4, qk_norm=False, qkv_bias=True)
    params = qwen.init_params(cfg, jax.random.key(0))
    shapes = jax.tree.map(lambda x: x.shape, params)
    assert shapes == qwen.param_shapes(cfg)
    axes = qwen.param_axes(cfg)
    jax.tree.map(lambda a, s: len(a) == len(s) or pytest.fail(f"{a} vs {s}"), axes, qwen.param_shapes(cfg),
                 is_leaf=lambda x: isinstance(x, tuple))
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()


def _scale_down(lp, factor, shared):
    return {**lp, "down": lp["down"] * factor * shared}


def test_layer_transform_sees_each_layers_slice():
    """A LayerTransform runs layer l with fn(params_l, stacked_l, shared): the same as running the
    plain model on params rewritten beforehand; it passes through jit as an argument, with a cache too."""
    cfg = ModelConfig("qwen3", vocab_size=50, hidden_size=16, intermediate_size=24, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=4)
    params = qwen.init_params(cfg, jax.random.key(0), std=0.1)
    factors = jnp.asarray([0.5, 2.0, -1.0])
    rewritten = {**params, "layers": {**params["layers"],
                                      "down": params["layers"]["down"] * factors[:, None, None] * 1.5}}
    toks = jnp.asarray(tokens((2, 6)) % cfg.vocab_size)
    transform = qwen.LayerTransform(_scale_down, factors, 1.5)
    want, _ = forward(rewritten, toks, cfg)
    got, _ = forward(params, toks, cfg, layer_transform=transform)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    cache = qwen.init_cache(cfg, 2, 8)
    want_c, _ = qwen.forward(rewritten, toks, cfg, cache=cache)
    got_c, _ = qwen.forward(params, toks, cfg, cache=cache, layer_transform=transform)
    np.testing.assert_allclose(np.asarray(got_c), np.asarray(want_c), rtol=1e-6, atol=1e-6)


def _down_plus(name, x, m, shared):
    # delta hook: adds x @ (shared * m_l) to the down projection only (None elsewhere: untouched)
    if name != "down":
        return None
    return jnp.einsum("btf,fd->btd", x.astype(jnp.float32), shared * m, preferred_element_type=jnp.float32)


def _no_delta(name, x, stacked, shared):
    return None


def test_layer_transform_delta_adds_to_the_projection():
    """LayerTransform.delta: layer l's projection gets delta(name, x, stacked_l, shared) added to its
    accumulator; a term x @ M_l on `down` is the plain model with down weights W_l + M_l (float32:
    the two differ only by the order of float32 additions). A delta that returns None everywhere
    is the plain model bit for bit, with and without a cache."""
    cfg = ModelConfig("qwen3", vocab_size=50, hidden_size=16, intermediate_size=24, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=4)
    params = qwen.init_params(cfg, jax.random.key(0), std=0.1)
    m = 0.05 * jax.random.normal(jax.random.key(1), params["layers"]["down"].shape)
    rewritten = {**params, "layers": {**params["layers"], "down": params["layers"]["down"] + 2.0 * m}}
    toks = jnp.asarray(tokens((2, 6)) % cfg.vocab_size)
    transform = qwen.LayerTransform(None, m, 2.0, delta=_down_plus)
    want, _ = forward(rewritten, toks, cfg)
    got, _ = forward(params, toks, cfg, layer_transform=transform)
    assert np.abs(np.asarray(want) - np.asarray(forward(params, toks, cfg)[0])).max() > 1e-3  # M matters
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    cache = qwen.init_cache(cfg, 2, 8)
    got_c, _ = qwen.forward(params, toks, cfg, cache=cache, layer_transform=transform)
    np.testing.assert_allclose(np.asarray(got_c), np.asarray(want), rtol=1e-5, atol=1e-5)
    for dtype in ("float32", "bfloat16"):
        p = jax.tree.map(lambda x: x.astype(dtype), params)
        none = qwen.LayerTransform(None, m, 2.0, delta=_no_delta)
        np.testing.assert_array_equal(np.asarray(forward(p, toks, cfg, layer_transform=none)[0]),
                                      np.asarray(forward(p, toks, cfg)[0]))
        np.testing.assert_array_equal(np.asarray(qwen.forward(p, toks, cfg, cache=cache, layer_transform=none)[0]),
                                      np.asarray(qwen.forward(p, toks, cfg, cache=cache)[0]))
