"""Greedy decoding: the decode loop of `rollout.decode` choosing the argmax. Prompts may be left-
or right-padded; every row continues from its own last real token."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from opdjax.models.config import ModelConfig
from opdjax.rollout.decode import decode
from opdjax.sharding import ShardingPlan


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "plan"))
def greedy_generate(params, prompt: jax.Array, prompt_mask: jax.Array, cfg: ModelConfig, *,
                    max_new_tokens: int, eos_id: jax.Array | int, pad_id: int = 0,
                    plan: ShardingPlan | None = None):
    """Returns (tokens [B, N], mask [B, N]): the greedy continuation, and which tokens are real
    (up to and including the first EOS; `pad_id` after it). eos_id: one id or an array of ids."""
    def choose(i, logits, state):
        return jnp.argmax(logits[0], axis=-1).astype(prompt.dtype), (), state

    tokens, mask, _ = decode(params, [(prompt, prompt_mask)], cfg, choose, (), max_new_tokens=max_new_tokens,
                             stop_ids=eos_id, pad_id=pad_id, plan=plan)
    return tokens, mask
