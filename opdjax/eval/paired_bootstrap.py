"""Confidence intervals for a multi-seed comparison: a two-level (seeds, then problems) paired
bootstrap over per-problem scores.

The scores of one arm are an array [S, P]: seed s, held-out problem p (a problem's score is its
sampled accuracy, the mean over `eval.samples` draws, or its greedy 0/1). Each bootstrap replicate
draws S seeds with replacement and, for each drawn seed, P problems with replacement, and averages
the drawn scores. Two arms are *paired*: one replicate uses the same drawn seeds and problems for
both, so the difference's interval carries only what differs between the arms, not which problems
or which seed happened to be hard. The problems of different seeds may differ (the toy task's
problem set is a function of the seed), which is why problems are drawn within each drawn seed.

Percentile intervals; `n_boot` replicates from a seeded NumPy generator (the same numbers on every
machine). Pure NumPy, no device.
"""
from __future__ import annotations

import dataclasses

import numpy as np

LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
    mean: float  # the plain mean over seeds and problems
    low: float
    high: float

    def covers(self, x: float) -> bool:
        return self.low <= x <= self.high

    def as_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high}


def check_scores(scores: dict[str, np.ndarray]) -> tuple[int, int]:
    """Every arm [S, P] with the same S and P (names the arm that differs)."""
    shapes = {arm: np.shape(x) for arm, x in scores.items()}
    if not shapes:
        raise ValueError("paired bootstrap: no arms.")
    first = next(iter(shapes.values()))
    for arm, sh in shapes.items():
        if len(sh) != 2 or sh != first or 0 in sh:
            raise ValueError(f"paired bootstrap: arm {arm!r} has scores of shape {sh}; every arm needs the same "
                             f"non-empty [seeds, problems] shape ({first} for the first arm).")
    return first


def draws(S: int, P: int, n_boot: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Replicate indices: seeds [B, S] and, within each drawn seed, problems [B, S, P]."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, S, (n_boot, S)), rng.integers(0, P, (n_boot, S, P))


def replicate_means(x: np.ndarray, seed_idx: np.ndarray, problem_idx: np.ndarray) -> np.ndarray:
    """[B] means of x [S, P] over each replicate's drawn seeds and problems."""
    return np.asarray(x, np.float64)[seed_idx[:, :, None], problem_idx].mean(axis=(1, 2))


def interval(x: np.ndarray, reps: np.ndarray, level: float = LEVEL) -> Interval:
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(reps, [a, 1.0 - a])
    return Interval(float(np.mean(x)), float(lo), float(hi))


def compare_arms(scores: dict[str, np.ndarray], rule: str, *, n_boot: int = 10_000, seed: int = 0,
                 level: float = LEVEL) -> dict:
    """Per-arm mean and interval, and the paired difference rule − other for every other arm with
    its interval and a verdict ("not distinguishable" when the interval covers 0)."""
    S, P = check_scores(scores)
    if rule not in scores:
        raise ValueError(f"paired bootstrap: the rule arm {rule!r} is not among the arms {list(scores)}.")
    si, pi = draws(S, P, n_boot, seed)
    reps = {arm: replicate_means(x, si, pi) for arm, x in scores.items()}
    out = {"seeds": S, "problems": P, "n_boot": n_boot, "level": level,
           "arms": {arm: interval(x, reps[arm], level).as_dict() for arm, x in scores.items()},
           "differences": {}}
    for arm in scores:
        if arm == rule:
            continue
        d = np.asarray(scores[rule], np.float64) - np.asarray(scores[arm], np.float64)
        iv = interval(d, reps[rule] - reps[arm], level)
        word = (f"{rule} ahead" if iv.low > 0 else f"{rule} behind" if iv.high < 0 else "not distinguishable")
        out["differences"][f"{rule} - {arm}"] = {**iv.as_dict(), "verdict": word}
    return out
