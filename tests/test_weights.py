"""Release index, fades, baselines and release statistics against plain NumPy loops.

Shapes are fixed (B, R below) so each jitted function compiles once per fade setting.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from opdjax.teachability import weights as rl

B, R = 5, 12
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- batches

@st.composite
def batches(draw):
    """Right-padded rows of lengths 0..R, monotone 0-indexed sentence ids (-1 on padding),
    a split per row in 0..J+1 (past the last sentence too) and a detected flag."""
    lengths = draw(st.lists(st.integers(0, R), min_size=B, max_size=B))
    mask = np.zeros((B, R), bool)
    sent = np.full((B, R), -1, np.int32)
    split = np.zeros(B, np.int32)
    for b, T in enumerate(lengths):
        mask[b, :T] = True
        starts = draw(st.lists(st.booleans(), min_size=T, max_size=T))
        if T:
            starts[0] = False
            sent[b, :T] = np.cumsum(starts)
        n_sent = int(sent[b, :T].max()) + 1 if T else 0
        split[b] = draw(st.integers(0, n_sent + 1))
    detected = np.array(draw(st.lists(st.booleans(), min_size=B, max_size=B)))
    return mask, sent, split, detected


def release_index_loop(split, detected, sent, mask):
    r = np.zeros(B, np.int32)
    for b in range(B):
        T = int(mask[b].sum())
        r[b] = T
        if detected[b]:
            for t in range(T):
                if sent[b, t] == split[b]:
                    r[b] = t
                    break
    return r


def weights_loop(r, mask, fade, fade_tokens=0, half_life=1.0):
    w = np.zeros(mask.shape, np.float64)
    for b in range(mask.shape[0]):
        for t in range(int(mask[b].sum())):
            if t < r[b]:
                w[b, t] = 1.0
            elif fade == "linear":
                w[b, t] = max(0.0, 1.0 - (t - r[b] + 1) / fade_tokens)
            elif fade == "exp":
                w[b, t] = 0.5 ** ((t - r[b] + 1) / half_life)
    return w


# ----------------------------------------------------------------------------- release index

@FAST
@given(batches())
def test_release_index_is_first_token_of_split_sentence(batch):
    mask, sent, split, detected = batch
    r = rl.release_index(split, detected, sent, mask)
    assert r.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(r), release_index_loop(split, detected, sent, mask))


def test_not_detected_means_whole_trajectory_supervised():
    mask = np.arange(R)[None, :] < np.array([12, 7, 3, 0, 9])[:, None]
    sent = np.where(mask, np.arange(R)[None, :] // 3, -1).astype(np.int32)
    r = rl.release_index(np.full(B, 1, np.int32), np.zeros(B, bool), sent, mask)
    np.testing.assert_array_equal(np.asarray(r), mask.sum(1))
    for fade in rl.FADES:
        np.testing.assert_array_equal(np.asarray(rl.release_weights(r, mask, fade)), mask.astype(np.float32))


# ----------------------------------------------------------------------------- fades

@pytest.mark.parametrize("fade,fade_tokens,half_life", [("hard", 32, 16.0), ("linear", 4, 16.0),
                                                        ("linear", 1, 16.0), ("exp", 32, 2.5)])
@FAST
@given(batch=batches())
def test_release_weights_match_numpy_loop(fade, fade_tokens, half_life, batch):
    mask, sent, split, detected = batch
    r = release_index_loop(split, detected, sent, mask)
    w = np.asarray(rl.release_weights(r, mask, fade, fade_tokens=fade_tokens, half_life=half_life))
    assert w.dtype == np.float32
    expected = weights_loop(r, mask, fade, fade_tokens, half_life)
    np.testing.assert_allclose(w, expected, rtol=1e-6, atol=0)
    assert np.all(w[~mask] == 0)
    # Every fade keeps exactly the tokens before r at full weight.
    np.testing.assert_array_equal((w == 1).sum(1), np.minimum(r, mask.sum(1)))
    if fade == "hard" or fade_tokens == 1:
        np.testing.assert_array_equal(w, (np.arange(R)[None] < r[:, None]) & mask)


def test_fade_definitions_on_one_row():
    mask = np.ones((1, R), bool)
    r = np.array([3], np.int32)
    lin = np.asarray(rl.release_weights(r, mask, "linear", fade_tokens=4))[0]
    np.testing.assert_allclose(lin[:8], [1, 1, 1, 0.75, 0.5, 0.25, 0, 0])
    exp = np.asarray(rl.release_weights(r, mask, "exp", half_life=2.0))[0]
    np.testing.assert_allclose(exp[:6], [1, 1, 1, 2 ** -0.5, 0.5, 2 ** -1.5], rtol=1e-6)


@pytest.mark.parametrize("kwargs,field", [(dict(fade="cosine"), "release.fade"),
                                          (dict(fade="linear", fade_tokens=0), "release.fade_tokens"),
                                          (dict(fade="linear", fade_tokens=2.5), "release.fade_tokens"),
                                          (dict(fade="exp", half_life=0.0), "release.half_life")])
def test_bad_fade_config_names_the_field(kwargs, field):
    mask = np.ones((1, R), bool)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        rl.release_weights(np.array([2], np.int32), mask, **kwargs)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        rl.prefix_fraction_weights(mask, 0.5, **kwargs)


def test_weights_are_constants_for_autodiff():
    # A float mask is the only differentiable input; stop_gradient must cut it.
    mask = jnp.ones((1, R), jnp.float32)
    r = jnp.array([4], jnp.int32)
    grads = [jax.grad(lambda m: rl.release_weights(r, m, "linear", fade_tokens=3).sum())(mask),
             jax.grad(lambda m: rl.full_weights(m).sum())(mask)]
    for g in grads:
        np.testing.assert_array_equal(np.asarray(g), 0.0)


# ----------------------------------------------------------------------------- baselines

def test_full_weights_are_the_mask():
    mask = np.arange(R)[None, :] < np.array([12, 0, 5, 1, 7])[:, None]
    np.testing.assert_array_equal(np.asarray(rl.full_weights(mask)), mask.astype(np.float32))


@FAST
@given(lengths=st.lists(st.integers(0, R), min_size=B, max_size=B), n64=st.integers(0, 64))
def test_prefix_fraction_keeps_round_half_up_of_fraction_times_length(lengths, n64):
    # Multiples of 1/64 make fraction*T exact in float32, so ties (x.5) are tested as ties.
    fraction = n64 / 64
    mask = np.arange(R)[None, :] < np.array(lengths)[:, None]
    w = np.asarray(rl.prefix_fraction_weights(mask, fraction))
    keep = [math.floor(fraction * T + 0.5) for T in lengths]
    np.testing.assert_array_equal(w, np.arange(R)[None, :] < np.array(keep)[:, None])


def test_prefix_fraction_common_values():
    mask = np.arange(R)[None, :] < np.array([10, 10, 3, 7, 12])[:, None]
    np.testing.assert_array_equal(np.asarray(rl.prefix_fraction_index(mask, 0.3)), [3, 3, 1, 2, 4])
    np.testing.assert_array_equal(np.asarray(rl.prefix_fraction_index(mask, 0.25)), [3, 3, 1, 2, 3])


@FAST
@given(lengths=st.lists(st.integers(0, R), min_size=B, max_size=B), n1024=st.integers(0, 1024),
       seed=st.integers(0, 2 ** 31 - 1))
def test_random_release_matches_the_kept_ratio_exactly(lengths, n1024, seed):
    ratio = n1024 / 1024  # exact in float32, and ratio * sum T too
    mask = np.arange(R)[None, :] < np.array(lengths)[:, None]
    r = np.asarray(rl.random_release_index(jax.random.key(seed), mask, ratio))
    T = np.array(lengths)
    assert np.all((0 <= r) & (r <= T))
    assert r.sum() == math.floor(ratio * T.sum() + 0.5)
    w = np.asarray(rl.random_release_weights(jax.random.key(seed), mask, ratio))
    np.testing.assert_array_equal(w, weights_loop(r, mask, "hard"))


def test_random_release_is_deterministic_per_key_and_varies_with_it():
    mask = np.arange(48)[None, :] < np.random.default_rng(0).integers(1, 49, 64)[:, None]
    r1 = np.asarray(rl.random_release_index(jax.random.key(1), mask, 0.6))
    np.testing.assert_array_equal(r1, np.asarray(rl.random_release_index(jax.random.key(1), mask, 0.6)))
    r2 = np.asarray(rl.random_release_index(jax.random.key(2), mask, 0.6))
    assert r1.sum() == r2.sum() and np.any(r1 != r2)


def test_random_release_points_spread_over_the_rows():
    # At ratio 1/2 on equal lengths the common scale is ~1: release fractions ~ Uniform(0, 1).
    mask = np.ones((512, 40), bool)
    frac = np.asarray(rl.random_release_index(jax.random.key(0), mask, 0.5)) / 40
    assert abs(frac.mean() - 0.5) < 0.01
    assert 0.25 < frac.std() < 0.33  # uniform: 0.289
    assert np.mean(frac == 1.0) < 0.05


# ----------------------------------------------------------------------------- statistics

def nanmean_or_nan(x):
    return float(np.mean(x)) if len(x) else float("nan")


def release_stats_loop(r, mask, w, margin, adv):
    T = mask.sum(1)
    before, after, released, frac = [], [], [], []
    adv_before, adv_after = [], []
    bins = [[] for _ in range(10)]
    for b in range(mask.shape[0]):
        for t in range(T[b]):
            (before if t < r[b] else after).append(margin[b, t])
            (adv_before if t < r[b] else adv_after).append(abs(adv[b, t]))
            bins[(10 * t) // T[b]].append(margin[b, t])
        if T[b]:
            released.append(r[b] < T[b])
            if r[b] < T[b]:
                frac.append(r[b] / T[b])
    return {"kept_share": w[mask].sum() / max(T.sum(), 1),
            "pre_release_share": np.minimum(r, T).sum() / max(T.sum(), 1),
            "release_rate": nanmean_or_nan(released), "mean_release_frac": nanmean_or_nan(frac),
            "margin_before": nanmean_or_nan(before), "margin_after": nanmean_or_nan(after),
            "abs_adv_before": nanmean_or_nan(adv_before), "abs_adv_after": nanmean_or_nan(adv_after),
            "margin_by_decile": np.array([nanmean_or_nan(x) for x in bins])}


@pytest.mark.parametrize("seed", range(4))
def test_release_stats_match_numpy(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, R + 1, B)
    lengths[0] = R
    mask = np.arange(R)[None, :] < lengths[:, None]
    r = np.where(rng.random(B) < 0.5, rng.integers(0, R + 1, B), lengths).astype(np.int32)
    if seed == 3:
        r = lengths.astype(np.int32)  # nothing released: the "after" means are undefined (NaN)
    margin = rng.normal(size=(B, R)).astype(np.float32)
    adv = rng.normal(size=(B, R)).astype(np.float32)
    w = np.asarray(rl.release_weights(r, mask, "exp", half_life=3.0))
    got = rl.release_stats(r, mask, w, margin, adv)
    want = release_stats_loop(r, mask, w, margin, adv)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    if seed == 3:
        assert np.isnan(got["margin_after"]) and np.isnan(got["mean_release_frac"])
        assert got["release_rate"] == 0


def test_margin_deciles_on_a_long_row():
    # T = 101: token 10 sits at t/T = 0.0990 (bin 0), token 11 at 0.109 (bin 1); integer binning
    # must not round such near-boundary tokens into the next bin.
    T = 101
    mask = np.ones((1, T), bool)
    margin = np.arange(T, dtype=np.float32)[None]
    got = rl.release_stats(np.array([T], np.int32), mask, mask.astype(np.float32), margin, margin)
    want = [np.mean([t for t in range(T) if (10 * t) // T == k]) for k in range(10)]
    np.testing.assert_allclose(np.asarray(got["margin_by_decile"]), want, rtol=1e-6)


# ----------------------------------------------------------------------------- random_matched under fades

U32 = 2.0 ** -24  # unit roundoff of float32


def random_order_loop(key, mask):
    """The (row, t) real tokens in random_release_index's documented order: threshold
    (t + 1) / (u_b * T_b) in float32, ties in row-major order."""
    u = 1.0 - np.asarray(jax.random.uniform(key, (mask.shape[0],), jnp.float32))
    T = mask.sum(1)
    toks = [(np.float32(t + 1) / (u[b] * np.float32(max(T[b], 1))), b * mask.shape[1] + t, b, t)
            for b in range(mask.shape[0]) for t in range(T[b])]
    return [(b, t) for *_, b, t in sorted(toks)]


def matched_loop(key, mask, target, fade, fade_tokens=0, half_life=1.0):
    """Brute force in float64: add tokens in the random order while sum_b S_b(r_b) <= target, with
    S_b(r) summed directly from the weights; the first token that does not fit moves its row a
    fraction theta of the way from w(r) to w(r + 1)."""
    def row(b, r):
        return weights_loop(np.full(mask.shape[0], r), mask, fade, fade_tokens, half_life)[b]
    r = np.zeros(mask.shape[0], np.int64)
    mass = sum(row(b, 0).sum() for b in range(mask.shape[0]))
    for b, t in random_order_loop(key, mask):
        assert t == r[b]  # the order keeps a prefix of every row
        inc = row(b, t + 1).sum() - row(b, t).sum()
        if mass + inc > target:
            theta = (target - mass) / inc
            w = weights_loop(r, mask, fade, fade_tokens, half_life)
            w[b] = (1 - theta) * row(b, t) + theta * row(b, t + 1)
            return r, w
        mass += inc
        r[b] += 1
    return r, weights_loop(r, mask, fade, fade_tokens, half_life)


@FAST
@given(lengths=st.lists(st.integers(0, R), min_size=B, max_size=B), n1024=st.integers(0, 1024),
       seed=st.integers(0, 2 ** 31 - 1))
def test_random_matched_hard_is_random_release_bit_for_bit(lengths, n1024, seed):
    ratio = n1024 / 1024
    mask = np.arange(R)[None, :] < np.array(lengths)[:, None]
    key = jax.random.key(seed)
    k = math.floor(ratio * sum(lengths) + 0.5)
    r, w = rl.random_matched_weights(key, mask, float(k), "hard")
    r_old = np.asarray(rl.random_release_index(key, mask, ratio))
    np.testing.assert_array_equal(np.asarray(r), r_old)
    np.testing.assert_array_equal(np.asarray(w), np.asarray(rl.random_release_weights(key, mask, ratio)))


FADE_SETTINGS = [("hard", 32, 16.0), ("linear", 1, 16.0), ("linear", 3, 16.0), ("linear", 8, 16.0),
                 ("exp", 32, 0.7), ("exp", 32, 4.0), ("exp", 32, 16.0)]


@pytest.mark.parametrize("fade,fade_tokens,half_life", FADE_SETTINGS)
@pytest.mark.parametrize("seed", range(3))
def test_random_matched_carries_the_rules_weight_mass(fade, fade_tokens, half_life, seed):
    rng = np.random.default_rng(seed)
    b, n = 8, 40
    lengths = rng.integers(0, n + 1, b)
    lengths[0] = n
    mask = np.arange(n)[None] < lengths[:, None]
    # the rule: two rows in three released at a random point, the others supervised throughout
    released = np.arange(b) % 3 != 2
    r_rule = np.where(released, (rng.uniform(0.1, 0.9, b) * lengths).astype(np.int32), lengths).astype(np.int32)
    fade_kw = dict(fade_tokens=fade_tokens, half_life=half_life)
    rule_w = rl.release_weights(r_rule, mask, fade, **fade_kw)
    target = jnp.sum(rule_w)
    key = jax.random.key(100 + seed)
    r, w = rl.random_matched_weights(key, mask, target, fade, **fade_kw)
    r, w = np.asarray(r), np.asarray(w)
    # float32 error bound: the target's sum, the cumulative mass that picks the cut and the
    # result's sum each err by at most N u sum(w) (recursive summation), plus the slack
    bound = 4 * mask.size * U32 * float(target)
    assert abs(float(np.sum(w)) - float(target)) <= bound, (float(np.sum(w)), float(target))
    assert w.dtype == np.float32
    assert np.all((0 <= w) & (w <= 1)) and np.all(w[~mask] == 0)
    assert np.all(np.diff(w, axis=1) <= 0)  # non-increasing along every row
    assert np.all((0 <= r) & (r <= lengths))
    r_np, w_np = matched_loop(key, mask, float(target), fade, fade_tokens, half_life)
    # Near a cut the two may place one token differently (theta ~ 1 here, ~ 0 there); the weights
    # are continuous in the cut, so they still agree within the mass error bound.
    np.testing.assert_allclose(w, w_np, rtol=0, atol=bound + 4 * U32)
    assert np.sum(np.abs(r - r_np)) <= 1


def test_release_stats_leave_undefined_margins_out():
    # NaN marks an undefined margin: margin means use defined tokens only, |A_t| means all tokens.
    rng = np.random.default_rng(0)
    lengths = np.array([R, 9, 6, 0, 11])
    mask = np.arange(R)[None, :] < lengths[:, None]
    margin = rng.normal(2.0, 1.0, size=(B, R)).astype(np.float32)
    late = np.arange(R)[None, :] >= (2 * lengths[:, None] + 2) // 3  # last third of each row
    margin[late] = np.nan
    adv = rng.normal(size=(B, R)).astype(np.float32)
    r = np.array([4, 3, 6, 0, 7], np.int32)
    w = np.asarray(rl.release_weights(r, mask, "hard"))
    got = rl.release_stats(r, mask, w, margin, adv)
    defined = mask & ~late
    t = np.arange(R)[None, :]
    after = mask & (t >= r[:, None])
    np.testing.assert_allclose(got["margin_after"], margin[after & defined].mean(), rtol=1e-6)
    np.testing.assert_allclose(got["margin_before"], margin[~after & defined].mean(), rtol=1e-6)
    np.testing.assert_allclose(got["abs_adv_after"], np.abs(adv[after]).mean(), rtol=1e-6)
    bins = (10 * t) // np.maximum(lengths, 1)[:, None]
    want = [margin[defined & (bins == k)].mean() if (defined & (bins == k)).any() else np.nan for k in range(10)]
    np.testing.assert_allclose(np.asarray(got["margin_by_decile"]), want, rtol=1e-6)
    assert np.isnan(want[-1])  # the last decile is undefined on every row: NaN, not 0
