"""The registry of masked distillation losses and the chunked driver the train step calls.

"Losses" in ../shared/design/RELEASE_RULE.md. Every loss is a pure jax function of the student's
float32 logits on a chunk of c response positions (and, for the full-vocabulary losses, the
teacher's logits on the same positions), returning a per-token loss [B, c] and a dict of
per-token diagnostics [B, c]. The batch loss is Σ_t coeff_t · loss_t with coefficients from
`token_coefficients` (the release weights w_t, normalised once over the whole global batch), so
gradient-accumulation microbatches simply add their Σ coeff·loss.

Names say what is computed (ARCHITECTURE.md: reverse KL = KL(student ‖ teacher)). With
s = log softmax(student logits), t = log softmax(teacher logits), p = e^s, q = e^t:

  pg               −min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t),  ρ_t = π_θ(y_t) / π_old(y_t)      (default)
                   A_t = ℓ_T(y_t) − log π_old(y_t) is a constant computed outside. With ρ = 1 (one
                   update per rollout batch) the gradient is −A_t ∇ log π_θ(y_t).
  reverse_kl_topk  Σ_{v∈C_t} p(v) (s(v) − t(v)) + p(tail) (log p(tail) − log q(tail)):
                   the exact KL(student ‖ teacher) between the two distributions coarsened to the
                   student's rollout-time top-K candidates C_t plus ONE tail bucket (all other
                   tokens), differentiated directly through p — not a policy-gradient advantage
                   (a term that does not depend on the sampled token has zero expected policy
                   gradient). Needs only the teacher's candidate log-probs, no teacher logits.
  reverse_kl_full  KL(student ‖ teacher) = Σ_v p (s − t) over the full vocabulary.
  forward_kl_full  KL(teacher ‖ student) = Σ_v q (t − s) over the full vocabulary.
  jsd              generalized Jensen–Shannon divergence, EXACTLY the convention of Hugging Face
                   TRL's `GKDTrainer.generalized_jsd_loss` (trl/experimental/gkd/gkd_trainer.py,
                   temperature 1), re-implemented here:
                     β = 0      : KL(teacher ‖ student)  (forward KL; TRL special-cases it)
                     β = 1      : KL(student ‖ teacher)  (reverse KL; TRL special-cases it)
                     0 < β < 1  : M = (1−β) p + β q  (log M by logsumexp)
                                  JSD_β = β · KL(teacher ‖ M) + (1−β) · KL(student ‖ M)
                   so β weighs the *teacher's* KL to the mixture and the mixture leans to the
                   teacher by β. Limits: JSD_β/β → KL(teacher ‖ student) as β → 0 and
                   JSD_β/(1−β) → KL(student ‖ teacher) as β → 1 (TRL's docs: "β = 0: KL,
                   β = 1: inverse KL"). TRL's default and ours: β = 0.5 (the symmetric JSD).
                   TRL averages over the labelled tokens ("batchmean" with labels), which is our
                   `kept_tokens` normalisation with w = the label mask. (Early TRL releases, 2024,
                   trl/trainer/gkd_trainer.py, used a log-space interpolation β t + (1−β) s instead
                   of the mixture M; the endpoints β = 0 / 1 agree, the interior does not — pin the
                   TRL version in a benchmark.)

Numerical conventions (ours):
  * pg: positions whose old_logp or advantage is not finite, or whose sampled id is outside
    [0, V), get A = 0 and ρ = 1 (zero loss, zero gradient, never NaN). The log-ratio is clamped
    to ±`LOG_RATIO_CLAMP` (= 20, as verl does) before exp, so a stale π_old cannot overflow ρ;
    beyond the clamp the gradient is 0. `old_logp` must be the log-prob of the same
    distribution `student_logits_fn` defines (e.g. the sampler's temperature applied to both),
    otherwise ρ ≠ 1 on-policy (config `rollout.old_logp`).
  * reverse_kl_topk: a candidate slot is *present* iff its id is in [0, V) and its teacher
    log-prob is finite (the scorer gives −inf to −1 fillers: see teachability/margins.py); absent
    slots belong to the tail. Present ids are assumed distinct (they come from a top-K). The
    student's tail mass is computed exactly, as a masked sum of exp(z − max z) over the
    non-candidate tokens (no 1 − Σ cancellation); the teacher's from its candidate log-probs as
    log(−expm1(logsumexp t_k)), clamped at 0 mass when rounding makes Σ q_k ≥ 1. Both tail
    masses get `TAIL_FLOOR` added (log(tail + floor)), so an empty tail (K = V, or the teacher's
    candidates holding all its mass) is finite and differentiable; with K = V the loss equals
    reverse_kl_full up to ~floor.
  * Full-vocabulary losses assume finite logits.

Normalisation (`loss.normalize`, see `token_coefficients`): kept_tokens (default) Σ w l / Σ w;
all_response_tokens Σ w l / Σ response_mask; per_sequence the mean, over rows that keep at least
one token, of Σ_t w l / Σ_t w.

Memory: `chunked_loss` scans over T in chunks of `chunk_tokens` with `jax.checkpoint` around
each chunk, so neither the forward nor the backward pass holds more than one chunk's [B, c, V]
float32 logits at a time (Qwen3's V is 151,936; a whole [B, T, V] would not fit), plus a few
chunk-sized temporaries. The KL losses have closed-form VJPs (dz = p ⊙ (g − Σ p g)) and
one-pass variadic reductions, so that XLA keeps few of them: compiled value_and_grad temp memory
on CPU (tests/test_losses.py, B=2, T=1024, V=32768, chunk 128) is ≈ 2 chunk-sized [B, c, V] f32
buffers for pg and ≈ 3 for the others, independent of T — 0.25–0.38 of one [B, T, V] f32 array
(the unchunked computation needs 2× (pg) to 5× (jsd) of it).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

LOG_RATIO_CLAMP = 20.0  # pg: |log ρ| is clamped here before exp (e^20 ≈ 4.9e8)
TAIL_FLOOR = 1e-10  # reverse_kl_topk: log(tail mass + floor) for both student and teacher
NORMALIZATIONS = ("kept_tokens", "all_response_tokens", "per_sequence")
DEFAULT_LOSS = "pg"
DEFAULT_NORMALIZE = "kept_tokens"


class LossInputs(NamedTuple):
    """Per-position constants aligned with the response positions (no gradient flows into them).

    A field a loss does not read may be None (e.g. cand_ids for `pg`)."""
    sampled_ids: Array | None  # [B, T] int32, the token y_t the student sampled
    old_logp: Array | None  # [B, T] f32, log π_old(y_t) recorded by the sampler
    advantage: Array | None  # [B, T] f32, A_t = teacher log-prob(y_t) − old_logp
    cand_ids: Array | None  # [B, T, K] int32, the student's top-K candidates at rollout time
    teacher_cand_logp: Array | None  # [B, T, K] f32, teacher log-probs of those candidates


class LossSpec(NamedTuple):
    name: str
    fn: Callable  # fn(student_logits [B,c,V], inputs, *, teacher_logits, clip_eps, jsd_beta) -> (loss, aux)
    needs_teacher_logits: bool  # full-vocabulary losses need the teacher's logits at training time
    uses_candidates: bool  # reads cand_ids / teacher_cand_logp
    input_fields: tuple[str, ...]  # the LossInputs fields it reads
    description: str


# ----------------------------------------------------------------------------- helpers

def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _gather_last(x: Array, ids: Array) -> Array:
    """x[..., ids] along the last axis; ids must already lie in [0, x.shape[-1])."""
    return jnp.take_along_axis(x, ids, axis=-1, mode="clip")


def _sampled_logp(logits: Array, sampled_ids: Array):
    """log softmax(logits)[y] [B, c], and whether y is inside the vocabulary."""
    V = logits.shape[-1]
    ids = jnp.asarray(sampled_ids, jnp.int32)
    in_vocab = (ids >= 0) & (ids < V)
    ids = jnp.clip(ids, 0, V - 1)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return _gather_last(logits, ids[..., None])[..., 0] - lse, in_vocab


# ----------------------------------------------------------------------------- per-token losses

def pg_loss(student_logits: Array, inputs: LossInputs, *, teacher_logits=None, clip_eps=0.2, jsd_beta=None):
    """Clipped policy gradient with the dense OPD advantage as per-token reward.

    loss_t = −min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t),  ρ_t = exp(log π_θ(y_t) − old_logp_t).
    Aux (per token): pg/ratio_mean ρ, pg/clip_frac 1 where the clip is active (the token's
    gradient is zeroed: A > 0 and ρ > 1+ε, or A < 0 and ρ < 1−ε), pg/approx_kl the k3 estimate
    of KL(π_old ‖ π_θ) = (ρ − 1) − log ρ, pg/advantage_mean A, and kl/reverse_k1 = −A, kl/reverse_k3
    = e^A − 1 − A: sample estimates (y ~ π_old) of KL(π_old ‖ teacher).
    """
    logits = _f32(student_logits)
    logp, in_vocab = _sampled_logp(logits, inputs.sampled_ids)
    old = _f32(jax.lax.stop_gradient(inputs.old_logp))
    adv = _f32(jax.lax.stop_gradient(inputs.advantage))
    ok = in_vocab & jnp.isfinite(old) & jnp.isfinite(adv)
    adv = jnp.where(ok, adv, 0.0)
    # Invalid positions: ratio exactly 1 through a constant (no gradient path through garbage).
    log_ratio = jnp.where(ok, logp - jnp.where(ok, old, 0.0), 0.0)
    log_ratio = jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    loss = -jnp.minimum(unclipped, clipped)
    clip_active = ((adv > 0) & (ratio > 1.0 + clip_eps)) | ((adv < 0) & (ratio < 1.0 - clip_eps))
    ratio_sg = jax.lax.stop_gradient(ratio)
    lr_sg = jax.lax.stop_gradient(log_ratio)
    adv_c = jnp.minimum(adv, 50.0)
    aux = {
        "pg/ratio_mean": ratio_sg,
        "pg/clip_frac": clip_active.astype(jnp.float32),
        "pg/approx_kl": (ratio_sg - 1.0) - lr_sg,
        "pg/advantage_mean": adv,
        "kl/reverse_k1": -adv,
        "kl/reverse_k3": jnp.expm1(adv_c) - adv_c,
    }
    return loss, aux


def _topk_fwd(student_logits: Array, cand_ids: Array, teacher_cand_logp: Array):
    z = _f32(student_logits)
    V = z.shape[-1]
    ids = jnp.asarray(cand_ids, jnp.int32)
    t_c = _f32(teacher_cand_logp)
    present = (ids >= 0) & (ids < V) & jnp.isfinite(t_c)
    ids_c = jnp.clip(ids, 0, V - 1)
    t_c = jnp.where(present, t_c, 0.0)  # absent slots: finite fillers, masked out below
    # One pass over V for lse and the student's tail, exactly: both sums share the row max as
    # shift; a tail term underflowing there is < 1e-38 of the top token, far below the floor.
    # Absent slots scatter to index V, which mode="drop" ignores.
    B, c = z.shape[:2]
    bi, ti = jnp.arange(B)[:, None, None], jnp.arange(c)[None, :, None]
    is_cand = jnp.zeros(z.shape, bool).at[bi, ti, jnp.where(present, ids_c, V)].set(True, mode="drop")
    zmax = jax.lax.stop_gradient(jnp.max(z, axis=-1))
    e = jnp.exp(z - zmax[..., None])
    zero = jnp.zeros((), jnp.float32)
    total_sum, tail_sum = jax.lax.reduce((e, jnp.where(is_cand, 0.0, e)), (zero, zero),
                                         lambda a, b: (a[0] + b[0], a[1] + b[1]), (z.ndim - 1,))
    lse = jnp.log(total_sum) + zmax  # [B, c]
    s_c = _gather_last(z, ids_c) - lse[..., None]  # [B, c, K] student log-probs of the candidates
    s_tail = jnp.log(tail_sum / total_sum + TAIL_FLOOR)  # log(P_T + floor)
    # Teacher tail: 1 − Σ_present q_k = −expm1(logsumexp t_k), clamped at 0 mass, plus the same floor.
    t_lse = jax.nn.logsumexp(jnp.where(present, t_c, -jnp.inf), axis=-1)  # -inf when none is present
    t_lse = jnp.where(jnp.isfinite(t_lse), t_lse, -1e30)
    t_mass = jnp.maximum(-jnp.expm1(jnp.minimum(t_lse, 0.0)), 0.0)
    t_tail = jnp.log(t_mass + TAIL_FLOOR)
    cand_terms = jnp.where(present, jnp.exp(s_c) * (s_c - t_c), 0.0)
    loss = jnp.sum(cand_terms, axis=-1) + jnp.exp(s_tail) * (s_tail - t_tail)
    s_mass = tail_sum / total_sum  # P_T
    res = (z, ids_c, present, lse, s_c, t_c, s_tail, t_tail, s_mass)
    return (loss, s_mass, t_mass), res


@jax.custom_vjp
def _topk(student_logits: Array, cand_ids: Array, teacher_cand_logp: Array):
    """(loss, student tail mass, teacher tail mass) per token. A closed-form VJP (w.r.t. the
    student logits only): with g_v = s_v − t_v on a present candidate and g_tail = log(P_T + floor)
    − log(Q_T + floor) on every other token, dz = p ⊙ (g − Σ_v p_v g_v) — one dense [B, c, V]
    buffer plus a K-sized scatter, where autodiff would keep the mask, gather and where transposes."""
    return _topk_fwd(student_logits, cand_ids, teacher_cand_logp)[0]


def _topk_bwd(res, cts):
    z, ids_c, present, lse, s_c, t_c, s_tail, t_tail, s_mass = res
    g_loss = cts[0]  # the tail masses are diagnostics: their cotangents are ignored
    V = z.shape[-1]
    B, c = z.shape[:2]
    g_tail = s_tail - t_tail  # [B, c]
    p_c = jnp.where(present, jnp.exp(s_c), 0.0)
    g_c = s_c - t_c  # [B, c, K]
    mean_g = jnp.sum(p_c * g_c, axis=-1) + s_mass * g_tail
    dz = jnp.exp(z - lse[..., None]) * (g_tail - mean_g)[..., None]
    bi, ti = jnp.arange(B)[:, None, None], jnp.arange(c)[None, :, None]
    dz = dz.at[bi, ti, jnp.where(present, ids_c, V)].add(p_c * (g_c - g_tail[..., None]), mode="drop")
    return (g_loss[..., None] * dz).astype(z.dtype), None, None


_topk.defvjp(_topk_fwd, _topk_bwd)


def reverse_kl_topk_loss(student_logits: Array, inputs: LossInputs, *, teacher_logits=None, clip_eps=None,
                         jsd_beta=None):
    """KL(student ‖ teacher) over the rollout-time top-K candidates plus one tail bucket.

    Aux: kl/reverse_topk (the loss), kl/student_tail_mass P_T and kl/teacher_tail_mass Q_T (the
    masses outside the present candidates, without the floor)."""
    loss, s_mass, t_mass = _topk(_f32(student_logits), jnp.asarray(inputs.cand_ids, jnp.int32),
                                 _f32(jax.lax.stop_gradient(inputs.teacher_cand_logp)))
    aux = {
        "kl/reverse_topk": jax.lax.stop_gradient(loss),
        "kl/student_tail_mass": jax.lax.stop_gradient(s_mass),
        "kl/teacher_tail_mass": jax.lax.stop_gradient(t_mass),
    }
    return loss, aux


def _full_logps(student_logits, teacher_logits):
    if teacher_logits is None:
        raise ValueError("this loss needs teacher_logits (a full-vocabulary loss)")
    s = jax.nn.log_softmax(_f32(student_logits), axis=-1)
    t = jax.nn.log_softmax(_f32(jax.lax.stop_gradient(teacher_logits)), axis=-1)
    return s, t


def _divergence_grad(s: Array, t: Array, kind: str, beta: float, value: Array) -> Array:
    """d divergence / d student logits, closed form: with g = ∂D/∂p (up to a constant),
    dz = p ⊙ (g − Σ_v p g). reverse: g = s − t (Σ p g = KL); forward: dz = p − q;
    jsd: g = (1−β)(s − log M), M = (1−β) p + β q."""
    p = jnp.exp(s)
    if kind == "reverse" or (kind == "jsd" and beta == 1.0):
        return p * ((s - t) - value[..., None])
    if kind == "forward" or (kind == "jsd" and beta == 0.0):
        return p - jnp.exp(t)
    m = jnp.logaddexp(s + math.log1p(-beta), t + math.log(beta))
    g = (1.0 - beta) * (s - m)
    return p * (g - jnp.sum(p * g, axis=-1, keepdims=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _full_vocab(student_logits: Array, teacher_logits: Array, kind: str, beta: float):
    """(loss, KL(student‖teacher), KL(teacher‖student)) per token; a closed-form VJP for the loss
    (w.r.t. the student logits only) keeps the backward pass at a few [B, c, V] buffers instead
    of autodiff's chain of log-softmax intermediates. The two KLs are diagnostics (no gradient)."""
    return _full_vocab_fwd(student_logits, teacher_logits, kind, beta)[0]


def _full_vocab_fwd(student_logits, teacher_logits, kind, beta):
    s, t = _full_logps(student_logits, teacher_logits)
    p, q = jnp.exp(s), jnp.exp(t)
    terms = [p * (s - t), q * (t - s)]  # KL(student‖teacher), KL(teacher‖student) summands
    if kind == "jsd" and 0.0 < beta < 1.0:
        m = jnp.logaddexp(s + math.log1p(-beta), t + math.log(beta))
        terms.append(beta * q * (t - m) + (1.0 - beta) * p * (s - m))
    # one variadic reduction over V: XLA fuses every summand into a single pass over the logits
    zero = jnp.zeros((), jnp.float32)
    sums = jax.lax.reduce(tuple(terms), (zero,) * len(terms),
                          lambda a, b: tuple(x + y for x, y in zip(a, b)), (s.ndim - 1,))
    rkl, fkl = sums[0], sums[1]
    if kind == "reverse" or (kind == "jsd" and beta == 1.0):
        loss = rkl
    elif kind == "forward" or (kind == "jsd" and beta == 0.0):
        loss = fkl
    else:
        loss = sums[2]
    return (loss, rkl, fkl), (student_logits, teacher_logits, loss)


def _full_vocab_bwd(kind, beta, res, cts):
    student_logits, teacher_logits, loss = res
    g_loss = cts[0]  # cotangents of the diagnostics are ignored: they carry no gradient
    s, t = _full_logps(student_logits, teacher_logits)
    dz = g_loss[..., None] * _divergence_grad(s, t, kind, beta, loss)
    return dz.astype(student_logits.dtype), jnp.zeros_like(teacher_logits)


_full_vocab.defvjp(_full_vocab_fwd, _full_vocab_bwd)


FULL_VOCAB_KINDS = ("reverse", "forward", "jsd")


def full_vocab_divergence(student_logits: Array, teacher_logits: Array, kind: str, beta: float = 0.0):
    """Per-token divergence over the full vocabulary, float32 [...] from logits [..., V]:
    "reverse" KL(student ‖ teacher), "forward" KL(teacher ‖ student), or "jsd" (TRL's generalized
    JSD with β = `beta`, see `jsd_loss`). Returns (divergence, aux {kl/reverse_full,
    kl/forward_full}). Gradient reaches the student logits only, by a closed-form VJP (a few
    [..., V] buffers in the backward pass). `kind` and `beta` are static."""
    if teacher_logits is None:
        raise ValueError("this loss needs teacher_logits (a full-vocabulary loss)")
    if kind not in FULL_VOCAB_KINDS:
        raise ValueError(f"kind={kind!r} is not a full-vocabulary divergence; choose one of "
                         f"{', '.join(FULL_VOCAB_KINDS)}.")
    loss, rkl, fkl = _full_vocab(_f32(student_logits), _f32(jax.lax.stop_gradient(teacher_logits)), kind, beta)
    aux = {"kl/reverse_full": jax.lax.stop_gradient(rkl), "kl/forward_full": jax.lax.stop_gradient(fkl)}
    return loss, aux


def reverse_kl_full_loss(student_logits: Array, inputs: LossInputs, *, teacher_logits=None, clip_eps=None,
                         jsd_beta=None):
    """KL(student ‖ teacher) = Σ_v p (s − t). Aux: kl/reverse_full, kl/forward_full."""
    return full_vocab_divergence(student_logits, teacher_logits, "reverse", 0.0)


def forward_kl_full_loss(student_logits: Array, inputs: LossInputs, *, teacher_logits=None, clip_eps=None,
                         jsd_beta=None):
    """KL(teacher ‖ student) = Σ_v q (t − s). Aux: kl/reverse_full, kl/forward_full."""
    return full_vocab_divergence(student_logits, teacher_logits, "forward", 0.0)


def _check_beta(beta) -> float:
    try:
        beta = float(beta)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise TypeError(f"loss.jsd_beta must be a static Python number (it selects TRL's beta=0/1 "
                        f"special cases), got {beta!r}") from e
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"loss.jsd_beta={beta!r} must be in [0, 1] (TRL: 0 = forward KL, 1 = reverse KL).")
    return beta


def jsd_loss(student_logits: Array, inputs: LossInputs, *, teacher_logits=None, clip_eps=None, jsd_beta=0.5):
    """Generalized JSD with TRL's GKDTrainer convention (see the module docstring).

    β = 0: KL(teacher ‖ student); β = 1: KL(student ‖ teacher); otherwise
    β · KL(teacher ‖ M) + (1−β) · KL(student ‖ M), M = β·teacher + (1−β)·student.
    Aux: kl/jsd, kl/reverse_full, kl/forward_full."""
    beta = _check_beta(jsd_beta)
    loss, aux = full_vocab_divergence(student_logits, teacher_logits, "jsd", beta)
    return loss, {"kl/jsd": jax.lax.stop_gradient(loss), **aux}


LOSSES: dict[str, LossSpec] = {
    "pg": LossSpec("pg", pg_loss, False, False, ("sampled_ids", "old_logp", "advantage"),
                   "clipped policy gradient with the dense OPD advantage A_t as reward (default)"),
    "reverse_kl_topk": LossSpec("reverse_kl_topk", reverse_kl_topk_loss, False, True, ("cand_ids", "teacher_cand_logp"),
                                "exact KL(student || teacher) over the rollout top-K candidates + one tail bucket"),
    "reverse_kl_full": LossSpec("reverse_kl_full", reverse_kl_full_loss, True, False, (),
                                "KL(student || teacher) over the full vocabulary"),
    "forward_kl_full": LossSpec("forward_kl_full", forward_kl_full_loss, True, False, (),
                                "KL(teacher || student) over the full vocabulary"),
    "jsd": LossSpec("jsd", jsd_loss, True, False, (),
                    "generalized JSD, TRL GKDTrainer convention (beta=0 forward KL, beta=1 reverse KL)"),
}


def get_loss(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ValueError(f"loss.name={name!r} is not a known loss; choose one of {', '.join(LOSSES)} "
                         f"(default {DEFAULT_LOSS}).")
    return LOSSES[name]


def per_token_loss(name: str, student_logits: Array, inputs: LossInputs, *, teacher_logits=None, clip_eps=0.2,
                   jsd_beta=0.5):
    """The loss `name` on already-computed logits [B, c, V] (unchunked): (loss [B, c], aux)."""
    spec = get_loss(name)
    _check_inputs(spec, inputs, teacher_logits is not None)
    return spec.fn(student_logits, inputs, teacher_logits=teacher_logits, clip_eps=clip_eps, jsd_beta=jsd_beta)


def _check_inputs(spec: LossSpec, inputs: LossInputs, have_teacher: bool) -> None:
    missing = [f for f in spec.input_fields if getattr(inputs, f) is None]
    if missing:
        raise ValueError(f"loss.name={spec.name!r} needs LossInputs.{', LossInputs.'.join(missing)}, got None")
    if spec.needs_teacher_logits and not have_teacher:
        raise ValueError(f"loss.name={spec.name!r} is a full-vocabulary loss: it needs the teacher's "
                         f"logits (teacher_hidden and teacher_logits_fn)")


# ----------------------------------------------------------------------------- normalisation

def check_normalize(how: str) -> None:
    if how not in NORMALIZATIONS:
        raise ValueError(f"loss.normalize={how!r} is not a normalisation; choose one of "
                         f"{', '.join(NORMALIZATIONS)} (default {DEFAULT_NORMALIZE}).")


def _safe_recip(x):
    """1/x where x > 0, else 0 (no NaN/inf, also in gradients)."""
    pos = x > 0
    return jnp.where(pos, 1.0 / jnp.where(pos, x, 1.0), 0.0)


def token_coefficients(weights: Array, response_mask: Array, how: str = DEFAULT_NORMALIZE) -> Array:
    """coeff [B, T] such that the batch loss is Σ coeff · loss; computed once over the global batch.

    w = weights · response_mask (float; fractional under fades; constant: stop_gradient).
      kept_tokens          coeff = w / Σ_{b,t} w
      all_response_tokens  coeff = w / Σ_{b,t} response_mask
      per_sequence         coeff = w_bt / (Σ_t w_bt · #{rows b' with Σ_t w_b't > 0})
    A batch (or row, for per_sequence) with nothing kept gets coefficient 0, never NaN.
    Microbatches of a gradient-accumulation step take their rows of this array and add their
    Σ coeff · loss: the sum is exactly the whole-batch loss.
    """
    check_normalize(how)
    mask = _f32(jax.lax.stop_gradient(response_mask) > 0)
    w = _f32(jax.lax.stop_gradient(weights)) * mask
    if how == "kept_tokens":
        coeff = w * _safe_recip(jnp.sum(w))
    elif how == "all_response_tokens":
        coeff = w * _safe_recip(jnp.sum(mask))
    else:
        row = jnp.sum(w, axis=-1, keepdims=True)
        rows_kept = jnp.sum(_f32(row > 0))
        coeff = w * _safe_recip(row) * _safe_recip(rows_kept)
    return jax.lax.stop_gradient(coeff)


# ----------------------------------------------------------------------------- chunked driver

def pad_to_chunks(x: Array, T: int, n: int, c: int) -> Array:
    """[B, T, ...] -> [n, B, c, ...]: T zero-padded to n * c, chunk-major (what a lax.scan over
    chunks of c positions takes as xs)."""
    pad = n * c - T
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(x.shape[0], n, c, *x.shape[2:]).swapaxes(0, 1)


def chunked_loss(name: str, *, student_hidden: Array, student_logits_fn: Callable[[Array], Array],
                 inputs: LossInputs, coeff: Array, teacher_hidden: Array | None = None,
                 teacher_logits_fn: Callable[[Array], Array] | None = None, chunk_tokens: int = 256,
                 clip_eps: float = 0.2, jsd_beta: float = 0.5):
    """Σ coeff · loss_`name` over [B, T] response positions, chunked over T: (loss, aux).

    student_hidden [B, T, D] final hidden states at the positions that predict the response tokens;
    student_logits_fn(h [B, c, D]) -> [B, c, V] float32 logits (closes over the params).
    teacher_hidden / teacher_logits_fn likewise, only for losses with needs_teacher_logits (they
    get stop_gradient). T is padded up to a multiple of the chunk (padding has coeff 0); a
    `jax.lax.scan` over chunks with `jax.checkpoint` around the body keeps at most one chunk's
    [B, c, V] logits alive in the forward and in the backward pass.
    aux: Σ coeff · per-token aux (e.g. pg/ratio_mean, pg/clip_frac, kl/...), so with the default
    normalisation each is a kept-token mean, and microbatches add them like the loss.
    `name`, `chunk_tokens` and `jsd_beta` are static.
    """
    spec = get_loss(name)
    need_teacher = spec.needs_teacher_logits
    if need_teacher and (teacher_hidden is None or teacher_logits_fn is None):
        raise ValueError(f"loss.name={name!r} is a full-vocabulary loss: chunked_loss needs teacher_hidden "
                         f"and teacher_logits_fn")
    _check_inputs(spec, inputs, True)
    if name == "jsd":
        jsd_beta = _check_beta(jsd_beta)
    if name == "pg" and isinstance(clip_eps, (int, float)) and not 0.0 <= clip_eps < 1.0:
        raise ValueError(f"loss.clip_eps={clip_eps!r} must be in [0, 1)")
    if not (isinstance(chunk_tokens, int) and chunk_tokens >= 1):
        raise ValueError(f"loss.chunk_tokens={chunk_tokens!r} must be an int >= 1")
    B, T = student_hidden.shape[:2]
    if tuple(coeff.shape) != (B, T):
        raise ValueError(f"coeff must be [B, T] = {(B, T)}, got {tuple(coeff.shape)}")
    c = min(chunk_tokens, T)
    n = -(-T // c)

    # Only the fields the loss reads travel through the scan.
    used = LossInputs(*(getattr(inputs, f) if f in spec.input_fields else None for f in LossInputs._fields))
    used = jax.tree.map(jax.lax.stop_gradient, used)
    xs = (
        pad_to_chunks(student_hidden, T, n, c),
        pad_to_chunks(jax.lax.stop_gradient(teacher_hidden), T, n, c) if need_teacher else None,
        jax.tree.map(lambda a: pad_to_chunks(a, T, n, c), used),
        pad_to_chunks(_f32(jax.lax.stop_gradient(coeff)), T, n, c),
    )

    def body(h_s, h_t, inp, cf):
        s_logits = student_logits_fn(h_s)
        t_logits = jax.lax.stop_gradient(teacher_logits_fn(h_t)) if need_teacher else None
        loss, aux = spec.fn(s_logits, inp, teacher_logits=t_logits, clip_eps=clip_eps, jsd_beta=jsd_beta)
        total = jnp.sum(cf * loss)
        aux_sums = {k: jnp.sum(cf * jax.lax.stop_gradient(v)) for k, v in aux.items()}
        return total, aux_sums

    body = jax.checkpoint(body, prevent_cse=False)

    def step(carry, x):
        return carry, body(*x)  # per-chunk scalars come out as ys [n] and are summed below

    _, (totals, auxs) = jax.lax.scan(step, None, xs)
    total = jnp.sum(totals)
    aux = {k: jnp.sum(v) for k, v in auxs.items()}
    return total, aux
