"""release.calibration = "permutation": the jitted test equals a NumPy loop, holds its level on
shift-free signals, finds planted shifts, and drives the release rule in training."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opdjax.teachability import changepoint, rule

from synthetic_rollouts import arrays_from_margins, sentence_margins


def _rows(seed, B=10, J=14):
    rng = np.random.default_rng(seed)
    M = rng.normal(size=(B, J))
    M[:3, 9:] -= 2.5          # planted downward shifts
    M[3, 5:] += 2.5           # an upward one
    valid = np.ones((B, J), bool)
    valid[4, 9:] = False      # shorter row
    valid[5, 2] = False       # a hole
    valid[6, 3:] = False      # too short to split
    M[7] = 1.0                # constant row (ties everywhere)
    return M, valid


@pytest.mark.parametrize("variance,alpha,min_segment", [("shared", 0.1, 2), ("separate", 0.2, 2),
                                                        ("shared", 0.05, 3)])
def test_vectorised_equals_numpy_loop(variance, alpha, min_segment):
    M, valid = _rows(0)
    with jax.enable_x64(True):  # float64 both sides: the comparison tests the algorithm
        orders = changepoint.permutation_orders(jax.random.key(3), jnp.asarray(valid), 39)
        got = changepoint.permutation_test(jnp.asarray(M), jnp.asarray(valid), orders, alpha=alpha,
                                           variance=variance, min_segment=min_segment, chunk=7)
        want = changepoint.permutation_test_numpy_loop(M, valid, np.asarray(orders), alpha=alpha,
                                                       variance=variance, min_segment=min_segment)
    for field in changepoint.PermutationTest._fields:
        np.testing.assert_allclose(np.asarray(getattr(got, field), np.float64),
                                   np.asarray(getattr(want, field), np.float64), atol=1e-9, err_msg=field)
    assert np.asarray(got.detected)[:3].all() and np.asarray(got.upward_detected)[3]
    assert not np.asarray(got.detected)[6] and np.asarray(got.p_down)[7] == 1.0


def test_orders_are_permutations_of_the_valid_sentences():
    _, valid = _rows(1)
    orders = np.asarray(changepoint.permutation_orders(jax.random.key(0), jnp.asarray(valid), 25))
    for b in range(valid.shape[0]):
        J = valid[b].sum()
        for o in orders[b]:
            assert sorted(o.tolist()) == list(range(valid.shape[1]))
            assert set(o[:J].tolist()) == set(np.flatnonzero(valid[b]).tolist())  # valid ones first
    # the reorderings differ from each other
    assert len({tuple(o) for o in orders[0]}) > 20


@pytest.mark.parametrize("dist", ["normal", "student_t", "exponential"])
def test_false_release_rate_is_at_most_alpha_on_noise(dist):
    """Shift-free trajectories (i.i.d. sentence scores, any distribution): the permutation test
    releases at most alpha (+ 3 s.e.), while plain BIC releases several times more often."""
    rng = np.random.default_rng({"normal": 0, "student_t": 1, "exponential": 2}[dist])
    B, J, alpha = 1500, 12, 0.05
    draw = {"normal": lambda s: rng.normal(size=s), "student_t": lambda s: rng.standard_t(2, size=s),
            "exponential": lambda s: rng.exponential(size=s)}[dist]
    M = draw((B, J)).astype(np.float32)
    valid = np.ones((B, J), bool)
    valid[B // 2:, 9:] = False  # half the rows are shorter
    orders = changepoint.permutation_orders(jax.random.key(7), jnp.asarray(valid), 99)
    pt = changepoint.permutation_test(jnp.asarray(M), jnp.asarray(valid), orders, alpha=alpha)
    rate = float(np.mean(pt.detected))
    se = np.sqrt(alpha * (1 - alpha) / B)
    assert rate <= alpha + 3 * se, rate
    assert rate >= alpha - 4 * se, rate  # and not trivially conservative
    assert float(np.mean(pt.chance_permutation)) <= alpha + 1e-6
    plain = float(np.mean(changepoint.bic_scan(jnp.asarray(M), jnp.asarray(valid)).detected))
    assert plain > 2 * alpha, plain
    np.testing.assert_allclose(float(np.mean(pt.chance_bic)), plain, atol=0.03)  # both are BIC's chance


def test_smallest_p_value_and_too_few_permutations():
    M = np.array([[5.0, 5.1, 4.9, 5.0, 5.2, 0.0, 0.1, -0.1, 0.0, 0.2]], np.float32)
    valid = np.ones_like(M, bool)
    orders = changepoint.permutation_orders(jax.random.key(0), jnp.asarray(valid), 19)
    pt = changepoint.permutation_test(jnp.asarray(M), jnp.asarray(valid), orders, alpha=0.05)
    assert float(pt.p_down[0]) == pytest.approx(1 / 20) and bool(pt.detected[0])
    with pytest.raises(ValueError, match=r"release.permutations=10 is too few for release.alpha=0.05"):
        changepoint.check_permutation_config(alpha=0.05, num_permutations=10)
    with pytest.raises(ValueError, match=r"release.alpha=1.5"):
        changepoint.check_permutation_config(alpha=1.5, num_permutations=200)


@pytest.mark.parametrize("field,value,match", [("calibration", "bonferroni", "release.calibration='bonferroni'"),
                                               ("alpha", 0.0, "release.alpha=0.0"),
                                               ("permutations", 5, "release.permutations=5 is too few")])
def test_config_errors_name_the_field(field, value, match):
    c = rule.release_config()
    c[field] = value
    with pytest.raises(ValueError, match=match):
        rule.settings_from_config(c)


def _decide(arrays, **release):
    c = rule.release_config()
    c.top_k = 2
    c.update(release)
    s = rule.settings_from_config(c)
    from opdjax.teachability.segments import Segments
    n = arrays["sent_ids"].shape[0]
    segs = Segments(arrays["sent_ids"], arrays["sent_ids"].max(1) + 1, [""] * n, [[]] * n, [None] * n)
    return rule.decide_release(s, tokenizer=None, response_ids=arrays["response_ids"],
                               response_mask=arrays["response_mask"],
                               teacher_sampled_logp=arrays["teacher_sampled_logp"],
                               teacher_cand_logp=arrays["teacher_cand_logp"],
                               student_sampled_logp=arrays["student_sampled_logp"],
                               student_cand_logp=arrays["student_cand_logp"],
                               candidate_ids=arrays["candidate_ids"], key=jax.random.key(1), segments=segs)


def test_release_rule_with_permutation_calibration():
    """Planted shift at sentence 8 of 12: the rule releases at its first token; on shift-free
    rows it releases about alpha of them, fewer than plain BIC does."""
    planted = arrays_from_margins(sentence_margins(32, 12, shift_at=8, shift=3.0, seed=0), 5)
    d = _decide(planted, calibration="permutation", permutations=99)
    r = np.asarray(d.release_index)
    assert np.mean(r == 8 * 5) > 0.9
    w = np.asarray(d.weights)
    np.testing.assert_array_equal(w, (np.arange(60)[None] < r[:, None]).astype(np.float32))
    assert {"bic_release_rate", "bic_chance_rate"} <= set(d.stats)

    noise = arrays_from_margins(sentence_margins(400, 12, seed=1), 5)
    perm = _decide(noise, calibration="permutation", permutations=99)
    bic = _decide(noise)
    rate = float(perm.stats["rule_release_rate"])
    assert rate <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 400)
    assert float(bic.stats["rule_release_rate"]) > rate
    assert float(perm.stats["shuffled_release_rate"]) <= 0.05 + 1e-6
    np.testing.assert_allclose(float(perm.stats["bic_release_rate"]), float(bic.stats["rule_release_rate"]))


def test_trimmed_scan_width_changes_nothing():
    """The jitted decision runs on a power-of-two width of sentence columns, not max_sentences."""
    a = arrays_from_margins(sentence_margins(16, 11, shift_at=7, seed=2), 4)
    assert rule.scan_width(11, rule.settings_from_config(rule.release_config())) == 16
    narrow, wide = _decide(a), _decide(a, max_sentences=11)
    assert narrow.sentence_scores.shape[1] == 16 and wide.sentence_scores.shape[1] == 11
    np.testing.assert_array_equal(np.asarray(narrow.weights), np.asarray(wide.weights))
    np.testing.assert_allclose(np.asarray(narrow.changepoint.delta_bic), np.asarray(wide.changepoint.delta_bic),
                               rtol=1e-5)


# --- issue 16 item 2: the permutation test is BIC's test (with lambda) AND p <= alpha
def _random_rows(seed, B=32, J_max=20):
    """Rows of 6..J_max valid sentences, half with a planted downward shift of 0.5..2.5 s.d."""
    rng = np.random.default_rng(seed)
    M = rng.normal(size=(B, J_max))
    valid = np.zeros((B, J_max), bool)
    for b in range(B):
        J = int(rng.choice([6, 9, 12, J_max]))
        valid[b, :J] = True
        if b % 2 == 0:
            M[b, int(rng.integers(J // 3, 2 * J // 3 + 1)):J] -= rng.uniform(0.5, 2.5)
    return M, valid


@pytest.mark.parametrize("penalty", [0.5, 1.0, 5.0, 20.0])
def test_permutation_releases_are_a_subset_of_bic(penalty):
    """Every permutation-released row is BIC-released at the same lambda (RELEASE_RULE.md), in the
    jitted test and in the float64 oracle alike; so are the chance columns (a reordering counts
    only if its own delta BIC > 0 as well)."""
    M, valid = _random_rows(int(penalty * 10))
    kw = dict(alpha=0.05, penalty=penalty)
    with jax.enable_x64(True):
        orders = changepoint.permutation_orders(jax.random.key(5), jnp.asarray(valid), 39)
        got = changepoint.permutation_test(jnp.asarray(M), jnp.asarray(valid), orders, **kw)
        cp = changepoint.bic_scan(jnp.asarray(M), jnp.asarray(valid), penalty=penalty)
    want = changepoint.permutation_test_numpy_loop(M, valid, np.asarray(orders), **kw)
    for field in changepoint.PermutationTest._fields:
        np.testing.assert_allclose(np.asarray(getattr(got, field), np.float64),
                                   np.asarray(getattr(want, field), np.float64), atol=1e-9, err_msg=field)
    for pt in (got, want):
        det, up = np.asarray(pt.detected), np.asarray(pt.upward_detected)
        np.testing.assert_array_equal(det, np.asarray(cp.detected) & (np.asarray(pt.p_down) <= 0.05))
        np.testing.assert_array_equal(up, np.asarray(cp.upward_detected) & (np.asarray(pt.p_up) <= 0.05))
        assert np.all(np.asarray(pt.chance_permutation) <= np.asarray(pt.chance_bic) + 1e-12)
        assert np.all(np.asarray(pt.chance_permutation_up) <= np.asarray(pt.chance_bic_up) + 1e-12)
    # the rows where the two tests disagree exist at both ends of the sweep
    p_ok = np.asarray(got.p_down) <= 0.05
    if penalty >= 5:
        assert np.any(p_ok & ~np.asarray(cp.detected))  # p small, delta BIC < 0: not released any more
    else:
        assert np.any(np.asarray(cp.detected) & ~p_ok)  # BIC fires, the permutation test does not


# One 12-sentence row (a 1-s.d. drop after sentence 6): p = 3/201 whatever lambda, while
# delta BIC = 12 ln(RSS_0/RSS_1) - 2 lambda ln 12 is +5.47 at lambda = 1 and -14.41 at lambda = 5.
ISSUE_ROW = np.array([[0.3, -0.5, 0.8, -0.2, 0.6, -0.7, -0.9, -0.5, -1.4, -1.8, -0.3, -1.1]])


def _issue_row_delta_bic(penalty):
    """By hand: the best downward split of ISSUE_ROW is after sentence 5 (checked by the scan)."""
    m, tau = ISSUE_ROW[0], 5
    rss0 = np.sum((m - m.mean()) ** 2)
    rss1 = np.sum((m[:tau] - m[:tau].mean()) ** 2) + np.sum((m[tau:] - m[tau:].mean()) ** 2)
    return 12 * np.log((rss0 + 1e-8) / (rss1 + 1e-8)) - 2 * penalty * np.log(12)


@pytest.mark.parametrize("penalty,released", [(1.0, True), (5.0, False), (20.0, False)])
def test_issue_row_negative_delta_bic_is_not_released(penalty, released):
    valid = np.ones_like(ISSUE_ROW, bool)
    orders = changepoint.permutation_orders(jax.random.key(0), jnp.asarray(valid), 200)
    want = changepoint.permutation_test_numpy_loop(ISSUE_ROW, valid, np.asarray(orders), penalty=penalty)
    got = changepoint.permutation_test(jnp.asarray(ISSUE_ROW, jnp.float32), jnp.asarray(valid), orders,
                                       penalty=penalty)
    cp = changepoint.bic_scan_numpy_loop(ISSUE_ROW, valid, penalty=penalty)
    assert int(cp.split[0]) == 5
    np.testing.assert_allclose(cp.delta_bic[0], _issue_row_delta_bic(penalty), rtol=1e-12)
    assert (cp.delta_bic[0] > 0) == released
    assert float(want.p_down[0]) == pytest.approx(3 / 201) and float(got.p_down[0]) == pytest.approx(3 / 201)
    assert bool(want.detected[0]) == released and bool(got.detected[0]) == released


def test_lambda_sweep_changes_permutation_releases():
    """The p-values do not depend on lambda, the releases do: they fall as lambda grows, through the
    rule's own decision too (release.calibration = "permutation")."""
    M, valid = _random_rows(3, B=64)
    rates, p = [], None
    with jax.enable_x64(True):  # float64: the shifted penalty moves no near-tie across the >= of p
        orders = changepoint.permutation_orders(jax.random.key(2), jnp.asarray(valid), 99)
        for penalty in (1.0, 2.0, 3.0, 5.0):
            pt = changepoint.permutation_test(jnp.asarray(M), jnp.asarray(valid), orders, penalty=penalty)
            p = np.asarray(pt.p_down) if p is None else p
            np.testing.assert_array_equal(np.asarray(pt.p_down), p)
            rates.append(float(np.mean(pt.detected)))
    # before the fix: 0.23 at every lambda (the share with p <= alpha); now 0.23, 0.14, 0.08, 0
    assert rates[0] > rates[1] > rates[2] > rates[3] == 0.0, rates

    planted = arrays_from_margins(sentence_margins(32, 12, shift_at=8, shift=1.5, seed=4), 5)
    low, high = (_decide(planted, calibration="permutation", permutations=99, bic_penalty=lam) for lam in (1.0, 5.0))
    for d in (low, high):
        perm, bic = float(d.stats["rule_release_rate"]), float(d.stats["bic_release_rate"])
        assert perm <= bic
        assert float(d.stats["shuffled_release_rate"]) <= float(d.stats["bic_chance_rate"]) + 1e-6
    assert float(low.stats["rule_release_rate"]) > float(high.stats["rule_release_rate"])
