"""Margins against a plain NumPy loop, the edge cases the module defines, and properties."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opdjax.teachability import margins

pytestmark = pytest.mark.timeout(240)
INF = np.inf
GAPS = ("advantage_gap", "teacher_gap", "renorm_prob_gap")


# ----------------------------------------------------------------------------- NumPy reference
def reference(variant, t_s, s_s, t_c, s_c, ids, y, mask=None):
    """(A, margin, defined) by loops in float64, following the module docstring word for word."""
    B, R, K = t_c.shape
    A, g, defined = np.zeros((B, R)), np.zeros((B, R)), np.zeros((B, R), bool)
    for b in range(B):
        for t in range(R):
            if mask is not None and not mask[b, t]:
                continue
            a_ok = np.isfinite(t_s[b, t]) and np.isfinite(s_s[b, t])
            if a_ok:
                A[b, t] = float(t_s[b, t]) - float(s_s[b, t])
            cands = [(ids[b, t, k], float(t_c[b, t, k]), float(t_c[b, t, k]) - float(s_c[b, t, k]))
                     for k in range(K) if np.isfinite(t_c[b, t, k]) and np.isfinite(s_c[b, t, k])]
            if variant == "sampled_margin":
                others = [a for v, _, a in cands if v != y[b, t]]
                if a_ok and others:
                    g[b, t], defined[b, t] = A[b, t] - max(others), True
                continue
            if len(cands) < 2:
                continue
            if variant == "advantage_gap":
                vals = sorted((a for _, _, a in cands), reverse=True)
            elif variant == "teacher_gap":
                vals = sorted((l for _, l, _ in cands), reverse=True)
            else:
                p = np.exp([l for _, l, _ in cands])
                vals = sorted(p / p.sum(), reverse=True)
            g[b, t], defined[b, t] = vals[0] - vals[1], True
    return A, g, defined


def call(variant, t_s, s_s, t_c, s_c, ids, y, mask=None):
    out = margins.margin(variant, np.float32(t_s), np.float32(s_s), np.float32(t_c), np.float32(s_c),
                         np.int32(ids), np.int32(y), mask)
    return tuple(np.asarray(x) for x in out)


def check_against_reference(variant, *inputs, mask=None):
    A, _, _, g, d = call(variant, *inputs, mask=mask)
    A_ref, g_ref, d_ref = reference(variant, *inputs, mask=mask)
    np.testing.assert_array_equal(d, d_ref)
    np.testing.assert_allclose(A, A_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=1e-5)
    assert np.isfinite(g).all() and np.isfinite(A).all()
    return g, d


def one_position(t_c, s_c, ids, y, t_s=None, s_s=None):
    """[1, 1, K] inputs; the sampled log-probs default to y's slot when y is a candidate."""
    t_c, s_c, ids = (np.array(x, dtype=float if i < 2 else int)[None, None] for i, x in enumerate((t_c, s_c, ids)))
    if t_s is None:
        k = list(ids[0, 0]).index(y)
        t_s, s_s = t_c[0, 0, k], s_c[0, 0, k]
    return np.array([[t_s]]), np.array([[s_s]]), t_c, s_c, ids, np.array([[y]])


# ----------------------------------------------------------------------------- random batches
def random_inputs(B, R, K, seed, absent=0.2, y_in_candidates=0.7):
    rs = np.random.RandomState(seed)
    t_c = -rs.exponential(3.0, (B, R, K))
    s_c = -rs.exponential(3.0, (B, R, K))
    s_c[rs.rand(B, R, K) < absent] = -INF  # top-p truncated
    ids = np.stack([rs.permutation(50)[:K] for _ in range(B * R)]).reshape(B, R, K)
    y = rs.randint(50, 60, (B, R))  # not a candidate ...
    t_s, s_s = -rs.exponential(3.0, (B, R)), -rs.exponential(1.0, (B, R))
    inside = rs.rand(B, R) < y_in_candidates  # ... unless it is one (then the log-probs agree)
    slot = rs.randint(0, K, (B, R))
    for b, t in zip(*np.nonzero(inside)):
        k = slot[b, t]
        y[b, t], s_c[b, t, k] = ids[b, t, k], np.log(rs.uniform(0.05, 1.0))
        t_s[b, t], s_s[b, t] = t_c[b, t, k], s_c[b, t, k]
    return t_s, s_s, t_c, s_c, ids, y


@pytest.mark.parametrize("variant", margins.MARGIN_VARIANTS)
@pytest.mark.parametrize("K", [1, 2, 5])
def test_variant_equals_numpy_loop(variant, K):
    inputs = random_inputs(3, 7, K, seed=K)
    mask = np.ones((3, 7), bool)
    mask[1, 4:] = False
    check_against_reference(variant, *inputs)
    check_against_reference(variant, *inputs, mask=mask)


def test_all_margins_equals_each_variant():
    inputs = random_inputs(2, 6, 4, seed=1)
    cast = [np.float32(x) for x in inputs[:4]] + [np.int32(x) for x in inputs[4:]]
    every = margins.all_margins(*cast)
    for v in margins.MARGIN_VARIANTS:
        one = margins.margin(v, *cast)
        np.testing.assert_array_equal(np.asarray(every.margin[v]), np.asarray(one.margin))
        np.testing.assert_array_equal(np.asarray(every.margin_defined[v]), np.asarray(one.margin_defined))
        np.testing.assert_array_equal(np.asarray(every.advantage), np.asarray(one.advantage))


# ----------------------------------------------------------------------------- edge cases
def test_ties_give_zero_gap():
    # two candidates with the same teacher log-prob and the same advantage
    inputs = one_position([-1.0, -1.0, -3.0], [-2.0, -2.0, -0.5], [4, 7, 9], y=4)
    for v in GAPS:
        g, d = check_against_reference(v, *inputs)
        assert d[0, 0] and g[0, 0] == 0.0
    g, d = check_against_reference("sampled_margin", *inputs)
    assert d[0, 0] and g[0, 0] == 0.0  # y ties with the best other candidate


def test_k1_gaps_undefined_and_sampled_margin_needs_another_candidate():
    y_is_candidate = one_position([-1.0], [-0.5], [3], y=3)
    y_elsewhere = one_position([-1.0], [-0.5], [3], y=8, t_s=-2.0, s_s=-1.0)
    for v in GAPS:
        for inputs in (y_is_candidate, y_elsewhere):
            g, d = check_against_reference(v, *inputs)
            assert not d[0, 0] and g[0, 0] == 0.0
    g, d = check_against_reference("sampled_margin", *y_is_candidate)
    assert not d[0, 0] and g[0, 0] == 0.0  # y is the only candidate: nothing to compare with
    g, d = check_against_reference("sampled_margin", *y_elsewhere)
    assert d[0, 0] and g[0, 0] == pytest.approx((-2.0 + 1.0) - (-1.0 + 0.5))


def test_k2_values():
    inputs = one_position([-0.5, -2.0], [-1.0, -0.25], [5, 6], y=6)  # a = [0.5, -1.75]
    expect = {"advantage_gap": 2.25, "teacher_gap": 1.5, "sampled_margin": -2.25,
              "renorm_prob_gap": (np.exp(-0.5) - np.exp(-2.0)) / (np.exp(-0.5) + np.exp(-2.0))}
    for v, want in expect.items():
        g, d = check_against_reference(v, *inputs)
        assert d[0, 0] and g[0, 0] == pytest.approx(want, abs=1e-6)


def test_k2_with_an_absent_candidate():
    # top-p truncation left one candidate: no second-best; y is that candidate -> no competitor
    inputs = one_position([-0.5, -2.0], [-0.1, -INF], [5, 6], y=5)
    for v in margins.MARGIN_VARIANTS:
        g, d = check_against_reference(v, *inputs)
        assert not d[0, 0] and g[0, 0] == 0.0
    # y outside the candidates: sampled_margin compares it with the one present candidate
    inputs = one_position([-0.5, -2.0], [-0.1, -INF], [5, 6], y=9, t_s=-3.0, s_s=-2.0)
    g, d = check_against_reference("sampled_margin", *inputs)
    assert d[0, 0] and g[0, 0] == pytest.approx(-1.0 - (-0.4))


def test_non_finite_inputs_are_absent_never_nan():
    # NaN / +inf / -inf student or teacher log-probs: the slot is absent
    inputs = one_position([-1.0, np.nan, -INF, -2.0], [-0.5, -1.0, -1.0, INF], [1, 2, 3, 4], y=1)
    for v in margins.MARGIN_VARIANTS:
        g, d = check_against_reference(v, *inputs)
        assert not d[0, 0] and g[0, 0] == 0.0
    A, cand_adv, present, _, _ = call("advantage_gap", *inputs)
    np.testing.assert_array_equal(present[0, 0], [True, False, False, False])
    np.testing.assert_array_equal(cand_adv[0, 0], [-0.5, 0, 0, 0])
    # all candidates absent, and a non-finite sampled log-prob: A = 0, nothing defined
    inputs = one_position([-INF, -INF], [-INF, -1.0], [1, 2], y=7, t_s=-INF, s_s=-1.0)
    for v in margins.MARGIN_VARIANTS:
        A, cand_adv, present, g, d = call(v, *inputs)
        assert A[0, 0] == 0 and not present.any() and not d[0, 0] and g[0, 0] == 0 and (cand_adv == 0).all()


def test_padding_is_zero_and_undefined():
    t_s, s_s, t_c, s_c, ids, y = random_inputs(2, 4, 3, seed=5, absent=0.0)
    mask = np.array([[True, True, False, False], [True, True, True, True]])
    for v in margins.MARGIN_VARIANTS:
        A, cand_adv, present, g, d = call(v, t_s, s_s, t_c, s_c, ids, y, mask)
        assert (A[~mask] == 0).all() and (g[~mask] == 0).all() and not d[~mask].any()
        assert not present[~mask].any() and (cand_adv[~mask] == 0).all()


def test_unknown_variant_and_bad_shapes_name_the_field():
    inputs = [np.float32(x) for x in random_inputs(1, 2, 3, seed=0)[:4]] + [np.int32(np.zeros((1, 2, 3))),
                                                                            np.int32(np.zeros((1, 2)))]
    with pytest.raises(ValueError, match=r"release.margin='top1'.*advantage_gap, teacher_gap, sampled_margin, "
                                         r"renorm_prob_gap"):
        margins.margin("top1", *inputs)
    bad = list(inputs)
    bad[3] = bad[3][..., :2]
    with pytest.raises(ValueError, match=r"student_cand_logp must have shape \(1, 2, 3\)"):
        margins.margin("advantage_gap", *bad)
    with pytest.raises(ValueError, match=r"response_mask must have shape \(1, 2\)"):
        margins.margin("advantage_gap", *inputs, np.ones((2, 1), bool))


# ----------------------------------------------------------------------------- properties
LOGP = st.one_of(st.floats(-60.0, 0.0), st.sampled_from([-INF, np.nan, 0.0, -1.0]))


@st.composite
def position_batches(draw):
    """[2, 3, K] batches: arbitrary (also non-finite, tied) log-probs, distinct candidate ids, y
    inside the candidates (sharing its slot's log-probs) or outside, random padding."""
    B, R, K = 2, 3, draw(st.sampled_from([1, 2, 4]))
    grid = lambda shape: np.array(draw(st.lists(LOGP, min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))),
                                  dtype=np.float64).reshape(shape)
    t_c, s_c = grid((B, R, K)), grid((B, R, K))
    t_s, s_s = grid((B, R)), grid((B, R))
    ids = np.broadcast_to(np.arange(K), (B, R, K)).copy()
    y = np.array(draw(st.lists(st.integers(0, K + 1), min_size=B * R, max_size=B * R))).reshape(B, R)
    for b in range(B):
        for t in range(R):
            if y[b, t] < K:
                t_s[b, t], s_s[b, t] = t_c[b, t, y[b, t]], s_c[b, t, y[b, t]]
    mask = np.array(draw(st.lists(st.booleans(), min_size=B * R, max_size=B * R))).reshape(B, R)
    return (t_s, s_s, t_c, s_c, ids, y), mask


@settings(max_examples=60, deadline=None)
@given(position_batches())
def test_properties(batch):
    inputs, mask = batch
    cast = [np.float32(x) for x in inputs[:4]] + [np.int32(x) for x in inputs[4:]]
    every = margins.all_margins(*cast, mask)
    g = {v: np.asarray(x) for v, x in every.margin.items()}
    d = {v: np.asarray(x) for v, x in every.margin_defined.items()}
    for v in margins.MARGIN_VARIANTS:
        assert np.isfinite(g[v]).all(), v
        assert (g[v][~d[v]] == 0).all(), v
        _, g_ref, d_ref = reference(v, *[np.float32(x) for x in inputs[:4]], *inputs[4:], mask=mask)
        np.testing.assert_array_equal(d[v], d_ref)
        np.testing.assert_allclose(g[v], g_ref, atol=1e-4, rtol=1e-5)
    assert np.isfinite(np.asarray(every.advantage)).all()
    assert np.isfinite(np.asarray(every.candidate_advantage)).all()
    assert (g["advantage_gap"] >= 0).all() and (g["teacher_gap"] >= 0).all()
    assert ((g["renorm_prob_gap"] >= 0) & (g["renorm_prob_gap"] <= 1)).all()
    # y a present candidate: sampled_margin <= advantage_gap (equal when y has the best advantage)
    present = np.asarray(every.candidate_present)
    y_present = np.take_along_axis(present, np.minimum(inputs[5], present.shape[-1] - 1)[..., None], -1)[..., 0]
    y_present &= inputs[5] < present.shape[-1]
    both = y_present & d["sampled_margin"] & d["advantage_gap"]
    assert (g["sampled_margin"][both] <= g["advantage_gap"][both] + 1e-4).all()
