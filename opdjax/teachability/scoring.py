"""Teacher scoring: log π_T of the sampled token and of the student's top-K candidates, for every
response position, from one teacher forward pass (Step 1 of ../shared/design/RELEASE_RULE.md).

Layout contract (what the sampler produces):
    tokens        [B, P+R] int   prompt left-padded to P columns, then response right-padded to R
    mask          [B, P+R] bool  real tokens
    candidate_ids [B, R, K] int  the student's top-K ids at each response position
Every row needs at least one real prompt token (the state s_0 the first response token is drawn
from; a chat template or BOS always provides it).

Output (`TeacherScores`, float32):
    sampled_logp   [B, R]    log π_T(tokens[:, P+t] | tokens before it)
    candidate_logp [B, R, K] log π_T(candidate_ids[:, t, k] | same context)
Padding response positions are 0. An id outside [0, V) at a real position (e.g. -1 for "no
candidate here") scores -inf, which `margins` reads as an absent candidate.

Memory: the logits are computed chunk by chunk over the response (a `lax.map` over chunks of
about `chunk_tokens` positions), and only a chunk's logsumexp is kept. The K+1 selected logits
are dot products of the hidden state with the gathered unembedding rows rather than an index
into the chunk's logits, so a vocabulary-sharded chunk is only ever reduced (max, sum) across
shards, never gathered. No [B, T, V] or [B*R, V] float32 tensor exists: the largest scoring
buffer is one chunk's float32 logits, B*c*V*4 bytes (~300 MiB for 512 positions at V = 151,936,
divided over the devices by data x fsdp x tensor). The forward pass's attention scores are
`qwen.apply`'s: float32 [B, H, c, T] for causal query blocks of c rows (qwen.ATTN_BLOCK / ATTN_CHUNK), not [B, H, T, T].

Chunks are [B, c] blocks (all rows, c = max(1, chunk_tokens // B) consecutive response
positions; B positions when B > chunk_tokens), not slices of the flattened B*R positions: a
batch-sharded chunk then lives on the devices that already hold its rows' hidden states, with no
resharding inside the loop. The last chunk is padded and the padding dropped.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from opdjax.models import qwen
from opdjax.models.config import ModelConfig
from opdjax.sharding import ShardingPlan, constrain

DEFAULT_CHUNK_TOKENS = 512


class TeacherScores(NamedTuple):
    sampled_logp: jax.Array  # [B, R] float32
    candidate_logp: jax.Array  # [B, R, K] float32


def check_layout(tokens_shape, mask_shape, candidate_shape, prompt_len: int, chunk_tokens: int) -> int:
    """Validate the layout contract at trace time; returns R. Errors name the argument."""
    if len(tokens_shape) != 2:
        raise ValueError(f"tokens must be [B, P+R], got shape {tuple(tokens_shape)}")
    if tuple(mask_shape) != tuple(tokens_shape):
        raise ValueError(f"mask shape {tuple(mask_shape)} must equal tokens shape {tuple(tokens_shape)}")
    B, T = tokens_shape
    if not 1 <= prompt_len < T:
        raise ValueError(f"prompt_len={prompt_len} must be in [1, {T}) for tokens of length {T}: the "
                         "first response token is predicted from the last prompt column")
    R = T - prompt_len
    if len(candidate_shape) != 3 or tuple(candidate_shape[:2]) != (B, R):
        raise ValueError(f"candidate_ids must be [B, R, K] = [{B}, {R}, K], got {tuple(candidate_shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    return R


def _response_inputs(hidden, tokens, mask, candidate_ids, prompt_len):
    """Hidden states that predict each response token, the K+1 ids to score, the response mask."""
    R = tokens.shape[1] - prompt_len
    # position P-1+t predicts the token at P+t
    pred_hidden = jax.lax.slice_in_dim(hidden, prompt_len - 1, prompt_len - 1 + R, axis=1)
    sampled = tokens[:, prompt_len:]
    ids = jnp.concatenate([sampled[..., None], candidate_ids], axis=-1).astype(jnp.int32)  # [B, R, K+1]
    return pred_hidden, ids, mask[:, prompt_len:].astype(bool)


def _finish(selected_logp, ids, response_mask, vocab_size) -> TeacherScores:
    """-inf for ids outside the vocabulary, 0 on padding; split sampled / candidates."""
    in_vocab = (ids >= 0) & (ids < vocab_size)
    out = jnp.where(in_vocab, selected_logp, -jnp.inf)
    out = jnp.where(response_mask[..., None], out, 0.0)
    return TeacherScores(out[..., 0], out[..., 1:])


def _selected_logp_chunk(unembed, h, ids, plan):
    """h [B, c, D], ids [B, c, K+1] -> log-probs [B, c, K+1] float32 (one chunk's logits live)."""
    logits = jnp.einsum("bcd,vd->bcv", h, unembed, preferred_element_type=jnp.float32)
    logits = constrain(plan, logits, ("batch", "length", "act_vocab"))
    lse = jax.nn.logsumexp(logits, axis=-1)
    ids = constrain(plan, jnp.clip(ids, 0, unembed.shape[0] - 1), ("batch", "length", None))
    rows = jnp.take(unembed, ids, axis=0)  # [B, c, K+1, D]: each vocab shard masks, then a small all-reduce
    rows = constrain(plan, rows, ("batch", "length", None, None))
    selected = jnp.einsum("bcd,bckd->bck", h, rows, preferred_element_type=jnp.float32)
    return selected - lse[..., None]


@functools.partial(jax.jit, static_argnames=("cfg", "prompt_len", "chunk_tokens", "plan", "microbatches"))
def teacher_logprobs(params: qwen.Params, tokens: jax.Array, mask: jax.Array, candidate_ids: jax.Array, *,
                     cfg: ModelConfig, prompt_len: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                     plan: ShardingPlan | None = None, microbatches: int = 1) -> TeacherScores:
    """Teacher log-probs of the sampled tokens and the candidates: one forward, chunked scoring.

    microbatches: score the rows in this many groups, one after the other (a lax.map), as the
    train step splits its batch (`batch.microbatches`): the forward's activations are then those
    of B / microbatches rows. Group i holds rows i, i+m, ... so every group spans every batch
    shard. The result does not depend on it."""
    check_layout(tokens.shape, mask.shape, candidate_ids.shape, prompt_len, chunk_tokens)
    B, m = tokens.shape[0], int(microbatches)
    if m < 1 or B % m:
        raise ValueError(f"microbatches={microbatches} must divide the {B} rows (batch.microbatches)")

    def score(t, k, c):
        hidden, _ = qwen.apply(params, t, cfg, mask=k, plan=plan)
        return _logprobs_from_hidden(params, hidden, t, k, c, prompt_len, chunk_tokens, plan)

    if m == 1:
        return score(tokens, mask, candidate_ids)
    split = lambda x: x.reshape(B // m, m, *x.shape[1:]).swapaxes(0, 1)  # noqa: E731
    out = jax.lax.map(lambda a: score(*a), (split(tokens), split(mask), split(candidate_ids)))
    unsplit = lambda x: constrain(plan, x.swapaxes(0, 1).reshape(B, *x.shape[2:]),  # noqa: E731
                                  ("batch", "length") + (None,) * (x.ndim - 3))
    return TeacherScores(*(unsplit(x) for x in out))


@functools.partial(jax.jit, static_argnames=("prompt_len", "chunk_tokens", "plan"))
def teacher_logprobs_from_hidden(params: qwen.Params, hidden: jax.Array, tokens: jax.Array, mask: jax.Array,
                                 candidate_ids: jax.Array, *, prompt_len: int,
                                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                                 plan: ShardingPlan | None = None) -> TeacherScores:
    """The scoring head alone, from final normed hidden states [B, P+R, D] (what `qwen.apply`
    returns): the part whose memory the chunking bounds, measured on its own in the tests."""
    check_layout(tokens.shape, mask.shape, candidate_ids.shape, prompt_len, chunk_tokens)
    return _logprobs_from_hidden(params, hidden, tokens, mask, candidate_ids, prompt_len, chunk_tokens, plan)


def _logprobs_from_hidden(params, hidden, tokens, mask, candidate_ids, prompt_len, chunk_tokens, plan):
    B, R, K1 = candidate_ids.shape[0], candidate_ids.shape[1], candidate_ids.shape[2] + 1
    pred_hidden, ids, response_mask = _response_inputs(hidden, tokens, mask, candidate_ids, prompt_len)
    # Gather the embed (fsdp) dimension once, outside the loop, not once per chunk; the vocab
    # stays sharded over tensor.
    unembed = constrain(plan, qwen.unembedding(params), ("vocab", None))

    c = min(R, max(1, chunk_tokens // B))  # response positions per row per chunk
    n = -(-R // c)
    pad = n * c - R  # the last chunk is padded (zero hidden, id 0), and the padding dropped
    pred_hidden = jnp.pad(pred_hidden, ((0, 0), (0, pad), (0, 0)))
    ids_padded = jnp.pad(ids, ((0, 0), (0, pad), (0, 0)))
    # [B, n*c, ...] -> [n, B, c, ...]: map over chunks, batch stays on its (sharded) axis
    h_chunks = pred_hidden.reshape(B, n, c, -1).swapaxes(0, 1)
    id_chunks = ids_padded.reshape(B, n, c, K1).swapaxes(0, 1)
    logp = jax.lax.map(lambda x: _selected_logp_chunk(unembed, x[0], x[1], plan), (h_chunks, id_chunks))
    logp = logp.swapaxes(0, 1).reshape(B, n * c, K1)[:, :R]
    logp = constrain(plan, logp, ("batch", "length", None))
    return _finish(logp, ids, response_mask, unembed.shape[0])


@functools.partial(jax.jit, static_argnames=("cfg", "prompt_len", "chunk_tokens", "plan"))
def naive_teacher_logprobs(params: qwen.Params, tokens: jax.Array, mask: jax.Array, candidate_ids: jax.Array,
                           *, cfg: ModelConfig, prompt_len: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                           plan: ShardingPlan | None = None) -> TeacherScores:
    """Reference: full [B, T, V] logits, log_softmax, take_along_axis (`chunk_tokens` is ignored).
    For tests and the memory/time benchmark only: at Qwen's vocabulary this needs B*T*V*4 bytes."""
    check_layout(tokens.shape, mask.shape, candidate_ids.shape, prompt_len, chunk_tokens)
    hidden, _ = qwen.apply(params, tokens, cfg, mask=mask, plan=plan)
    return _naive_from_hidden(params, hidden, tokens, mask, candidate_ids, prompt_len, plan)


@functools.partial(jax.jit, static_argnames=("prompt_len", "chunk_tokens", "plan"))
def naive_teacher_logprobs_from_hidden(params: qwen.Params, hidden: jax.Array, tokens: jax.Array,
                                       mask: jax.Array, candidate_ids: jax.Array, *, prompt_len: int,
                                       chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                                       plan: ShardingPlan | None = None) -> TeacherScores:
    check_layout(tokens.shape, mask.shape, candidate_ids.shape, prompt_len, chunk_tokens)
    return _naive_from_hidden(params, hidden, tokens, mask, candidate_ids, prompt_len, plan)


def _naive_from_hidden(params, hidden, tokens, mask, candidate_ids, prompt_len, plan):
    logp = jax.nn.log_softmax(qwen.logits_from_hidden(params, hidden, plan), axis=-1)  # [B, T, V]
    pred_logp, ids, response_mask = _response_inputs(logp, tokens, mask, candidate_ids, prompt_len)
    vocab = logp.shape[-1]
    selected = jnp.take_along_axis(pred_logp, jnp.clip(ids, 0, vocab - 1), axis=-1)
    return _finish(selected, ids, response_mask, vocab)
