"""Per-token OPD advantage and the teacher's margin over the student's top-K candidate set
(Step 1 of ../shared/design/RELEASE_RULE.md, after teacher scoring).

Inputs ([B, R] response-aligned, float32 log-probs; K = release.top_k):
    teacher_sampled_logp ℓ_T(y_t)          student_sampled_logp  log π_old(y_t)  (as the sampler recorded)
    teacher_cand_logp    ℓ_T(v), v ∈ C_t   student_cand_logp     log π_old(v)    [B, R, K]
    candidate_ids        C_t  [B, R, K]    sampled_ids           y_t  [B, R]
    response_mask        [B, R] bool, optional (default: every position is real)

Signals:
    A_t    = ℓ_T(y_t) − log π_old(y_t)                 (the dense OPD advantage, = −k1 reverse KL)
    a_t(v) = ℓ_T(v) − log π_old(v),  v ∈ C_t
    g_t    by `release.margin`:
      advantage_gap   (default) best − second-best a_t(v) over C_t                    ≥ 0
      teacher_gap     best − second-best ℓ_T(v) over C_t                               ≥ 0
      sampled_margin  A_t − max_{v ∈ C_t, v ≠ y_t} a_t(v)                               any sign
      renorm_prob_gap q^(1) − q^(2), q(v) = π_T(v) / Σ_{u ∈ C_t} π_T(u)                 in [0, 1]

Edge cases (our definitions; none of them produce NaN):
  * Absent candidates. A slot of C_t is *present* iff its student and its teacher log-prob are
    both finite (and the position is real). A sampler that truncates (top-p, top-k below K)
    records −inf for the tokens it could not sample, and the scorer gives −inf to ids outside
    the vocabulary (e.g. −1 fillers): such slots are not candidates at all — C_t is the set of
    present slots, of size n_t ≤ K. Present ids are assumed distinct (they come from a top-K).
  * Fewer than two present candidates (n_t ≤ 1, always the case when K = 1). The three
    best-minus-second-best margins need a second-best, so they are *undefined* there:
    `margin = 0` and `margin_defined = False`. We do not call that "gap 0 by definition": 0
    would claim "the teacher cannot tell the candidates apart", while here there is nothing to
    tell apart — a top-p sampler truncates to one token exactly where the student is confident,
    so scoring those tokens 0 would manufacture a late downward shift. Consumers (the sentence
    scores) should average over defined tokens only; 0 is a filler that keeps arrays finite.
    (Nor ∞ or q^(1) − 0 = 1: a single candidate carries no measurement of contrast.)
  * sampled_margin: when y_t is among the present candidates it is compared with the best
    *other* present candidate (so g_t = advantage_gap when y_t is the best, negative otherwise);
    when y_t is not among them (temperature sampling outside the top-K) it is compared with
    the best present candidate. Undefined (0, False) when no present candidate other than y_t
    exists — y_t the only candidate, or none present — or when A_t itself is not finite.
  * Ties: the best and second-best are equal values, the gap is exactly 0 (defined).
  * A_t where either sampled log-prob is non-finite (a sampler bug; an id outside the
    vocabulary) or on padding: 0. candidate_advantage is 0 on absent slots.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

MARGIN_VARIANTS = ("advantage_gap", "teacher_gap", "sampled_margin", "renorm_prob_gap")
DEFAULT_MARGIN = "advantage_gap"


class Margins(NamedTuple):
    advantage: jax.Array  # [B, R] float32 A_t (0 on padding / non-finite inputs)
    candidate_advantage: jax.Array  # [B, R, K] float32 a_t(v) (0 on absent slots)
    candidate_present: jax.Array  # [B, R, K] bool
    margin: jax.Array  # [B, R] float32 g_t (0 where undefined)
    margin_defined: jax.Array  # [B, R] bool


class AllMargins(NamedTuple):
    """Every variant at once (diagnostics); `margin[v]` and `margin_defined[v]` per variant."""
    advantage: jax.Array
    candidate_advantage: jax.Array
    candidate_present: jax.Array
    margin: dict[str, jax.Array]
    margin_defined: dict[str, jax.Array]


def check_margin_variant(variant: str) -> None:
    if variant not in MARGIN_VARIANTS:
        raise ValueError(f"release.margin={variant!r} is not a margin variant; choose one of "
                         f"{', '.join(MARGIN_VARIANTS)} (default {DEFAULT_MARGIN}).")


def _check_shapes(teacher_sampled_logp, student_sampled_logp, teacher_cand_logp, student_cand_logp,
                  candidate_ids, sampled_ids, response_mask) -> None:
    BR = tuple(teacher_sampled_logp.shape)
    if len(BR) != 2:
        raise ValueError(f"teacher_sampled_logp must be [B, R], got shape {BR}")
    BRK = tuple(teacher_cand_logp.shape)
    if len(BRK) != 3 or BRK[:2] != BR or BRK[2] < 1:
        raise ValueError(f"teacher_cand_logp must be [B, R, K] = [{BR[0]}, {BR[1]}, K>=1], got shape {BRK}")
    for name, x, want in (("student_sampled_logp", student_sampled_logp, BR), ("sampled_ids", sampled_ids, BR),
                          ("student_cand_logp", student_cand_logp, BRK), ("candidate_ids", candidate_ids, BRK),
                          ("response_mask", response_mask, BR)):
        if x is not None and tuple(x.shape) != want:
            raise ValueError(f"{name} must have shape {want} (like the teacher's), got {tuple(x.shape)}")


class _Base(NamedTuple):
    advantage: jax.Array
    sampled_ok: jax.Array
    cand_teacher: jax.Array
    cand_adv: jax.Array
    present: jax.Array
    is_sampled: jax.Array


def _base(teacher_sampled_logp, student_sampled_logp, teacher_cand_logp, student_cand_logp, candidate_ids,
          sampled_ids, response_mask) -> _Base:
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    t_s, s_s, t_c, s_c = map(f32, (teacher_sampled_logp, student_sampled_logp, teacher_cand_logp,
                                   student_cand_logp))
    real = (jnp.ones(t_s.shape, bool) if response_mask is None else jnp.asarray(response_mask, bool))
    sampled_ok = real & jnp.isfinite(t_s) & jnp.isfinite(s_s)
    present = real[..., None] & jnp.isfinite(t_c) & jnp.isfinite(s_c)
    # Zero the inputs before subtracting so that no inf - inf (NaN) is ever formed.
    advantage = jnp.where(sampled_ok, t_s, 0.0) - jnp.where(sampled_ok, s_s, 0.0)
    cand_teacher = jnp.where(present, t_c, 0.0)
    cand_adv = cand_teacher - jnp.where(present, s_c, 0.0)
    is_sampled = jnp.asarray(candidate_ids) == jnp.asarray(sampled_ids)[..., None]
    return _Base(advantage, sampled_ok, cand_teacher, cand_adv, present, is_sampled)


def _best_two(values, present):
    """Largest and second-largest present value over the last axis (-inf where missing)."""
    v = jnp.where(present, values, -jnp.inf)
    if v.shape[-1] == 1:
        return v[..., 0], jnp.full(v.shape[:-1], -jnp.inf)
    top, _ = jax.lax.top_k(v, 2)
    return top[..., 0], top[..., 1]


def _gap(values, present):
    """best − second-best over present slots; undefined (0, False) with fewer than two."""
    top1, top2 = _best_two(values, present)
    defined = jnp.sum(present, axis=-1) >= 2
    return jnp.where(defined, top1, 0.0) - jnp.where(defined, top2, 0.0), defined


def _renorm_prob_gap(teacher, present):
    top1, top2 = _best_two(teacher, present)
    defined = jnp.sum(present, axis=-1) >= 2
    top1, top2 = jnp.where(defined, top1, 0.0), jnp.where(defined, top2, 0.0)
    # log Σ_{u∈C} π_T(u) around the max: lse >= top1, so both probabilities are <= 1.
    lse = top1 + jnp.log(jnp.sum(jnp.where(present, jnp.exp(teacher - top1[..., None]), 0.0), axis=-1))
    lse = jnp.where(defined, lse, 0.0)
    gap = jnp.exp(top1 - lse) - jnp.exp(top2 - lse)
    return jnp.where(defined, jnp.clip(gap, 0.0, 1.0), 0.0), defined  # clip: rounding only


def _sampled_margin(b: _Base):
    others = b.present & ~b.is_sampled
    best_other = jnp.max(jnp.where(others, b.cand_adv, -jnp.inf), axis=-1)
    defined = b.sampled_ok & jnp.any(others, axis=-1)
    return jnp.where(defined, b.advantage, 0.0) - jnp.where(defined, best_other, 0.0), defined


def _variant(variant: str, b: _Base):
    if variant == "advantage_gap":
        return _gap(b.cand_adv, b.present)
    if variant == "teacher_gap":
        return _gap(b.cand_teacher, b.present)
    if variant == "sampled_margin":
        return _sampled_margin(b)
    return _renorm_prob_gap(b.cand_teacher, b.present)


@functools.partial(jax.jit, static_argnames=("variant",))
def margin(variant: str, teacher_sampled_logp: jax.Array, student_sampled_logp: jax.Array,
           teacher_cand_logp: jax.Array, student_cand_logp: jax.Array, candidate_ids: jax.Array,
           sampled_ids: jax.Array, response_mask: jax.Array | None = None) -> Margins:
    """A_t, a_t(v) and the margin g_t of one variant (`release.margin`; checked at trace time)."""
    check_margin_variant(variant)
    args = (teacher_sampled_logp, student_sampled_logp, teacher_cand_logp, student_cand_logp, candidate_ids,
            sampled_ids, response_mask)
    _check_shapes(*args)
    b = _base(*args)
    g, defined = _variant(variant, b)
    return Margins(b.advantage, b.cand_adv, b.present, g, defined)


@jax.jit
def all_margins(teacher_sampled_logp: jax.Array, student_sampled_logp: jax.Array, teacher_cand_logp: jax.Array,
                student_cand_logp: jax.Array, candidate_ids: jax.Array, sampled_ids: jax.Array,
                response_mask: jax.Array | None = None) -> AllMargins:
    """Every variant from one pass over the inputs (for the diagnostics)."""
    args = (teacher_sampled_logp, student_sampled_logp, teacher_cand_logp, student_cand_logp, candidate_ids,
            sampled_ids, response_mask)
    _check_shapes(*args)
    b = _base(*args)
    out = {v: _variant(v, b) for v in MARGIN_VARIANTS}
    return AllMargins(b.advantage, b.cand_adv, b.present, {v: g for v, (g, _) in out.items()},
                      {v: d for v, (_, d) in out.items()})
