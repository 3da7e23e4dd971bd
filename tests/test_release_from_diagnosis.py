"""Diagnosis -> training (issue 15, item 12): the diagnose job's recommended release settings
(release_settings.json), `release.from_diagnosis` reading them, its warnings, and
compare.diagnose_first's reuse of a diagnosis on disk. Synthetic verdict inputs with hand-set
p-values stand in for full diagnosis runs; the expected picks follow from the documented rule."""
import json
import logging
import os

import pytest

from opdjax.teachability import collapse_stats, rule
from opdjax.train import diagnose as diagnose_job, opd
from opdjax.train.config import TOY_PAIR, opd_config
from opdjax.train.validate import ConfigError, validate_config

SIGNIFICANCE = 0.01
ALPHA = 0.05


def block(down_p, up_p=0.9, rate=0.2, chance=0.1):
    return {"down_rate": rate, "down_chance": chance, "down_count": 0, "down_p_value": down_p, "up_rate": 0.05,
            "up_chance": 0.1, "up_count": 0, "up_p_value": up_p, "mean_release_frac": 0.5, "margin_before": 1.0,
            "margin_after": 0.5, "abs_adv_before": 1.0, "abs_adv_after": 1.0}


def summary(bic, perm, n=64):
    """A `collapse_stats.summarize`-shaped dict for group "all": bic / perm = block(...)."""
    th = {"pairs": n, "first_mean": 1.0, "last_mean": 1.0, "mean_diff": 0.0, "se_diff": 0.1, "share_lower": 0.5,
          "p_value": 1.0}
    return {"all": {"rollouts": n, "mean_tokens": 70.0, "mean_sentences": 7.0, "bic": bic, "permutation": perm,
                    "margin_by_decile": [1.0] * 10, "margin_by_third": [1.0] * 3, "thirds": th}}


# 3 variants -> each test at 0.01 / 6 = 0.00167
DETECTED = {
    # collapse under plain BIC (down p far below the level, no upward shift)
    "advantage_gap": summary(block(1e-5, rate=0.34, chance=0.14), block(0.3, rate=0.03, chance=0.02)),
    # collapse under the permutation calibration, weaker
    "teacher_gap": summary(block(0.5), block(1e-3, rate=0.1, chance=0.02)),
    # the smallest down p of all, but upward shifts too: non-stationary, not a collapse
    "sampled_margin": summary(block(1e-7, up_p=1e-6), block(0.5)),
}
NOT_DETECTED = {
    "advantage_gap": summary(block(0.02), block(0.5)),
    "teacher_gap": summary(block(0.3, rate=0.12, chance=0.13), block(0.004, rate=0.05, chance=0.03)),
    "sampled_margin": summary(block(0.5, up_p=1e-6), block(0.003)),  # upward above chance: last
}


def test_recommendation_detected_is_the_verdicts_best_finding():
    v = collapse_stats.verdict(DETECTED, SIGNIFICANCE, ALPHA)
    rec = v["recommendation"]
    assert v["collapse"] and rec["detected"]
    assert (rec["margin"], rec["calibration"]) == ("advantage_gap", "bic")
    assert (rec["rate"], rec["chance"], rec["p"]) == (0.34, 0.14, 1e-5)
    assert (rec["perm_rate"], rec["perm_chance"], rec["perm_p"]) == (0.03, 0.02, 0.3)
    assert "train with release.margin=advantage_gap, release.calibration=bic" in v["text"]


def test_recommendation_not_detected_is_the_lowest_p_under_permutation():
    v = collapse_stats.verdict(NOT_DETECTED, SIGNIFICANCE, ALPHA)
    rec = v["recommendation"]
    assert not v["collapse"] and not rec["detected"]
    # teacher_gap: p = 0.004 (permutation) < advantage_gap's 0.02; sampled_margin's 0.003 comes
    # last because its upward shifts are above chance
    assert (rec["margin"], rec["calibration"]) == ("teacher_gap", "permutation")
    assert (rec["rate"], rec["chance"], rec["p"]) == (0.05, 0.03, 0.004)
    assert (rec["bic_rate"], rec["bic_chance"], rec["bic_p"]) == (0.12, 0.13, 0.3)
    # all p-values equal: the first variant
    flat = {k: summary(block(1.0), block(1.0)) for k in ("renorm_prob_gap", "advantage_gap")}
    assert collapse_stats.verdict(flat, SIGNIFICANCE, ALPHA)["recommendation"]["margin"] == "renorm_prob_gap"


def toy_config(workdir):
    c = opd_config()
    c.workdir = str(workdir)
    c.student.path = os.path.join(TOY_PAIR, "student")
    c.teacher.path = os.path.join(TOY_PAIR, "teacher")
    c.data.task = "toy_arithmetic"
    c.data.num_train, c.data.num_eval = 16, 4
    c.data.max_prompt_tokens = 96
    c.rollout.samples_per_prompt = 2
    c.rollout.max_new_tokens = 24
    c.batch.prompts_per_step = 4  # 8 rollout rows: divisible by the 8 simulated devices
    c.eval.num_problems, c.eval.samples, c.eval.k = 4, 2, (1, 2)
    c.metrics.progress = False
    return c


def write_diagnosis(config, variants, out_dir, **settings_over) -> str:
    """release_settings.json as the diagnose job writes it, from a synthetic verdict."""
    release = rule.settings_from_config(config.release)
    st = {"penalty": release.bic_penalty, "min_segment": release.min_segment, "variance": release.variance,
          "sentence_reduce": release.sentence_reduce, "alpha": release.alpha, "permutations": release.permutations,
          "significance": SIGNIFICANCE, "seed": 0, "split_blank_lines": release.split_blank_lines,
          "top_k": release.top_k}
    results = {"variants": variants, "settings": st, "verdict": collapse_stats.verdict(variants, SIGNIFICANCE, ALPHA),
               "rollouts": {"count": 64, "prompts": 16, "samples_per_prompt": 4,
                            "max_new_tokens": config.rollout.max_new_tokens, "response_tokens": 4355}}
    rec = diagnose_job.release_settings_record(config, release, results)
    rec["settings"].update(settings_over)
    os.makedirs(out_dir, exist_ok=True)
    return diagnose_job.write_release_settings(str(out_dir), rec)


def test_the_file_holds_the_recommendation_and_its_evidence(tmp_path):
    c = toy_config(tmp_path)
    path = write_diagnosis(c, DETECTED, tmp_path / "diagnosis")
    assert os.path.basename(path) == "release_settings.json"
    rec = json.load(open(path))
    assert (rec["detected"], rec["margin"], rec["calibration"]) == (True, "advantage_gap", "bic")
    assert (rec["rate"], rec["chance"], rec["p"]) == (0.34, 0.14, 1e-5)
    assert rec["settings"] == {"top_k": 8, "bic_penalty": 1.0, "min_segment": 2, "variance": "shared",
                               "sentence_reduce": "mean", "split_blank_lines": True, "alpha": 0.05,
                               "permutations": 200, "significance": 0.01, "seed": 0,
                               "variants": ["advantage_gap", "teacher_gap", "sampled_margin"]}
    assert rec["student"] == os.path.join(TOY_PAIR, "student") and rec["teacher"] == os.path.join(TOY_PAIR, "teacher")
    assert rec["rollouts"]["count"] == 64 and rec["verdict"].startswith("Collapse detected")
    assert rule.read_release_settings(path)["margin"] == "advantage_gap"


def test_from_diagnosis_sets_margin_and_calibration(tmp_path):
    c = toy_config(tmp_path)
    path = write_diagnosis(c, NOT_DETECTED, tmp_path / "diagnosis")
    assert (c.release.margin, c.release.calibration) == ("advantage_gap", "bic")  # the defaults
    c.release.from_diagnosis = path
    s = rule.settings_from_config(c.release)
    assert (s.margin, s.calibration) == ("teacher_gap", "permutation")  # the file wins
    assert validate_config(c).release == s
    # the OPD job's own release settings (where sampling, the rule and the pictures read them)
    job = opd.OPDJob(c)
    assert (job.phases.release.margin, job.phases.release.calibration) == ("teacher_gap", "permutation")
    assert "mostly cut at random" in job.release_warning


@pytest.mark.parametrize("content, problem", [
    (None, "does not exist"),
    ("{not json", "cannot be read as JSON"),
    ('["a list"]', "holds no JSON object"),
    ('{"format": 1, "detected": true, "margin": "advantage_gap", "settings": {}}', "lacks the field 'calibration'"),
    ('{"format": 1, "detected": true, "margin": "best_gap", "calibration": "bic"}', "has margin='best_gap'"),
    ('{"format": 7}', "has format 7, not 1"),
])
def test_a_bad_file_names_release_from_diagnosis(tmp_path, content, problem):
    path = tmp_path / "release_settings.json"
    if content is not None:
        path.write_text(content)
    c = toy_config(tmp_path)
    c.release.from_diagnosis = str(path)
    with pytest.raises(ValueError, match=f"^release.from_diagnosis='{path}' {problem}"):
        rule.settings_from_config(c.release)
    with pytest.raises(ConfigError, match=f"^config.release.from_diagnosis='{path}' {problem}.*job=diagnose"):
        validate_config(c)  # before any model is loaded or compiled


def test_not_detected_warns_that_the_rule_cuts_at_random(tmp_path, caplog):
    c = toy_config(tmp_path)
    c.release.from_diagnosis = write_diagnosis(c, NOT_DETECTED, tmp_path / "diagnosis")
    with caplog.at_level(logging.INFO, logger="opdjax.teachability.rule"):
        warning = rule.log_from_diagnosis(c)
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert info == [f"release.margin=teacher_gap, release.calibration=permutation from {c.release.from_diagnosis} "
                    "(diagnosis: not detected; teacher_gap under permutation: 5% of 64 rollouts released against 3% "
                    "on shuffled sentence orders, p=0.004); replaces the config's release.margin='advantage_gap', "
                    "release.calibration='bic'"]
    assert warned == [warning]
    # the file's rates: teacher_gap's plain BIC 12% vs 13%, permutation 5% vs 3%
    assert "plain BIC 12% against 13% chance, permutation-calibrated 5% against 3%" in warning
    assert "release rule will mostly cut at random" in warning and "release.alpha=0.05" in warning
    # a baseline arm does not cut by the rule: no warning there; a detected collapse: none either
    c.release.mode = "full"
    assert rule.from_diagnosis_notes(c)[2] is None
    c.release.mode = "bic"
    c.release.from_diagnosis = write_diagnosis(c, DETECTED, tmp_path / "detected")
    info, warnings, not_detected = rule.from_diagnosis_notes(c)
    assert not_detected is None and warnings == [] and "(diagnosis: detected;" in info


def test_settings_the_diagnosis_was_measured_under_warn_by_field(tmp_path):
    c = toy_config(tmp_path)
    c.release.from_diagnosis = write_diagnosis(c, DETECTED, tmp_path / "diagnosis", min_segment=3,
                                               variance="separate", alpha=0.1)
    _, warnings, _ = rule.from_diagnosis_notes(c)
    # alpha differs too, but a plain-BIC recommendation does not depend on it
    assert [w.split("=")[0] for w in warnings] == ["release.min_segment", "release.variance"]
    assert "release.min_segment=2 but the diagnosis in" in warnings[0] and "min_segment=3" in warnings[0]
    c.release.from_diagnosis = write_diagnosis(c, NOT_DETECTED, tmp_path / "perm", alpha=0.1, top_k=4)
    c.student.path = str(tmp_path / "another_student")
    c.rollout.max_new_tokens = 48
    _, warnings, _ = rule.from_diagnosis_notes(c)
    assert [w.split("=")[0].split(" ")[0] for w in warnings] == [
        "release.top_k", "release.alpha", "config.student", "rollout.max_new_tokens"]


def test_diagnose_first_reuses_a_diagnosis_with_the_same_settings(tmp_path, caplog):
    c = toy_config(tmp_path)
    c.compare.diagnose_first = True
    d = diagnose_job.diagnosis_config(c)
    assert (d.job, d.release.from_diagnosis, d.compare.diagnose_first) == ("diagnose", "", False)
    out = tmp_path / "diagnosis"
    path = write_diagnosis(d, NOT_DETECTED, out)
    assert json.load(open(path))["fingerprint"] == diagnose_job.diagnosis_fingerprint(d)
    with caplog.at_level(logging.INFO):
        got = diagnose_job.release_settings_for(c)
    assert got == path == c.release.from_diagnosis
    assert "reusing the diagnosis" in caplog.text and not (out / "diagnosis.json").exists()  # no new run
    # the comparison config now names what its arms train with
    assert (c.release.margin, c.release.calibration) == ("teacher_gap", "permutation")
    # what changes the rollouts or the statistics changes the fingerprint; the training budget does not
    fp = diagnose_job.diagnosis_fingerprint(d)
    for field, value in (("train.steps", 7), ("eval.num_problems", 2), ("release.mode", "full"),
                         ("compare.arms", ("bic",)), ("release.margin", "teacher_gap")):
        e = diagnose_job.diagnosis_config(c)
        section, name = field.split(".")
        e[section][name] = value
        assert diagnose_job.diagnosis_fingerprint(e) == fp, field
    for field, value in (("rollout.max_new_tokens", 96), ("release.min_segment", 3), ("diagnose.num_prompts", 8),
                         ("student.path", "/elsewhere")):
        e = diagnose_job.diagnosis_config(c)
        section, name = field.split(".")
        e[section][name] = value
        assert diagnose_job.diagnosis_fingerprint(e) != fp, field


def test_diagnose_first_off_leaves_the_config_alone(tmp_path):
    c = toy_config(tmp_path)
    assert diagnose_job.release_settings_for(c) == ""
    assert (c.release.margin, c.release.calibration) == ("advantage_gap", "bic")
    c.release.from_diagnosis = str(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="config.release.from_diagnosis=.*missing.json' does not exist"):
        diagnose_job.release_settings_for(c)
