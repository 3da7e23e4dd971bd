"""DAIL step 2: contrastive distillation of the student on its synthesised traces.

Specification: ../shared/design/DAIL.md ("Step 2"). One trace r (response token ids, taken once
from the trace file) is read in three contexts that share r token for token:

    student   student context(x) + r        -> π_θ   (trainable)
    expert    expert context(x, s) + r      -> π_ref (frozen; the positive)
    hint      hint context(x, h(s)) + r     -> π_ref (frozen; the negative)

and the loss, per aligned response token t, is (reverse KL by default)

    reverse  KL(π_θ(·|student) ‖ π_ref(·|expert)) − γ · min(KL(π_θ(·|student) ‖ π_ref(·|hint)), clip)
    forward  KL(π_ref(·|expert) ‖ π_θ(·|student)) − γ · min(KL(π_ref(·|hint) ‖ π_θ(·|student)), clip)

summed with per-token coefficients (default: the mean over the batch's real response tokens).
Full vocabulary, in chunks of response positions, with the closed-form VJP of opdjax.losses.

Host side: `align` builds the three right-padded token arrays and, per context, the index of the
position whose next-token logits predict each response token; `check_aligned` checks it (the
trainer runs it on every trace at start-up).
Device side: `contrastive_loss` (pure, jittable).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from opdjax import losses
from opdjax.models import qwen

CONTEXTS = ("student", "expert", "hint")
DIVERGENCES = ("reverse", "forward")


# ----------------------------------------------------------------------------- alignment (host)

class AlignedBatch(NamedTuple):
    """Three tokenisations of B traces with the same response tokens (a pytree: NamedTuple).

    For each context c: tokens_c [B, T_c] int32 = prompt ids + response ids, right-padded with
    pad_id; mask_c [B, T_c] bool (False = padding); positions_c [B, R] int32 = len(prompt_c) + r − 1,
    the position whose next-token logits predict response[:, r] (0 on padded r, masked out).
    response [B, R] int32 (padding = pad_id) and response_mask [B, R] bool are shared.
    T_c and R are multiples of `length_multiple`."""
    tokens_student: np.ndarray
    mask_student: np.ndarray
    positions_student: np.ndarray
    tokens_expert: np.ndarray
    mask_expert: np.ndarray
    positions_expert: np.ndarray
    tokens_hint: np.ndarray
    mask_hint: np.ndarray
    positions_hint: np.ndarray
    response: np.ndarray
    response_mask: np.ndarray

    def context(self, name: str):
        """(tokens, mask, positions) of context `name` (student | expert | hint)."""
        if name not in CONTEXTS:
            raise ValueError(f"context={name!r} is not one of {', '.join(CONTEXTS)}")
        return (getattr(self, f"tokens_{name}"), getattr(self, f"mask_{name}"),
                getattr(self, f"positions_{name}"))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _ids(seq, what: str, record: str) -> np.ndarray:
    """A list of token ids as int32, refusing what would silently wrap or index out of the vocab."""
    a = np.asarray(seq)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"record {record}: {what} must be a flat list of integer token ids")
    if a.size and (a.min() < 0 or a.max() > np.iinfo(np.int32).max):
        raise ValueError(f"record {record}: {what} has token ids outside [0, 2^31)")
    return a.astype(np.int32)


def align(student_prompts: Sequence[Sequence[int]], expert_prompts: Sequence[Sequence[int]],
          hint_prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, pad_id: int,
          length_multiple: int = 16, max_response_tokens: int = 0,
          records: Sequence | None = None) -> AlignedBatch:
    """Right-padded token arrays of the three contexts, each = its prompt + the SAME response ids.

    Each argument is a list of B token-id lists. The response ids are used as given in every
    context (never re-tokenised per context: BPE merges across the prompt/response boundary would
    otherwise shift the response tokens differently in each context). Lengths are padded up to a
    multiple of `length_multiple` so that batches of similar lengths share one compiled program.
    Errors (empty response or prompt, response longer than `max_response_tokens` > 0, ragged
    lists) name the record: records[i] when given, else its index.
    """
    B = len(responses)
    fields = {"student_prompts": student_prompts, "expert_prompts": expert_prompts,
              "hint_prompts": hint_prompts}
    if records is not None:
        fields["records"] = records
    for name, seq in fields.items():
        if len(seq) != B:
            raise ValueError(f"align: {name} has {len(seq)} entries but responses has {B}")
    if B == 0:
        raise ValueError("align: empty batch (no responses)")
    if not (isinstance(length_multiple, (int, np.integer)) and length_multiple >= 1):
        raise ValueError(f"align: length_multiple={length_multiple!r} must be an int >= 1")
    names = [str(records[i]) if records is not None else f"#{i}" for i in range(B)]

    resp = []
    for i, r in enumerate(responses):
        r = _ids(r, "response", names[i])
        if r.size == 0:
            raise ValueError(f"record {names[i]}: empty response (a trace needs at least one token)")
        if max_response_tokens > 0 and r.size > max_response_tokens:
            raise ValueError(f"record {names[i]}: response has {r.size} tokens, more than "
                             f"max_response_tokens={max_response_tokens}")
        resp.append(r)
    R = _round_up(max(r.size for r in resp), length_multiple)
    response = np.full((B, R), pad_id, np.int32)
    response_mask = np.zeros((B, R), bool)
    for i, r in enumerate(resp):
        response[i, :r.size] = r
        response_mask[i, :r.size] = True

    out = {"response": response, "response_mask": response_mask}
    for ctx, prompts in zip(CONTEXTS, (student_prompts, expert_prompts, hint_prompts)):
        ps = [_ids(p, f"{ctx} prompt", names[i]) for i, p in enumerate(prompts)]
        for i, p in enumerate(ps):
            if p.size == 0:  # the first response token needs a position that predicts it
                raise ValueError(f"record {names[i]}: empty {ctx} prompt")
        T = _round_up(max(p.size + r.size for p, r in zip(ps, resp)), length_multiple)
        tokens = np.full((B, T), pad_id, np.int32)
        mask = np.zeros((B, T), bool)
        positions = np.zeros((B, R), np.int32)
        for i, (p, r) in enumerate(zip(ps, resp)):
            n = p.size + r.size
            tokens[i, :p.size], tokens[i, p.size:n] = p, r
            mask[i, :n] = True
            positions[i, :r.size] = p.size - 1 + np.arange(r.size)
        out.update({f"tokens_{ctx}": tokens, f"mask_{ctx}": mask, f"positions_{ctx}": positions})
    return AlignedBatch(**out)


class AlignmentError(ValueError):
    """The three tokenisations of a trace do not predict the same response tokens."""


def check_aligned(batch: AlignedBatch, records: Sequence | None = None) -> None:
    """Check that every context's positions predict exactly the shared response tokens:
    tokens_c[b, positions_c[b, r] + 1] == response[b, r] on every real r, at real (unpadded)
    positions, in arrays of the right shapes. Raises AlignmentError naming the trace (records[b],
    else its row), the context and the response index. The trainer runs it once on every trace."""
    response = np.asarray(batch.response)
    real = np.asarray(batch.response_mask, bool)
    B, R = response.shape
    name = lambda b: str(records[b]) if records is not None else f"row {b}"  # noqa: E731
    for ctx in CONTEXTS:
        tokens, mask, positions = (np.asarray(a) for a in batch.context(ctx))
        if positions.shape != (B, R):
            raise AlignmentError(f"positions_{ctx} is {positions.shape}, expected {(B, R)}")
        if tokens.shape != mask.shape or tokens.shape[0] != B:
            raise AlignmentError(f"tokens_{ctx} {tokens.shape} / mask_{ctx} {mask.shape}: expected [{B}, T]")
        T = tokens.shape[1]
        nxt = np.where(real, positions + 1, 0)
        rows = np.arange(B)[:, None]
        at = np.clip(nxt, 0, T - 1)
        checks = ((real & ((nxt < 1) | (nxt >= T)), f"its position is outside [0, {T - 1})"),
                  (real & ~mask[rows, at], "it lands on padding"),
                  (real & (tokens[rows, at] != response), "tokens[position + 1] is another token"))
        hits = [(tuple(np.argwhere(bad)[0]), what) for bad, what in checks if bad.any()]
        if hits:
            (b, r), what = min(hits, key=lambda h: h[0])  # the first trace and response index that fails
            raise AlignmentError(f"trace {name(b)}: the {ctx} context does not predict response token {r} "
                                 f"(id {response[b, r]}): {what}. The three contexts must be followed by the "
                                 "same response ids (contrastive.align builds them so).")


# ----------------------------------------------------------------------------- loss (device)

def _default_apply(cfg, plan, remat: bool):
    def apply(params, tokens, mask):
        return qwen.apply(params, tokens, cfg, mask=mask, remat=remat, plan=plan)[0]
    return apply


def _gather(hidden, positions):
    """hidden [B, T, D] at positions [B, R] -> [B, R, D]."""
    return jnp.take_along_axis(hidden, positions[..., None].astype(jnp.int32), axis=1, mode="clip")


def contrastive_loss(student_params, ref_params, batch: AlignedBatch, cfg, *, gamma: float = 0.1,
                     divergence: str = "reverse", negative_clip: float = 10.0, chunk_tokens: int = 256,
                     student_apply: Callable | None = None, ref_apply: Callable | None = None,
                     remat: bool = True, plan=None, coeff=None):
    """DAIL's contrastive loss Σ_{b,r} coeff · [KL_pos − γ · guard(KL_neg)]: (loss, aux).

    batch: an AlignedBatch of jnp (or NumPy) arrays. The student's hidden states come from
    student_apply(student_params, tokens_student, mask_student) -> [B, T, D], the positive and
    negative ones from ref_apply(ref_params, tokens_{expert,hint}, mask_...) under stop_gradient;
    both default to qwen.apply (the trainer passes a closure that adds LoRA). Logits are
    qwen.logits_from_hidden with the matching params. divergence: "reverse" = KL(π_θ ‖ π_ref),
    "forward" = KL(π_ref ‖ π_θ), full vocabulary, for both terms.

    guard: with negative_clip > 0 the negative term enters as min(KL_neg, clip) per token (zero
    gradient beyond the clip: a token already that far from the hint context is not pushed
    further; the term is unbounded otherwise). negative_clip <= 0: no clip.

    coeff [B, R] (constant): default response_mask / Σ response_mask, i.e. the mean over this
    batch's real response tokens. For gradient accumulation compute it ONCE over the global batch
    (losses.token_coefficients(ones, response_mask) on all rows) and pass each microbatch its
    rows: the microbatch losses (and aux means) then add up to the global-batch mean.

    aux (scalars, no gradient): kl_positive, kl_negative (unclipped) and kl_negative_clipped_share
    (share of tokens with KL_neg > clip) as Σ coeff · x (means under the default coeff), and
    tokens = this batch's real response tokens. Under a global coeff every aux value, like the
    loss, is the microbatch's share: SUM them over microbatches (do not average).

    Memory: the response positions are scanned in chunks of `chunk_tokens` with jax.checkpoint
    around each, so only one chunk's [B, c, V] float32 logits (×3 contexts) are alive at a time.
    Static: divergence, chunk_tokens, remat, plan, the apply functions (gamma and negative_clip
    may be traced).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"dail.train.divergence={divergence!r} is not a divergence; choose one of "
                         f"{', '.join(DIVERGENCES)} (reverse = KL(student || ref), forward = KL(ref || student))")
    if not (isinstance(chunk_tokens, int) and chunk_tokens >= 1):
        raise ValueError(f"config.loss.chunk_tokens={chunk_tokens!r} must be an int >= 1")
    clip = jnp.asarray(negative_clip, jnp.float32)  # may be traced (one program for every clip)
    student_apply = student_apply or _default_apply(cfg, plan, remat)
    # The reference is never differentiated, so rematerialising its layers would only cost time.
    ref_apply = ref_apply or _default_apply(cfg, plan, False)

    response_mask = jnp.asarray(batch.response_mask, bool)
    B, R = response_mask.shape
    for ctx in CONTEXTS:
        shape = tuple(jnp.shape(batch.context(ctx)[2]))
        if shape != (B, R):
            raise ValueError(f"positions_{ctx} must be [B, R] = {(B, R)} like response_mask, got {shape}")
    if coeff is None:
        coeff = losses.token_coefficients(jnp.ones((B, R), jnp.float32), response_mask)
    elif tuple(jnp.shape(coeff)) != (B, R):
        raise ValueError(f"coeff must be [B, R] = {(B, R)}, got {tuple(jnp.shape(coeff))}")
    coeff = jax.lax.stop_gradient(jnp.asarray(coeff, jnp.float32) * response_mask)

    def hidden(apply, params, ctx):
        tokens, mask, positions = (jnp.asarray(a) for a in batch.context(ctx))
        return _gather(apply(params, tokens, mask.astype(bool)), positions)

    h_student = hidden(student_apply, student_params, "student")
    h_pos = jax.lax.stop_gradient(hidden(ref_apply, ref_params, "expert"))
    h_neg = jax.lax.stop_gradient(hidden(ref_apply, ref_params, "hint"))

    c = min(chunk_tokens, R)
    n = -(-R // c)
    xs = tuple(losses.pad_to_chunks(a, R, n, c) for a in (h_student, h_pos, h_neg, coeff))

    def body(hs, hp, hn, cf):
        z = qwen.logits_from_hidden(student_params, hs, plan)
        zp = jax.lax.stop_gradient(qwen.logits_from_hidden(ref_params, hp, plan))
        zn = jax.lax.stop_gradient(qwen.logits_from_hidden(ref_params, hn, plan))
        # losses' full-vocabulary KL: closed-form VJP w.r.t. the student logits only.
        kl_pos, _ = losses.full_vocab_divergence(z, zp, divergence)
        kl_neg, _ = losses.full_vocab_divergence(z, zn, divergence)
        over = (clip > 0) & (kl_neg > clip)  # clip <= 0: no guard
        guarded = jnp.where(over, clip, kl_neg)  # a constant beyond the clip: zero gradient
        total = jnp.sum(cf * (kl_pos - gamma * guarded))
        sg = jax.lax.stop_gradient
        diag = (jnp.sum(cf * sg(kl_pos)), jnp.sum(cf * sg(kl_neg)), jnp.sum(cf * over.astype(jnp.float32)))
        return total, diag

    body = jax.checkpoint(body, prevent_cse=False)
    _, (totals, diags) = jax.lax.scan(lambda carry, x: (carry, body(*x)), None, xs)
    aux = {
        "kl_positive": jnp.sum(diags[0]),
        "kl_negative": jnp.sum(diags[1]),
        "kl_negative_clipped_share": jnp.sum(diags[2]),
        "tokens": jnp.sum(response_mask.astype(jnp.int32)),
    }
    return jnp.sum(totals), aux
