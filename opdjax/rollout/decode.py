"""The one decode loop every generator uses: prefill each context into a fixed-size KV cache, then
a `lax.while_loop` that feeds every context the chosen token and stops once every row has emitted
a stop token (the outputs keep their fixed [B, N] shape).

What differs between generators is only how the next token is chosen (`Choose`): the OPD sampler
(`sampler.sample`), greedy decoding (`greedy.greedy_generate`), DAIL's mixed rollout over two
contexts (`mixed.mixed_rollout`) and the toy pair's evaluation sampler (`toy_pair.sample_generate`).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from opdjax.models import qwen
from opdjax.models.config import ModelConfig
from opdjax.sharding import ShardingPlan

# choose(step, logits per context ([B, V] each), state) -> (token [B], records, state).
# Step 0 picks from the prefill's logits, step i + 1 from the logits after feeding token i.
Choose = Callable[[jax.Array, tuple, Any], tuple[jax.Array, tuple, Any]]


def decode_on_per_layer_weights(plan: ShardingPlan | None) -> bool:
    """Whether the decode loop runs on `qwen.unstack_layers` weights: on CPU only. XLA CPU cannot
    feed a dynamic-slice of the stacked [L, ...] weights to its dot kernels, so the layer scan copies
    every layer's weights out of the stack on every step (bench_vs_tunix.py: 201 MB per step at
    75.5M params). The TPU compiler fuses that slice into the matmul (checked, v5p: no weight copy in
    the loop), so per-layer weights would only add a copy of them (+33 MB temp at the bench's shape,
    bf16). GPU keeps the layer scan too: not measured (no GPU was lent to this work), and the copy
    would cost accelerator memory (Qwen3-8B synthesis on H100: +14 GiB)."""
    mesh = getattr(plan, "mesh", None)
    devices = getattr(mesh, "devices", None)
    platform = devices.flat[0].platform if devices is not None else jax.default_backend()
    return platform == "cpu"


def last_real_index(mask: jax.Array) -> jax.Array:
    """Index of each row's last real token (works for left and right padding)."""
    T = mask.shape[1]
    return T - 1 - jnp.argmax(mask[:, ::-1], axis=1)


def prefill(params, prompt: jax.Array, prompt_mask: jax.Array, cfg: ModelConfig, size: int, dtype,
            plan: ShardingPlan | None = None, samples: int = 1):
    """(next-token logits [B * samples, V], KV cache of `size` positions) after each prompt row.

    samples > 1: each prompt row is prefilled once and its cache copied to `samples` rows (row
    u * samples + j is sample j of prompt u), rather than redoing the same prompt `samples` times."""
    cache = qwen.init_cache(cfg, prompt.shape[0], size, dtype)
    hidden, cache = qwen.apply(params, prompt, cfg, mask=prompt_mask, cache=cache, plan=plan)
    last = jnp.take_along_axis(hidden, last_real_index(prompt_mask)[:, None, None], axis=1)[:, 0]
    logits = qwen.logits_from_hidden(params, last)
    if samples > 1:
        rep = lambda x, axis: jnp.repeat(x, samples, axis=axis)  # noqa: E731
        cache = qwen.KVCache(rep(cache.k, 1), rep(cache.v, 1), rep(cache.valid, 0), cache.index,
                             rep(cache.next_pos, 0))
        if plan is not None:
            cache = cache._replace(k=plan.constrain(cache.k, qwen.CACHE_AXES), v=plan.constrain(cache.v, qwen.CACHE_AXES))
        logits = rep(logits, 0)
    return logits, cache


def decode(params, contexts: Sequence[tuple[jax.Array, jax.Array]], cfg: ModelConfig, choose: Choose, state, *,
           max_new_tokens: int, stop_ids, record_pads: tuple = (), pad_id: int = 0,
           plan: ShardingPlan | None = None, cache_dtype: str = "", samples: int = 1):
    """Generate up to `max_new_tokens` tokens after each row of the (left- or right-padded)
    prompts; returns (tokens [B, N], mask [B, N], records) with B = prompt rows x samples.

    contexts: (prompt, prompt_mask) pairs with the same rows; each gets its own KV cache and is fed
      the same chosen tokens, so all of them extend one text (the samplers have one context).
    choose / state: see `Choose`; `state` is carried from step to step (e.g. a PRNG key).
    stop_ids: ids (a tuple or an array) that end a row; the stop token is kept and marked real.
    record_pads: one entry per record `choose` returns: the value written where a row has already
      stopped (and where the loop never reached), or None to write the record as is (buffer zeros).
    cache_dtype: "" = the params' dtype.

    mask marks the real tokens (up to and including the first stop token); tokens is `pad_id`
    after it."""
    N = max_new_tokens
    dtype = cache_dtype or jax.tree.leaves(params)[0].dtype
    firsts = [prefill(params, prompt, mask, cfg, prompt.shape[1] + N, dtype, plan, samples) for prompt, mask in contexts]
    caches = tuple(c for _, c in firsts)
    token, records, state = choose(jnp.zeros((), jnp.int32), tuple(logits for logits, _ in firsts), state)
    B = token.shape[0]
    stop = jnp.atleast_1d(jnp.asarray(stop_ids))
    # Output buffers [N, B, ...], filled row by row; a step never reached keeps the padding values.
    bufs = ((jnp.full((N, B), pad_id, token.dtype), jnp.zeros((N, B), bool))
            + tuple(jnp.zeros((N,) + r.shape, r.dtype) if pad is None else jnp.full((N,) + r.shape, pad, r.dtype)
                    for r, pad in zip(records, record_pads, strict=True)))

    def cond(carry):
        i, *_, done, _ = carry
        return (i < N) & ~jnp.all(done)  # stop early once every row has emitted a stop token

    def body(carry):
        i, caches, (token, records), state, done, bufs = carry
        real = ~done
        emitted = jnp.where(real, token, pad_id)
        done = done | jnp.isin(token, stop)
        fill = lambda a, pad: jnp.where(real.reshape(real.shape + (1,) * (a.ndim - 1)), a, pad)  # noqa: E731
        row = (emitted, real) + tuple(r if pad is None else fill(r, pad) for r, pad in zip(records, record_pads))
        bufs = tuple(jax.lax.dynamic_update_index_in_dim(b, r.astype(b.dtype), i, axis=0) for b, r in zip(bufs, row))
        logits, new_caches = [], []
        for cache in caches:
            step_logits, cache = qwen.forward(step_params, emitted[:, None], cfg, mask=real[:, None], cache=cache,
                                              plan=plan)
            logits.append(step_logits[:, 0])
            new_caches.append(cache)
        token, records, state = choose(i + 1, tuple(logits), state)
        return i + 1, tuple(new_caches), (token, records), state, done, bufs

    # On CPU the loop's steps run on per-layer weights, sliced out of the [L, ...] stack once here
    # rather than by the layer scan on every step (qwen.unstack_layers: the step is memory-bound).
    step_params = qwen.unstack_layers(params, plan) if decode_on_per_layer_weights(plan) else params
    carry = (jnp.zeros((), jnp.int32), caches, (token, records), state, jnp.zeros((B,), bool), bufs)
    *_, bufs = jax.lax.while_loop(cond, body, carry)
    tokens, mask, *records = (b.swapaxes(0, 1) for b in bufs)
    return tokens, mask, tuple(records)
