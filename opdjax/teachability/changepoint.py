"""Sentence scores and the BIC-style downward change point (RELEASE_RULE.md, Steps 2-3).

`sentence_scores` turns per-token margins into one score per sentence; `bic_scan` finds, for
every trajectory of a [B, J_max] batch at once, the best split of its sentence scores into a
high prefix and a low suffix. Both are pure jitted functions of arrays.
`bic_scan_numpy_loop` is the plain O(J^2) float64 oracle (tests, benchmark).

Definitions (ours, where the spec is silent):
- A non-finite margin (NaN, +-inf) is left out of its sentence's score; `counts` says how
  many tokens were used. A sentence with no finite margin (or no token) is invalid.
- Sentence ids run 0..J_max-1 per row, -1 is padding. Inside jit an id >= J_max cannot raise and
  its token is dropped: call `check_sentence_ids` on the host first.
- Median of an even count = mean of the two middle values.
- `valid` is normally a prefix of the row. Holes (an invalid sentence inside the row; a
  non-finite score in M counts as invalid) are skipped: J is the number of valid sentences,
  `split` counts valid sentences on the left, and `release_sentence` is the row index of the
  first sentence of the right segment (the release happens at its first token). For a
  prefix-valid row the two are equal.
- `split`, `delta_bic` and the two means describe the best downward candidate even when it is
  not detected (for the diagnostics); use `detected` to release. With no candidate at all
  (J < 2*min_segment, or no downward split): delta_bic = -inf, split = J,
  release_sentence = J_max, mean_left = mean_right = mean of the row. The upward_* fields are
  the same scan restricted to upward shifts (mu2 > mu1); an exact tie mu2 == mu1 is neither.

Numerics: each row is centred by its mean before the prefix sums (no RSS changes), so a large
common offset costs float32 no digits. Shared variance uses RSS_1 = RSS_0 - (between-segment sum
of squares), which needs only prefix sums of M; separate variance takes the right side's sums
from suffix sums. Measured against the float64 loop (rows of <= 64 sentences, offsets 0 and 1e4):
float32 delta_bic is within ~3e-5 * max(1, |delta_bic|) (shared) and ~2e-3 * max(1, |delta_bic|)
(separate: a short segment whose scores nearly coincide has a variance float32 resolves only
roughly); decisions differ only at near-ties. With float64 inputs under jax_enable_x64 the scan
matches the loop to ~1e-12. Scores must stay well below 1e18 in magnitude (their float32 squares
must be finite), far beyond any margin in nats.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

VARIANCES = ("shared", "separate")
REDUCES = ("mean", "median")


class ChangePoint(NamedTuple):
    split: jax.Array             # [B] int32: tau*, valid sentences in the left segment
    release_sentence: jax.Array  # [B] int32: row index of the right segment's first sentence
    delta_bic: jax.Array         # [B] delta BIC at tau* (-inf: no downward candidate)
    mean_left: jax.Array         # [B] mu1 at tau*
    mean_right: jax.Array        # [B] mu2 at tau*
    detected: jax.Array          # [B] bool: delta_bic > 0 and J >= 2 * min_segment
    num_sentences: jax.Array     # [B] int32: J, the number of valid sentences
    upward_split: jax.Array      # [B] int32: like split, best upward shift (mu2 > mu1)
    upward_delta_bic: jax.Array  # [B]
    upward_detected: jax.Array   # [B] bool


def check_sentence_ids(sent_ids, max_sentences: int) -> None:
    """Host-side check before `sentence_scores`: ids must be -1 (padding) or in [0, J_max)."""
    ids = np.asarray(sent_ids)
    bad = (ids < -1) | (ids >= max_sentences)
    if bad.any():
        raise ValueError(
            f"sentence ids must be -1 (padding) or in [0, {max_sentences}); found {int(ids[bad][0])} "
            f"(largest id {int(ids.max())}). Raise max_sentences to at least {int(ids.max()) + 1}.")


def check_release_config(*, penalty, min_segment, variance) -> None:
    """Reject meaningless scan settings before any array is touched, naming the config field."""
    if variance not in VARIANCES:
        raise ValueError(f"release.variance={variance!r} must be one of {VARIANCES}.")
    if not (isinstance(penalty, (int, float, np.integer, np.floating)) and 0 <= penalty < np.inf):
        raise ValueError(f"release.bic_penalty={penalty!r} must be a finite number >= 0.")
    if not (isinstance(min_segment, (int, np.integer)) and min_segment >= 1):
        raise ValueError(f"release.min_segment={min_segment!r} must be an integer >= 1.")
    if variance == "separate" and min_segment < 2:
        # A one-sentence side has zero variance: ln(eps) would make every trajectory "detected".
        raise ValueError(f"release.variance='separate' needs release.min_segment >= 2 "
                         f"(got {min_segment}): a one-sentence segment has no variance.")


@functools.partial(jax.jit, static_argnames=("max_sentences", "reduce"))
def sentence_scores(margin, sent_ids, max_sentences: int, reduce: str = "mean"):
    """Per-sentence mean (or median) of the finite margins.

    margin [B, R] float, sent_ids [B, R] int32 (-1 = padding) ->
    (M [B, J_max] float32, valid [B, J_max] bool, counts [B, J_max] int32 finite tokens used).
    Invalid sentences have M = 0. (M is float64 for float64 margins under jax_enable_x64.)
    """
    if reduce not in REDUCES:
        raise ValueError(f"release.sentence_reduce={reduce!r} must be one of {REDUCES}.")
    batch = margin.shape[0]
    x = margin.astype(jnp.result_type(margin.dtype, jnp.float32))
    used = (sent_ids >= 0) & (sent_ids < max_sentences) & jnp.isfinite(x)
    x = jnp.where(used, x, 0)
    # One flat segment per (row, sentence); unused tokens go to an out-of-range id and are dropped.
    flat = jnp.where(used, jnp.arange(batch)[:, None] * max_sentences + sent_ids, batch * max_sentences)
    segment_sum = functools.partial(jax.ops.segment_sum, segment_ids=flat.reshape(-1),
                                    num_segments=batch * max_sentences)
    counts = segment_sum(used.reshape(-1).astype(jnp.int32)).reshape(batch, max_sentences)
    valid = counts > 0
    if reduce == "mean" or margin.shape[1] == 0:  # (no token at all: every sentence invalid)
        total = segment_sum(x.reshape(-1)).reshape(batch, max_sentences)
        return jnp.where(valid, total / jnp.maximum(counts, 1), 0), valid, counts
    # Median: one lexicographic sort by (sentence id, value) puts each sentence's values in a
    # sorted run; unused tokens sort last. A run starts after all earlier sentences' tokens.
    key = jnp.where(used, sent_ids, max_sentences)
    _, ordered = jax.lax.sort((key, x), dimension=1, num_keys=2)
    start = jnp.cumsum(counts, axis=1) - counts
    last = margin.shape[1] - 1
    lo = jnp.take_along_axis(ordered, jnp.clip(start + (counts - 1) // 2, 0, last), axis=1)
    hi = jnp.take_along_axis(ordered, jnp.clip(start + counts // 2, 0, last), axis=1)
    return jnp.where(valid, (lo + hi) / 2, 0), valid, counts


@functools.partial(jax.jit, static_argnames=("penalty", "min_segment", "variance", "eps"))
def bic_scan(M, valid, *, penalty: float = 1.0, min_segment: int = 2, variance: str = "shared",
             eps: float = 1e-8) -> ChangePoint:
    """Best downward (and upward) mean-shift split of every row's valid sentence scores.

    M [B, J_max] float, valid [B, J_max] bool. All splits at once from prefix sums: column k-1
    of the [B, J_max-1] arrays below is the split before row position k (left = positions < k).
    For a fixed row, delta BIC falls as the two-segment cost rises, so tau* is the candidate of
    least cost (as ruptures minimises it) and delta BIC is computed at tau* only.
    """
    check_release_config(penalty=penalty, min_segment=min_segment, variance=variance)
    width = M.shape[1]
    if width < 2:  # no split exists; pad so that the arrays of splits below are not empty
        M, valid = jnp.pad(M, ((0, 0), (0, 2 - width))), jnp.pad(valid, ((0, 0), (0, 2 - width)))
    dtype = jnp.result_type(M.dtype, jnp.float32)
    valid = valid & jnp.isfinite(M)                     # a non-finite score is no score
    w = valid.astype(dtype)
    n = w.sum(axis=1, keepdims=True)                    # J per row
    x = jnp.where(valid, M.astype(dtype), 0)
    center = x.sum(axis=1, keepdims=True) / jnp.maximum(n, 1)
    xc = jnp.where(valid, x - center, 0)                # centring: float32 keeps its digits
    total_s = xc.sum(axis=1, keepdims=True)
    rss0 = jnp.maximum((xc * xc).sum(axis=1, keepdims=True) - total_s**2 / jnp.maximum(n, 1), 0)

    if variance == "shared":
        n_left, s_left = jnp.cumsum(jnp.stack([w, xc]), axis=2)[:, :, :-1]
        n_right = n - n_left
        # RSS_1 = RSS_0 - between-segment sum of squares, n1*n2/J * (mu1 - mu2)^2 (an identity):
        # one prefix sum, no cancellation between two large sums of squares, one division.
        gap = s_left * n - total_s * n_left               # = (mu1 - mu2) * n1 * n2
        cost = jnp.maximum(rss0 - gap * gap / jnp.maximum(n * n_left * n_right, 1), 0)
    else:
        n_left, s_left, q_left = jnp.cumsum(jnp.stack([w, xc, xc * xc]), axis=2)[:, :, :-1]
        # The right side from suffix sums, not total - prefix: that difference cancels when the
        # right segment is short, and its variance enters the statistic on its own.
        s_right, q_right = jax.lax.cumsum(jnp.stack([xc, xc * xc]), axis=2, reverse=True)[:, :, 1:]
        n_right = n - n_left
        gap = s_left * n_right - s_right * n_left         # = (mu1 - mu2) * n1 * n2
        side_cost = lambda q, s, cnt: cnt * jnp.log(  # noqa: E731  cnt * ln(variance + eps)
            jnp.maximum(q - s * s / jnp.maximum(cnt, 1), 0) / jnp.maximum(cnt, 1) + eps)
        cost = side_cost(q_left, s_left, n_left) + side_cost(q_right, s_right, n_right)

    # A split is counted once: at the row position of the right segment's first valid sentence.
    candidate = valid[:, 1:] & (n_left >= min_segment) & (n_right >= min_segment)
    log_j = jnp.log(jnp.maximum(n[:, 0], 1))

    def best(mask):
        k = jnp.argmin(jnp.where(mask, cost, jnp.inf), axis=1)  # first minimum: earliest tau on ties
        found = mask.any(axis=1)
        pick = lambda a: jnp.take_along_axis(a, k[:, None], axis=1)[:, 0]  # noqa: E731
        J, tau, s1, c = n[:, 0], pick(n_left), pick(s_left), pick(cost)
        if variance == "shared":  # kappa = 2: the second mean and the change location
            delta_bic = J * (jnp.log(rss0[:, 0] + eps) - jnp.log(c + eps)) - 2 * penalty * log_j
        else:                     # kappa = 3: also the second variance
            delta_bic = J * jnp.log(rss0[:, 0] / jnp.maximum(J, 1) + eps) - c - 3 * penalty * log_j
        delta_bic = jnp.where(found, delta_bic, -jnp.inf)
        mean_left = jnp.where(found, s1 / jnp.maximum(tau, 1), 0) + center[:, 0]
        mean_right = jnp.where(found, (total_s[:, 0] - s1) / jnp.maximum(J - tau, 1), 0) + center[:, 0]
        split = jnp.where(found, tau, J).astype(jnp.int32)
        release = jnp.where(found, k + 1, width).astype(jnp.int32)
        detected = found & (delta_bic > 0) & (J >= 2 * min_segment)
        return split, release, delta_bic, mean_left, mean_right, detected

    split, release, down_bic, mu1, mu2, detected = best(candidate & (gap > 0))
    up_split, _, up_bic, _, _, up_detected = best(candidate & (gap < 0))
    return ChangePoint(split, release, down_bic, mu1, mu2, detected, n[:, 0].astype(jnp.int32),
                       up_split, up_bic, up_detected)


def bic_scan_numpy_loop(M, valid, *, penalty: float = 1.0, min_segment: int = 2,
                        variance: str = "shared", eps: float = 1e-8) -> ChangePoint:
    """The O(J^2) float64 oracle: a Python loop over rows and splits, means from slices."""
    check_release_config(penalty=penalty, min_segment=min_segment, variance=variance)
    M = np.asarray(M, np.float64)
    valid = np.asarray(valid, bool) & np.isfinite(M)
    rows = []
    for scores_row, valid_row in zip(M, valid):
        positions = np.flatnonzero(valid_row)
        m = scores_row[positions]
        J = len(m)
        mean_all = m.mean() if J else 0.0
        rss0 = ((m - mean_all) ** 2).sum()
        results = {}
        for direction in ("down", "up"):
            out = dict(split=J, release=M.shape[1], bic=-np.inf, mu1=mean_all, mu2=mean_all)
            for tau in range(min_segment, J - min_segment + 1):
                left, right = m[:tau], m[tau:]
                mu1, mu2 = left.mean(), right.mean()
                if not (mu2 < mu1 if direction == "down" else mu2 > mu1):
                    continue
                rss_l, rss_r = ((left - mu1) ** 2).sum(), ((right - mu2) ** 2).sum()
                if variance == "shared":
                    bic = J * np.log((rss0 + eps) / (rss_l + rss_r + eps)) - 2 * penalty * np.log(J)
                else:
                    bic = (J * np.log(rss0 / J + eps) - tau * np.log(rss_l / tau + eps)
                           - (J - tau) * np.log(rss_r / (J - tau) + eps) - 3 * penalty * np.log(J))
                if bic > out["bic"]:
                    out = dict(split=tau, release=positions[tau], bic=bic, mu1=mu1, mu2=mu2)
            out["detected"] = out["bic"] > 0 and J >= 2 * min_segment
            results[direction] = out
        down, up = results["down"], results["up"]
        rows.append((down["split"], down["release"], down["bic"], down["mu1"], down["mu2"],
                     down["detected"], J, up["split"], up["bic"], up["detected"]))
    cols = list(zip(*rows)) if rows else [()] * len(ChangePoint._fields)
    dtypes = (np.int32, np.int32, np.float64, np.float64, np.float64, bool, np.int32,
              np.int32, np.float64, bool)
    return ChangePoint(*(np.asarray(c, dt) for c, dt in zip(cols, dtypes)))


# ------------------------------------------------------------------ permutation calibration
class PermutationTest(NamedTuple):
    """`release.calibration = "permutation"`: each trajectory's delta BIC against the same
    statistic over P random reorderings of its own sentence scores (RELEASE_RULE.md, Step 3).

    p = (1 + #{reorderings with delta_bic >= observed}) / (P + 1), the standard permutation
    p-value: under exchangeable sentence scores (no shift, no trend), P(p <= alpha) <= alpha for
    every alpha, whatever J, the penalty or the score distribution. The penalty term
    -kappa lambda ln J is the same for a trajectory and its reorderings, so lambda does not change
    p; it enters through the other half of the test: a trajectory is detected iff the plain BIC
    test fires (delta_bic > 0 at lambda, J >= 2 * min_segment) AND p <= alpha. Permutation
    releases are therefore a subset of BIC's at the same lambda, and still at most alpha of
    shift-free trajectories. A trajectory with no downward candidate has p = 1 and is never detected.
    """
    p_down: jax.Array             # [B] float32
    p_up: jax.Array               # [B] float32 (the same for the best upward shift)
    detected: jax.Array           # [B] bool: delta_bic > 0, J >= 2 * min_segment, p_down <= alpha
    upward_detected: jax.Array    # [B] bool: the same for upward shifts
    chance_bic: jax.Array         # [B] share of the reorderings on which the plain BIC test fires
    chance_bic_up: jax.Array      # [B] the same for upward shifts
    chance_permutation: jax.Array     # [B] share of reorderings the combined test itself flags
    chance_permutation_up: jax.Array  # [B]


def check_permutation_config(*, alpha, num_permutations) -> None:
    if not (isinstance(alpha, (float, int, np.floating)) and 0 < alpha < 1):
        raise ValueError(f"release.alpha={alpha!r} must lie in (0, 1) (default 0.05).")
    if not (isinstance(num_permutations, (int, np.integer)) and num_permutations >= 1):
        raise ValueError(f"release.permutations={num_permutations!r} must be an integer >= 1 (default 200).")
    if (num_permutations + 1) * alpha < 1:
        # The smallest attainable p-value is 1/(P+1): with fewer reorderings nothing can be detected.
        raise ValueError(f"release.permutations={num_permutations} is too few for release.alpha={alpha}: the "
                         f"smallest p-value is 1/(P+1) = {1 / (num_permutations + 1):.3g} > alpha, so nothing "
                         f"could ever be detected. Use at least {int(np.ceil(1 / alpha)) - 1} permutations.")


@functools.partial(jax.jit, static_argnames=("num_permutations",))
def permutation_orders(key, valid, num_permutations: int):
    """[B, P, J_max] int32: P uniform random orders of each row's valid sentences, which come
    first (holes closed up); the invalid positions follow, so the reordered rows are prefix-valid.

    The noise comes from XLA's RngBitGenerator ("rbg"), keyed by the given key's bits: on a CPU
    its program compiles in ~0.1 s where threefry's takes ~0.8 s, which is most of a
    diagnosis' own cost on small pairs. Deterministic for a key on one backend; the streams of
    different backends may differ (fine for reorderings)."""
    data = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
    rbg = jax.random.wrap_key_data(jnp.resize(data, (4,)) ^ jnp.array([0, 0, 0x9E3779B9, 0x85EBCA6B], jnp.uint32),
                                   impl="rbg")
    noise = jax.random.uniform(rbg, (valid.shape[0], num_permutations, valid.shape[1]))
    return jnp.argsort(jnp.where(valid[:, None, :], noise, 2.0), axis=2).astype(jnp.int32)


def tie_tolerance(x, dtype):
    """A reordering that puts the same sentences on each side as the real order has the same
    delta BIC up to rounding; it must count as a tie (>=), or p would depend on summation order."""
    rtol = 1e-10 if jnp.dtype(dtype) == jnp.float64 else 1e-5
    return rtol * jnp.maximum(1.0, jnp.abs(x))


def _p_values(null, observed, num_permutations):
    """(1 + #{null >= observed}) / (P + 1) per row; null [B, P], observed [B] or [B, P].
    Near-ties (tie_tolerance) count as >=: conservative."""
    obs = observed if observed.ndim == 2 else observed[:, None]
    obs = jnp.where(jnp.isfinite(obs), obs - tie_tolerance(obs, null.dtype), obs)
    sorted_null = jnp.sort(null, axis=1)
    below = jax.vmap(lambda s, o: jnp.searchsorted(s, o, side="left"))(sorted_null, obs)
    return (1 + num_permutations - below).astype(jnp.float32) / (num_permutations + 1)


VECTORISED_ELEMENTS = 1 << 22  # B * P * J_max up to which all reorderings are scanned at once


def _permutations_per_step(batch: int, num_permutations: int, width: int, chunk: int) -> int:
    """All P at once when the [B, P, J_max] arrays are small (fast to compile and run); else the
    largest divisor of P up to `chunk`, so lax.map has no remainder step to compile apart."""
    if batch * num_permutations * width <= VECTORISED_ELEMENTS:
        return num_permutations
    return max(d for d in range(1, min(chunk, num_permutations) + 1) if num_permutations % d == 0)


@functools.partial(jax.jit, static_argnames=("alpha", "penalty", "min_segment", "variance", "eps",
                                             "chunk"))
def permutation_test(M, valid, orders, *, alpha: float = 0.05, penalty: float = 1.0, min_segment: int = 2,
                     variance: str = "shared", eps: float = 1e-8, chunk: int = 32,
                     observed: ChangePoint | None = None) -> PermutationTest:
    """Calibrate every row's downward (and upward) delta BIC against its P reorderings `orders`
    ([B, P, J_max], from `permutation_orders`). Small batches scan every reordering at once; above
    VECTORISED_ELEMENTS the reorderings are scanned at most `chunk` at a time (lax.map), so memory
    is O(B * chunk * J_max) whatever P is.

    The chance columns are the rates one would see on trajectories with no structure at all:
    `chance_bic` is the plain BIC test's firing rate on the reorderings, `chance_permutation`
    treats each reordering in turn as the observation (against the other P - 1 and the real
    order) under the same combined test: flagged iff its own delta BIC > 0 and its p <= alpha;
    so chance_permutation <= min(chance_bic, alpha) up to ties.
    """
    check_release_config(penalty=penalty, min_segment=min_segment, variance=variance)
    num_permutations = orders.shape[1]
    check_permutation_config(alpha=alpha, num_permutations=num_permutations)
    scan = functools.partial(bic_scan, penalty=penalty, min_segment=min_segment, variance=variance, eps=eps)
    observed = scan(M, valid) if observed is None else observed  # the caller's bic_scan of (M, valid)

    def one(order):  # order [B, J_max] -> the scan of the reordered rows
        cp = scan(jnp.take_along_axis(M, order, axis=1), jnp.take_along_axis(valid, order, axis=1))
        return cp.delta_bic, cp.upward_delta_bic, cp.detected, cp.upward_detected

    step = _permutations_per_step(M.shape[0], num_permutations, M.shape[1], chunk)
    if step == num_permutations:  # small: every reordering in one vectorised scan
        down, up, fired, fired_up = jax.vmap(one, in_axes=1, out_axes=1)(orders)
    else:
        down, up, fired, fired_up = jax.lax.map(one, jnp.moveaxis(orders, 1, 0), batch_size=step)
        down, up, fired, fired_up = (jnp.moveaxis(a, 0, 1) for a in (down, up, fired, fired_up))  # [B, P]
    enough = observed.num_sentences >= 2 * min_segment

    def calibrate(null, null_fired, obs_stat):
        p = jnp.where(jnp.isfinite(obs_stat), _p_values(null, obs_stat, num_permutations)[:, 0], 1.0)
        # Each reordering as the observation: (1 + #{other orders >= it}) / (P + 1), the other
        # orders being the P - 1 other reorderings and the real one. #{null >= x} counts x itself,
        # which stands in for the 1.
        at_least = _p_values(null, null, num_permutations) * (num_permutations + 1) - 1  # self included
        tied_or_above = obs_stat[:, None] >= null - tie_tolerance(null, null.dtype)
        p_null = (at_least + tied_or_above) / (num_permutations + 1)
        # The combined test (plain BIC at lambda AND p <= alpha), for the real order and for
        # each reordering (null_fired: the reordering's own delta BIC > 0, J >= 2 * min_segment).
        flagged = null_fired & (p_null <= alpha)
        return p, (obs_stat > 0) & enough & (p <= alpha), jnp.mean(flagged.astype(jnp.float32), axis=1)

    p_down, detected, chance_perm = calibrate(down, fired, observed.delta_bic)
    p_up, up_detected, chance_perm_up = calibrate(up, fired_up, observed.upward_delta_bic)
    mean = lambda a: jnp.mean(a.astype(jnp.float32), axis=1)  # noqa: E731
    return PermutationTest(p_down, p_up, detected, up_detected, mean(fired), mean(fired_up), chance_perm,
                           chance_perm_up)


def permutation_test_numpy_loop(M, valid, orders, *, alpha: float = 0.05, penalty: float = 1.0,
                                min_segment: int = 2, variance: str = "shared",
                                eps: float = 1e-8) -> PermutationTest:
    """Oracle: the float64 O(J^2) loop on every reordering, counts by plain comparisons; detected
    iff the plain BIC test fires (delta BIC > 0 at `penalty`) and p <= alpha, for the real order
    and for each reordering in the chance column alike."""
    M, valid, orders = np.asarray(M, np.float64), np.asarray(valid, bool), np.asarray(orders)
    B, P = orders.shape[:2]
    kw = dict(penalty=penalty, min_segment=min_segment, variance=variance, eps=eps)
    obs = bic_scan_numpy_loop(M, valid, **kw)
    out = {k: np.zeros(B) for k in PermutationTest._fields}
    for b in range(B):
        perm = bic_scan_numpy_loop(M[b][orders[b]], valid[b][orders[b]], **kw)
        enough = obs.num_sentences[b] >= 2 * min_segment
        for suffix, stat, null, fired in (("", obs.delta_bic[b], perm.delta_bic, perm.detected),
                                          ("_up", obs.upward_delta_bic[b], perm.upward_delta_bic,
                                           perm.upward_detected)):
            tol = lambda x: 1e-10 * max(1.0, abs(x))  # noqa: E731  float64 ties (tie_tolerance)
            p = (1 + sum(x >= stat - tol(stat) for x in null)) / (P + 1) if np.isfinite(stat) else 1.0
            flagged = 0
            for j in range(P):
                others = [null[k] for k in range(P) if k != j] + [stat]
                p_j = (1 + sum(x >= null[j] - tol(null[j]) for x in others)) / (P + 1)
                flagged += bool(null[j] > 0 and p_j <= alpha and enough)
            name = "down" if not suffix else "up"
            out[f"p_{name}"][b] = p
            out["detected" if not suffix else "upward_detected"][b] = stat > 0 and enough and p <= alpha
            out[f"chance_bic{suffix}"][b] = np.mean(fired)
            out[f"chance_permutation{suffix}"][b] = flagged / P
    for k in ("detected", "upward_detected"):
        out[k] = out[k].astype(bool)
    return PermutationTest(**out)
