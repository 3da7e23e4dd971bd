"""pass@k estimator against brute-force enumeration, the table helpers and the plot."""
import itertools
import math

import numpy as np
import pytest

from opdjax.eval.passk import avg_at_n, default_ks, pass_at_k, pass_at_k_table, plot_pass_at_k


def brute_force(n, c, k):
    """Fraction of the k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_matches_enumeration_over_all_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k), abs=1e-12), (n, c, k)


def test_edges():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0 and pass_at_k(10, 10, 10) == 1.0
    assert pass_at_k(10, 1, 10) == 1.0  # k = n: every sample is drawn
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(7, 3, 5) == 1.0  # n - c < k
    assert pass_at_k(1000, 1, 1) == pytest.approx(1e-3, rel=1e-12)  # tiny values stay accurate
    assert pass_at_k(200, 37, 50) == pytest.approx(1 - math.comb(163, 50) / math.comb(200, 50), rel=1e-12)


def test_vectorised_over_mixed_n_and_c():
    n = np.array([4, 10, 10, 16, 3])
    c = np.array([1, 0, 5, 16, 2])
    got = pass_at_k(n, c, 3)
    want = [1 - math.comb(ni - ci, 3) / math.comb(ni, 3) for ni, ci in zip(n, c)]
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert got.shape == (5,)
    assert pass_at_k(8, np.arange(9), 2).shape == (9,)  # broadcast scalar n


def test_errors_name_k_and_n():
    with pytest.raises(ValueError, match=r"k=5 .*n=4"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match=r"k=9 .*n=3"):
        pass_at_k([10, 3], [1, 1], 9)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="positive integer"):
        pass_at_k(4, 1, 0)


def test_table_and_avg():
    correct = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=bool)
    table = pass_at_k_table(correct, [1, 2, 4])
    assert list(table) == [1, 2, 4]
    assert table[1] == pytest.approx((0.25 + 1 + 0) / 3)
    assert table[2] == pytest.approx((0.5 + 1 + 0) / 3)
    assert table[4] == pytest.approx((1 + 1 + 0) / 3)
    assert avg_at_n(correct) == pytest.approx(5 / 12) == pytest.approx(table[1])
    with pytest.raises(ValueError, match="k=8 .*n=4"):
        pass_at_k_table(correct, [8])
    with pytest.raises(ValueError, match="problems, samples"):
        avg_at_n(np.ones(4, dtype=bool))
    assert default_ks(16) == [1, 2, 4, 8, 16] and default_ks(12) == [1, 2, 4, 8, 12]


def test_plot_writes_png(tmp_path):
    curves = {"student": {1: 0.2, 2: 0.3, 4: 0.45, 8: 0.6},
              "student + OPD": {1: 0.35, 2: 0.5, 4: 0.62, 8: 0.7},
              "teacher": {1: 0.7, 4: 0.85, 8: 0.9}}
    out = plot_pass_at_k(curves, tmp_path / "plots" / "passk.png")
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
