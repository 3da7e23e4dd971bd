"""DAIL's mixed rollout (DAIL.md, step 1): one set of weights M, two contexts, one generated text.

Each row carries two KV caches over the same weights: the *student context* (the problem alone)
and the *expert context* (the problem plus the expert solution as a reference). Every step both
caches are fed the same chosen token, so both contexts always extend the same text. The choice:

  P = the student context's top-n next-token distribution, renormalised over those n;
  V = the expert context's probabilities on its own top-n, NOT renormalised (0 elsewhere);
  tau = 0: draw from P;   tau = 1: draw from V renormalised ("direct");
  otherwise draw c ~ P up to `retries` times and take the first with V[c] >= tau; if none passes,
  draw from V renormalised (a "fallback": the expert context took over).

So the student speaks unless it strays from the expert's path. Banned ids (the end-of-thinking
token during synthesis) get -inf logits in both contexts before anything else: they are outside
the vocabulary M may choose from, and V is a distribution over what remains.

Keys: step i uses k_i = fold_in(key, i), as the student sampler does, and at tau = 0 (tau = 1)
the draw is exactly `sampler.sample`'s with top_k = n on the student (expert) prompt with the
same key — the extremes are the plain samplers, not approximations of them. The retries use
fold_in(k_i, j) for j = 1..retries-1 (the first retry is k_i itself) and the fallback
fold_in(k_i, retries).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from opdjax.models import qwen
from opdjax.models.config import ModelConfig
from opdjax.rollout.greedy import last_real_index
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
            raise ValueError(f"config.{section}.max_new_tokens={self.max_new_tokens!r} must be an integer >= 1.")
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
        if self.top_n + len(self.banned_ids) > vocab_size:
            raise ValueError(f"config.{section}.top_n={self.top_n} plus {len(self.banned_ids)} banned ids exceed the "
                             f"vocabulary ({vocab_size}).")
        if self.cache_dtype not in ("", "float32", "bfloat16"):
            raise ValueError(f"config.{section}.cache_dtype={self.cache_dtype!r}: choose '', float32 or bfloat16.")
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


def expert_top_probs(expert_logits: jax.Array, top_n: int) -> jax.Array:
    """V: the expert context's softmax probabilities on its top-n ids, 0 elsewhere ([B, V])."""
    probs = jax.nn.softmax(expert_logits, axis=-1)
    kth = jax.lax.top_k(expert_logits, top_n)[0][..., -1:]
    return jnp.where(expert_logits >= kth, probs, 0.0)


def choose_mixed(student_logits: jax.Array, expert_logits: jax.Array, key: jax.Array,
                 settings: MixedSettings) -> tuple[jax.Array, jax.Array]:
    """One position for a batch: (token [B] int32, from_expert [B] bool). Logits are [B, V]."""
    s_logits = _ban(student_logits, settings.banned_ids)
    e_logits = _ban(expert_logits, settings.banned_ids)
    top = settings.top_n_sampling
    p_logits = sampling_logits(s_logits, top)  # -inf outside the student's top-n: draws from P
    v_logits = sampling_logits(e_logits, top)  # draws from V renormalised
    tau = float(settings.accept_threshold)
    B = s_logits.shape[0]
    if tau == 0.0:
        return jax.random.categorical(key, p_logits, axis=-1).astype(jnp.int32), jnp.zeros((B,), bool)
    if tau == 1.0:
        return jax.random.categorical(key, v_logits, axis=-1).astype(jnp.int32), jnp.ones((B,), bool)
    R = settings.retries
    keys = [key] + [jax.random.fold_in(key, j) for j in range(1, R)]
    cands = jnp.stack([jax.random.categorical(k, p_logits, axis=-1) for k in keys])  # [R, B]
    v = expert_top_probs(e_logits, settings.top_n)
    accepted = jnp.take_along_axis(v, cands.T, axis=-1).T >= tau  # [R, B]
    first = jnp.argmax(accepted, axis=0)  # the first accepted try (0 when none is)
    any_accepted = jnp.any(accepted, axis=0)
    fallback = jax.random.categorical(jax.random.fold_in(key, R), v_logits, axis=-1)
    token = jnp.where(any_accepted, jnp.take_along_axis(cands, first[None], axis=0)[0], fallback)
    return token.astype(jnp.int32), ~any_accepted


def _prefill(params, prompt, prompt_mask, cfg, size, dtype, plan, samples):
    """Prefill each distinct prompt once, then give each of its `samples` rows a copy of the cache
    (row u * samples + j is sample j of prompt u): the samples of one problem share their context,
    so prefilling them separately would redo the same work `samples` times."""
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


@functools.partial(jax.jit, static_argnames=("cfg", "settings", "pad_id", "plan", "samples"))
def mixed_rollout(params, student_prompt: jax.Array, student_mask: jax.Array, expert_prompt: jax.Array,
                  expert_mask: jax.Array, key: jax.Array, cfg: ModelConfig, settings: MixedSettings, *,
                  pad_id: int = 0, plan: ShardingPlan | None = None, samples: int = 1) -> MixedRollout:
    """Generate up to `settings.max_new_tokens` tokens per row from the two contexts (left- or
    right-padded prompts of any two lengths). Stops once every row has emitted a stop token.

    samples: rows per prompt row; the outputs have prompt rows x samples rows, sample j of prompt
    u at row u * samples + j (the same as passing each prompt row repeated `samples` times)."""
    N = settings.max_new_tokens
    B = student_prompt.shape[0] * samples
    dtype = settings.cache_dtype or jax.tree.leaves(params)[0].dtype
    s_logits, s_cache = _prefill(params, student_prompt, student_mask, cfg, student_prompt.shape[1] + N, dtype, plan,
                                 samples)
    e_logits, e_cache = _prefill(params, expert_prompt, expert_mask, cfg, expert_prompt.shape[1] + N, dtype, plan,
                                 samples)
    first = choose_mixed(s_logits, e_logits, jax.random.fold_in(key, 0), settings)
    stop = jnp.asarray(settings.stop_ids, jnp.int32)
    bufs = (jnp.full((N, B), pad_id, jnp.int32), jnp.zeros((N, B), bool), jnp.zeros((N, B), bool))

    def cond(carry):
        i, *_, done, _ = carry
        return (i < N) & ~jnp.all(done)

    def body(carry):
        i, s_cache, e_cache, (token, from_expert), done, bufs = carry
        real = ~done
        emitted = jnp.where(real, token, pad_id)
        done = done | jnp.isin(token, stop)
        bufs = tuple(jax.lax.dynamic_update_index_in_dim(b, r, i, axis=0)
                     for b, r in zip(bufs, (emitted, real, from_expert & real)))
        s_logits, s_cache = qwen.forward(params, emitted[:, None], cfg, mask=real[:, None], cache=s_cache, plan=plan)
        e_logits, e_cache = qwen.forward(params, emitted[:, None], cfg, mask=real[:, None], cache=e_cache, plan=plan)
        nxt = choose_mixed(s_logits[:, 0], e_logits[:, 0], jax.random.fold_in(key, i + 1), settings)
        return i + 1, s_cache, e_cache, nxt, done, bufs

    carry = (jnp.zeros((), jnp.int32), s_cache, e_cache, first, jnp.zeros((B,), bool), bufs)
    *_, bufs = jax.lax.while_loop(cond, body, carry)
    tokens, mask, from_expert = (b.swapaxes(0, 1) for b in bufs)
    return MixedRollout(tokens, mask, from_expert)
