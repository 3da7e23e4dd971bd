"""DAIL's mixed rollout (DAIL.md, step 1), a sampler variant: one set of weights M, two contexts,
one generated text (the decode loop of `rollout.decode` over two KV caches).

Each row carries two KV caches over the same weights: the *student context* (the problem alone)
and the *expert context* (the problem plus the expert solution as a reference). Every step both
caches are fed the same chosen token, so both contexts always extend the same text. The choice:

  P = the student context's top-n next-token distribution, renormalised over those n;
  V = the expert context's probabilities on its own top-n, NOT renormalised (0 elsewhere);
  tau = 0: draw from P;   tau = 1: draw from V renormalised ("direct");
  otherwise draw c ~ P up to `retries` times and take the first with V[c] >= tau; if none passes,
  draw from V renormalised (a "fallback": the expert context took over).

So the student speaks unless it strays from the expert's path. Banned ids (the end-of-thinking
token during synthesis) are removed as the authors remove them (their
generate_expert_completions.py: the suppressed token's probability is set to 0 in both top-20
arrays, and only the proposal and the fallback draw renormalise): each top-n is taken over the
whole vocabulary, banned ids included, and a banned id in it is then dropped. So P and the
fallback draw are renormalised over the remaining ids, but V is NOT: V[c] keeps its probability
under the full softmax, in which the banned id still holds its mass. When the expert context puts
mass q on `</think>`, every other V[c] stays below 1 - q, so the student's proposals pass tau less
often there, and the expert (renormalised) takes over (tests/test_dail_mixed.py has a case where
renormalising V would flip every decision). A top-n that is all banned ids is refused by
`MixedSettings.check` (top_n must exceed the number of banned ids).

Keys: step i uses k_i = fold_in(key, i), as the student sampler does, and at tau = 0 (tau = 1)
the draw is exactly `sampler.sample`'s with top_k = n on the student (expert) prompt with the
same key (with no banned id in the step's top-n) — the extremes are the plain samplers, not
approximations of them. The retries use
fold_in(k_i, j) for j = 1..retries-1 (the first retry is k_i itself) and the fallback
fold_in(k_i, retries).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from opdjax.models.config import ModelConfig
from opdjax.rollout import draw
from opdjax.rollout.decode import decode
from opdjax.rollout.sampler import SamplingSettings, sampling_logits
from opdjax.sharding import ShardingPlan


@dataclasses.dataclass(frozen=True)
class MixedSettings:
    """Static (hashable) settings of the mixed rollout; `check` names the config field."""
    max_new_tokens: int
    accept_threshold: float  # tau
    top_n: int = 20
    retries: int = 5
    stop_ids: tuple[int, ...] = ()
    banned_ids: tuple[int, ...] = ()
    cache_dtype: str = ""

    def check(self, vocab_size: int, section: str = "synthesis") -> "MixedSettings":
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"config.rollout.max_new_tokens={self.max_new_tokens!r} must be an integer >= 1.")
        if not 0.0 <= float(self.accept_threshold) <= 1.0:
            raise ValueError(f"config.{section}.accept_threshold={self.accept_threshold!r} must be in [0, 1] "
                             "(0 = student only, 1 = expert only).")
        if not (isinstance(self.top_n, int) and 1 <= self.top_n <= vocab_size):
            raise ValueError(f"config.{section}.top_n={self.top_n!r} must be an integer in [1, vocab size {vocab_size}].")
        if not (isinstance(self.retries, int) and self.retries >= 1):
            raise ValueError(f"config.{section}.retries={self.retries!r} must be an integer >= 1.")
        if not self.stop_ids:
            raise ValueError(f"config.{section}: no stop token (the tokenizer has no EOS?).")
        for name, ids in (("stop", self.stop_ids), ("banned", self.banned_ids)):
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise ValueError(f"config.{section}: {name} id {bad[0]} is outside the vocabulary [0, {vocab_size}).")
        clash = sorted(set(self.stop_ids) & set(self.banned_ids))
        if clash:
            raise ValueError(f"config.{section}.ban_tokens bans stop id {clash[0]}: generation could never end.")
        if self.top_n <= len(self.banned_ids):
            raise ValueError(f"config.{section}.top_n={self.top_n} must exceed the number of banned ids "
                             f"({len(self.banned_ids)}, config.{section}.ban_tokens): a top-n of banned ids only "
                             "leaves nothing to draw.")
        if self.cache_dtype not in ("", "float32", "bfloat16"):
            raise ValueError(f"config.rollout.cache_dtype={self.cache_dtype!r}: choose '', float32 or bfloat16.")
        return self

    @property
    def top_n_sampling(self) -> SamplingSettings:
        """The plain sampler's settings that draw from P (or V renormalised): top-k = n, T = 1."""
        return SamplingSettings(max_new_tokens=self.max_new_tokens, temperature=1.0, top_k=self.top_n,
                                candidates=1, stop_ids=self.stop_ids, cache_dtype=self.cache_dtype)


class MixedRollout(NamedTuple):
    tokens: jax.Array  # [B, N] int32, pad after the stop token
    mask: jax.Array  # [B, N] bool, real tokens (the stop token included)
    from_expert: jax.Array  # [B, N] bool, drawn from V (a fallback, or every token at tau = 1)


def _ban(logits: jax.Array, banned_ids: tuple[int, ...]) -> jax.Array:
    logits = logits.astype(jnp.float32)
    if banned_ids:
        logits = logits.at[..., jnp.asarray(banned_ids)].set(-jnp.inf)
    return logits


def expert_top_probs(expert_logits: jax.Array, top_n: int, banned_ids: tuple[int, ...] = ()) -> jax.Array:
    """V: the expert context's softmax probabilities (over the whole vocabulary) on its top-n ids,
    0 elsewhere and 0 at banned ids, not renormalised ([B, V]; the authors' rule, module docstring)."""
    logits = expert_logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    kth = jax.lax.top_k(logits, top_n)[0][..., -1:]
    v = jnp.where(logits >= kth, probs, 0.0)
    if banned_ids:
        v = v.at[..., jnp.asarray(banned_ids)].set(0.0)
    return v


def choose_mixed(student_logits: jax.Array, expert_logits: jax.Array, key: jax.Array,
                 settings: MixedSettings) -> tuple[jax.Array, jax.Array]:
    """One position for a batch: (token [B] int32, from_expert [B] bool). Logits are [B, V]."""
    banned = settings.banned_ids
    top = settings.top_n_sampling
    # top-n over the whole vocabulary, then banned ids dropped: draws from P / V renormalised
    p_logits = _ban(sampling_logits(student_logits.astype(jnp.float32), top), banned)
    v_logits = _ban(sampling_logits(expert_logits.astype(jnp.float32), top), banned)
    tau = float(settings.accept_threshold)
    B = student_logits.shape[0]
    if tau == 0.0:
        return draw.categorical(key, p_logits), jnp.zeros((B,), bool)
    if tau == 1.0:
        return draw.categorical(key, v_logits), jnp.ones((B,), bool)
    R = settings.retries
    keys = [key] + [jax.random.fold_in(key, j) for j in range(1, R)]
    cands = jnp.stack([draw.categorical(k, p_logits) for k in keys])  # [R, B]
    v = expert_top_probs(expert_logits, settings.top_n, banned)  # banned ids at 0, not renormalised
    accepted = jnp.take_along_axis(v, cands.T, axis=-1).T >= tau  # [R, B]
    first = jnp.argmax(accepted, axis=0)  # the first accepted try (0 when none is)
    any_accepted = jnp.any(accepted, axis=0)
    fallback = draw.categorical(jax.random.fold_in(key, R), v_logits)
    token = jnp.where(any_accepted, jnp.take_along_axis(cands, first[None], axis=0)[0], fallback)
    return token.astype(jnp.int32), ~any_accepted


@functools.partial(jax.jit, static_argnames=("cfg", "settings", "pad_id", "plan", "samples"))
def mixed_rollout(params, student_prompt: jax.Array, student_mask: jax.Array, expert_prompt: jax.Array,
                  expert_mask: jax.Array, key: jax.Array, cfg: ModelConfig, settings: MixedSettings, *,
                  pad_id: int = 0, plan: ShardingPlan | None = None, samples: int = 1) -> MixedRollout:
    """Generate up to `settings.max_new_tokens` tokens per row from the two contexts (left- or
    right-padded prompts of any two lengths). Stops once every row has emitted a stop token.

    samples: rows per prompt row; the outputs have prompt rows x samples rows, sample j of prompt
    u at row u * samples + j (the same as passing each prompt row repeated `samples` times; each
    prompt is prefilled once)."""
    def choose(i, logits, state):
        token, from_expert = choose_mixed(logits[0], logits[1], jax.random.fold_in(key, i), settings)
        return token, (from_expert,), state

    tokens, mask, (from_expert,) = decode(
        params, [(student_prompt, student_mask), (expert_prompt, expert_mask)], cfg, choose, (),
        max_new_tokens=settings.max_new_tokens, stop_ids=settings.stop_ids, record_pads=(False,), pad_id=pad_id,
        plan=plan, cache_dtype=settings.cache_dtype, samples=samples)
    return MixedRollout(tokens, mask, from_expert)
