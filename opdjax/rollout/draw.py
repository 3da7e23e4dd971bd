"""One token per row from softmax(logits), by inverse CDF with one uniform number per row: what every
sampler here draws with (OPD sampler, DAIL's mixed rollout, the toy pair's evaluation sampler).

Why not `jax.random.categorical`: it draws a Gumbel number for every vocabulary entry, i.e.
threefry over B x V values per decode step; at B=8, V=32768 that was 3-5 ms of a ~28 ms CPU
decode step (bench/bench_vs_tunix.py), and DAIL's mixed rollout draws up to `retries + 1` times per
step. Here threefry makes B numbers; the rest is one exp and two cumulative sums.

Exactness: the probabilities are exp(x - max) in float32 and the cumulative sums are taken in
two levels (blocks of BLOCK entries, then within the chosen block), so a token's interval is off
from its probability by about one float32 rounding of the running sum (~1e-7 of the mass): the
same order as the Gumbel route's own float32 limit (its uniforms have 2^-24 resolution, so a
token more than ~17 nats below the top can never win there). A token with probability exactly 0
(-inf logit: cut by top-k / top-p) is never drawn, whatever the rounding.

Keys: the uniform comes from `jax.random.uniform(key, (B,))`; with threefry (partitionable) a row's
draw depends on the key, its row index and its logits only, not on how the batch is sharded.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK = 256  # entries per block of the first-level cumulative sum


def _first_true_or_last_positive(hit: jax.Array, positive: jax.Array) -> jax.Array:
    """Index of the first True in `hit` per row; if none (rounding at the top end), the last index
    where `positive` (a row always has one: the max logit has probability 1 before normalising)."""
    n = hit.shape[-1]
    last_positive = n - 1 - jnp.argmax(positive[..., ::-1], axis=-1)
    return jnp.where(hit.any(axis=-1), jnp.argmax(hit, axis=-1), last_positive)


def categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """[B] int32 draws from softmax(logits [B, V]) (float32; -inf = excluded), one uniform per row.
    Same distribution as `jax.random.categorical(key, logits)`, different random stream."""
    B, V = logits.shape
    x = logits.astype(jnp.float32)
    p = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))  # unnormalised; 0 where excluded
    nb = -(-V // BLOCK)
    blocks = jnp.pad(p, ((0, 0), (0, nb * BLOCK - V))).reshape(B, nb, BLOCK)
    block_mass = blocks.sum(axis=-1)  # [B, nb]
    upto = jnp.cumsum(block_mass, axis=-1)  # mass of blocks 0..j
    u = jax.random.uniform(key, (B,), jnp.float32) * upto[:, -1]  # in [0, total)
    # The block whose cumulative interval holds u (a block with mass 0 is never chosen).
    j = _first_true_or_last_positive((upto > u[:, None]) & (block_mass > 0), block_mass > 0)
    before = jnp.where(j > 0, jnp.take_along_axis(upto, jnp.maximum(j - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
    within = jnp.take_along_axis(blocks, j[:, None, None], axis=1)[:, 0]  # [B, BLOCK]
    t = _first_true_or_last_positive((jnp.cumsum(within, axis=-1) > (u - before)[:, None]) & (within > 0),
                                     within > 0)
    return (j * BLOCK + t).astype(jnp.int32)
