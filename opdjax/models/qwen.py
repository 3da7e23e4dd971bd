"""Qwen3 / Qwen2 / Qwen2.5 decoder as pure functions of a params pytree.

    params = {"embed": [V, D], "final_norm": [D], ("lm_head": [V, D] if untied),
              "layers": {name: [L, ...]}}            (layers stacked, run with lax.scan)

(`unstack_layers` turns "layers" into a tuple of per-layer dicts, run as a Python loop: the CPU
decode loop's layout, see its docstring.)

One code path serves the full forward, prefill and decode: `apply` takes T new tokens and an
optional fixed-size KV cache. Without a cache the keys are the new tokens themselves; with one,
the new keys/values are written at slots [index, index+T) and the queries attend to every
valid slot at or before their own (a one-token decode step over a cache longer than KV_BLOCK
reads only the filled blocks of it). Per-row positions come from the padding mask, so left- and
right-padded rows give the same logits as the unpadded row. Without a cache, `cfg.attention`
may hand attention to a fused kernel (splash on TPU, cuDNN on GPU: opdjax.models.attention).

Precision: weights and the residual stream stay in the params' dtype (as transformers does);
RMSNorm statistics, RoPE tables, attention softmax and the logits are float32.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from opdjax.models import attention
from opdjax.models.config import ModelConfig, RopeConfig
from opdjax.sharding import ShardingPlan, constrain

Params = dict[str, Any]

# Logical axis names of every parameter (see opdjax.sharding for the rules table).
LAYER_AXES = {
    "attn_norm": ("layers", "norm"),
    "mlp_norm": ("layers", "norm"),
    "q": ("layers", "embed", "heads", "head_dim"),
    "k": ("layers", "embed", "kv_heads", "head_dim"),
    "v": ("layers", "embed", "kv_heads", "head_dim"),
    "o": ("layers", "heads", "head_dim", "embed"),
    "q_bias": ("layers", "heads", "head_dim"),
    "k_bias": ("layers", "kv_heads", "head_dim"),
    "v_bias": ("layers", "kv_heads", "head_dim"),
    "o_bias": ("layers", "norm"),
    "q_norm": ("layers", "head_dim"),
    "k_norm": ("layers", "head_dim"),
    "gate": ("layers", "embed", "mlp"),
    "up": ("layers", "embed", "mlp"),
    "down": ("layers", "mlp", "embed"),
}
# Keys/values kv-head-major, [L, B, K, S, hd]: attention reads a layer's [B, K, S, hd] as its dot
# operand as stored (with [.., S, K, hd] XLA copied a transposed K and V out of the cache, per layer
# and per decode step).
CACHE_AXES = ("layers", "batch", "kv_heads", "cache_length", "head_dim")

# Query rows per attention block when T is longer (a static size; see `apply`'s attn_chunk).
# float32 scores are then [B, H, ATTN_CHUNK, S] at a time rather than [B, H, T, S].
ATTN_CHUNK = 512
# Without a KV cache, keys are the queries' own tokens and query block [t0, t1) needs keys [0, t1)
# only: attention then runs in unrolled blocks of ATTN_BLOCK rows (more when T > ATTN_BLOCK *
# ATTN_MAX_BLOCKS, never more than attn_chunk), skipping the keys after each block (about half
# the T x T work, in cache-sized tiles). Beyond ATTN_MAX_BLOCKS blocks of attn_chunk rows it
# falls back to the lax.map over query blocks (a program that does not grow with T).
ATTN_BLOCK = 128
ATTN_MAX_BLOCKS = 16
# A decode step (one new token per row) over a cache longer than KV_BLOCK slots attends to the
# filled prefix only, in blocks of KV_BLOCK slots read straight from the cache (`_attend_live`):
# its K/V traffic follows the live length, not the cache size (at real lengths the cache, not the
# weights, is most of what a step reads).
KV_BLOCK = 256


def param_shapes(cfg: ModelConfig) -> Params:
    """Shape of every parameter, as a pytree of tuples (the one place the layout is defined)."""
    L, D, F, H, K, hd, V = (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                            cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size)
    layers = {
        "attn_norm": (L, D), "mlp_norm": (L, D),
        "q": (L, D, H, hd), "k": (L, D, K, hd), "v": (L, D, K, hd), "o": (L, H, hd, D),
        "gate": (L, D, F), "up": (L, D, F), "down": (L, F, D),
    }
    if cfg.qkv_bias:
        layers.update(q_bias=(L, H, hd), k_bias=(L, K, hd), v_bias=(L, K, hd))
    if cfg.o_bias:
        layers["o_bias"] = (L, D)
    if cfg.qk_norm:
        layers.update(q_norm=(L, hd), k_norm=(L, hd))
    shapes: Params = {"embed": (V, D), "final_norm": (D,), "layers": layers}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (V, D)
    return shapes


def param_axes(cfg: ModelConfig) -> Params:
    """Logical axis names of every parameter, same structure as `param_shapes`."""
    layers = {k: LAYER_AXES[k] for k in param_shapes(cfg)["layers"]}
    axes: Params = {"embed": ("vocab", "embed"), "final_norm": ("norm",), "layers": layers}
    if not cfg.tie_word_embeddings:
        axes["lm_head"] = ("vocab", "embed")
    return axes


def abstract_params(cfg: ModelConfig, dtype=None) -> Params:
    dtype = jnp.dtype(dtype or cfg.dtype)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), param_shapes(cfg), is_leaf=_is_shape)


def param_shardings(cfg: ModelConfig, plan: ShardingPlan) -> Params:
    return jax.tree.map(lambda names, s: plan.sharding(names, s), param_axes(cfg), param_shapes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))


def init_params(cfg: ModelConfig, key: jax.Array, dtype=None, std: float = 0.02) -> Params:
    """Random params (normal(0, std) weights and biases, unit norms) for tests and toy models."""
    return _init_params(cfg, key, jnp.dtype(dtype or cfg.dtype), float(std))


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "std"))
def _init_params(cfg: ModelConfig, key: jax.Array, dtype, std: float) -> Params:
    # One jitted program instead of one dispatch per leaf (much faster for many small leaves).
    shapes = param_shapes(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)
    keys = jax.random.split(key, len(flat))
    out = [jnp.ones(shape, dtype) if "norm" in jax.tree_util.keystr(path)
           else (std * jax.random.normal(k, shape)).astype(dtype)  # biases nonzero: tests must see them
           for (path, shape), k in zip(flat, keys)]
    return jax.tree.unflatten(treedef, out)


# ---------------------------------------------------------------------------------------- cache
class KVCache(NamedTuple):
    """Fixed-size KV cache. All rows write at the same slot `index`; rows differ by which slots
    are `valid` (padding is never valid) and by their own next position."""
    k: jax.Array  # [L, B, K, S, hd] (CACHE_AXES)
    v: jax.Array  # [L, B, K, S, hd]
    valid: jax.Array  # [B, S] bool: slot holds a real token
    index: jax.Array  # [] int32: next slot to write
    next_pos: jax.Array  # [B] int32: position of each row's next real token


def cache_shape(cfg: ModelConfig, batch: int, size: int) -> tuple[int, ...]:
    """Shape of KVCache.k / .v (CACHE_AXES): the one place the cache layout is written."""
    return (cfg.num_layers, batch, cfg.num_kv_heads, size, cfg.head_dim)


def init_cache(cfg: ModelConfig, batch: int, size: int, dtype=None) -> KVCache:
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = cache_shape(cfg, batch, size)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, size), bool),
                   jnp.zeros((), jnp.int32), jnp.zeros((batch,), jnp.int32))


def cache_axes() -> KVCache:
    return KVCache(CACHE_AXES, CACHE_AXES, ("batch", "cache_length"), (), ("batch",))


# ---------------------------------------------------------------------------------------- pieces
def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    # Statistics in float32, result back in x's dtype before the weight (transformers' order).
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def rope_inverse_frequencies(head_dim: int, rope: RopeConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [head_dim/2] (float32) and the cos/sin scale, per rope_type,
    following transformers' definitions of default, linear, yarn and llama3 RoPE."""
    dim = head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    pos_freqs = np.float32(rope.theta) ** exponents
    inv = (np.float32(1.0) / pos_freqs).astype(np.float32)
    scale = 1.0
    if rope.rope_type == "linear":
        inv = inv / np.float32(rope.factor)
    elif rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * np.pi / inv
        inv_l = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * inv_l / rope.factor + smooth * inv_l
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, inv_l).astype(np.float32)
    elif rope.rope_type == "yarn":
        inv, scale = _yarn(dim, rope, pos_freqs)
    return inv.astype(np.float32), float(scale)


def _yarn(dim: int, rope: RopeConfig, pos_freqs: np.ndarray) -> tuple[np.ndarray, float]:
    factor, base = rope.factor, rope.theta

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * np.log(scale) + 1.0

    if rope.attention_factor is not None:
        scale = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        scale = float(get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim))
    else:
        scale = get_mscale(factor)

    def correction_dim(rot):
        return (dim * np.log(rope.original_max_position_embeddings / (rot * 2 * np.pi))) / (2 * np.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = np.floor(low), np.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation = (1 - ramp).astype(np.float32)
    inv_extra = np.float32(1.0) / pos_freqs
    inv_inter = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    return (inv_inter * (1 - extrapolation) + inv_extra * extrapolation).astype(np.float32), scale


def rope_tables(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    inv, scale = rope_inverse_frequencies(cfg.head_dim, cfg.rope)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)  # [B, T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, heads, hd]; rotate-half convention (first half pairs with second half)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def positions_from_mask(mask: jax.Array, start: jax.Array | None = None) -> jax.Array:
    """Position of each real token counting only real tokens of its row (padding gets the
    position of the previous real token, which is harmless: it is never attended to)."""
    pos = jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1
    if start is not None:
        pos = pos + start[:, None]
    return jnp.maximum(pos, 0)


# ---------------------------------------------------------------------------------------- layers
def _mm(eq: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum accumulated in float32, rounded once to the operands' dtype (as transformers' bf16
    GEMMs do, and as TPU/GPU matrix units accumulate). A no-op for float32."""
    out = jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)
    return out.astype(jnp.result_type(a.dtype, b.dtype))


def _proj(name: str, eq: str, x: jax.Array, w: jax.Array, delta=None) -> jax.Array:
    """Projection `name` (a key of LAYER_AXES) of x by w, as `_mm`. With `delta` (a layer's
    `LayerTransform.delta`, bound to the layer), delta(name, x) -> None or a float32 term of the
    output's elements (any shape of the same size, e.g. [B, T, out] flattened) is added to the
    float32 accumulator before the single rounding to the output dtype. Without it: `_mm` itself."""
    if delta is None:
        return _mm(eq, x, w)
    extra = delta(name, x)
    if extra is None:
        return _mm(eq, x, w)
    out = jnp.einsum(eq, x, w, preferred_element_type=jnp.float32)
    out = out + extra.astype(jnp.float32).reshape(out.shape)
    return out.astype(jnp.result_type(x.dtype, w.dtype))


def _attention(x, lp, cos, sin, key_valid, q_slots, layer_cache, index, cfg: ModelConfig, plan,
               attn_chunk: int | None = ATTN_CHUNK, delta=None):
    B, T, _ = x.shape
    q = _proj("q", "btd,dhk->bthk", x, lp["q"], delta)
    k = _proj("k", "btd,dhk->bthk", x, lp["k"], delta)
    v = _proj("v", "btd,dhk->bthk", x, lp["v"], delta)
    if cfg.qkv_bias:
        q, k, v = q + lp["q_bias"], k + lp["k_bias"], v + lp["v_bias"]
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q = constrain(plan, q, ("batch", "length", "act_heads", "head_dim"))

    if layer_cache is None:
        # Without a cache the keys are the new tokens, put kv-head-major like the cache.
        keys, values, new_cache = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), None
    else:
        # The whole [L, B, K, S, hd] cache rides in the layer loop's carry: this layer writes its
        # T new slots into it in place and reads its own layer back. (As scanned-over inputs and
        # outputs, XLA kept an input and an output copy of the cache and copied every layer out
        # and back in each decode step: the TPU compiler showed 2 extra caches of HBM.)
        ks, vs, layer = layer_cache
        kv_major = lambda a, c: a.astype(c.dtype).transpose(0, 2, 1, 3)[None]  # noqa: E731  [1, B, K, T, hd]
        ks = jax.lax.dynamic_update_slice(ks, kv_major(k, ks), (layer, 0, 0, index, 0))
        vs = jax.lax.dynamic_update_slice(vs, kv_major(v, vs), (layer, 0, 0, index, 0))
        new_cache = (ks, vs)
        keys = jax.lax.dynamic_index_in_dim(ks, layer, keepdims=False)  # [B, K, S, hd]
        values = jax.lax.dynamic_index_in_dim(vs, layer, keepdims=False)
    # A one-token decode step over a long cache reads its blocks in `_attend_live` (see KV_BLOCK).
    live_prefix = layer_cache is not None and T == 1 and keys.shape[2] > KV_BLOCK
    keys = keys.astype(q.dtype)

    max_block = T if attn_chunk is None else attn_chunk
    block = min(max_block, max(ATTN_BLOCK, -(-T // ATTN_MAX_BLOCKS)))
    if live_prefix:  # blocks read from the cache itself (the layer slices above are dead code to XLA)
        out = _attend_live(q, ks, vs, layer, key_valid, q_slots, index + T, cfg, plan)
    elif layer_cache is None and cfg.attention != "xla":
        # A fused kernel (splash on TPU, cuDNN on GPU; see opdjax.models.attention): without a
        # cache the keys are the queries' own tokens, so key_valid is the row's padding mask.
        out = attention.attend_full(q, k.astype(q.dtype), v, key_valid, cfg, plan)
        out = constrain(plan, out, ("batch", "length", "act_heads", "head_dim"))
    elif layer_cache is None and T > block and T <= block * ATTN_MAX_BLOCKS:
        # Causal block skipping (see ATTN_BLOCK): block [t0, t1) against keys [0, t1).
        outs = [_attend_kv_major(q[:, t0:t0 + block], keys[:, :, :t0 + block], values[:, :, :t0 + block],
                                 key_valid[:, :t0 + block], q_slots[t0:t0 + block], cfg, plan)
                for t0 in range(0, T, block)]
        out = constrain(plan, jnp.concatenate(outs, axis=1), ("batch", "length", "act_heads", "head_dim"))
    elif attn_chunk is None or T <= attn_chunk:
        out = _attend_kv_major(q, keys, values, key_valid, q_slots, cfg, plan)
    else:
        # Query blocks of `attn_chunk` rows, one at a time (lax.map: the program does not grow
        # with T), each against all S keys: scores are [B, K, G, c, S] instead of [.., T, S].
        # The last block is padded (zero queries, the last slot) and its padding dropped.
        c = attn_chunk
        n = -(-T // c)
        pad = n * c - T
        q_blocks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, n, c, *q.shape[2:]).swapaxes(0, 1)
        slot_blocks = jnp.pad(q_slots, (0, pad), mode="edge").reshape(n, c)
        out = jax.lax.map(lambda a: _attend_kv_major(a[0], keys, values, key_valid, a[1], cfg, plan),
                          (q_blocks, slot_blocks))
        out = out.swapaxes(0, 1).reshape(B, n * c, *out.shape[3:])[:, :T]
        out = constrain(plan, out, ("batch", "length", "act_heads", "head_dim"))
    y = _proj("o", "bthk,hkd->btd", out.astype(x.dtype), lp["o"], delta)
    if cfg.o_bias:
        y = y + lp["o_bias"]
    return y, new_cache


def _attend(q, keys, values, key_valid, q_slots, cfg: ModelConfig, plan):
    """Attention of queries q [B, t, H, hd] at cache slots q_slots [t] to keys/values
    [B, S, K, hd]: a query sees the valid slots at or before its own. Returns [B, t, H, hd]."""
    return _attend_kv_major(q, keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3), key_valid, q_slots,
                            cfg, plan)


def _attend_kv_major(q, kh, vh, key_valid, q_slots, cfg: ModelConfig, plan):
    """`_attend` with keys/values kv-head-major, [B, K, S, hd] (the cache's layout)."""
    B, T = q.shape[:2]
    K, G, hd = cfg.num_kv_heads, cfg.num_groups, cfg.head_dim
    S = kh.shape[2]
    q = constrain(plan, q, ("batch", "length", "act_heads", "head_dim"))
    # Grouped-query attention without repeating K/V: query head h = kv_head * G + g, computed as
    # [B, K, G, T, hd] x [B, K, S, hd] (batch dims leading). The mask is an additive float32 bias
    # (0 or finfo.min, a finite floor: fully masked rows of padding queries stay finite), not a
    # select, so XLA can fuse scores, mask, softmax and the PV product (README, "Performance").
    qh = q.reshape(B, T, K, G, hd).transpose(0, 2, 3, 1, 4)
    visible = key_valid[:, None, :] & (jnp.arange(S)[None, None, :] <= q_slots[None, :, None])  # [B,T,S]
    bias = jnp.where(visible, 0.0, jnp.finfo(jnp.float32).min)[:, None, None]
    scores = jnp.einsum("bkgtd,bksd->bkgts", qh, kh, preferred_element_type=jnp.float32) * (hd ** -0.5)
    probs = jax.nn.softmax(scores + bias, axis=-1).astype(vh.dtype)
    out = _mm("bkgts,bksd->bkgtd", probs, vh).transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, hd)
    # Queries that see no key at all (left padding) get zeros, whatever S: so blocks that skip
    # keys give the same result as one block (a uniform average would depend on S).
    out = jnp.where(visible.any(axis=-1)[:, :, None, None], out, 0)
    return constrain(plan, out, ("batch", "length", "act_heads", "head_dim"))


def _attend_live(q, ks, vs, layer, key_valid, q_slots, live, cfg: ModelConfig, plan):
    """`_attend` of one query per row against layer `layer` of the whole cache ks, vs
    [L, B, K, S, hd], reading only the blocks of KV_BLOCK slots up to slot `live` - 1 (the filled
    prefix; a traced bound, so a while loop over blocks) with a running softmax: the maximum,
    the sum and the weighted values are rescaled as each block raises the maximum (as flash
    attention does). Same result as `_attend` over all S slots, up to float rounding: slots at or
    after `live` are never visible to the query anyway. Returns [B, 1, H, hd]."""
    B, T = q.shape[:2]
    K, G, hd = cfg.num_kv_heads, cfg.num_groups, cfg.head_dim
    S, n = ks.shape[3], KV_BLOCK
    qh = constrain(plan, q, ("batch", "length", "act_heads", "head_dim")).reshape(B, T, K, G, hd).transpose(0, 2, 3, 1, 4)

    def block(j, carry):
        m, total, acc, seen = carry
        # The last block may run past S: it is read from S - n instead, its already-seen slots masked.
        start = jnp.minimum(j * n, S - n)
        kb = jax.lax.dynamic_slice(ks, (layer, 0, 0, start, 0), (1, B, K, n, hd))[0].astype(q.dtype)
        vb = jax.lax.dynamic_slice(vs, (layer, 0, 0, start, 0), (1, B, K, n, hd))[0]
        slots = start + jnp.arange(n)
        visible = (jax.lax.dynamic_slice_in_dim(key_valid, start, n, axis=1)[:, None, :]
                   & (slots[None, None, :] <= q_slots[None, :, None]) & (slots >= j * n)[None, None, :])  # [B,T,n]
        scores = jnp.einsum("bkgtd,bksd->bkgts", qh, kb, preferred_element_type=jnp.float32) * (hd ** -0.5)
        scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
        m_new = jnp.maximum(m, scores.max(axis=-1))
        shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # nothing visible yet: keep every term 0
        p = jnp.exp(scores - shift[..., None])
        rescale = jnp.exp(m - shift)
        total = total * rescale + p.sum(axis=-1)
        acc = acc * rescale[..., None] + jnp.einsum("bkgts,bksd->bkgtd", p.astype(vb.dtype), vb,
                                                    preferred_element_type=jnp.float32)
        return m_new, total, acc, seen | visible.any(axis=-1)

    init = (jnp.full((B, K, G, T), -jnp.inf, jnp.float32), jnp.zeros((B, K, G, T), jnp.float32),
            jnp.zeros((B, K, G, T, hd), jnp.float32), jnp.zeros((B, T), bool))
    # `j < ceil(S / n)` in the condition is redundant at run time; it gives the loop a constant
    # upper bound, which the HLO cost walker (aot/hlo.py) reads as its trip count (as the decode
    # loop's), so compiled rooflines count the whole cache: an upper bound, not one block.
    live_blocks = (live + n - 1) // n
    _, _, total, acc, seen = jax.lax.while_loop(
        lambda c: (c[0] < live_blocks) & (c[0] < -(-S // n)),
        lambda c: (c[0] + 1, *block(c[0], c[1:])), (jnp.zeros((), jnp.int32), *init))
    out = (acc / jnp.where(total > 0, total, 1.0)[..., None]).astype(vs.dtype)
    out = out.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, hd)
    # A query that sees no slot at all gets zeros, as in `_attend`.
    out = jnp.where(seen[:, :, None, None], out, 0)
    return constrain(plan, out, ("batch", "length", "act_heads", "head_dim"))


def _mlp(x, lp, plan, delta=None):
    gate = _proj("gate", "btd,df->btf", x, lp["gate"], delta)
    up = _proj("up", "btd,df->btf", x, lp["up"], delta)
    h = constrain(plan, jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
    return _proj("down", "btf,fd->btd", h, lp["down"], delta)


def _decoder_layer(x, lp, cos, sin, key_valid, q_slots, layer_cache, index, cfg, plan, attn_chunk, delta=None):
    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    attn, new_cache = _attention(h, lp, cos, sin, key_valid, q_slots, layer_cache, index, cfg, plan,
                                 attn_chunk, delta)
    x = x + attn
    x = x + _mlp(rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps), lp, plan, delta)
    return constrain(plan, x, ("batch", "length", "act_embed")), new_cache


# ---------------------------------------------------------------------------------------- model
@functools.partial(jax.tree_util.register_dataclass, data_fields=("stacked", "shared"),
                   meta_fields=("fn", "delta"))
@dataclasses.dataclass(frozen=True)
class LayerTransform:
    """A per-layer change of the model inside `apply`'s layer scan, in either or both of two forms:

    fn: layer l runs with params fn(layer_params_l, stacked_l, shared) instead of layer_params_l
        (a rewrite of the weights; None: the params as they are);
    delta: every projection y = x @ W of layer l (name in q, k, v, o, gate, up, down) gets
        delta(name, x, stacked_l, shared) added to its float32 accumulator before the one rounding
        to the output dtype; delta returns None for a projection it leaves alone, else a float32
        array of the output's size ([B, T, out], out = the output dims flattened row-major).

    stacked: a pytree of [L, ...] arrays, scanned with the layers (fn and delta see layer l's
    slice); shared: a pytree given whole to every layer. A pytree itself, so it can be a jit
    argument; fn and delta are static (hashable: part of the compilation key). LoRA's activation
    path (y = x @ W + s * (x @ A) @ B, as PEFT computes it): opdjax.models.lora.layer_transform."""
    fn: Callable[[Params, Any, Any], Params] | None
    stacked: Any
    shared: Any = None
    delta: Callable[[str, jax.Array, Any, Any], jax.Array | None] | None = None


def apply(params: Params, tokens: jax.Array, cfg: ModelConfig, *, mask: jax.Array | None = None,
          positions: jax.Array | None = None, cache: KVCache | None = None,
          plan: ShardingPlan | None = None,
          attn_chunk: int | None = ATTN_CHUNK, remat: bool = False,
          layer_transform: LayerTransform | None = None) -> tuple[jax.Array, KVCache | None]:
    """Final normed hidden states [B, T, D] for T new tokens, and the updated cache.

    tokens: [B, T] int; mask: [B, T] bool (False = padding), default all True;
    positions: [B, T] int, default counted from the mask (continuing from the cache);
    attn_chunk: static int, attention runs over query blocks of this many rows when T exceeds
    it (None: all T queries at once). Same result either way; bounds the float32 scores.
    remat: static bool, recompute each layer in the backward pass instead of keeping its
    intermediates (training: activation memory is one [B, T, D] per layer plus one layer's).
    layer_transform: None, or a LayerTransform applied to each layer inside the scan, one layer at
    a time (the params are not modified; gradients reach its arrays). None is exactly the plain
    model.
    """
    B, T = tokens.shape
    mask = jnp.ones((B, T), bool) if mask is None else mask.astype(bool)
    if cache is None:
        index = jnp.zeros((), jnp.int32)
        key_valid = mask
        start = None
    else:
        index = cache.index
        key_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, index))
        start = cache.next_pos
    if positions is None:
        positions = positions_from_mask(mask, start)
    q_slots = index + jnp.arange(T)
    cos, sin = rope_tables(positions, cfg)

    x = jnp.take(params["embed"], tokens, axis=0)
    x = constrain(plan, x, ("batch", "length", "act_embed"))

    stacked = None if layer_transform is None else layer_transform.stacked

    def layer(x, lp, layer_stacked, layer_cache):
        delta = None
        if layer_transform is not None:
            t = layer_transform
            if t.fn is not None:
                lp = t.fn(lp, layer_stacked, t.shared)
            if t.delta is not None:
                delta = lambda name, h: t.delta(name, h, layer_stacked, t.shared)  # noqa: E731
        return _decoder_layer(x, lp, cos, sin, key_valid, q_slots, layer_cache, index, cfg, plan,
                              attn_chunk, delta)

    if isinstance(params["layers"], (tuple, list)):
        # Per-layer weights (`unstack_layers`, the decode loop's layout): a Python loop over layers.
        if layer_transform is not None or remat:
            raise ValueError("layer_transform and remat need the stacked [L, ...] layers, not unstack_layers' tuple.")
        ks, vs = (None, None) if cache is None else (cache.k, cache.v)
        for i, lp in enumerate(params["layers"]):
            x, kv = layer(x, lp, None, None if cache is None else (ks, vs, i))
            ks, vs = (None, None) if cache is None else kv
        new_cache = None if cache is None else KVCache(
            ks, vs, key_valid, index + T, cache.next_pos + mask.sum(axis=1, dtype=jnp.int32))
    elif cache is None:
        def body(x, scanned):
            return layer(x, *scanned, None)[0], None

        if remat:
            body = jax.checkpoint(body)
        x, _ = jax.lax.scan(body, x, (params["layers"], stacked))
        new_cache = None
    else:
        def body_cached(carry, scanned):  # the cache is carried and updated in place (see _attention)
            x, ks, vs, i = carry
            x, (ks, vs) = layer(x, *scanned, (ks, vs, i))
            return (x, ks, vs, i + 1), None

        (x, ks, vs, _), _ = jax.lax.scan(body_cached, (x, cache.k, cache.v, jnp.zeros((), jnp.int32)),
                                         (params["layers"], stacked))
        new_cache = KVCache(ks, vs, key_valid, index + T, cache.next_pos + mask.sum(axis=1, dtype=jnp.int32))
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    return x, new_cache


def unstack_layers(params: Params, plan: ShardingPlan | None = None) -> Params:
    """params with "layers" as a tuple of L per-layer dicts (each leaf without its leading L axis),
    which `apply` runs as a Python loop over layers: the decode loop's layout (rollout.decode).

    Why: in a memory-bound decode step, `lax.scan` over the stacked [L, ...] weights makes XLA CPU
    copy each layer's weights out of the stack on every step (a dynamic-slice its dot kernels cannot
    take as an operand): every weight byte written and read twice more per token. Slicing once,
    before the decode loop, costs one copy of the layer weights for the duration of a generate call
    (measured: bench/bench_vs_tunix.py, README "Performance"). Slicing inside the loop with static
    indices, or unrolling the scan, does not help: XLA then keeps all L slices live at once."""
    layers = params["layers"]
    if isinstance(layers, (tuple, list)):
        return params
    n = next(iter(layers.values())).shape[0]
    per_layer = []
    for i in range(n):
        lp = {name: a[i] for name, a in layers.items()}
        if plan is not None:
            lp = {name: plan.constrain(a, LAYER_AXES[name][1:]) for name, a in lp.items()}
        per_layer.append(lp)
    return {**params, "layers": tuple(per_layer)}


def unembedding(params: Params) -> jax.Array:
    """[V, D] output embedding (the input embedding when tied)."""
    return params["lm_head"] if "lm_head" in params else params["embed"]


def logits_from_hidden(params: Params, hidden: jax.Array, plan: ShardingPlan | None = None) -> jax.Array:
    """float32 logits [..., V]; accumulate in float32 whatever the params' dtype."""
    logits = jnp.einsum("...d,vd->...v", hidden, unembedding(params), preferred_element_type=jnp.float32)
    if plan is not None and logits.ndim == 3:
        logits = plan.constrain(logits, ("batch", "length", "act_vocab"))
    return logits


def forward(params: Params, tokens: jax.Array, cfg: ModelConfig, *, mask=None, positions=None,
            cache: KVCache | None = None, plan: ShardingPlan | None = None,
            attn_chunk: int | None = ATTN_CHUNK, layer_transform: LayerTransform | None = None):
    """Logits [B, T, V] (float32) and the updated cache (None without one); arguments as in `apply`."""
    hidden, cache = apply(params, tokens, cfg, mask=mask, positions=positions, cache=cache, plan=plan,
                          attn_chunk=attn_chunk, layer_transform=layer_transform)
    return logits_from_hidden(params, hidden, plan), cache


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def jit_forward(cfg: ModelConfig, plan: ShardingPlan | None = None):
    """`fn(params, tokens, mask) -> logits` jitted with explicit NamedShardings on the plan's mesh
    (params by the logical rules, tokens by batch, logits by batch and vocab)."""
    if plan is None:
        return jax.jit(lambda params, tokens, mask: forward(params, tokens, cfg, mask=mask)[0])
    batch_shards = plan.batch_shards
    fn = jax.jit(
        lambda params, tokens, mask: forward(params, tokens, cfg, mask=mask, plan=plan)[0],
        in_shardings=(param_shardings(cfg, plan), plan.sharding(("batch", "length")),
                      plan.sharding(("batch", "length"))),
        out_shardings=plan.sharding(("batch", "length", "act_vocab"), (batch_shards, 1, cfg.vocab_size)),
    )

    def checked(params, tokens, mask):
        if tokens.shape[0] % batch_shards:
            raise ValueError(
                f"batch size {tokens.shape[0]} is not divisible by the {batch_shards} batch shards of "
                f"mesh {dict(plan.mesh.shape)} (data x fsdp); pad the batch or change mesh.shape."
            )
        return fn(params, tokens, mask)

    return checked

