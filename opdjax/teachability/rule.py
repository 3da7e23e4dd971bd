"""The release rule end to end, as the train step calls it (RELEASE_RULE.md, Steps 1-4).

    teacher scores + the sampler's student log-probs   (device)
      -> margins.margin              A_t, g_t                          (jitted)
      -> segments.segment_batch      token -> sentence ids             (host, NLTK Punkt)
      -> decide (one jitted call)    sentence scores, BIC scan (+ the permutation calibration when
                                     release.calibration = "permutation"), release index, weights, stats
The result's `weights` [B, R] is the one array the loss consumes, whatever `release.mode` is:
`bic` (the rule), or the baselines `full` (plain OPD), `prefix_fraction`, `random_matched`
(random release points carrying the same weight mass Σw as the rule on this very batch).

`release_config()` holds every switch with its default; `settings_from_config` validates the
whole section by field name before anything is compiled or computed. `release.from_diagnosis`
names the release_settings.json a `diagnose` job wrote: `settings_from_config` takes
release.margin and release.calibration from it (`read_release_settings`), and
`log_from_diagnosis` says so in the job's log, with a warning for each setting the diagnosis was
measured under that differs from the run's, and one when the diagnosis found no collapse.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from opdjax import multihost
from opdjax.teachability import changepoint, margins, pictures, weights
from opdjax.teachability.segments import Segments, segment_batch

MODES = ("bic", "full", "prefix_fraction", "random_matched")
CALIBRATIONS = ("bic", "permutation")
RELEASE_SETTINGS_FILE = "release_settings.json"  # what the diagnose job writes in its directory
RELEASE_SETTINGS_FORMAT = 1
# release fields a diagnosis measured under: a run whose values differ gets a warning per field
# (alpha and permutations only matter for a permutation-calibrated recommendation)
DIAGNOSIS_FIELDS = ("top_k", "bic_penalty", "min_segment", "variance", "sentence_reduce", "split_blank_lines")
PERMUTATION_FIELDS = ("alpha", "permutations")

log = logging.getLogger(__name__)


def release_config() -> ml_collections.ConfigDict:
    """The `release` section of a training config. Paper = the abstract's words; ours = our choice."""
    c = ml_collections.ConfigDict()
    c.mode = "bic"  # bic (the rule) | full | prefix_fraction | random_matched   (baselines: ours)
    c.margin = "advantage_gap"  # teacher margin over the student's top-K (paper); variant: ours
    c.top_k = 8  # K of the candidate set (ours)
    c.split_blank_lines = True  # pre-split on blank lines before Punkt (ours; Punkt is the paper's)
    c.sentence_reduce = "mean"  # sentence score: mean | median of token margins (ours)
    c.max_sentences = 512  # J_max of the jitted scan; a longer response is an error, never cut
    c.bic_penalty = 1.0  # lambda in dBIC = J ln(RSS0/RSS1) - kappa lambda ln J (BIC-style: paper)
    c.variance = "shared"  # shared | separate Gaussian variance (ours)
    c.min_segment = 2  # sentences on each side of a split (ours)
    # bic (the paper's: detect iff delta BIC > 0) | permutation (ours: detect iff delta BIC beats
    # the (1 - alpha) level of the same statistic over `permutations` reorderings of the
    # trajectory's own sentence scores; removes the releases plain BIC makes by chance)
    c.calibration = "bic"
    c.alpha = 0.05  # calibration=permutation: false-release rate on shift-free trajectories
    c.permutations = 200  # calibration=permutation: P reorderings per trajectory
    c.fade = "hard"  # hard (the paper's "truncate") | linear | exp (ours)
    c.fade_tokens = 32  # linear fade length
    c.half_life = 16.0  # exp fade half-life, tokens
    c.prefix_fraction = 0.5  # mode=prefix_fraction: share of each response kept
    # ours: the release_settings.json of a diagnose job (workdir/diagnosis/): its recommended
    # margin and calibration replace release.margin / release.calibration (the file wins; the job
    # logs what it applied). "" = off.
    c.from_diagnosis = ""
    return c


@dataclasses.dataclass(frozen=True)
class ReleaseSettings:
    """The validated, hashable form of the config section (a static argument of jitted code)."""
    mode: str
    margin: str
    top_k: int
    split_blank_lines: bool
    sentence_reduce: str
    max_sentences: int
    bic_penalty: float
    variance: str
    min_segment: int
    calibration: str
    alpha: float
    permutations: int
    fade: str
    fade_tokens: int
    half_life: float
    prefix_fraction: float


def settings_from_config(c: ml_collections.ConfigDict) -> ReleaseSettings:
    """Check the whole `release` section, naming the field and the fix; nothing is compiled."""
    known = set(release_config().keys())
    unknown = sorted(set(c.keys()) - known)
    if unknown:
        raise ValueError(f"release.{unknown[0]} is not a release-rule setting; known: {', '.join(sorted(known))}.")
    full = release_config()
    full.update(c)
    if not isinstance(full.from_diagnosis, str):
        raise ValueError(f"release.from_diagnosis={full.from_diagnosis!r} must be a path ('' = off).")
    if full.from_diagnosis:
        rec = read_release_settings(full.from_diagnosis)
        full.margin, full.calibration = rec["margin"], rec["calibration"]
    if full.mode not in MODES:
        raise ValueError(f"release.mode={full.mode!r}: choose one of {', '.join(MODES)}.")
    margins.check_margin_variant(full.margin)
    if not (isinstance(full.top_k, int) and full.top_k >= 1):
        raise ValueError(f"release.top_k={full.top_k!r} must be an integer >= 1 (default 8).")
    if full.sentence_reduce not in changepoint.REDUCES:
        raise ValueError(f"release.sentence_reduce={full.sentence_reduce!r}: choose one of "
                         f"{', '.join(changepoint.REDUCES)}.")
    if not (isinstance(full.max_sentences, int) and full.max_sentences >= 1):
        raise ValueError(f"release.max_sentences={full.max_sentences!r} must be an integer >= 1.")
    changepoint.check_release_config(penalty=full.bic_penalty, min_segment=full.min_segment,
                                     variance=full.variance)
    if full.calibration not in CALIBRATIONS:
        raise ValueError(f"release.calibration={full.calibration!r}: choose one of {', '.join(CALIBRATIONS)}.")
    changepoint.check_permutation_config(alpha=full.alpha, num_permutations=full.permutations)
    weights.validate_fade(full.fade, full.fade_tokens, full.half_life)
    if not 0.0 <= full.prefix_fraction <= 1.0:
        raise ValueError(f"release.prefix_fraction={full.prefix_fraction!r} must lie in [0, 1].")
    return ReleaseSettings(**{f.name: full[f.name] for f in dataclasses.fields(ReleaseSettings)})


def _from_diagnosis_error(path, problem: str) -> ValueError:
    return ValueError(f"release.from_diagnosis={path!r} {problem}; give the {RELEASE_SETTINGS_FILE} a diagnose job "
                      "wrote (job=diagnose, or compare.diagnose_first=True: workdir/diagnosis/"
                      f"{RELEASE_SETTINGS_FILE}), or '' to use release.margin / release.calibration as set.")


def read_release_settings(path: str) -> dict[str, Any]:
    """The recommendation a diagnose job wrote (`release.from_diagnosis`), checked field by field;
    a ValueError naming release.from_diagnosis and the path otherwise."""
    if not os.path.isfile(path):
        raise _from_diagnosis_error(path, "does not exist" if not os.path.exists(path) else "is not a file")
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _from_diagnosis_error(path, f"cannot be read as JSON ({e})") from e
    if not isinstance(rec, dict):
        raise _from_diagnosis_error(path, "holds no JSON object")
    if rec.get("format") != RELEASE_SETTINGS_FORMAT:
        raise _from_diagnosis_error(path, f"has format {rec.get('format')!r}, not {RELEASE_SETTINGS_FORMAT}")
    checks = {"detected": lambda v: isinstance(v, bool),
              "margin": lambda v: v in margins.MARGIN_VARIANTS,
              "calibration": lambda v: v in CALIBRATIONS,
              "settings": lambda v: isinstance(v, dict) and all(k in v for k in DIAGNOSIS_FIELDS + PERMUTATION_FIELDS)}
    for k, ok in checks.items():
        if k not in rec:
            raise _from_diagnosis_error(path, f"lacks the field {k!r}")
        if not ok(rec[k]):
            raise _from_diagnosis_error(path, f"has {k}={rec[k]!r}, which is not valid here")
    return rec


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.2g}"


def from_diagnosis_notes(config) -> tuple[str, list[str], str | None]:
    """What release.from_diagnosis does to the run `config` (a whole OPD config): (the info line,
    one warning per setting the diagnosis was measured under that differs from this run's, the
    "not detected" warning or None). Reads the file; call after validation."""
    r = config.release
    path = r.from_diagnosis
    rec = read_release_settings(path)
    found = "detected" if rec["detected"] else "not detected"
    evidence = (f"{rec['margin']} under {rec['calibration']}: {_pct(rec.get('rate'))} of "
                f"{rec.get('rollouts', {}).get('count', '?')} rollouts released against {_pct(rec.get('chance'))} "
                f"on shuffled sentence orders, p={_num(rec.get('p'))}")
    info = (f"release.margin={rec['margin']}, release.calibration={rec['calibration']} from {path} "
            f"(diagnosis: {found}; {evidence})")
    replaced = [f"release.{k}={r[k]!r}" for k in ("margin", "calibration") if r[k] != rec[k]]
    if replaced:
        info += f"; replaces the config's {', '.join(replaced)}"
    warnings = []
    st = rec["settings"]
    fields = DIAGNOSIS_FIELDS + (PERMUTATION_FIELDS if rec["calibration"] == "permutation" else ())
    for k in fields:
        if st[k] != r[k]:
            warnings.append(f"release.{k}={r[k]!r} but the diagnosis in {path} was measured with {k}={st[k]!r}: "
                            "its recommendation holds for its settings; rerun the diagnosis with this config "
                            f"(job=diagnose) or set release.{k}={st[k]!r}.")
    for role in ("student", "teacher"):
        mine = _model_name(config[role])
        theirs = rec.get(role)
        if theirs and mine and os.path.abspath(theirs) != os.path.abspath(mine):
            warnings.append(f"config.{role} is {mine!r} but the diagnosis in {path} measured {theirs!r}: its "
                            "recommendation is for another pair.")
    n_tokens = rec.get("rollouts", {}).get("max_new_tokens")
    if n_tokens and n_tokens != config.rollout.max_new_tokens:
        warnings.append(f"rollout.max_new_tokens={config.rollout.max_new_tokens} but the diagnosis in {path} "
                        f"sampled up to {n_tokens} new tokens.")
    not_detected = None
    if not rec["detected"] and r.mode == "bic":
        not_detected = (f"the diagnosis in {path} found no local teachability collapse: with no margin variant did "
                        f"downward change points fire above chance (best: {rec['margin']}, plain BIC "
                        f"{_pct(rec.get('bic_rate'))} against {_pct(rec.get('bic_chance'))} chance, permutation-"
                        f"calibrated {_pct(rec.get('perm_rate'))} against {_pct(rec.get('perm_chance'))}); the "
                        "release rule will mostly cut at random"
                        + (f" (release.calibration=permutation keeps its cuts near release.alpha={r.alpha} of the "
                           "rollouts)." if rec["calibration"] == "permutation" else "."))
    return info, warnings, not_detected


def _model_name(section) -> str:
    return section.gguf or section.path


def log_from_diagnosis(config) -> str | None:
    """Logs `from_diagnosis_notes` (when release.from_diagnosis is set); returns the "not
    detected" warning (the OPD job's summary.json keeps it as release_warning) or None."""
    if not config.release.from_diagnosis:
        return None
    info, warnings, not_detected = from_diagnosis_notes(config)
    log.info("%s", info)
    for w in warnings:
        log.warning("%s", w)
    if not_detected:
        log.warning("%s", not_detected)
    return not_detected


class ReleaseDecision(NamedTuple):
    weights: jax.Array  # [B, R] float32: the loss weights (stop-gradient)
    release_index: jax.Array  # [B] int32: r (= response length where nothing is released)
    rule_release_index: jax.Array  # [B] int32: where the BIC rule would release (all modes)
    advantage: jax.Array  # [B, R] A_t
    margin: jax.Array  # [B, R] g_t (NaN where undefined, e.g. < 2 candidates present)
    sentence_scores: jax.Array  # [B, J_max] M_j
    sentence_valid: jax.Array  # [B, J_max]
    changepoint: changepoint.ChangePoint
    stats: dict[str, jax.Array]
    segments: Segments


def segment_rows(settings: ReleaseSettings, tokenizer, response_ids, response_mask, plan=None) -> Segments:
    """Sentence segments (host, NLTK Punkt) of the rows of a [B, R] response batch that this
    process feeds (every row on one process): each process splits its own rows, none repeats
    another's. `Segments.rows` names the global rows."""
    rows = multihost.feeding_rows(plan, response_ids.shape, ("batch", "length"))
    ids, mask = multihost.rows_of((response_ids, response_mask), rows)
    segs = segment_batch(tokenizer, ids, mask, split_blank_lines=settings.split_blank_lines)
    segs.rows = rows
    return segs


def decide_release(settings: ReleaseSettings, *, tokenizer, response_ids, response_mask,
                   teacher_sampled_logp, teacher_cand_logp, student_sampled_logp, student_cand_logp,
                   candidate_ids, key: jax.Array | None = None, segments: Segments | None = None,
                   plan=None) -> ReleaseDecision:
    """Release decision for one batch of rollouts. All [B, R] / [B, R, K] arrays are
    response-aligned (R response columns, right-padded; `response_mask` marks real tokens).
    `segments`: the sentence segmentation of this process's rows (`segment_rows`) if already made
    (it depends on the tokens only, so the trainer computes it on the host while the teacher
    scores on device). `plan`: the mesh the batch lives on (None: one device); on a pod each
    process contributes the sentence ids of its own rows."""
    m = margins.margin(settings.margin, teacher_sampled_logp, student_sampled_logp, teacher_cand_logp,
                       student_cand_logp, candidate_ids, response_ids, response_mask)
    segs = segments if segments is not None else segment_rows(settings, tokenizer, response_ids, response_mask,
                                                               plan)
    # The scan width is a compile-time shape: every process must pick the same, from the longest
    # response of the whole batch.
    longest = max(multihost.gather_objects(int(segs.num_sentences.max(initial=0))))  # host: Segments
    width = checked_scan_width(longest, settings)
    if key is None:
        key = jax.random.key(0)
    shape = tuple(response_ids.shape)
    sent_ids = multihost.from_local_rows(plan, segs.sent_ids, ("batch", "length"), shape)
    return ReleaseDecision(*_decide(settings, width, m.margin, m.margin_defined, m.advantage,
                                    sent_ids, jnp.asarray(response_mask, bool), key), segs)


def scan_width(num_sentences: int, settings: ReleaseSettings) -> int:
    """Columns of the sentence arrays for a batch whose longest response has `num_sentences`:
    the next power of two (>= 8), capped at release.max_sentences. The scan costs O(width), and
    the permutation calibration O(P * width), so a batch of 12-sentence answers should not pay
    for 512 columns; powers of two bound the number of compiled shapes to log2(max_sentences)."""
    return min(settings.max_sentences, max(8, 1 << max(int(num_sentences) - 1, 0).bit_length()))


def checked_scan_width(num_sentences: int, settings: ReleaseSettings) -> int:
    """`scan_width`, after refusing a batch whose longest response exceeds release.max_sentences."""
    if num_sentences > settings.max_sentences:
        raise ValueError(f"a response has {num_sentences} sentences but release.max_sentences="
                         f"{settings.max_sentences}; raise it (responses are never cut).")
    return scan_width(num_sentences, settings)


def detect(s: ReleaseSettings, M, valid, key):
    """The change point of every row under `release.calibration` (traced inside jit).
    Returns (ChangePoint whose `detected` / `upward_detected` follow the calibration, chance
    level, extra stats). The chance level is the share of trajectories the same test flags once
    each trajectory's sentence scores are put in a random order."""
    cp = changepoint.bic_scan(M, valid, penalty=s.bic_penalty, min_segment=s.min_segment, variance=s.variance)
    if s.calibration == "bic":
        return cp, _shuffled_release_rate(key, M, valid, s), {}
    orders = changepoint.permutation_orders(key, valid, s.permutations)
    pt = changepoint.permutation_test(M, valid, orders, alpha=s.alpha, penalty=s.bic_penalty,
                                      min_segment=s.min_segment, variance=s.variance, observed=cp)
    extra = {"bic_release_rate": jnp.mean(cp.detected.astype(jnp.float32)),  # what plain BIC would do
             "bic_chance_rate": jnp.mean(pt.chance_bic)}
    cp = cp._replace(detected=pt.detected, upward_detected=pt.upward_detected)
    return cp, jnp.mean(pt.chance_permutation), extra


@functools.partial(jax.jit, static_argnums=(0, 1))
def _decide(s: ReleaseSettings, width: int, margin, margin_defined, advantage, sent_ids, response_mask, key):
    # Undefined margins (fewer than two candidates present) are left out of the sentence means
    # rather than counted as 0, which would plant spurious low sentences.
    g = jnp.where(margin_defined & response_mask, margin, jnp.nan)
    M, valid, _ = changepoint.sentence_scores(g, sent_ids, width, s.sentence_reduce)
    key_random, key_shuffle = jax.random.split(key)
    cp, chance, extra = detect(s, M, valid, key_shuffle)
    rule_r = weights.release_index(cp.release_sentence, cp.detected, sent_ids, response_mask)
    rule_w = weights.release_weights(rule_r, response_mask, s.fade, s.fade_tokens, s.half_life)
    kept_ratio = jnp.sum(rule_w) / jnp.maximum(jnp.sum(response_mask), 1)
    lengths = weights.response_lengths(response_mask)
    if s.mode == "bic":
        r, w = rule_r, rule_w
    elif s.mode == "random_matched":  # random points carrying the rule's sum w, fades included
        r, w = weights.random_matched_weights(key_random, response_mask, jnp.sum(rule_w), s.fade, s.fade_tokens,
                                              s.half_life)
    else:
        r = lengths if s.mode == "full" else weights.prefix_fraction_index(response_mask, s.prefix_fraction)
        w = weights.release_weights(r, response_mask, s.fade, s.fade_tokens, s.half_life)
    # g stays NaN where the margin is undefined: the margin statistics leave those tokens out
    stats = weights.release_stats(r, response_mask, w, g, advantage)
    stats["rule_release_rate"] = jnp.mean(cp.detected.astype(jnp.float32))
    stats["rule_kept_share"] = kept_ratio
    stats["upward_shift_rate"] = jnp.mean(cp.upward_detected.astype(jnp.float32))
    stats["shuffled_release_rate"] = chance
    stats.update(extra)
    stats["mean_num_sentences"] = jnp.mean(cp.num_sentences.astype(jnp.float32))
    stats["mean_delta_bic_detected"] = jnp.sum(jnp.where(cp.detected, cp.delta_bic, 0.0)) / jnp.maximum(
        jnp.sum(cp.detected), 1)
    return w, r, rule_r, advantage, g, M, valid, cp, stats


def _shuffled_release_rate(key, M, valid, s: ReleaseSettings):
    """The chance level: the same test on each trajectory's sentence scores in a random order
    (valid sentences permuted among themselves, padding kept at the end)."""
    noise = jax.random.uniform(key, M.shape)
    order = jnp.argsort(jnp.where(valid, noise, 2.0), axis=1)
    shuffled = jnp.take_along_axis(M, order, axis=1)
    shuffled_valid = jnp.take_along_axis(valid, order, axis=1)
    cp = changepoint.bic_scan(shuffled, shuffled_valid, penalty=s.bic_penalty, min_segment=s.min_segment,
                              variance=s.variance)
    return jnp.mean(cp.detected.astype(jnp.float32))


def summary(decision: ReleaseDecision) -> dict[str, Any]:
    """Host scalars for the metrics log (`release/` namespace); the decile curve as a list.
    A collective on a pod (the statistics are small replicated arrays)."""
    out = {}
    for k, v in multihost.to_host(decision.stats).items():
        out[k] = v.tolist() if v.ndim else float(v)
    return out


class PictureRows(NamedTuple):
    """What the pictures of some rows of a batch need, on the host (`local_picture_rows`)."""
    rows: np.ndarray  # [n] global row indices
    response_ids: np.ndarray
    response_mask: np.ndarray
    sent_ids: np.ndarray
    margin: np.ndarray
    sentence_scores: np.ndarray
    release_sentence: np.ndarray
    detected: np.ndarray
    delta_bic: np.ndarray
    mean_left: np.ndarray
    mean_right: np.ndarray
    release_index: np.ndarray
    weights: np.ndarray


def local_picture_rows(decision: ReleaseDecision, response_ids, response_mask, plan=None) -> PictureRows:
    """The rows this process segmented, fetched from its own devices (no communication: process 0
    can call it alone)."""
    rows = decision.segments.rows
    if rows is None:
        rows = np.arange(len(decision.segments.sent_ids))
    cp = decision.changepoint
    # the row index of the right segment's first sentence: equals `split` unless a sentence
    # without a defined margin sits inside the left part
    fetched = multihost.rows_of((response_ids, response_mask, decision.margin, decision.sentence_scores,
                                 cp.release_sentence, cp.detected, cp.delta_bic, cp.mean_left, cp.mean_right,
                                 decision.release_index, decision.weights), rows)
    ids, mask, margin, scores, split, detected, dbic, mu1, mu2, r, w = fetched
    return PictureRows(rows, ids, mask, decision.segments.sent_ids, margin, scores, split, detected, dbic, mu1, mu2,
                       r, w)


def write_pictures(rows: PictureRows | ReleaseDecision, out_dir, step: int, *, tokenizer, response_ids=None,
                   response_mask=None, margin_name: str = "advantage_gap", max_trajectories: int = 4):
    """PNG + HTML + Markdown of a few trajectories of this batch (the trainer calls this every N
    steps, on process 0, with `local_picture_rows`; a decision and its response arrays work on one
    process); returns the written paths."""
    if isinstance(rows, ReleaseDecision):
        rows = local_picture_rows(rows, response_ids, response_mask)
    return pictures.write_release_report(
        out_dir, step, response_mask=rows.response_mask, sent_ids=rows.sent_ids, margins=rows.margin,
        sentence_scores=rows.sentence_scores, split=rows.release_sentence, detected=rows.detected,
        delta_bic=rows.delta_bic, mean_left=rows.mean_left, mean_right=rows.mean_right,
        release_index=rows.release_index, weights=rows.weights, token_ids=rows.response_ids, tokenizer=tokenizer,
        margin_name=margin_name, max_trajectories=max_trajectories, labels=rows.rows)
