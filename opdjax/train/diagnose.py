"""The `diagnose` job: measure whether local teachability collapse is there at all, for one
teacher/student pair and one prompt set, before a training run is spent on the release rule.

    python launch/tpu_run.py --config configs/diagnose_toy_pair.py
    python launch/tpu_run.py --config configs/<your OPD config>.py --config.job=diagnose

The same config as training (models, data, rollout, release), plus the `diagnose` section. The
student samples `rollout.samples_per_prompt` answers to each of the first `diagnose.num_prompts`
prompts, the teacher scores them, the responses are split into sentences: the OPD step's own
code (opd.rollout_and_score). No parameter is updated. The per-token arrays are saved
(workdir/diagnosis/arrays.npz) and the statistics are computed from them
(teachability.collapse_stats), then drawn and written (teachability.collapse_report):
    diagnosis.json   every number, the verdict, the timings
    report.md        the verdict paragraph, tables, pictures
    per_rollout.npz  the per-rollout statistics of every variant
    release_settings.json  the recommended release.margin / release.calibration and their
                     evidence (collapse_stats.recommendation), for release.from_diagnosis
`diagnose(config)` is the same as a Python function; it returns the results dict.
`release_settings_for(config)` is compare.diagnose_first: the diagnosis before the arms (reused
when the same one is on disk), and release.from_diagnosis pointed at its file.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np

from opdjax import multihost, sharding
from opdjax.teachability import collapse_stats, collapse_report, rule
from opdjax.train import metrics as metrics_lib
from opdjax.models.load import load_section
from opdjax.train.opd import (EncodedPrompts, Phases, encode_problems, problems_for,
                             rollout_and_score, sampling_settings)
from opdjax.errors import ConfigError
from opdjax.train.validate import check_diagnose_section, load_tokenizer_for, validate_config
from opdjax.data.grading import grade

log = logging.getLogger(__name__)


def _encode(config, tokenizer, template):
    """(problems, their prompt ids encoded on first use, the padded width); each process renders
    its share up front to check the lengths (an over-long prompt is an error on every process)."""
    train, _ = problems_for(config)
    n = config.diagnose.num_prompts or len(train)
    if n > len(train):
        raise ConfigError(f"config.diagnose.num_prompts={n} but the prompt set has only {len(train)} prompts "
                          "(lower it, or 0 for all of them).")
    problems = train[:n]
    encode = functools.partial(encode_problems, config, tokenizer, template)
    lengths = multihost.map_split(lambda share: [len(r) for r in encode(share)] if share else [], problems,
                                  "encoding the prompts", batched=True)
    return problems, EncodedPrompts(encode, problems), max(lengths)


def collect(config, checked, student_tok, template, plan, *, progress: bool = True):
    """Rollouts, teacher scores and sentence ids for the diagnosis prompts, as host arrays (whole,
    on every process: on a pod each process samples and segments its own rows, then they are
    gathered)."""
    problems, encoded, prompt_len = _encode(config, student_tok, template)
    settings = checked.release
    sampling = sampling_settings(config, settings, student_tok, checked.student_cfg)
    phases = Phases(config, settings, sampling, checked.student_cfg, checked.teacher_cfg, student_tok, prompt_len, plan)
    timings = {"load_s": 0.0, "sample_s": 0.0, "score_s": 0.0, "segment_s": 0.0, "grade_s": 0.0}
    t = time.perf_counter()
    student = load_section(config.student, plan)[0]
    teacher = load_section(config.teacher, plan)[0]
    timings["load_s"] = time.perf_counter() - t

    n_samples, per_call = config.rollout.samples_per_prompt, config.batch.prompts_per_step
    calls = -(-len(encoded) // per_call)
    root = jax.random.key(config.seed)
    parts: dict[str, list] = {k: [] for k in collapse_stats.ARRAY_FIELDS}
    parts.update(prompt_index=[], texts=[])
    bar = metrics_lib.Progress(calls, 0, enabled=progress and config.metrics.progress)
    for call in range(calls):
        idx = list(range(call * per_call, min((call + 1) * per_call, len(encoded))))
        # A short last call repeats its last prompt to keep the compiled shape; those rows are dropped.
        padded = idx + [idx[-1]] * (per_call - len(idx))
        rows = [i for i in padded for _ in range(n_samples)]
        sc = rollout_and_score(phases, student, teacher, encoded, rows, jax.random.fold_in(root, call),
                               overlap_segments=False)
        roll, scores, segs, tm = sc.rollout, sc.scores, sc.segments, sc.timings
        old_logp, old_cand = sc.old_logp, sc.old_cand_logp
        for k in ("sample_s", "score_s", "segment_s"):
            timings[k] += tm[k]
        keep = len(idx) * n_samples
        host = multihost.to_host(dict(response_ids=roll.tokens, response_mask=roll.mask,
                                      teacher_sampled_logp=scores.sampled_logp, teacher_cand_logp=scores.candidate_logp,
                                      student_sampled_logp=old_logp, student_cand_logp=old_cand,
                                      candidate_ids=roll.topk_ids))
        # each process segmented its own rows: put the sentence ids and texts of all rows together
        by_row = {}
        for part in multihost.gather_objects((segs.rows.tolist(), segs.sent_ids, segs.texts)):
            by_row.update({r: (ids, text) for r, ids, text in zip(part[0], part[1], part[2])})
        host["sent_ids"] = np.stack([by_row[r][0] for r in range(len(rows))])
        for k, v in host.items():
            parts[k].append(v[:keep])
        parts["prompt_index"] += [i for i in idx for _ in range(n_samples)]
        parts["texts"] += [by_row[r][1] for r in range(keep)]
        bar.update(call + 1, tokens=int(host["response_mask"][:keep].sum()))
    bar.close()
    arrays = {k: np.concatenate(parts[k]) for k in collapse_stats.ARRAY_FIELDS}
    arrays["prompt_index"] = np.asarray(parts["prompt_index"], np.int32)
    t = time.perf_counter()
    golds = [problems[i].answer for i in arrays["prompt_index"]]
    if any(g not in (None, "") for g in golds):
        arrays["correct"] = np.array(multihost.map_split(
            lambda tg: -1 if tg[1] in (None, "") else int(grade(*tg)), list(zip(parts["texts"], golds)), "grading"),
            np.int8)
    timings["grade_s"] = time.perf_counter() - t
    return arrays, parts["texts"], problems, timings


def load_arrays(path, tokenizer):
    """The per-token arrays of an earlier diagnosis (`diagnose.arrays`), checked by field."""
    if not os.path.isfile(path):
        raise ConfigError(f"config.diagnose.arrays={path!r} does not exist; give the arrays.npz an earlier "
                          "diagnosis wrote (workdir/diagnosis/arrays.npz).")
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    try:
        collapse_stats.check_arrays(arrays)
    except ValueError as e:
        raise ConfigError(f"config.diagnose.arrays={path!r}: {e}") from e
    ids, mask = arrays["response_ids"], arrays["response_mask"].astype(bool)
    texts = [tokenizer.decode(ids[b][mask[b]], skip_special_tokens=True) for b in range(len(ids))]
    n_prompts = len(np.unique(arrays["prompt_index"])) if "prompt_index" in arrays else len(ids)
    timings = {"load_s": 0.0, "sample_s": 0.0, "score_s": 0.0, "segment_s": 0.0, "grade_s": 0.0}
    log.info("reusing %d rollouts from %s (no sampling, no scoring)", len(ids), path)
    return arrays, texts, n_prompts, timings


def diagnose(config) -> dict:
    """Run the diagnosis described by `config`; returns the results (also in diagnosis.json)."""
    t_start = time.perf_counter()
    if config.release.from_diagnosis:  # every variant under both calibrations is measured anyway
        log.info("release.from_diagnosis=%r is not read by the diagnosis itself", config.release.from_diagnosis)
        config = ml_collections.ConfigDict(config.to_dict())
        config.release.from_diagnosis = ""
    check_diagnose_section(config.diagnose)
    student_tok = load_tokenizer_for(config.student, "student")
    teacher_tok = load_tokenizer_for(config.teacher, "teacher")
    checked = validate_config(config, tokenizers=(student_tok, teacher_tok))
    template = {"": None, "student": student_tok.chat_template, "teacher": teacher_tok.chat_template}[
        config.tokenizer.chat_template]
    out_dir = config.diagnose.directory or os.path.join(config.workdir, "diagnosis")
    plan = sharding.plan_from_config(config.mesh)

    if config.diagnose.arrays:
        arrays, texts, num_prompts, timings = load_arrays(config.diagnose.arrays, student_tok)
    else:
        arrays, texts, problems, timings = collect(config, checked, student_tok, template, plan)
        num_prompts = len(problems)
    # The statistics are host work on arrays every process now holds: process 0 computes and
    # writes them, the others receive the results.
    error = None
    if multihost.is_writer():
        try:
            results = _analyse(config, checked, student_tok, out_dir, arrays, texts, num_prompts, timings, t_start)
        except Exception as e:  # noqa: BLE001 -- raised on every process below
            error = e
    multihost.raise_if_any_failed(error, "the diagnosis statistics")
    results = multihost.broadcast_object(results if multihost.is_writer() else None)
    print(results["verdict"]["text"], flush=True)
    return results


def _analyse(config, checked, student_tok, out_dir, arrays, texts, num_prompts, timings, t_start) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    np.savez_compressed(os.path.join(out_dir, "arrays.npz"), **arrays)
    log.info("%d rollouts, %d response tokens; sampling %.1f s, scoring %.1f s", len(texts),
             int(arrays["response_mask"].sum()), timings["sample_s"], timings["score_s"])

    diag = collapse_stats.DiagnoseSettings(tuple(config.diagnose.variants), float(config.diagnose.significance),
                                      int(config.seed))
    t = time.perf_counter()
    results, per_variant = collapse_stats.diagnose(arrays, checked.release, diag)
    timings["analysis_s"] = time.perf_counter() - t
    np.savez_compressed(os.path.join(out_dir, "per_rollout.npz"),
                        **{f"{v}/{k}": np.asarray(a) for v, per in per_variant.items() for k, a in per.items()})
    results["rollouts"] = {"count": int(len(texts)), "prompts": num_prompts,
                           "samples_per_prompt": len(texts) // max(num_prompts, 1),
                           "max_new_tokens": int(arrays["response_mask"].shape[1]),
                           "response_tokens": int(arrays["response_mask"].sum())}
    if config.diagnose.arrays:
        results["rollouts"]["reused_from"] = config.diagnose.arrays
    if "correct" in arrays:
        results["rollouts"].update(graded=int((arrays["correct"] >= 0).sum()),
                                   correct=int((arrays["correct"] == 1).sum()),
                                   incorrect=int((arrays["correct"] == 0).sum()))
    t = time.perf_counter()
    collapse_report.draw(out_dir, results, per_variant, arrays, tokenizer=student_tok,
                          examples=config.diagnose.examples)
    timings["report_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    # the diagnosis' own cost: sentence segmentation and the statistics (margins, scans, P
    # reorderings, tests); loading, sampling, scoring, grading and drawing are reported apart
    timings["share_beyond_sampling_and_scoring"] = (timings["segment_s"] + timings["analysis_s"]) / max(
        timings["total_s"], 1e-9)
    results["timings"] = timings
    with open(os.path.join(out_dir, "diagnosis.json"), "w") as f:
        json.dump(_jsonable(results), f, indent=2)
    path = write_release_settings(out_dir, release_settings_record(config, checked.release, results))
    log.info("recommended release settings: %s", path)
    collapse_report.write_markdown(out_dir, results, title=_title(config))
    log.info("report: %s", os.path.join(out_dir, "report.md"))
    return results


def run(config) -> dict:
    """The job entry (opdjax.jobs)."""
    return diagnose(config)


# ------------------------------------------------------------------ the recommended settings
def release_settings_record(config, release: rule.ReleaseSettings, results: dict) -> dict:
    """What release_settings.json holds: the verdict's recommendation (margin, calibration,
    detected, the rates and p-values behind it), the settings it was measured under, the pair,
    the rollouts, the verdict text, and the fingerprint `release_settings_for` resumes by."""
    rec = dict(results["verdict"]["recommendation"])
    st = results["settings"]
    settings = {"top_k": int(st["top_k"]), "bic_penalty": release.bic_penalty, "min_segment": release.min_segment,
                "variance": release.variance, "sentence_reduce": release.sentence_reduce,
                "split_blank_lines": release.split_blank_lines, "alpha": release.alpha,
                "permutations": release.permutations, "significance": st["significance"], "seed": st["seed"],
                "variants": list(results["variants"])}
    return {"format": rule.RELEASE_SETTINGS_FORMAT, **rec, "settings": settings,
            "student": os.path.abspath(config.student.gguf or config.student.path),
            "teacher": os.path.abspath(config.teacher.gguf or config.teacher.path),
            "rollouts": results["rollouts"], "verdict": results["verdict"]["text"],
            "fingerprint": diagnosis_fingerprint(config)}


def write_release_settings(out_dir: str, record: dict) -> str:
    path = os.path.join(out_dir, rule.RELEASE_SETTINGS_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_jsonable(record), f, indent=2)
    os.replace(tmp, path)  # a reader never sees half a file
    return path


# what a diagnosis' rollouts and statistics depend on (a change re-runs it under
# compare.diagnose_first); the rest (train, eval, optimizer, checkpoints...) does not matter to it
_RELEASE_NOT_MEASURED = ("mode", "margin", "calibration", "from_diagnosis", "fade", "fade_tokens", "half_life",
                         "prefix_fraction")
_DATA_NOT_MEASURED = ("num_eval", "eval_file", "eval_split", "shuffle", "trace_reads")


def diagnosis_fingerprint(config) -> str:
    d = config.to_dict()
    kept = {k: d[k] for k in ("seed", "student", "teacher", "model", "tokenizer", "rollout", "diagnose")}
    kept["data"] = {k: v for k, v in d["data"].items() if k not in _DATA_NOT_MEASURED}
    kept["release"] = {k: v for k, v in d["release"].items() if k not in _RELEASE_NOT_MEASURED}
    kept["batch"] = {"prompts_per_step": d["batch"]["prompts_per_step"]}  # one sampler call's rows and key
    kept["loss"] = {"chunk_tokens": d["loss"]["chunk_tokens"]}  # teacher scoring's chunks
    kept["format"] = rule.RELEASE_SETTINGS_FORMAT
    return multihost.fingerprint(kept)


def diagnosis_config(config) -> ml_collections.ConfigDict:
    """The diagnose job of a comparison config: the same models, data, rollout, release and
    diagnose sections, in workdir/diagnosis (or diagnose.directory)."""
    d = ml_collections.ConfigDict(config.to_dict())
    d.job = "diagnose"
    d.release.from_diagnosis = ""
    d.compare.diagnose_first = False
    return d


def release_settings_for(config) -> str:
    """compare.diagnose_first: run the diagnosis of `config` (unless workdir/diagnosis holds one
    with the same fingerprint), then point config.release.from_diagnosis at its
    release_settings.json. Where release.from_diagnosis is set (either way), copy its margin and
    calibration into config.release, so that the comparison's report names what the arms use.
    Returns release.from_diagnosis ('' = off)."""
    if config.compare.diagnose_first:
        dconf = diagnosis_config(config)
        out_dir = dconf.diagnose.directory or os.path.join(dconf.workdir, "diagnosis")
        path = os.path.join(out_dir, rule.RELEASE_SETTINGS_FILE)
        same = None
        if multihost.is_writer():
            same = _recorded_fingerprint(path) == diagnosis_fingerprint(dconf)
        if multihost.broadcast_object(same):
            log.info("compare.diagnose_first: reusing the diagnosis in %s (same settings)", out_dir)
        else:
            log.info("compare.diagnose_first: diagnosing before the arms, in %s", out_dir)
            diagnose(dconf)
        config.release.from_diagnosis = path
    if config.release.from_diagnosis:
        try:
            rec = rule.read_release_settings(config.release.from_diagnosis)
        except ValueError as e:
            raise ConfigError(f"config.{e}") from e
        rule.log_from_diagnosis(config)
        config.release.margin, config.release.calibration = rec["margin"], rec["calibration"]
    return config.release.from_diagnosis


def _recorded_fingerprint(path: str) -> str | None:
    try:
        with open(path) as f:
            return json.load(f).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _title(config) -> str:
    def name(section):  # the file of a GGUF, parent/name of a checkpoint directory
        if section.gguf:
            return os.path.basename(section.gguf)
        return "/".join(os.path.normpath(section.path).split(os.sep)[-2:])
    return f"teachability diagnosis: {name(config.teacher)} -> {name(config.student)}"


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x
