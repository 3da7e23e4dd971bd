"""Greedy decoding with the fixed-size KV cache: one jitted prefill + a scanned decode loop.

This is the deterministic core the sampler builds on (temperature / top-p / top-k and the
release rule's top-K recording add to the same loop). Prompts may be left- or right-padded;
every row continues from its own last real token.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from opdjax.models import qwen
from opdjax.models.config import ModelConfig
from opdjax.sharding import ShardingPlan


def last_real_index(mask: jax.Array) -> jax.Array:
    """Index of each row's last real token (works for left and right padding)."""
    T = mask.shape[1]
    return T - 1 - jnp.argmax(mask[:, ::-1], axis=1)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "plan"))
def greedy_generate(params, prompt: jax.Array, prompt_mask: jax.Array, cfg: ModelConfig, *,
                    max_new_tokens: int, eos_id: jax.Array | int, pad_id: int = 0,
                    plan: ShardingPlan | None = None):
    """Returns (tokens [B, N], mask [B, N]): the greedy continuation, and which tokens are real
    (up to and including the first EOS; `pad_id` after it)."""
    B, P = prompt.shape
    cache = qwen.init_cache(cfg, B, P + max_new_tokens, jax.tree.leaves(params)[0].dtype)
    hidden, cache = qwen.apply(params, prompt, cfg, mask=prompt_mask, cache=cache, plan=plan)
    last = jnp.take_along_axis(hidden, last_real_index(prompt_mask)[:, None, None], axis=1)
    first = jnp.argmax(qwen.logits_from_hidden(params, last[:, 0]), axis=-1).astype(prompt.dtype)
    eos = jnp.atleast_1d(jnp.asarray(eos_id))

    def step(carry, _):
        cache, token, done = carry
        emitted = jnp.where(done, pad_id, token)
        real = ~done
        done = done | jnp.isin(token, eos)
        logits, cache = qwen.forward(params, emitted[:, None], cfg, mask=real[:, None], cache=cache, plan=plan)
        nxt = jnp.argmax(logits[:, 0], axis=-1).astype(token.dtype)
        return (cache, nxt, done), (emitted, real)

    (_, _, _), (tokens, real) = jax.lax.scan(step, (cache, first, jnp.zeros((B,), bool)), None,
                                             length=max_new_tokens)
    return tokens.T, real.T
