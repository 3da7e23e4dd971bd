"""Sentence scores and the BIC change-point scan against the O(J^2) NumPy loop and `ruptures`."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import ruptures
from hypothesis import given, settings
from hypothesis import strategies as st

from opdjax.teachability import changepoint as cp

pytestmark = pytest.mark.timeout(120)


def _signals(seed, rows, width, *, offset=0.0, holes=False):
    """Noisy rows with a mean shift (down, up or none) and garbage beyond each row's length."""
    rs = np.random.RandomState(seed)
    j = np.arange(width)[None]
    noise = rs.uniform(0.2, 3, (rows, 1))
    M = offset + rs.uniform(-3, 3, (rows, 1)) + noise * rs.randn(rows, width)
    shift = rs.choice([-1, 0, 1], rows)[:, None] * rs.uniform(0, 4, (rows, 1)) * noise
    M += shift * (j >= rs.randint(1, width, (rows, 1)))
    valid = j < rs.randint(0, width + 1, (rows, 1))
    if holes:  # invalid sentences inside some rows
        valid &= ~((rs.rand(rows, width) < 0.1) & (rs.rand(rows, 1) < 0.3))
    M[~valid] = rs.choice([np.nan, 1e30, -7.0], (~valid).sum())
    return M, valid


def _delta_bic_at(m, tau, *, penalty=1.0, variance="shared", eps=1e-8):
    """Float64 delta BIC of one split of the valid scores m (the oracle's formula, one tau)."""
    J, left, right = len(m), m[:tau], m[tau:]
    rss = lambda a: ((a - a.mean()) ** 2).sum()  # noqa: E731
    if variance == "shared":
        return J * np.log((rss(m) + eps) / (rss(left) + rss(right) + eps)) - 2 * penalty * np.log(J)
    return (J * np.log(rss(m) / J + eps) - tau * np.log(rss(left) / tau + eps)
            - (J - tau) * np.log(rss(right) / (J - tau) + eps) - 3 * penalty * np.log(J))


EXACT = ("split", "release_sentence", "detected", "num_sentences", "upward_split", "upward_detected")


def _assert_same(ours, ref, rtol):
    for name in EXACT:
        np.testing.assert_array_equal(np.asarray(getattr(ours, name)), getattr(ref, name), err_msg=name)
    for name in ("delta_bic", "upward_delta_bic", "mean_left", "mean_right"):
        # Same -inf (no candidate) pattern, then values relative to their scale (>= 1).
        a, b = np.asarray(getattr(ours, name), np.float64), getattr(ref, name)
        np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b), err_msg=name)
        fin = np.isfinite(b)
        np.testing.assert_allclose(a[fin], b[fin], rtol=rtol, atol=rtol, err_msg=name)


CONFIGS = [dict(variance="shared", min_segment=2, penalty=1.0),
           dict(variance="shared", min_segment=1, penalty=0.5),
           dict(variance="separate", min_segment=2, penalty=1.0),
           dict(variance="separate", min_segment=3, penalty=2.0)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_matches_numpy_loop_in_float64(config):
    # float64 throughout (scoped x64), so 1e-6 tests the algorithm, not float32 rounding.
    M, valid = _signals(0, 96, 40, holes=True)
    ref = cp.bic_scan_numpy_loop(M, valid, **config)
    with jax.enable_x64(True):
        ours = cp.bic_scan(jnp.asarray(M, jnp.float64), jnp.asarray(valid), **config)
        assert ours.delta_bic.dtype == jnp.float64
        _assert_same(ours, ref, rtol=1e-6)
    assert ref.detected.any() and (~ref.detected).any() and ref.upward_detected.any()


@pytest.mark.parametrize("variance", ["shared", "separate"])
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_float32_decisions_agree_except_near_ties(variance, offset):
    # The offset shows why rows are centred: uncentred float32 sums of squares at 1e4 lose ~all
    # digits of a unit-variance signal. The oracle sees the same float32-rounded inputs.
    M, valid = _signals(1, 600, 64, offset=offset)
    M = M.astype(np.float32)
    ref = cp.bic_scan_numpy_loop(M, valid, variance=variance)
    ours = cp.bic_scan(jnp.asarray(M), jnp.asarray(valid), variance=variance)
    bic, ref_bic = np.asarray(ours.delta_bic, np.float64), ref.delta_bic
    fin = np.isfinite(ref_bic)
    assert (np.isfinite(bic) == fin).all()
    # Accuracy stated in the module docstring: shared ~1e-5, separate ~2e-3 of max(1, |dBIC|).
    tol = {"shared": 1e-4, "separate": 1e-2}[variance]
    assert (np.abs(bic[fin] - ref_bic[fin]) <= tol * np.maximum(1, np.abs(ref_bic[fin]))).all()
    split, detected = np.asarray(ours.split), np.asarray(ours.detected)
    differ = np.flatnonzero((split != ref.split) | (detected != ref.detected))
    assert len(differ) <= 5
    for row in differ:  # only near-ties may differ: two splits (or dBIC and 0) within tolerance
        m = M[row][valid[row]].astype(np.float64)
        at_ours = _delta_bic_at(m, int(split[row]), variance=variance)
        assert abs(at_ours - ref_bic[row]) <= tol * max(1, abs(ref_bic[row]))
        if detected[row] != ref.detected[row]:
            assert abs(ref_bic[row]) <= tol * max(1, abs(ref_bic[row]))


def _downward_signals(seed, count, variance):
    rs = np.random.RandomState(seed)
    for _ in range(count):
        J = rs.randint(12, 48)
        tau = rs.randint(2, J - 1)
        if variance == "shared":
            m = rs.randn(J) - rs.uniform(0.5, 3) * (np.arange(J) >= tau)
        else:  # a change in variance too, so the "normal" cost has something to find
            m = np.where(np.arange(J) < tau, rs.randn(J) * 2, rs.randn(J) * 0.5 - rs.uniform(0.5, 3))
        yield m


@pytest.mark.parametrize("variance,min_segment", [("shared", 1), ("shared", 2), ("shared", 4),
                                                  ("separate", 2), ("separate", 3)])
def test_argmax_equals_ruptures_argmin_on_downward_signals(variance, min_segment):
    # ruptures minimises the two-segment cost over all splits; where its best split is downward
    # our argmax over downward candidates must be the same split. eps=1e-6 is ruptures' own
    # variance bias for model "normal", so both minimise the same function.
    model, eps = {"shared": ("l2", 1e-8), "separate": ("normal", 1e-6)}[variance]
    signals = list(_downward_signals(min_segment, 20, variance))
    M = np.zeros((len(signals), 48), np.float32)
    valid = np.zeros(M.shape, bool)
    for row, m in enumerate(signals):
        M[row, :len(m)], valid[row, :len(m)] = m, True
    ours = cp.bic_scan(jnp.asarray(M), jnp.asarray(valid), min_segment=min_segment, variance=variance,
                       eps=eps)
    checked = 0
    for row, m in enumerate(signals):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "normal": notice of its 1e-6 bias
            bkp = ruptures.Dynp(model=model, min_size=min_segment, jump=1).fit(m).predict(n_bkps=1)[0]
        if m[bkp:].mean() < m[:bkp].mean():
            assert int(ours.split[row]) == bkp, row
            checked += 1
    assert checked >= 15


def test_too_few_sentences_not_detected_with_defined_outputs():
    M = np.arange(24, dtype=np.float32).reshape(4, 6) * -1.0  # strongly decreasing rows
    valid = np.arange(6)[None] < np.array([[0], [1], [2], [3]])
    for variance in cp.VARIANCES:
        r = cp.bic_scan(jnp.asarray(M), jnp.asarray(valid), variance=variance)
        assert not np.asarray(r.detected).any() and not np.asarray(r.upward_detected).any()
        np.testing.assert_array_equal(r.num_sentences, [0, 1, 2, 3])
        np.testing.assert_array_equal(r.split, [0, 1, 2, 3])
        np.testing.assert_array_equal(r.release_sentence, [6, 6, 6, 6])
        assert np.isneginf(np.asarray(r.delta_bic)).all()
        row_means = [0.0] + [M[b, :b].mean() for b in (1, 2, 3)]
        np.testing.assert_allclose(r.mean_left, row_means)
        np.testing.assert_allclose(r.mean_right, row_means)


def test_constant_signal_not_detected_and_no_nan():
    M = np.array([[3.7] * 20, [-1234.5] * 20, [0.0] * 20, [1e-3] * 20], np.float32)
    for variance in cp.VARIANCES:
        r = cp.bic_scan(jnp.asarray(M), jnp.ones(M.shape, bool), variance=variance)
        assert not np.asarray(r.detected).any() and not np.asarray(r.upward_detected).any()
        for value in r:
            assert not np.isnan(np.asarray(value, np.float64)).any()
        np.testing.assert_allclose(r.mean_left, M[:, 0], rtol=1e-6)


def test_upward_shift_is_only_an_upward_detection():
    rs = np.random.RandomState(3)
    M = (rs.randn(2, 30) * 0.3 + 2.0 * (np.arange(30) >= 12)).astype(np.float32)
    for variance in cp.VARIANCES:
        r = cp.bic_scan(jnp.asarray(M), jnp.ones(M.shape, bool), variance=variance)
        assert not np.asarray(r.detected).any()
        assert np.asarray(r.upward_detected).all()
        np.testing.assert_array_equal(r.upward_split, [12, 12])


def test_single_huge_outlier():
    # Shared variance: one spike in mid-rollout barely changes the two means (no detection);
    # in the second sentence it makes the first two sentences a genuinely higher prefix.
    rs = np.random.RandomState(4)
    M = rs.randn(2, 40)
    M[0, 20], M[1, 1] = 100.0, 100.0
    valid = np.ones(M.shape, bool)
    r = cp.bic_scan(jnp.asarray(M, jnp.float32), jnp.asarray(valid))
    np.testing.assert_array_equal(r.detected, [False, True])
    assert int(r.split[1]) == 2
    for variance in cp.VARIANCES:  # whatever each variant decides, it is the oracle's decision
        ours = cp.bic_scan(jnp.asarray(M, jnp.float32), jnp.asarray(valid), variance=variance)
        _assert_same(ours, cp.bic_scan_numpy_loop(M, valid, variance=variance), rtol=1e-4)


def test_nonfinite_scores_are_skipped_like_invalid_sentences():
    rs = np.random.RandomState(5)
    m = (rs.randn(30) - 2.0 * (np.arange(30) >= 18)).astype(np.float32)
    holed = m.copy()
    holed[[4, 17]] = [np.nan, np.inf]
    ours = cp.bic_scan(jnp.asarray(holed[None]), jnp.ones((1, 30), bool))
    kept = np.delete(m, [4, 17])
    compact = cp.bic_scan(jnp.asarray(kept[None]), jnp.ones((1, 28), bool))
    assert bool(ours.detected[0]) and int(ours.num_sentences[0]) == 28
    assert int(ours.split[0]) == int(compact.split[0]) == 16  # 16 valid sentences before row 18
    assert int(ours.release_sentence[0]) == 18               # the row index where release happens
    np.testing.assert_allclose(ours.delta_bic, compact.delta_bic, rtol=1e-5)


def test_padding_beyond_row_length_changes_nothing():
    # Rows of a few lengths, garbage (NaN, 1e30, -7) beyond them, against the same rows unpadded.
    M = np.random.RandomState(6).randn(60, 48) - 2.0 * (np.arange(48) >= 20)
    lengths = np.resize([0, 10, 48], 60)
    valid = np.arange(48)[None] < lengths[:, None]
    M[~valid] = np.resize([np.nan, 1e30, -7.0], (~valid).sum())
    padded = jax.tree.map(np.asarray, cp.bic_scan(jnp.asarray(M, jnp.float32), jnp.asarray(valid)))
    for J in np.unique(lengths):
        rows = lengths == J
        alone = jax.tree.map(np.asarray, cp.bic_scan(jnp.asarray(M[rows, :J], jnp.float32),
                                                     jnp.ones((rows.sum(), J), bool)))
        for name in ("split", "detected", "upward_split", "upward_detected", "num_sentences"):
            np.testing.assert_array_equal(getattr(padded, name)[rows], getattr(alone, name), err_msg=name)
        # "No candidate" points past the row: J_max there, J here.
        no_candidate = ~np.isfinite(alone.delta_bic)
        np.testing.assert_array_equal(padded.release_sentence[rows],
                                      np.where(no_candidate, 48, alone.release_sentence))
        np.testing.assert_allclose(padded.delta_bic[rows], alone.delta_bic, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(padded.mean_left[rows], alone.mean_left, rtol=1e-5, atol=1e-5)
    assert padded.detected.any()


def _token_batch(seed):
    """Token margins with (unordered) sentence ids, -1 padding, non-finite margins, one empty sentence."""
    rs = np.random.RandomState(seed)
    margin = rs.randn(3, 50).astype(np.float32)
    ids = rs.randint(0, 9, (3, 50)).astype(np.int32)
    ids[0, 40:] = -1
    ids[1] = np.sort(ids[1])
    margin[2, rs.rand(50) < 0.2] = np.nan
    margin[2, 0] = -np.inf
    ids[1][ids[1] == 5] = 4                                 # sentence 5 of row 1 has no token
    margin[0][ids[0] == 3] = np.nan                         # sentence 3 of row 0 has no finite margin
    return margin, ids


@pytest.mark.parametrize("reduce", cp.REDUCES)
def test_sentence_scores_match_numpy(reduce):
    margin, ids = _token_batch(7)
    M, valid, counts = cp.sentence_scores(jnp.asarray(margin), jnp.asarray(ids), 10, reduce)
    for b in range(3):
        for j in range(10):
            values = margin[b][(ids[b] == j) & np.isfinite(margin[b])]
            assert int(counts[b, j]) == len(values) and bool(valid[b, j]) == (len(values) > 0)
            expected = getattr(np, reduce)(values) if len(values) else 0.0
            np.testing.assert_allclose(M[b, j], expected, rtol=1e-6, atol=1e-6)
    assert not bool(valid[0, 3]) and not bool(valid[1, 5]) and not bool(valid[0, 9])


def test_median_of_even_count_is_mean_of_middle_two():
    margin = jnp.asarray([[5.0, 1.0, 3.0, 10.0, 7.0, -1.0, 2.0]])
    ids = jnp.asarray([[0, 0, 0, 0, 1, 1, 1]], jnp.int32)
    M, _, counts = cp.sentence_scores(margin, ids, 2, "median")
    np.testing.assert_allclose(M[0], [4.0, 2.0])  # (3 + 5) / 2 and the middle of three
    np.testing.assert_array_equal(counts[0], [4, 3])


def test_sentence_ids_beyond_max_are_a_host_error():
    ids = np.array([[0, 1, 2, 7, -1]], np.int32)
    with pytest.raises(ValueError, match=r"max_sentences to at least 8"):
        cp.check_sentence_ids(ids, 4)
    with pytest.raises(ValueError, match=r"found -2"):
        cp.check_sentence_ids(np.array([[0, -2]]), 4)
    cp.check_sentence_ids(ids, 8)
    # Unchecked, the jitted function drops those tokens (it cannot raise).
    _, _, counts = cp.sentence_scores(jnp.ones((1, 5)), jnp.asarray(ids), 4)
    np.testing.assert_array_equal(counts[0], [1, 1, 1, 0])


def test_scores_to_release_end_to_end():
    # 6 sentences of 5 tokens: high margins for 4 sentences, then low. Release at sentence 4.
    rs = np.random.RandomState(8)
    margin = np.where(np.arange(30) < 20, 3.0, 0.5) + 0.1 * rs.randn(30)
    ids = np.repeat(np.arange(6), 5).astype(np.int32)
    M, valid, _ = cp.sentence_scores(jnp.asarray(margin[None], jnp.float32), jnp.asarray(ids[None]), 8)
    r = cp.bic_scan(M, valid)
    assert bool(r.detected[0]) and int(r.split[0]) == int(r.release_sentence[0]) == 4
    assert int(r.num_sentences[0]) == 6


@pytest.mark.parametrize("kwargs,field", [(dict(variance="pooled"), "release.variance"),
                                          (dict(penalty=-1.0), "release.bic_penalty"),
                                          (dict(penalty=float("nan")), "release.bic_penalty"),
                                          (dict(min_segment=0), "release.min_segment"),
                                          (dict(min_segment=2.5), "release.min_segment"),
                                          (dict(variance="separate", min_segment=1), "release.min_segment")])
def test_config_errors_name_the_field(kwargs, field):
    for scan in (cp.bic_scan, cp.bic_scan_numpy_loop):
        with pytest.raises(ValueError, match=field):
            scan(jnp.zeros((1, 8)), jnp.ones((1, 8), bool), **kwargs)
    with pytest.raises(ValueError, match="release.sentence_reduce"):
        cp.sentence_scores(jnp.zeros((1, 4)), jnp.zeros((1, 4), jnp.int32), 2, "mode")


WIDTH = 24
_score = st.one_of(st.integers(-3, 3).map(float),  # exact ties, constant stretches
                   st.floats(-1e3, 1e3, width=32),
                   st.sampled_from([np.nan, np.inf, -np.inf]))


@settings(max_examples=60, deadline=None)
@given(scores=st.lists(_score, min_size=4 * WIDTH, max_size=4 * WIDTH),
       lengths=st.lists(st.integers(0, WIDTH), min_size=4, max_size=4),
       variance=st.sampled_from(cp.VARIANCES), min_segment=st.sampled_from([2, 3]))
def test_properties(scores, lengths, variance, min_segment):
    M = np.asarray(scores, np.float32).reshape(4, WIDTH)
    valid = np.arange(WIDTH)[None] < np.asarray(lengths)[:, None]
    r = cp.bic_scan(jnp.asarray(M), jnp.asarray(valid), variance=variance, min_segment=min_segment)
    r = jax.tree.map(np.asarray, r)
    for name in ("delta_bic", "upward_delta_bic", "mean_left", "mean_right"):
        assert not np.isnan(getattr(r, name)).any(), name
    usable = valid & np.isfinite(M)
    np.testing.assert_array_equal(r.num_sentences, usable.sum(1))
    J = r.num_sentences
    found = np.isfinite(r.delta_bic)
    assert (r.detected == (found & (r.delta_bic > 0) & (J >= 2 * min_segment))).all()
    assert (r.mean_right[r.detected] <= r.mean_left[r.detected]).all()  # strict before rounding
    assert ((r.split[found] >= min_segment) & (r.split[found] <= J[found] - min_segment)).all()
    for b in np.flatnonzero(found):  # the release row index is a valid sentence, tau* before it
        assert usable[b, r.release_sentence[b]] and usable[b, :r.release_sentence[b]].sum() == r.split[b]
    assert (r.release_sentence[~found] == WIDTH).all() and (r.split[~found] == J[~found]).all()
