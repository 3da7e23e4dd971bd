"""The multi-seed comparison's statistics (opdjax/eval/paired_bootstrap.py) against closed forms:
the two-level bootstrap's variance, pairing, verdicts; and compare.seeds' config checks."""
import numpy as np
import pytest

from opdjax.eval import paired_bootstrap as pb
from opdjax.train import compare
from opdjax.train.config import opd_config


def test_two_level_variance_matches_the_closed_form():
    # Replicate mean = (1/S) sum_j (1/P) sum_k x[I_j, K_jk]. Given the drawn seeds I its variance is
    # mean_j v_{I_j} / (S P) (v_s = population variance of seed s's problems); the drawn seeds add
    # Var_s(m_s) / S (population variance of the seed means). So
    #   Var = Var_s(m_s) / S + mean_s(v_s) / (S P).
    rng = np.random.default_rng(3)
    S, P, B = 5, 64, 40_000
    x = (rng.random((S, P)) < rng.uniform(0.2, 0.8, (S, 1))).astype(float)
    want = x.mean(1).var() / S + x.var(1).mean() / (S * P)
    si, pi = pb.draws(S, P, B, seed=1)
    got = pb.replicate_means(x, si, pi).var(ddof=1)
    # The replicate means are close to normal, so the sample variance's relative s.e. is about
    # sqrt(2 / (B - 1)) = 0.7%; 5 s.e. = 3.5%.
    assert abs(got / want - 1) < 5 * np.sqrt(2 / (B - 1)), (got, want)


def test_one_seed_interval_is_the_problems_interval():
    # S = 1: only problems are drawn; the percentile interval of the mean of P draws is close to
    # mean +- 1.96 sd / sqrt(P) (P = 400, CLT). The 2.5% / 97.5% quantiles of B = 20,000 draws
    # have a relative s.e. near 2%; allow 8%.
    rng = np.random.default_rng(0)
    x = (rng.random((1, 400)) < 0.4).astype(float)
    res = pb.compare_arms({"bic": x, "full": x[:, ::-1].copy()}, "bic", n_boot=20_000)
    half = 1.959964 * x.std() / np.sqrt(400)
    iv = res["arms"]["bic"]
    assert iv["mean"] == pytest.approx(x.mean())
    assert (iv["high"] - iv["low"]) / 2 == pytest.approx(half, rel=0.08)


def test_pairing_and_verdicts():
    rng = np.random.default_rng(1)
    S, P = 5, 128
    full = (rng.random((S, P)) < 0.5).astype(float)
    same = pb.compare_arms({"bic": full.copy(), "full": full}, "bic", n_boot=2000)
    d = same["differences"]["bic - full"]
    assert (d["mean"], d["low"], d["high"]) == (0.0, 0.0, 0.0) and d["verdict"] == "not distinguishable"
    # The rule solves 4% more problems, the same ones as full otherwise: the arms' own intervals
    # overlap widely, yet every paired replicate difference is > 0.
    better = full.copy()
    flip = np.argwhere(better == 0)[rng.permutation(int((better == 0).sum()))[: int(0.04 * S * P)]]
    better[flip[:, 0], flip[:, 1]] = 1.0
    res = pb.compare_arms({"bic": better, "full": full}, "bic", n_boot=2000)
    a, b = res["arms"]["bic"], res["arms"]["full"]
    assert a["low"] < b["high"]  # unpaired intervals overlap
    d = res["differences"]["bic - full"]
    assert d["low"] > 0 and d["verdict"] == "bic ahead"
    assert d["mean"] == pytest.approx(better.mean() - full.mean())
    worse = pb.compare_arms({"bic": full, "random_matched": better}, "bic", n_boot=2000)
    assert worse["differences"]["bic - random_matched"]["verdict"] == "bic behind"
    # same draws for the same seed: the numbers do not depend on the machine
    again = pb.compare_arms({"bic": better, "full": full}, "bic", n_boot=2000)
    assert again == res


def test_bad_scores_are_named():
    with pytest.raises(ValueError, match="arm 'full'.*shape"):
        pb.compare_arms({"bic": np.zeros((2, 3)), "full": np.zeros((2, 4))}, "bic")
    with pytest.raises(ValueError, match="rule arm 'bic'"):
        pb.compare_arms({"full": np.zeros((2, 3))}, "bic")


def test_compare_seeds_config_is_checked():
    c = opd_config()
    c.compare.arms = ("bic", "full")
    assert compare.check_compare(c) == (("bic", "full"), None)
    c.compare.seeds = (0, 1, 2)
    assert compare.check_compare(c) == (("bic", "full"), (0, 1, 2))
    for bad in [(0, 0), (-1,), (0.5,), ("1",)]:
        c.compare.seeds = bad
        with pytest.raises(ValueError, match=r"config\.compare\.seeds"):
            compare.check_compare(c)
    c.compare.seeds = (3,)
    a = compare.arm_config(c, "full", first=True, seed=3)
    assert (a.seed, a.release.mode, a.compare.seeds, a.workdir.endswith("seed3/full")) == (3, "full", (), True)
