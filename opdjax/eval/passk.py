"""pass@k and avg@n from graded samples, and pass@k curves.

pass@k is the probability that at least one of k samples, drawn without replacement from the n
generated for a problem, is correct. With c correct out of n, the unbiased estimator of Chen et
al. (2021, "Evaluating Large Language Models Trained on Code") is

    pass@k = 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i)

The product form avoids the huge binomials; here it is evaluated as a difference of cumulative
sums of log1p(-k/i), so arrays of (n, c) with different n are handled in one vectorised pass.
avg@n is the plain mean accuracy over all n samples of all problems (= pass@1).
"""
from __future__ import annotations

import os
from typing import Iterable, Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def pass_at_k(n, c, k: int):
    """Unbiased pass@k for each (n, c) pair (broadcast); a float for scalar inputs.

    n: samples per problem, c: correct samples, k: the budget (an int, 1 <= k <= every n).
    """
    n_arr, c_arr = np.broadcast_arrays(np.asarray(n, dtype=np.float64), np.asarray(c, dtype=np.float64))
    if np.any(n_arr != np.round(n_arr)) or np.any(c_arr != np.round(c_arr)):
        raise ValueError(f"pass_at_k: n and c must be whole numbers, got n={n!r}, c={c!r}")
    n_arr, c_arr = n_arr.astype(np.int64), c_arr.astype(np.int64)
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"pass_at_k: k must be a positive integer, got k={k!r}")
    k = int(k)
    if n_arr.size:
        if np.any(c_arr < 0) or np.any(c_arr > n_arr):
            raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c!r} for n={n!r}")
        if k > n_arr.min():
            raise ValueError(f"pass_at_k: k={k} is larger than n={int(n_arr.min())} samples per "
                             "problem; pass@k needs at least k samples (generate more, or use a "
                             "smaller k)")
    # log C(n-c, k)/C(n, k) = sum_{i=n-c+1}^{n} log(1 - k/i) = S[n] - S[n-c], where
    # S[m] = sum_{i=k+1}^{m} log(1 - k/i) (m >= k). When n - c < k a correct sample is always
    # among the k: pass@k = 1.
    top = int(n_arr.max()) if n_arr.size else k
    terms = np.zeros(top + 1)
    i = np.arange(k + 1, top + 1, dtype=np.float64)
    terms[k + 1:] = np.log1p(-k / i)
    S = np.cumsum(terms)
    fails = n_arr - c_arr
    certain = fails < k
    log_ratio = S[n_arr] - S[np.maximum(fails, k)]
    out = np.where(certain, 1.0, -np.expm1(log_ratio))
    out = np.where(c_arr == 0, 0.0, out)
    return float(out) if out.ndim == 0 else out


def _check_correct(correct) -> np.ndarray:
    correct = np.asarray(correct)
    if correct.ndim != 2:
        raise ValueError(f"correct must be [problems, samples], got shape {correct.shape}")
    if correct.shape[0] == 0 or correct.shape[1] == 0:
        raise ValueError(f"correct has no problems or no samples (shape {correct.shape})")
    return correct.astype(bool)


def pass_at_k_table(correct, ks: Iterable[int]) -> dict[int, float]:
    """{k: pass@k averaged over problems} from `correct` [problems, n] (bool)."""
    correct = _check_correct(correct)
    n = correct.shape[1]
    c = correct.sum(axis=1)
    return {int(k): float(np.mean(pass_at_k(n, c, int(k)))) for k in ks}


def avg_at_n(correct) -> float:
    """Mean accuracy over all samples of all problems, `correct` [problems, n] (bool)."""
    return float(np.mean(_check_correct(correct)))


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n (n itself included)."""
    ks = [1 << i for i in range(int(np.log2(n)) + 1) if (1 << i) <= n] if n >= 1 else []
    return ks + ([n] if ks and ks[-1] != n else [])


def plot_pass_at_k(curves: Mapping[str, Mapping[int, float]], out_png: str | os.PathLike,
                   title: str = "pass@k") -> str:
    """One figure with a pass@k curve per model (k on a log2 axis); returns the PNG path."""
    if not curves:
        raise ValueError("plot_pass_at_k: no curves to plot")
    fig = Figure(figsize=(6.0, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    all_ks: set[int] = set()
    for name, curve in curves.items():
        ks = sorted(int(k) for k in curve)
        all_ks.update(ks)
        ax.plot(ks, [curve[k] for k in ks], marker="o", label=str(name))
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(all_ks))
    ax.set_xticklabels([str(k) for k in sorted(all_ks)])
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("pass@k")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    out_png = os.fspath(out_png)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png)
    return out_png
