"""Teachability diagnosis: is local teachability collapse there at all, for this pair and these
prompts? The statistics, from saved per-token arrays (no model, no parameter update).

For every margin variant (margins.MARGIN_VARIANTS) this runs the release rule's own pieces, the
sentence scores, the BIC scan and the permutation calibration (changepoint.permutation_test),
on the same rollouts, and asks whether downward change points fire more often than they do
once each rollout's sentence scores are put in a random order (the chance level).

    per_rollout_statistics  one jitted call per variant: per-rollout flags, p-values, release
                            points, and sums/counts of margins and |A_t| (before/after the
                            release, per position decile, first/last third)
    summarize               pools a group of rollouts (all, correct, incorrect) into the report's
                            numbers: rates beside chance with an exact one-sided test, mean r/T,
                            margins before/after, decile curve, first-vs-last third paired test
    verdict                 one plain paragraph, and the release settings it recommends
                            (`recommendation`: what release.from_diagnosis applies)
Everything is pooled from the per-rollout sums, so a number in the report is a ratio of sums
over the rollouts of its group; `recompute_numpy` in the tests rebuilds them from the arrays.

Definitions (ours):
- position of token t in a response of T tokens: decile floor(10 t / T), third floor(3 t / T);
- "before / after the release" pools the tokens of the rollouts the calibration released;
- margins are averaged over the tokens where they are defined (margins.py), |A_t| over all
  response tokens;
- first-vs-last third: per rollout, the mean margin over its last third minus its first third,
  tested with a paired sign-flip permutation test (two-sided; exact for n <= 16 pairs, else
  20,000 random flips); rollouts without a defined margin in both thirds are left out;
- a rate beside chance is tested one-sided with the exact Poisson-binomial tail: rollout i fires
  by chance with its own probability (its share of firing reorderings), independently.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from opdjax import multihost
from opdjax.teachability import changepoint, margins, weights
from opdjax.teachability.rule import ReleaseSettings, checked_scan_width

CALIBRATIONS = ("bic", "permutation")
N_THIRDS = 3
ARRAY_FIELDS = ("response_ids", "response_mask", "teacher_sampled_logp", "teacher_cand_logp",
                "student_sampled_logp", "student_cand_logp", "candidate_ids", "sent_ids")


@dataclasses.dataclass(frozen=True)
class DiagnoseSettings:
    variants: tuple[str, ...] = margins.MARGIN_VARIANTS
    significance: float = 0.01  # level of the verdict's tests
    seed: int = 0  # the reorderings' key


def check_arrays(arrays: dict[str, np.ndarray]) -> None:
    """The per-token arrays a diagnosis reads, with the shapes it needs (names the field)."""
    missing = [k for k in ARRAY_FIELDS if k not in arrays]
    if missing:
        raise ValueError(f"diagnosis arrays lack {', '.join(missing)} (need {', '.join(ARRAY_FIELDS)}).")
    N, R = np.shape(arrays["response_mask"])
    for k in ARRAY_FIELDS:
        if tuple(np.shape(arrays[k])[:2]) != (N, R):
            raise ValueError(f"diagnosis array {k} has shape {np.shape(arrays[k])}, expected [{N}, {R}, ...].")
    if "correct" in arrays and np.shape(arrays["correct"]) != (N,):
        raise ValueError(f"diagnosis array correct has shape {np.shape(arrays['correct'])}, expected [{N}].")


# ----------------------------------------------------------------------- per rollout (device)
def _sums_where(x, m):
    return jnp.sum(jnp.where(m, x, 0.0), axis=-1), jnp.sum(m, axis=-1, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def per_rollout_statistics(s: ReleaseSettings, width: int, margin, defined, advantage, sent_ids, mask, key):
    """Per-rollout statistics of one margin variant under both calibrations. [N] or [N, bins]."""
    mask = mask.astype(bool)
    defined = defined & mask
    g = jnp.where(defined, margin, jnp.nan)
    M, valid, _ = changepoint.sentence_scores(g, sent_ids, width, s.sentence_reduce)
    cp = changepoint.bic_scan(M, valid, penalty=s.bic_penalty, min_segment=s.min_segment, variance=s.variance)
    orders = changepoint.permutation_orders(key, valid, s.permutations)
    pt = changepoint.permutation_test(M, valid, orders, alpha=s.alpha, penalty=s.bic_penalty,
                                      min_segment=s.min_segment, variance=s.variance, observed=cp)
    T = weights.response_lengths(mask)
    t = jnp.arange(mask.shape[1], dtype=jnp.int32)[None, :]
    g0 = jnp.where(defined, margin, 0.0).astype(jnp.float32)
    abs_adv = jnp.abs(jnp.where(mask, advantage, 0.0)).astype(jnp.float32)
    out = {"num_tokens": T, "num_sentences": cp.num_sentences, "delta_bic": cp.delta_bic,
           "release_sentence": cp.release_sentence, "split": cp.split,
           "mean_left": cp.mean_left, "mean_right": cp.mean_right,
           "p_down": pt.p_down, "p_up": pt.p_up, "sentence_scores": M, "sentence_valid": valid}
    flags = {"bic": (cp.detected, cp.upward_detected, pt.chance_bic, pt.chance_bic_up),
             "permutation": (pt.detected, pt.upward_detected, pt.chance_permutation, pt.chance_permutation_up)}
    for c, (down, up, chance, chance_up) in flags.items():
        r = weights.release_index(cp.release_sentence, down, sent_ids, mask)
        before, after = mask & (t < r[:, None]), mask & (t >= r[:, None])
        out |= {f"{c}/detected": down, f"{c}/upward_detected": up, f"{c}/chance": chance,
                f"{c}/chance_up": chance_up, f"{c}/release_index": r}
        for name, x, m in (("margin_before", g0, before & defined), ("margin_after", g0, after & defined),
                           ("abs_adv_before", abs_adv, before), ("abs_adv_after", abs_adv, after)):
            out[f"{c}/{name}_sum"], out[f"{c}/{name}_n"] = _sums_where(x, m)
    for name, bins in (("decile", weights.N_POSITION_BINS), ("third", N_THIRDS)):
        bin_of = (bins * t) // jnp.maximum(T, 1)[:, None]
        in_bin = defined[:, None, :] & (bin_of[:, None, :] == jnp.arange(bins)[None, :, None])  # [N, bins, R]
        out[f"{name}_margin_sum"], out[f"{name}_margin_n"] = _sums_where(g0[:, None, :], in_bin)
    return out


def all_variant_margins(arrays: dict[str, np.ndarray]) -> margins.AllMargins:
    """A_t and every margin variant from the per-token arrays (one jitted pass)."""
    return margins.all_margins(arrays["teacher_sampled_logp"], arrays["student_sampled_logp"],
                               arrays["teacher_cand_logp"], arrays["student_cand_logp"], arrays["candidate_ids"],
                               arrays["response_ids"], np.asarray(arrays["response_mask"], bool))


def analyze_variant(arrays: dict[str, np.ndarray], settings: ReleaseSettings, variant: str, key,
                    all_m: margins.AllMargins | None = None) -> dict[str, np.ndarray]:
    """`per_rollout_statistics` of `variant` (host numpy), plus its token margins (NaN where
    undefined) and A_t. `all_m`: `all_variant_margins(arrays)` if already computed."""
    mask = np.asarray(arrays["response_mask"], bool)
    m = all_m if all_m is not None else all_variant_margins(arrays)
    sent_ids = np.asarray(arrays["sent_ids"])
    width = checked_scan_width(int(sent_ids.max(initial=-1)) + 1, settings)
    out = per_rollout_statistics(settings, width, m.margin[variant],
                                 m.margin_defined[variant], m.advantage, jnp.asarray(sent_ids), mask, key)
    out = multihost.to_host(out)
    defined, margin, advantage = multihost.to_host((m.margin_defined[variant], m.margin[variant], m.advantage))
    out["margin"] = np.where(defined & mask, margin, np.nan)
    out["advantage"] = advantage
    return out


# ------------------------------------------------------------------------------ tests (host)
def poisson_binomial_sf(k: int, probs) -> float:
    """P(X >= k) for X = sum of independent Bernoulli(p_i): exact, by convolution (float64)."""
    probs = np.clip(np.asarray(probs, np.float64), 0.0, 1.0)
    if k <= 0:
        return 1.0
    if k > len(probs):
        return 0.0
    pmf = np.zeros(len(probs) + 1)
    pmf[0] = 1.0
    for i, p in enumerate(probs):
        pmf[1:i + 2] = pmf[1:i + 2] * (1 - p) + pmf[:i + 1] * p
        pmf[0] *= 1 - p
    return float(min(1.0, pmf[k:].sum()))


def sign_flip_test(diffs, *, num_flips: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value of mean(diffs) = 0 for paired differences, by flipping their signs:
    exact over all 2^n sign patterns for n <= 16, else (1 + #extreme) / (1 + num_flips)."""
    d = np.asarray(diffs, np.float64)
    n = len(d)
    if n == 0:
        return float("nan")
    observed = abs(d.mean())
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))
    if n <= 16:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        return float(np.mean(np.abs(signs @ d / n) >= observed - tol))
    signs = _random_signs(num_flips, n, seed)
    return float((1 + np.sum(np.abs(signs @ d / n) >= observed - tol)) / (1 + num_flips))


@functools.lru_cache(maxsize=16)
def _random_signs(num_flips: int, n: int, seed: int) -> np.ndarray:
    """The sign patterns of `sign_flip_test` (cached: every variant and group of n pairs reuses them)."""
    signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(num_flips, n))
    signs.setflags(write=False)
    return signs


def _ratio(num, den) -> float:
    return float(num / den) if den else float("nan")


def summarize(per: dict[str, np.ndarray], rows: np.ndarray, *, seed: int = 0) -> dict[str, Any]:
    """The report's numbers for the rollouts `rows` (bool [N]) of one variant."""
    rows = np.asarray(rows, bool)
    n = int(rows.sum())
    out: dict[str, Any] = {"rollouts": n}
    pick = lambda k: np.asarray(per[k])[rows]  # noqa: E731
    T = pick("num_tokens")
    out["mean_tokens"] = float(T.mean()) if n else float("nan")
    out["mean_sentences"] = float(pick("num_sentences").mean()) if n else float("nan")
    for c in CALIBRATIONS:
        block = {}
        for direction, flag, chance in (("down", "detected", "chance"), ("up", "upward_detected", "chance_up")):
            fired, p_chance = pick(f"{c}/{flag}").astype(bool), pick(f"{c}/{chance}")
            block[f"{direction}_rate"] = _ratio(fired.sum(), n)
            block[f"{direction}_chance"] = float(p_chance.mean()) if n else float("nan")
            block[f"{direction}_count"] = int(fired.sum())
            block[f"{direction}_p_value"] = poisson_binomial_sf(int(fired.sum()), p_chance)
        released = pick(f"{c}/detected").astype(bool)
        r = pick(f"{c}/release_index")
        block["mean_release_frac"] = float(np.mean(r[released] / T[released])) if released.any() else float("nan")
        for name in ("margin_before", "margin_after", "abs_adv_before", "abs_adv_after"):
            block[name] = _ratio(pick(f"{c}/{name}_sum")[released].sum(), pick(f"{c}/{name}_n")[released].sum())
        out[c] = block
    for name in ("decile", "third"):
        s, k = pick(f"{name}_margin_sum").sum(0), pick(f"{name}_margin_n").sum(0)
        out[f"margin_by_{name}"] = [_ratio(a, b) for a, b in zip(s, k)]
    first_n, last_n = pick("third_margin_n")[:, 0], pick("third_margin_n")[:, -1]
    both = (first_n > 0) & (last_n > 0)
    first = pick("third_margin_sum")[both, 0] / first_n[both]
    last = pick("third_margin_sum")[both, -1] / last_n[both]
    diffs = last - first
    out["thirds"] = {"pairs": int(both.sum()),
                     "first_mean": float(first.mean()) if both.any() else float("nan"),
                     "last_mean": float(last.mean()) if both.any() else float("nan"),
                     "mean_diff": float(diffs.mean()) if both.any() else float("nan"),
                     "se_diff": float(diffs.std(ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else float("nan"),
                     "share_lower": float(np.mean(diffs < 0)) if both.any() else float("nan"),
                     "p_value": sign_flip_test(diffs, seed=seed)}
    return out


def groups(correct: np.ndarray | None, n: int) -> dict[str, np.ndarray]:
    """all, and where answers were graded, correct / incorrect (correct: 1, 0, or -1 ungraded)."""
    out = {"all": np.ones(n, bool)}
    if correct is not None:
        c = np.asarray(correct)
        if (c >= 0).any():
            out["correct"] = c == 1
            out["incorrect"] = c == 0
    return out


def diagnose(arrays: dict[str, np.ndarray], settings: ReleaseSettings,
             diag: DiagnoseSettings = DiagnoseSettings()) -> tuple[dict[str, Any], dict[str, dict]]:
    """(results, per-rollout arrays per variant). results[variant][group] = `summarize(...)`,
    plus results["verdict"] and the settings that produced them."""
    check_arrays(arrays)
    N = np.shape(arrays["response_mask"])[0]
    grp = groups(arrays.get("correct"), N)
    key = jax.random.key(diag.seed)
    results: dict[str, Any] = {"variants": {}, "settings": {
        "penalty": settings.bic_penalty, "min_segment": settings.min_segment, "variance": settings.variance,
        "sentence_reduce": settings.sentence_reduce, "alpha": settings.alpha,
        "permutations": settings.permutations, "significance": diag.significance, "seed": diag.seed,
        "split_blank_lines": settings.split_blank_lines, "top_k": int(np.shape(arrays["candidate_ids"])[2])}}
    per_variant = {}
    for v in diag.variants:
        margins.check_margin_variant(v)
    all_m = all_variant_margins(arrays)
    for v in diag.variants:
        # One key for all variants: their reorderings are the same permutations of positions.
        per = analyze_variant(arrays, settings, v, key, all_m)
        per_variant[v] = per
        results["variants"][v] = {g: summarize(per, rows, seed=diag.seed) for g, rows in grp.items()
                                  if g == "all" or rows.any()}
    results["verdict"] = verdict(results["variants"], diag.significance, settings.alpha)
    return results, per_variant


# ------------------------------------------------------------------------------- the verdict
def _span(xs) -> str:
    lo, hi = min(xs), max(xs)
    return f"{lo:.0%}" if round(lo, 2) == round(hi, 2) else f"{lo:.0%}-{hi:.0%}"


def _fmt_p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-4 else "<1e-4"


def variant_finding(v: str, s: dict[str, Any], level: float) -> dict[str, Any]:
    """Whether `v` shows collapse on the rollouts summarised in `s` (one group), at `level`.

    Per calibration: downward change points above chance, and not upward ones too (shifts both
    ways mean non-stationary scores, not a late collapse). The calibration reported is the
    permutation one where it finds the collapse (fewer random releases), else plain BIC: on
    short responses (few sentences) a per-trajectory permutation test has little power, since
    many reorderings reproduce the same split, while the pooled BIC-vs-chance test still can.
    """
    th = s["thirds"]
    by = {c: {"down": s[c]["down_p_value"] < level, "up": s[c]["up_p_value"] < level} for c in CALIBRATIONS}
    found = {c: by[c]["down"] and not by[c]["up"] for c in CALIBRATIONS}
    c = "permutation" if found["permutation"] or not found["bic"] else "bic"
    b = s[c]
    return {"variant": v, "collapse": bool(found["bic"] or found["permutation"]), "calibration": c,
            "collapse_by_calibration": {k: bool(x) for k, x in found.items()},
            "downward_above_chance": bool(by["bic"]["down"] or by["permutation"]["down"]),
            "upward_above_chance": bool(by["bic"]["up"] or by["permutation"]["up"]),
            "falls_late": bool(th["p_value"] < level and th["mean_diff"] < 0),
            "rises_late": bool(th["p_value"] < level and th["mean_diff"] > 0),
            "rate": b["down_rate"], "chance": b["down_chance"], "p": b["down_p_value"],
            "perm_rate": s["permutation"]["down_rate"], "perm_chance": s["permutation"]["down_chance"],
            "perm_p": s["permutation"]["down_p_value"],
            "bic_rate": s["bic"]["down_rate"], "bic_chance": s["bic"]["down_chance"], "bic_p": s["bic"]["down_p_value"],
            "release_frac": b["mean_release_frac"], "before": b["margin_before"], "after": b["margin_after"],
            "first": th["first_mean"], "last": th["last_mean"]}


def verdict(variant_results: dict[str, dict], significance: float, alpha: float) -> dict[str, Any]:
    """One paragraph in plain words, and the per-variant findings it rests on (group "all").
    Each variant is tested under both calibrations, so each test runs at significance / (2 V)
    (Bonferroni): the verdict's own false-alarm rate stays below `significance`."""
    level = significance / max(2 * len(variant_results), 1)
    findings = [variant_finding(v, r["all"], level) for v, r in variant_results.items()]
    n = next(iter(variant_results.values()))["all"]["rollouts"] if variant_results else 0
    hits = [f for f in findings if f["collapse"]]
    both = [f for f in findings if f["downward_above_chance"] and f["upward_above_chance"]]
    lines = []
    if hits:
        best = min(hits, key=lambda f: (f["p"], -f["rate"]))
        cal = ("permutation calibration at alpha=" + f"{alpha}" if best["calibration"] == "permutation"
               else "plain BIC")
        lines.append(
            f"Collapse detected above chance with variant {best['variant']} ({cal}): downward change points in "
            f"{best['rate']:.0%} of {n} rollouts against {best['chance']:.0%} on shuffled sentence orders "
            f"(one-sided p={_fmt_p(best['p'])}); released at r/T={best['release_frac']:.2f} on average, margin "
            f"{best['before']:.3g} before vs {best['after']:.3g} after the release.")
        others = [f["variant"] for f in hits if f is not best]
        if others:
            lines.append(f"Also above chance: {', '.join(others)}.")
        lines.append("The release rule has something to find with this pair and these prompts; train with "
                     f"release.margin={best['variant']}, release.calibration={best['calibration']}.")
    else:
        lines.append(
            f"Not detected: with no margin variant do downward change points fire above chance on these {n} "
            f"rollouts (plain BIC {_span([f['bic_rate'] for f in findings])} against "
            f"{_span([f['bic_chance'] for f in findings])} on shuffled sentence orders; permutation-calibrated at "
            f"alpha={alpha}: {_span([f['perm_rate'] for f in findings])} against "
            f"{_span([f['perm_chance'] for f in findings])}). The release rule would mostly truncate at random.")
    if both:
        lines.append("Shifts in both directions are above chance for "
                     f"{', '.join(f['variant'] for f in both)}: the sentence scores are non-stationary, "
                     "which is not a specific late collapse.")
    up_only = [f["variant"] for f in findings if f["upward_above_chance"] and not f["downward_above_chance"]]
    if up_only:
        lines.append(f"Upward change points are above chance for {', '.join(up_only)}: there the margin "
                     "steps up later in the rollouts, the opposite of a collapse.")
    rising = [f["variant"] for f in findings if f["rises_late"]]
    falling = [f["variant"] for f in findings if f["falls_late"]]
    if rising:
        lines.append(f"Margins rise from the first to the last third for {', '.join(rising)} "
                     f"(paired sign-flip test, p<{level:.2g}).")
    if falling:
        lines.append(f"Margins fall from the first to the last third for {', '.join(falling)} "
                     f"(paired sign-flip test, p<{level:.2g}).")
    lines.append(f"(Each test at {significance}/{2 * len(variant_results)} = {level:.2g}: "
                 f"{len(variant_results)} variants x 2 calibrations.)")
    return {"text": " ".join(lines), "collapse": bool(hits), "level": level, "findings": findings,
            "recommendation": recommendation(findings)}


def recommendation(findings: list[dict[str, Any]]) -> dict[str, Any]:
    """The release settings the verdict recommends (what `release.from_diagnosis` applies).

    Detected: the verdict's best finding, its variant under its calibration. Not detected (ours):
    the variant whose downward change points came closest to chance-beating (lowest one-sided p
    under either calibration; variants whose upward shifts are above chance last; ties: the
    earlier variant), under the *permutation* calibration:
    with nothing to find, plain BIC would still cut its chance share of rollouts (10-16%) at
    random, while the permutation test cuts at most release.alpha of shift-free rollouts, so the
    rule stays close to plain OPD. The numbers are that variant's under that calibration."""
    if not findings:
        raise ValueError("the verdict has no findings (no margin variant was diagnosed).")
    hits = [f for f in findings if f["collapse"]]
    if hits:
        best = min(hits, key=lambda f: (f["p"], -f["rate"]))
        calibration = best["calibration"]
    else:
        best = min(findings, key=lambda f: (f["upward_above_chance"], min(f["bic_p"], f["perm_p"])))  # first of ties
        calibration = "permutation"
    key = "perm" if calibration == "permutation" else "bic"
    return {"detected": bool(hits), "margin": best["variant"], "calibration": calibration,
            "rate": best[f"{key}_rate"], "chance": best[f"{key}_chance"], "p": best[f"{key}_p"],
            "bic_rate": best["bic_rate"], "bic_chance": best["bic_chance"], "bic_p": best["bic_p"],
            "perm_rate": best["perm_rate"], "perm_chance": best["perm_chance"], "perm_p": best["perm_p"]}
