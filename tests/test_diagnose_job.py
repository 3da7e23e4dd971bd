"""The diagnose job through the one entry point on the shipped toy pair, shrunk: it writes the
per-token arrays, and every number of its report equals one recomputed here from those arrays
with plain NumPy loops (margins, sentence means, the O(J^2) BIC loop, the permutation loop)."""
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from opdjax.teachability import changepoint, collapse_report, rule
from opdjax.train import diagnose as diagnose_job
from opdjax.train.validate import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P, ALPHA, SEED = 39, 0.1, 3


def numpy_margin(variant, a, b, t):
    """g_t and whether it is defined, for row b token t, straight from the definitions."""
    tc, sc = a["teacher_cand_logp"][b, t].astype(np.float64), a["student_cand_logp"][b, t].astype(np.float64)
    present = np.isfinite(tc) & np.isfinite(sc)
    adv = tc - sc
    if variant == "sampled_margin":
        ts, ss = float(a["teacher_sampled_logp"][b, t]), float(a["student_sampled_logp"][b, t])
        others = present & (a["candidate_ids"][b, t] != a["response_ids"][b, t])
        if not (np.isfinite(ts) and np.isfinite(ss) and others.any()):
            return 0.0, False
        return (ts - ss) - adv[others].max(), True
    if present.sum() < 2:
        return 0.0, False
    if variant == "advantage_gap":
        top = np.sort(adv[present])[::-1]
        return top[0] - top[1], True
    if variant == "teacher_gap":
        top = np.sort(tc[present])[::-1]
        return top[0] - top[1], True
    q = np.exp(tc[present] - tc[present].max())
    q = np.sort(q / q.sum())[::-1]
    return q[0] - q[1], True


def recompute(a, variant, width):
    mask = a["response_mask"].astype(bool)
    N, R = mask.shape
    T = mask.sum(1)
    g = np.full((N, R), np.nan)
    absA = np.abs(np.where(mask, a["teacher_sampled_logp"].astype(np.float64) - a["student_sampled_logp"], 0))
    M, valid = np.zeros((N, width)), np.zeros((N, width), bool)
    for b in range(N):
        for t in range(T[b]):
            v, ok = numpy_margin(variant, a, b, t)
            if ok:
                g[b, t] = v
        for j in range(width):
            vals = g[b][(a["sent_ids"][b] == j) & mask[b] & np.isfinite(g[b])]
            if len(vals):
                M[b, j], valid[b, j] = vals.mean(), True
    loop = changepoint.bic_scan_numpy_loop(M, valid)
    orders = np.asarray(changepoint.permutation_orders(jax.random.key(SEED), valid, P))
    perm = changepoint.permutation_test_numpy_loop(M, valid, orders, alpha=ALPHA)
    out = {}
    for c, detected, up, chance, chance_up in (
            ("bic", loop.detected, loop.upward_detected, perm.chance_bic, perm.chance_bic_up),
            ("permutation", perm.detected, perm.upward_detected, perm.chance_permutation, perm.chance_permutation_up)):
        r = np.array([(a["sent_ids"][b][mask[b]] < loop.release_sentence[b]).sum() if detected[b] else T[b]
                      for b in range(N)])
        pos = np.arange(R)[None]
        before, after = mask & (pos < r[:, None]), mask & (pos >= r[:, None])
        rel = detected[:, None]
        pooled = lambda x, m: np.nansum(np.where(m, x, 0)) / m.sum() if m.sum() else float("nan")  # noqa: E731
        out[c] = {"down_rate": detected.mean(), "down_chance": chance.mean(), "up_rate": up.mean(),
                  "up_chance": chance_up.mean(),
                  "mean_release_frac": (r / T)[detected].mean() if detected.any() else float("nan"),
                  "margin_before": pooled(g, before & rel & np.isfinite(g)),
                  "margin_after": pooled(g, after & rel & np.isfinite(g)),
                  "abs_adv_before": pooled(absA, before & rel), "abs_adv_after": pooled(absA, after & rel)}
    dec = [[] for _ in range(10)]
    first, last = [], []
    for b in range(N):
        for t in range(T[b]):
            if np.isfinite(g[b, t]):
                dec[(10 * t) // T[b]].append(g[b, t])
        thirds = [[g[b, t] for t in range(T[b]) if (3 * t) // T[b] == k and np.isfinite(g[b, t])] for k in (0, 2)]
        if thirds[0] and thirds[1]:
            first.append(np.mean(thirds[0]))
            last.append(np.mean(thirds[1]))
    out["margin_by_decile"] = [np.mean(d) if d else float("nan") for d in dec]
    out["thirds"] = {"pairs": len(first), "first_mean": np.mean(first), "last_mean": np.mean(last),
                     "mean_diff": np.mean(np.subtract(last, first))}
    return out


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_report_numbers_equal_a_recomputation_from_the_saved_arrays(tmp_path):
    work = tmp_path / "diag"
    cmd = [sys.executable, "launch/tpu_run.py", "--config", "configs/diagnose_toy_pair.py", f"--config.workdir={work}",
           "--config.diagnose.num_prompts=6", "--config.batch.prompts_per_step=4", "--config.rollout.samples_per_prompt=2",
           "--config.rollout.max_new_tokens=80", f"--config.release.permutations={P}", f"--config.release.alpha={ALPHA}",
           f"--config.seed={SEED}", "--config.diagnose.examples=1", "--config.metrics.progress=False"]
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert out.returncode == 0, out.stderr[-3000:]
    d = work / "diagnosis"
    results = json.load(open(d / "diagnosis.json"))
    report = (d / "report.md").read_text()
    a = dict(np.load(d / "arrays.npz"))
    assert a["response_mask"].shape[0] == 12  # 6 prompts x 2 samples: the short last call's padding dropped
    np.testing.assert_array_equal(a["prompt_index"], np.repeat(np.arange(6), 2))
    assert set(np.unique(a["correct"])) <= {0, 1}
    assert results["verdict"]["text"] in report and results["rollouts"]["count"] == 12
    for pic in ("margin_by_position", "detection_vs_chance", "delta_bic"):
        assert (d / results["pictures"][pic]).stat().st_size > 5000
    settings = rule.settings_from_config(rule.release_config())
    width = rule.scan_width(int(a["sent_ids"].max()) + 1, settings)
    for variant, groups in results["variants"].items():
        got, want = groups["all"], recompute(a, variant, width)
        assert got["rollouts"] == 12
        for c in ("bic", "permutation"):
            for k, v in want[c].items():
                value = float("nan") if got[c][k] is None else got[c][k]  # JSON writes NaN as null
                assert value == pytest.approx(v, rel=1e-4, abs=1e-5, nan_ok=True), (variant, c, k)
            row = (f"| all | 12 | {c} | {collapse_report._pct(want[c]['down_rate'])} | "
                   f"{collapse_report._pct(want[c]['down_chance'])} |")
            assert row in report, row
        deciles = [float("nan") if x is None else x for x in got["margin_by_decile"]]
        np.testing.assert_allclose(deciles, want["margin_by_decile"], rtol=1e-4)
        for k, v in want["thirds"].items():
            assert got["thirds"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (variant, k)
    assert results["timings"]["sample_s"] > 0 and "| analysis |" in report

    # release_settings.json: the verdict's pick, redone here from the report's p-values
    rec = json.load(open(d / "release_settings.json"))
    level, found, closest = results["verdict"]["level"], [], []
    for variant, groups in results["variants"].items():
        s = groups["all"]
        ok = {c: s[c]["down_p_value"] < level <= s[c]["up_p_value"] for c in ("bic", "permutation")}
        c = "permutation" if ok["permutation"] or not ok["bic"] else "bic"
        if ok["bic"] or ok["permutation"]:
            found.append((s[c]["down_p_value"], -s[c]["down_rate"], variant, c))
        up = any(s[c]["up_p_value"] < level for c in ("bic", "permutation"))
        closest.append((up, min(s[c]["down_p_value"] for c in ("bic", "permutation")), variant, "permutation"))
    want = min(found)[2:] if found else min(closest, key=lambda x: x[:2])[2:]
    assert (rec["detected"], rec["margin"], rec["calibration"]) == (bool(found),) + want
    assert rec["rollouts"]["count"] == 12 and rec["settings"]["permutations"] == P and rec["settings"]["alpha"] == ALPHA
    assert f"`release.margin={rec['margin']}`" in report

    # the Markdown re-rendered from diagnosis.json alone is the same report
    title = report.splitlines()[0][2:]
    assert collapse_report.main([str(d), "--title", title]) == 0
    assert (d / "report.md").read_text() == report

    # diagnose.arrays: the same statistics from the saved rollouts, with no model run
    c = _toy_config()
    c.workdir, c.seed = str(tmp_path / "again"), SEED
    c.release.permutations, c.release.alpha = P, ALPHA
    c.diagnose.arrays, c.diagnose.examples = str(d / "arrays.npz"), 0
    again = diagnose_job.diagnose(c)
    assert again["rollouts"]["reused_from"] == str(d / "arrays.npz") and again["timings"]["sample_s"] == 0
    assert json.loads(json.dumps(again["variants"]).replace("NaN", "null")) == results["variants"]
    assert "reused from" in (tmp_path / "again" / "diagnosis" / "report.md").read_text()


def _toy_config():
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    try:
        import diagnose_toy_pair
    finally:
        sys.path.pop(0)
    c = diagnose_toy_pair.get_config()
    c.metrics.progress = False
    return c


def test_config_errors_name_the_field_before_loading_models(tmp_path):
    c = _toy_config()
    c.workdir = str(tmp_path)
    c.diagnose.variants = ("advantage_gap", "margin_of_error")
    with pytest.raises(ConfigError, match="config.diagnose.variants contains 'margin_of_error'"):
        diagnose_job.diagnose(c)
    c = _toy_config()
    c.workdir = str(tmp_path)
    c.diagnose.num_prompts = 17
    with pytest.raises(ConfigError, match="config.diagnose.num_prompts=17 but the prompt set has only 16"):
        diagnose_job.diagnose(c)
    c = _toy_config()
    c.release.calibration = "permutations"
    with pytest.raises(ConfigError, match="release.calibration='permutations'"):
        diagnose_job.diagnose(c)
    c = _toy_config()
    c.workdir = str(tmp_path)
    c.diagnose.num_prompts = 17
    c.release.from_diagnosis = str(tmp_path / "not_yet.json")  # the diagnosis writes it; never reads it
    with pytest.raises(ConfigError, match="config.diagnose.num_prompts=17"):
        diagnose_job.diagnose(c)
    c = _toy_config()
    c.workdir = str(tmp_path)
    c.diagnose.arrays = str(tmp_path / "nowhere.npz")
    with pytest.raises(ConfigError, match="config.diagnose.arrays=.*nowhere.npz' does not exist"):
        diagnose_job.diagnose(c)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_compare_diagnoses_first_and_every_arm_trains_with_its_recommendation(tmp_path, caplog):
    """compare.diagnose_first: the diagnosis runs in workdir/diagnosis, every arm reads its
    release_settings.json; a second comparison with the same settings reuses it."""
    import logging
    from opdjax.train import compare
    c = _toy_config()
    c.job, c.workdir = "opd_compare", str(tmp_path)
    c.compare.arms, c.compare.diagnose_first = ("bic", "full"), True
    c.mesh.shape = (1, -1, 1)
    c.data.num_train, c.data.num_eval = 8, 4
    c.diagnose.num_prompts, c.diagnose.examples = 4, 0
    c.rollout.samples_per_prompt, c.rollout.max_new_tokens, c.batch.prompts_per_step = 2, 24, 4
    c.release.permutations = 20
    c.train.steps, c.checkpoint.every, c.metrics.pictures_every = 1, 0, 0
    c.eval.num_problems, c.eval.samples, c.eval.k, c.eval.max_new_tokens = 4, 2, (1, 2), 24
    with caplog.at_level(logging.INFO):
        out = compare.run(c)
    path = str(tmp_path / "diagnosis" / "release_settings.json")
    rec = json.load(open(path))
    assert c.release.from_diagnosis == path and (c.release.margin, c.release.calibration) == (
        rec["margin"], rec["calibration"])
    logged = (f"release.margin={rec['margin']}, release.calibration={rec['calibration']} from {path} "
              f"(diagnosis: {'detected' if rec['detected'] else 'not detected'};")
    assert caplog.text.count(logged) == 3  # the comparison, then each arm
    for arm in ("bic", "full"):
        summary = json.load(open(tmp_path / arm / "summary.json"))
        # the rule's arm warns when nothing was detected; the full arm does not cut by the rule
        assert ("release_warning" in summary) == (arm == "bic" and not rec["detected"])
    assert f"margin `{rec['margin']}`" in open(tmp_path / "report.md").read() and out["arms"]
    # the same comparison again: the diagnosis on disk is reused, not redone
    again = ml_collections.ConfigDict(c.to_dict())
    again.release.from_diagnosis = ""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert diagnose_job.release_settings_for(again) == path
    assert "reusing the diagnosis" in caplog.text
