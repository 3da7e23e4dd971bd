"""The teachability diagnosis on rollouts with a known answer, and its statistics against
brute force."""
import itertools

import numpy as np
import pytest

from opdjax.teachability import collapse_stats, rule

from synthetic_rollouts import arrays_from_margins, sentence_margins

SETTINGS = rule.settings_from_config(rule.release_config())


def _run(arrays, **diag):
    return collapse_stats.diagnose(arrays, SETTINGS, collapse_stats.DiagnoseSettings(**diag))


def test_planted_downward_shift_is_found_at_its_sentence():
    J, shift_at, tok = 12, 8, 5
    arrays = arrays_from_margins(sentence_margins(64, J, shift_at=shift_at, shift=2.5, seed=0), tok)
    results, per = _run(arrays)
    for v in ("advantage_gap", "teacher_gap"):
        s = results["variants"][v]["all"]
        for c in ("bic", "permutation"):
            assert s[c]["down_rate"] > 0.8 and s[c]["down_chance"] < 0.2, (v, c, s[c])
            assert s[c]["down_p_value"] < 1e-10
            assert s[c]["mean_release_frac"] == pytest.approx(shift_at / J, abs=0.03)
            assert s[c]["margin_after"] < s[c]["margin_before"] - 2
        released = per[v]["permutation/detected"]
        found = per[v]["release_sentence"][released]
        assert np.mean(found == shift_at) > 0.7 and np.mean(abs(found - shift_at) <= 1) > 0.9
        assert s["thirds"]["mean_diff"] < -1.5 and s["thirds"]["p_value"] < 1e-3
        deciles = s["margin_by_decile"]
        assert min(deciles[:6]) > max(deciles[7:]) + 1.5
    v = results["verdict"]
    assert v["collapse"] and v["text"].startswith("Collapse detected above chance with variant")


def test_no_shift_is_within_sampling_error_of_chance():
    n = 400
    arrays = arrays_from_margins(sentence_margins(n, 12, seed=3), 5)
    results, _ = _run(arrays)
    for v, groups in results["variants"].items():
        for c in ("bic", "permutation"):
            b = groups["all"][c]
            se = np.sqrt(b["down_chance"] * (1 - b["down_chance"]) / n)
            assert abs(b["down_rate"] - b["down_chance"]) < 3.5 * se, (v, c, b)
            assert b["down_p_value"] > 0.01
    assert not results["verdict"]["collapse"]
    assert results["verdict"]["text"].startswith("Not detected")
    assert "would mostly truncate at random" in results["verdict"]["text"]


def test_upward_shift_is_not_collapse():
    arrays = arrays_from_margins(sentence_margins(64, 12, shift_at=6, shift=-2.5, seed=4), 5)
    results, _ = _run(arrays)
    s = results["variants"]["advantage_gap"]["all"]["permutation"]
    assert s["up_rate"] > 0.8 and s["up_p_value"] < 1e-10 and s["down_p_value"] > 0.01
    assert not results["verdict"]["collapse"]
    assert "rise from the first to the last third" in results["verdict"]["text"]


def test_groups_split_by_correctness():
    """The shift is planted only in the incorrect rollouts: only that group shows it."""
    n = 80
    correct = np.arange(n) % 2
    m = sentence_margins(n, 12, seed=5)
    m[correct == 0, 7:] -= 2.5
    results, _ = _run(arrays_from_margins(np.clip(m, 0.05, None), 5, correct=correct))
    g = results["variants"]["advantage_gap"]
    assert g["correct"]["rollouts"] == g["incorrect"]["rollouts"] == 40
    assert g["incorrect"]["permutation"]["down_rate"] > 0.8
    assert g["correct"]["permutation"]["down_rate"] < 0.2
    assert g["all"]["permutation"]["down_count"] == (g["correct"]["permutation"]["down_count"]
                                                     + g["incorrect"]["permutation"]["down_count"])


def test_ungraded_rollouts_have_no_groups():
    arrays = arrays_from_margins(sentence_margins(8, 8, seed=6), 4, correct=-np.ones(8))
    results, _ = _run(arrays, variants=("advantage_gap",))
    assert list(results["variants"]["advantage_gap"]) == ["all"]


def test_poisson_binomial_tail_equals_enumeration():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 0.6, size=9)
    for k in range(0, 11):
        brute = sum(np.prod([pi if o else 1 - pi for pi, o in zip(p, outcome)])
                    for outcome in itertools.product((0, 1), repeat=9) if sum(outcome) >= k)
        assert collapse_stats.poisson_binomial_sf(k, p) == pytest.approx(brute, abs=1e-12)
    # equal probabilities: the binomial tail
    from math import comb
    assert collapse_stats.poisson_binomial_sf(7, [0.3] * 20) == pytest.approx(
        sum(comb(20, i) * 0.3**i * 0.7**(20 - i) for i in range(7, 21)), rel=1e-10)


def test_sign_flip_test_exact_and_sampled():
    d = np.array([0.5, -0.2, 0.9, 1.1, 0.3, -0.1, 0.7])
    obs = abs(d.mean())
    brute = np.mean([abs(np.dot(s, d)) / len(d) >= obs - 1e-12 for s in itertools.product((1, -1), repeat=7)])
    assert collapse_stats.sign_flip_test(d) == pytest.approx(brute)
    rng = np.random.default_rng(1)
    null = rng.normal(size=40)
    assert collapse_stats.sign_flip_test(null) > 0.01
    assert collapse_stats.sign_flip_test(null + 1.0) < 1e-3
    # agrees with the paired t-test on a large sample (scipy is a test oracle only)
    from scipy import stats
    x = rng.normal(size=60) + 0.3
    assert collapse_stats.sign_flip_test(x) == pytest.approx(stats.ttest_1samp(x, 0).pvalue, abs=0.02)


def test_bad_arrays_are_named():
    arrays = arrays_from_margins(sentence_margins(4, 6, seed=0), 3)
    del arrays["sent_ids"]
    with pytest.raises(ValueError, match="lack sent_ids"):
        collapse_stats.check_arrays(arrays)
    arrays = arrays_from_margins(sentence_margins(4, 6, seed=0), 3)
    arrays["teacher_cand_logp"] = arrays["teacher_cand_logp"][:, :5]
    with pytest.raises(ValueError, match="teacher_cand_logp has shape"):
        collapse_stats.check_arrays(arrays)


def test_permutation_calibration_releases_a_subset_of_bic_at_the_same_penalty():
    """Issue 16: under release.bic_penalty = 5 a planted 2.5-s.d. drop still has small p-values,
    but delta BIC < 0 on most rollouts; the permutation calibration (BIC's test AND p <= alpha)
    releases only rollouts plain BIC releases, and its chance level is the combined test's."""
    c = rule.release_config()
    c.bic_penalty = 5.0
    settings = rule.settings_from_config(c)
    arrays = arrays_from_margins(sentence_margins(64, 12, shift_at=8, shift=2.5, seed=0), 5)
    results, per = collapse_stats.diagnose(arrays, settings, collapse_stats.DiagnoseSettings(variants=("advantage_gap",)))
    r = per["advantage_gap"]
    bic, perm = r["bic/detected"].astype(bool), r["permutation/detected"].astype(bool)
    np.testing.assert_array_equal(perm, bic & (r["p_down"] <= settings.alpha))
    assert np.mean(r["p_down"] <= settings.alpha) > 0.8 > np.mean(bic)  # the two halves of the test disagree
    assert np.all(r["permutation/chance"] <= r["bic/chance"] + 1e-6)
    s = results["variants"]["advantage_gap"]["all"]
    assert s["permutation"]["down_rate"] <= s["bic"]["down_rate"]
