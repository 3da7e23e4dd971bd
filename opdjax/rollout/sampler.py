"""The student's sampler: the decode loop of `rollout.decode` (one jitted prefill + a loop over a
fixed-size KV cache that stops once every row has emitted a stop token), choosing by sampling.

For every generated position it records what the rest of the step needs, so nothing is
recomputed later:
  - the sampled token and whether it is real (up to and including the first stop token);
  - its log-prob under the distribution actually sampled from (after temperature, top-k and
    top-p: `logp_sampled`) and under the student's own softmax (`logp_model`);
  - the student's top-K candidate ids with their log-probs under both distributions — the
    release rule's candidate set C_t comes for free from the logits already computed here.
Which of the two log-probs is pi_old is a config choice (`rollout.old_logp`), never implicit.

Temperature 0 is greedy decoding (argmax; `logp_sampled` is 0, the log-prob of a point mass),
and then the sampler matches an argmax loop over full forwards token for token.

Presence penalty (`presence_penalty`, vLLM's definition, which DAIL's authors evaluated with): every
token that has already appeared in the row's *generated* tokens so far (not the prompt) has the
penalty subtracted from its logit, once however often it appeared, before temperature, top-k and
top-p (and before the argmax of greedy decoding). It shapes the distribution sampled from
(`logp_sampled`); `logp_model` and the top-K candidates stay the model's own. The "appeared" set
is a per-row [B, V] bool mask carried through the decode loop, only when the penalty is non-zero:
with 0.0 (the default) the loop carries nothing and the sampler is the one without the penalty.
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
from opdjax.sharding import ShardingPlan


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Static (hashable) sampling settings; `check` names the config field on bad values."""
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    candidates: int = 8  # K of the recorded student top-K
    stop_ids: tuple[int, ...] = ()
    cache_dtype: str = ""  # "" = the params' dtype; "bfloat16" halves the KV cache of a float32 student
    # Subtracted from the logit of every token already generated in the row (vLLM's presence_penalty:
    # generated tokens only, applied before temperature / top-k / top-p). 0.0 = off.
    presence_penalty: float = 0.0

    def check(self, vocab_size: int, section: str = "rollout") -> "SamplingSettings":
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"{section}.max_new_tokens={self.max_new_tokens!r} must be an integer >= 1.")
        if not self.temperature >= 0:
            raise ValueError(f"{section}.temperature={self.temperature!r} must be >= 0 (0 = greedy).")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{section}.top_p={self.top_p!r} must be in (0, 1] (1 = off).")
        if not (isinstance(self.top_k, int) and 0 <= self.top_k <= vocab_size):
            raise ValueError(f"{section}.top_k={self.top_k!r} must be an integer in [0, vocab size "
                             f"{vocab_size}] (0 = off).")
        if not (isinstance(self.candidates, int) and 1 <= self.candidates <= vocab_size):
            raise ValueError(f"release.top_k={self.candidates!r} (the student's candidate set) must be in "
                             f"[1, vocab size {vocab_size}].")
        if not self.stop_ids:
            raise ValueError(f"{section}.stop_tokens: no stop token at all (the tokenizer has no EOS?); "
                             "give at least one id.")
        if self.cache_dtype not in ("", "float32", "bfloat16"):
            raise ValueError(f"{section}.cache_dtype={self.cache_dtype!r}: choose '' (the params' dtype), "
                             "float32 or bfloat16.")
        pp = self.presence_penalty
        if isinstance(pp, bool) or not isinstance(pp, (int, float)) or not -2.0 <= pp <= 2.0:
            raise ValueError(f"{section}.presence_penalty={pp!r} must be a number in [-2, 2] (vLLM's range; "
                             "0 = off, > 0 discourages tokens already generated).")
        bad = [i for i in self.stop_ids if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"{section}.stop_tokens: id {bad[0]} is outside the vocabulary [0, {vocab_size}).")
        return self


class Rollout(NamedTuple):
    tokens: jax.Array  # [B, N] int32, pad after the stop token
    mask: jax.Array  # [B, N] bool, real tokens (the stop token included)
    logp_sampled: jax.Array  # [B, N] f32, log-prob under the sampling distribution
    logp_model: jax.Array  # [B, N] f32, log-prob under the student's softmax (temperature 1)
    topk_ids: jax.Array  # [B, N, K] int32, the student's top-K candidates (by its own logits)
    topk_logp_sampled: jax.Array  # [B, N, K] f32 (-inf where top-k/top-p cut the candidate)
    topk_logp_model: jax.Array  # [B, N, K] f32


def sampling_logits(logits: jax.Array, s: SamplingSettings) -> jax.Array:
    """float32 logits of the distribution sampled from: temperature, then top-k, then top-p
    (the smallest set of most likely tokens whose mass reaches top_p; ties at the edge kept).
    Excluded tokens get -inf. Temperature 0 is handled by the caller (greedy)."""
    return tempered_truncated(logits, s.temperature, s.top_k, s.top_p)


def tempered_truncated(logits: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0,
                       fill: float = -jnp.inf) -> jax.Array:
    """`sampling_logits` with explicit settings, excluded tokens set to `fill`. The OPD train step
    scores pi_theta with the same function (train/step.py: the policy being trained is the one
    sampled from), with a finite `fill` so that 0 * fill stays 0 inside the losses; softmax gives
    the excluded tokens probability exactly 0 either way."""
    x = logits.astype(jnp.float32) / max(temperature, 1e-6)
    if top_k:
        kth = jax.lax.top_k(x, top_k)[0][..., -1:]
        x = jnp.where(x < kth, fill, x)
    if top_p < 1.0:
        sorted_desc = -jnp.sort(-x, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
        keep_sorted = before < top_p  # the token that crosses top_p is kept
        cutoff = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < cutoff, fill, x)
    return x


def presence_penalised(logits: jax.Array, appeared: jax.Array, penalty: float) -> jax.Array:
    """float32 logits minus `penalty` where `appeared` [B, V] (the tokens already generated in the row)."""
    return logits.astype(jnp.float32) - jnp.float32(penalty) * appeared.astype(jnp.float32)


def _choose(logits: jax.Array, key: jax.Array, s: SamplingSettings, appeared: jax.Array | None = None):
    """One position: (token, logp_sampled, logp_model, topk ids, topk logp sampled, topk logp model).
    appeared [B, V] bool (only with a presence penalty): the row's tokens generated so far."""
    logits = logits.astype(jnp.float32)
    model_logp = jax.nn.log_softmax(logits, axis=-1)
    cand_logit, cand_ids = jax.lax.top_k(logits, s.candidates)
    cand_model = jnp.take_along_axis(model_logp, cand_ids, axis=-1)
    chosen_from = logits if appeared is None else presence_penalised(logits, appeared, s.presence_penalty)
    if s.temperature == 0:
        token = jnp.argmax(chosen_from, axis=-1)
        sampled_logp = jnp.where(jnp.arange(logits.shape[-1]) == token[:, None], 0.0, -jnp.inf)
    else:
        x = sampling_logits(chosen_from, s)
        sampled_logp = jax.nn.log_softmax(x, axis=-1)
        token = draw.categorical(key, x)
    token = token.astype(jnp.int32)
    pick = lambda a: jnp.take_along_axis(a, token[:, None], axis=-1)[:, 0]
    del cand_logit
    return (token, pick(sampled_logp), pick(model_logp), cand_ids.astype(jnp.int32),
            jnp.take_along_axis(sampled_logp, cand_ids, axis=-1), cand_model)


@functools.partial(jax.jit, static_argnames=("cfg", "settings", "pad_id", "plan"))
def sample(params, prompt: jax.Array, prompt_mask: jax.Array, key: jax.Array, cfg: ModelConfig,
           settings: SamplingSettings, *, pad_id: int = 0, plan: ShardingPlan | None = None) -> Rollout:
    """Sample `settings.max_new_tokens` tokens after each (left- or right-padded) prompt row.

    Row b at step i uses the random key fold_in(key, i): the draw depends on the key, the step
    and the logits only (threefry is partitionable), not on how the batch is sharded.
    With settings.presence_penalty != 0 the state carried from step to step is the [B, V] mask of
    the tokens each row has generated so far (step 0, from the prefill, sees an empty mask).
    """
    if settings.presence_penalty:
        def choose(i, logits, appeared):
            token, *records = _choose(logits[0], jax.random.fold_in(key, i), settings, appeared)
            appeared = appeared | jax.nn.one_hot(token, appeared.shape[-1], dtype=jnp.bool_)
            return token, tuple(records), appeared

        state = jnp.zeros((prompt.shape[0], cfg.vocab_size), bool)
    else:
        def choose(i, logits, state):
            token, *records = _choose(logits[0], jax.random.fold_in(key, i), settings)
            return token, tuple(records), state

        state = ()

    # Recorded per step: logp sampled / model (0 after the stop), candidate ids (as chosen), and
    # the candidates' log-probs (-inf after the stop).
    tokens, mask, records = decode(params, [(prompt, prompt_mask)], cfg, choose, state,
                                   max_new_tokens=settings.max_new_tokens, stop_ids=settings.stop_ids,
                                   record_pads=(0.0, 0.0, None, -jnp.inf, -jnp.inf), pad_id=pad_id, plan=plan,
                                   cache_dtype=settings.cache_dtype)
    return Rollout(tokens, mask, *records)
