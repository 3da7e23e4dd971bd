"""The `dail_synthesize` job (DAIL.md, step 1): problems + expert solutions -> traces.jsonl.

    python launch/tpu_run.py --config configs/dail_demo.py --config.job=dail_synthesize

For every problem the frozen model M draws `synthesis.num_samples` traces with the mixed rollout
(`opdjax.rollout.mixed`: the student context speaks, the expert context takes over when the student
strays) and keeps one of them, as `synthesis.selection` says:
  - "graded", for a problem with a checkable answer (data.answer_field): the first trace whose
    final answer (`opdjax.data.grading.extract_answer`) is equivalent to it (`answers_equivalent`);
    when none matches, `synthesis.on_no_match` decides: "skip" writes the record with trace null
    (training ignores it), "random" keeps a seeded-random trace; `matched` is false either way;
  - "random", and for a problem without an answer: a seeded-random trace,
    np.random.default_rng([seed, i]).integers(num_samples), i the problem's position in the
    problem list; `matched` says whether it happens to match (when there is an answer);
  - "auto" (default): random for a reasoning recipe, graded otherwise (`resolve_recipe`). The
    authors' rule: their reasoning runs keep one random trace per problem without grading
    (grade_and_save.py, extract_final_dataset.py); a thinking trace with `</think>` banned never
    leaves the thinking block, and cut at 256 tokens it rarely holds a closed \\boxed{} to grade.
A reasoning recipe: prompts.enable_thinking is on AND the chat template thinks (its generation
prompt changes with the enable_thinking switch, as Qwen3's does, or always opens <think>, as
DeepSeek-R1's distills do). It also sets tau when synthesis.accept_threshold is None: 1.0 for a
reasoning recipe, 0.8 otherwise (`opdjax.dail.config.accept_threshold_for`, the authors' values).
A low keep rate is loud: kept / problems below `synthesis.min_keep_rate` is an error naming the
rate and its likely cause (`check_keep_rate`), checked after every batch once
KEEP_RATE_CHECK_AFTER problems are done, and at the end.

Output: one JSON object per line (synthesis.output, default workdir/traces.jsonl):
    id, record (where the problem came from), problem, solutions (list), answer (or null),
    hint (the landmarks hint text, for training's negative context),
    trace (text, or null when skipped), trace_ids (the kept trace's token ids without the stop
    token: training uses these ids, it never re-tokenises the text), num_tokens (len(trace_ids)),
    ended (the trace emitted a stop token, rather than running into max_new_tokens),
    stop_id (the stop token it emitted, or null),
    fallback_rate (share of the kept trace's generated tokens, its stop token included, that the
    expert context chose), mean_fallback_rate (the same over all num_samples traces),
    num_matched (how many of the samples matched the answer; 0 without an answer),
    num_answered (how many samples reach a final answer at all), num_ended (how many emitted a
    stop token), matched, selected ("answer" | "random" | null when skipped), selection (the
    rule applied to this problem: "graded" | "random"), reference_cut (null, or how
    prompts.reference_cut shortened the expert context's reference: solutions_kept, solutions,
    chars_dropped, tokens_before, tokens_after), tau (the resolved one), seed, num_samples.
Lines are appended and flushed after every batch, so a killed run loses at most the batch in
flight.

Stop tokens: the tokenizer's eos, the eos id(s) of config.json, and `<|im_end|>` and
`<|endoftext|>` when the vocabulary has them (a chat turn's end and a document's end both end a
trace). Banned tokens (synthesis.ban_tokens): those that are single tokens of the vocabulary;
others are ignored (logged).

Shapes and randomness. Every problem's contexts are rendered before any compute (an over-long
reference fails at once, naming its record), and student and expert prompts are left-padded to
fixed widths: the longest over ALL problems, rounded up to a multiple of 16. Problems are cut into
fixed batches of `problems_per_batch` consecutive problems (batch j = problems j*ppb ..
j*ppb+ppb-1), each problem repeated `num_samples` times (rows problem-major); the last batch is
filled with copies of its last problem, whose outputs are dropped. So every call has one shape
and compiles once. Batch j draws with key fold_in(key(seed), j*ppb) (the index of its first
problem).

Resuming. A re-run reads the ids already in the output (a torn last line, left by a killed run,
is cut off) and redoes only what is missing: a batch all of whose problems are present is skipped;
a batch with some missing is run whole, with its own key and shape, and only the missing
problems' lines are written. A resumed run therefore writes exactly the lines an uninterrupted
run would have written for those problems (in a different order in the file) — provided the
problem list, seed, problems_per_batch, num_samples and the synthesis/prompt settings are the
same. tau, seed and selection are stored in every line and checked on resume; change the output
file to synthesise with other settings.

On a pod (several processes, one global mesh) every process reads the problems and the output
before any process writes (`read_done_everywhere`: the processes check that they read the same
records, then process 0 alone cuts a torn line), so every process takes the same resume
decisions. Each batch's prompts go in as global arrays (`multihost.to_global`); the rollout comes
back whole on every process (`multihost.to_host`: a problem's samples may sit on several
processes' devices), and the per-problem host work (decoding, answer grading, selection) is split
across the processes (`multihost.map_split`), every process getting every record. Process 0
alone appends the lines and writes the summary; the job ends with a barrier, so the output is
complete on disk when any process goes on.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any

import jax
import numpy as np

from opdjax import multihost, sharding
from opdjax.aot import job as aot_job
from opdjax.dail.config import accept_threshold_for, output_path
from opdjax.dail.expert_problems import ExpertProblem, load_expert_problems
from opdjax.dail.hints import hint_text
from opdjax.dail.prompts import (join_solutions, render_contexts, rendered_context_settings,
                                 write_context_settings)
from opdjax.data import grading
from opdjax.data.prompts import left_pad
from opdjax.data.tokenizer import render_chat
from opdjax.errors import ConfigError
from opdjax.models.config import ModelConfig
from opdjax.models.load import load_section
from opdjax.rollout import mixed, stops
from opdjax.train import metrics as metrics_lib
from opdjax.train.validate import load_tokenizer_for, validate_dail_synthesis

log = logging.getLogger(__name__)

PAD_MULTIPLE = 16  # prompt widths are rounded up to this (one compile for the whole run)
EXTRA_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
SUMMARY_FILE = "synthesis_summary.json"
# The keep rate is checked after a batch once this many problems are done (ours: at a true keep
# rate of 0.3, 32 problems fall below 0.1 with probability 0.5%: binomial P(X <= 3)), and always at
# the end.
KEEP_RATE_CHECK_AFTER = 32


def check_config(config, *, num_devices: int | None = None) -> ModelConfig:
    """Everything the synthesis job reads, before any weights are loaded (opdjax.train.validate).
    Returns M's ModelConfig (from config.json)."""
    return validate_dail_synthesis(config, num_devices=num_devices)


# ------------------------------------------------------------------------------------ tokens
def special_ids(tokenizer, model_cfg: ModelConfig, ban_tokens) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(stop ids, banned ids); see the module docstring."""
    vocab = tokenizer.get_vocab()
    stop = stops.stop_ids(tokenizer, (model_cfg,), [vocab[t] for t in EXTRA_STOP_TOKENS if t in vocab])
    banned = []
    for t in ban_tokens:
        if t in vocab:
            banned.append(int(vocab[t]))
        else:
            log.info("synthesis.ban_tokens: %r is not a token of this vocabulary; ignored", t)
    return stop, tuple(sorted(set(banned)))


# ------------------------------------------------------------------------------------ output
def read_done(path: str, *, cut_torn_line: bool = True) -> dict[str, dict]:
    """The records already in an output file, by id. A torn last line (no newline at the end: a run
    killed mid-write) is ignored and, with `cut_torn_line`, cut off the file; any other unreadable
    line is an error naming it."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1  # everything after the last newline is a torn line
    if end < len(data) and cut_torn_line:
        cut_torn_tail(path)
    done: dict[str, dict] = {}
    for line_no, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{line_no}: not a JSON record ({e}); the synthesis output is damaged. "
                             "Remove the line (its problem is then redone) or choose another "
                             "config.synthesis.output.") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
            raise ValueError(f"{path}:{line_no}: not a synthesis record (no string 'id'); is "
                             "config.synthesis.output another file?")
        done[rec["id"]] = dict(rec, _line=line_no)
    return done


def cut_torn_tail(path: str) -> int:
    """Cut a torn last line (the bytes after the last newline) off the output; returns how many
    bytes were cut."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end == len(data):
        return 0
    log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(data) - end)
    with open(path, "r+b") as f:
        f.truncate(end)
    return len(data) - end


def read_done_everywhere(path: str) -> dict[str, dict]:
    """`read_done` on a pod: every process reads the output (shared storage) before any process
    writes to it, the processes check that they read the same records (else every one stops,
    naming the difference), and then process 0 alone cuts a torn last line. So every process takes
    the same resume decisions."""
    done = multihost.run_everywhere(lambda: read_done(path, cut_torn_line=False), f"reading {path}")
    multihost.agree((len(done), multihost.fingerprint(done)),
                    f"records in the synthesis output {path}")  # a collective: every process has read it
    if multihost.is_writer():
        cut_torn_tail(path)
    return done


def _check_resumable(path: str, done: dict[str, dict], tau: float, seed: int, selection: str | None = None) -> None:
    """Every record already in the output was written with these settings (`selection`: the
    recipe's rule for problems with an answer; one without an answer is always random)."""
    for rec in done.values():
        checks = [("tau", tau, "synthesis.accept_threshold"), ("seed", seed, "seed")]
        if selection is not None:
            checks.append(("selection", selection if rec.get("answer") is not None else "random",
                           "synthesis.selection (as resolved for this problem)"))
        for field, want, name in checks:
            if field in rec and rec[field] != want:
                raise ValueError(
                    f"{path}:{rec['_line']}: this output was written with {field}={rec[field]!r}, but "
                    f"config.{name}={want!r}. Resuming would mix traces of two settings: choose another "
                    "config.synthesis.output (or remove the file to start over).")


# ------------------------------------------------------------------------------------ selection
@dataclasses.dataclass
class Sample:
    ids: list[int]  # the trace's tokens, stop token excluded
    text: str
    ended: bool
    stop_id: int | None
    fallback_rate: float


def decode_samples(tokens: np.ndarray, mask: np.ndarray, from_expert: np.ndarray, tokenizer,
                   stop_ids: tuple[int, ...]) -> list[Sample]:
    """One Sample per row of a rollout (host arrays [R, N])."""
    out = []
    stop = set(stop_ids)
    for tok, m, fe in zip(tokens, mask, from_expert):
        n = int(m.sum())  # real tokens form a prefix: the rollout pads after the stop token
        ids = [int(t) for t in tok[:n]]
        ended = bool(n) and ids[-1] in stop
        stop_id = ids[-1] if ended else None
        if ended:
            ids = ids[:-1]
        rate = float(fe[:n].mean()) if n else 0.0
        out.append(Sample(ids, tokenizer.decode(ids, skip_special_tokens=False), ended, stop_id, rate))
    return out


def select(samples: list[Sample], answer: str | None, *, on_no_match: str, seed: int,
           index: int, selection: str = "graded") -> tuple[int | None, str | None, int]:
    """(kept sample index or None, how it was selected, number of samples matching the answer).
    selection: "graded" (the first match; on_no_match when none) or "random" (seeded, whatever
    the samples say); a problem without an answer is always random."""
    pick = lambda: int(np.random.default_rng([seed, index]).integers(len(samples)))  # noqa: E731
    if answer is None:
        return pick(), "random", 0
    matches = [grading.grade(s.text, answer) for s in samples]
    num_matched = int(sum(matches))
    if selection == "random":
        return pick(), "random", num_matched
    if num_matched:
        return matches.index(True), "answer", num_matched
    if on_no_match == "random":
        return pick(), "random", 0
    return None, None, 0


def make_record(p: ExpertProblem, hint: str, samples: list[Sample], kept: int | None, selected: str | None,
                num_matched: int, *, tau: float, seed: int, selection: str = "graded",
                reference_cut: dict | None = None) -> dict[str, Any]:
    s = samples[kept] if kept is not None else None
    matched = selected == "answer" or (s is not None and p.answer is not None and selection == "random"
                                       and grading.grade(s.text, p.answer))
    return {
        "id": p.id, "record": p.record, "problem": p.problem, "solutions": list(p.solutions), "answer": p.answer,
        "hint": hint,
        "trace": s.text if s else None, "trace_ids": s.ids if s else None, "num_tokens": len(s.ids) if s else None,
        "ended": s.ended if s else None, "stop_id": s.stop_id if s else None,
        "fallback_rate": s.fallback_rate if s else None,
        "mean_fallback_rate": float(np.mean([x.fallback_rate for x in samples])),
        "num_matched": num_matched,
        "num_answered": sum(grading.extract_answer(x.text) is not None for x in samples),
        "num_ended": sum(x.ended for x in samples),
        "matched": bool(matched), "selected": selected,
        "selection": selection if p.answer is not None else "random",
        "reference_cut": reference_cut,
        "tau": tau, "seed": seed, "num_samples": len(samples),
    }


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What synthesis resolves from the config and the tokenizer (`resolve_recipe`)."""
    reasoning: bool  # thinking on and a template that thinks
    reasoning_why: str
    tau: float
    tau_source: str
    selection: str  # "graded" | "random": the rule for problems with an answer

    def describe(self) -> str:
        return (f"{'reasoning' if self.reasoning else 'non-reasoning'} recipe ({self.reasoning_why}); "
                f"tau {self.tau:g} ({self.tau_source}); selection {self.selection}")


_PROBE = [{"role": "user", "content": "1 + 1?"}]


def template_thinks(tokenizer) -> bool:
    """Whether the chat template has a thinking mode: its generation prompt changes with the
    enable_thinking switch (Qwen3) or always opens a <think> block (DeepSeek-R1 distills)."""
    on = render_chat(tokenizer, _PROBE, add_generation_prompt=True, enable_thinking=True)
    off = render_chat(tokenizer, _PROBE, add_generation_prompt=True, enable_thinking=False)
    return on != off or on.rstrip().endswith("<think>")


def resolve_recipe(config, tokenizer) -> Recipe:
    """The one place tau and the selection rule are resolved (module docstring): a reasoning
    recipe (prompts.enable_thinking and a template that thinks) gets tau 1.0 and random selection,
    any other 0.8 and graded selection, unless synthesis.accept_threshold / synthesis.selection
    say otherwise."""
    thinks = template_thinks(tokenizer)
    on = bool(config.prompts.enable_thinking)
    reasoning = on and thinks
    why = (f"prompts.enable_thinking={on}, the chat template "
           f"{'has a thinking mode' if thinks else 'has no thinking mode'}")
    s = config.synthesis
    tau = accept_threshold_for(config, reasoning)
    tau_source = ("config.synthesis.accept_threshold" if s.accept_threshold is not None else
                  f"per recipe: the authors' {'reasoning' if reasoning else 'non-reasoning'} tau")
    selection = s.selection if s.selection != "auto" else ("random" if reasoning else "graded")
    return Recipe(reasoning, why, tau, tau_source, selection)


def check_keep_rate(records: list[dict], min_keep_rate: float, *, final: bool, max_new_tokens: int,
                    path: str = "") -> None:
    """ConfigError when kept / problems < min_keep_rate (0 = off), naming the rate and its likely
    cause, read off the skipped problems' samples. Before the end (`final` false) only once
    KEEP_RATE_CHECK_AFTER problems are done."""
    n = len(records)
    if not min_keep_rate or not n or (not final and n < KEEP_RATE_CHECK_AFTER):
        return
    kept = sum(r.get("trace_ids") is not None for r in records)
    rate = kept / n
    if rate >= min_keep_rate:
        return
    skipped = [r for r in records if r.get("trace_ids") is None]
    samples = sum(int(r.get("num_samples") or 0) for r in skipped)
    answered = sum(int(r.get("num_answered") or 0) for r in skipped) / samples if samples else 0.0
    ended = sum(int(r.get("num_ended") or 0) for r in skipped) / samples if samples else 0.0
    if answered < 0.5:
        cause = (f"only {answered:.0%} of the skipped problems' samples reach a final answer at all and "
                 f"{ended:.0%} end before config.rollout.max_new_tokens={max_new_tokens}: traces of "
                 f"{max_new_tokens} tokens rarely close \\boxed{{}}, so answer grading finds nothing to "
                 "match; use config.synthesis.selection='random' (the authors' choice for thinking "
                 "traces) or raise config.rollout.max_new_tokens")
    else:
        cause = (f"{answered:.0%} of the skipped problems' samples reach a final answer, but none of "
                 "them matches data.answer_field: the problems may be beyond M even with the reference "
                 "(more synthesis.num_samples, or a higher synthesis.accept_threshold, lets the expert "
                 "lead more), or answer_field may not hold the final answer; "
                 "synthesis.on_no_match='random' keeps a trace anyway")
    when = "" if final else f" after the first {n} problems"
    raise ConfigError(
        f"synthesis kept {kept} of {n} problems ({rate:.1%}){when} < config.synthesis.min_keep_rate="
        f"{min_keep_rate:g}: {cause}. The records so far are in {path or 'the output'} (a re-run resumes "
        "from them); config.synthesis.min_keep_rate=0 turns this check off.")


def summarize(records: list[dict]) -> dict[str, Any]:
    """Whole-output statistics over the given records."""
    kept = [r for r in records if r.get("trace_ids") is not None]
    checkable = [r for r in records if r.get("answer") is not None]
    mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    return {
        "done": len(records), "kept": len(kept), "skipped": len(records) - len(kept),
        "with_answer": len(checkable), "matched": sum(bool(r.get("matched")) for r in checkable),
        "match_rate": mean([float(bool(r.get("matched"))) for r in checkable]),
        "sample_match_rate": mean([r["num_matched"] / r["num_samples"] for r in checkable
                                   if r.get("num_samples")]),
        "mean_fallback_rate": mean([r["fallback_rate"] for r in kept]),
        "mean_sample_fallback_rate": mean([r["mean_fallback_rate"] for r in records
                                           if r.get("mean_fallback_rate") is not None]),
        "mean_trace_tokens": mean([r["num_tokens"] for r in kept]),
        "ended_rate": mean([float(bool(r["ended"])) for r in kept]),
        "keep_rate": len(kept) / len(records) if records else None,
        "selected_by_answer": sum(r.get("selected") == "answer" for r in records),
        "selected_at_random": sum(r.get("selected") == "random" for r in records),
        "reference_cuts": sum(bool(r.get("reference_cut")) for r in records),
    }


# ------------------------------------------------------------------------------------ the job
def _round_up(n: int, m: int = PAD_MULTIPLE) -> int:
    return max(m, int(math.ceil(n / m) * m))


def run(config) -> dict:
    """Synthesise traces for every problem not yet in the output; returns the summary dict (also
    written to workdir/synthesis_summary.json)."""
    t_start = time.perf_counter()
    model_cfg = check_config(config)
    s = config.synthesis
    seed, n_samples, ppb = int(config.seed), int(s.num_samples), int(s.problems_per_batch)
    tokenizer = load_tokenizer_for(config.model, "model")
    recipe = resolve_recipe(config, tokenizer)
    tau = recipe.tau
    log.info("synthesis: %s", recipe.describe())
    stop_ids, banned_ids = special_ids(tokenizer, model_cfg, s.ban_tokens)
    settings = mixed.MixedSettings(max_new_tokens=int(config.rollout.max_new_tokens), accept_threshold=tau, top_n=int(s.top_n),
                                   retries=int(s.retries), stop_ids=stop_ids, banned_ids=banned_ids,
                                   cache_dtype=config.rollout.cache_dtype).check(model_cfg.vocab_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]

    d = config.data
    problems = load_expert_problems(d.problems, id_field=d.id_field, problem_field=d.problem_field,
                                    solution_field=d.solution_field, answer_field=d.answer_field, split=d.split,
                                    limit=int(d.limit), data_dir=d.data_dir)
    # Every context up front: an over-long one fails here, naming its record, before any compute.
    hints, student_rows, expert_rows, cuts = [], [], [], []
    for p in problems:
        where = f"problem id {p.id!r} ({p.record})"
        try:
            hint = hint_text(join_solutions(list(p.solutions), config.prompts.solution_separator), config.hint,
                             problem=p.problem)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        ctx = render_contexts(tokenizer, config.prompts, p.problem, list(p.solutions), hint,
                              max_prompt_tokens=config.data.max_prompt_tokens, record=where)
        hints.append(hint)
        cuts.append(ctx.reference_cut)
        student_rows.append(ctx.student)
        expert_rows.append(ctx.expert)
    Ps, Pe = _round_up(max(map(len, student_rows))), _round_up(max(map(len, expert_rows)))

    out_path = output_path(config)
    writing = multihost.is_writer()  # process 0 writes the output and the summary
    if writing:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        os.makedirs(config.workdir, exist_ok=True)
    done = read_done_everywhere(out_path)
    _check_resumable(out_path, done, tau, seed, recipe.selection)
    # the rendering settings beside the output (<output>.settings.json): training refuses other ones
    write_context_settings(out_path, rendered_context_settings(config, tokenizer), write=writing, resumed=bool(done))
    ids = {p.id for p in problems}
    foreign = [i for i in done if i not in ids]
    if foreign:
        log.warning("%s holds %d record(s) whose id is not among the problems (e.g. %r); kept, not counted",
                    out_path, len(foreign), foreign[0])
    already = sum(p.id in done for p in problems)
    batches = [list(range(j, min(j + ppb, len(problems)))) for j in range(0, len(problems), ppb)]
    todo = [b for b in batches if any(problems[i].id not in done for i in b)]
    log.info("synthesis: %d problems (%d already in %s), %d batches of %d problems x %d samples to run; "
             "prompt widths student %d / expert %d; tau %g; stop ids %s; banned ids %s",
             len(problems), already, out_path, len(todo), ppb, n_samples, Ps, Pe, tau, stop_ids, banned_ids)

    generated_tokens, processed, t_loop = 0, 0, None
    if todo:
        plan = sharding.plan_from_config(config.mesh)
        aot_job.check_at_start(config, plan, "dail_synthesize")  # TPU: does the rollout fit? (before weights)
        params, _ = load_section(config.model, plan)  # model_cfg (attention resolved) drives the rollout
        root = jax.random.key(seed)
        # every process holds the whole (small) prompt batch; each device gets its rows
        put = lambda x: multihost.to_global(plan, x, ("batch", "length"))  # noqa: E731
        progress = metrics_lib.Progress(len(problems), already, enabled=config.metrics.progress)
        t_loop = time.perf_counter()
        out = open(out_path, "a", encoding="utf-8") if writing else None
        try:
            for batch in todo:
                members = batch + [batch[-1]] * (ppb - len(batch))  # fill: one shape for every call
                # one prompt row per problem: the rollout prefills it once for its n_samples rows
                s_tok, s_mask = left_pad([student_rows[i] for i in members], pad_id, Ps)
                e_tok, e_mask = left_pad([expert_rows[i] for i in members], pad_id, Pe)
                roll = mixed.mixed_rollout(params, put(s_tok), put(s_mask), put(e_tok), put(e_mask),
                                           jax.random.fold_in(root, batch[0]), model_cfg, settings,
                                           pad_id=pad_id, plan=plan, samples=n_samples)
                # The whole (integer) rollout on every process: a problem's samples may sit on
                # several processes' devices. Then each process decodes and grades its share of
                # the problems, and every process gets every record.
                tokens, mask, from_expert = multihost.to_host(tuple(roll))
                batch_tokens = int(mask[:len(batch) * n_samples].sum())  # the fill rows not counted
                generated_tokens += batch_tokens

                def finish(k_i):
                    k, i = k_i
                    rows = slice(k * n_samples, (k + 1) * n_samples)
                    p = problems[i]
                    samples = decode_samples(tokens[rows], mask[rows], from_expert[rows], tokenizer, stop_ids)
                    kept, selected, num_matched = select(samples, p.answer, on_no_match=s.on_no_match,
                                                         seed=seed, index=i, selection=recipe.selection)
                    return make_record(p, hints[i], samples, kept, selected, num_matched, tau=tau, seed=seed,
                                       selection=recipe.selection, reference_cut=cuts[i])

                # a problem already done is redone only to draw the batch's other problems exactly
                work = [(k, i) for k, i in enumerate(batch) if problems[i].id not in done]
                records = multihost.map_split(finish, work, "decoding and grading the synthesised traces")
                for rec in records:
                    done[rec["id"]] = rec
                processed += len(records)
                if out is not None:
                    out.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
                    out.flush()
                    os.fsync(out.fileno())
                elapsed = time.perf_counter() - t_loop
                progress.update(sum(p.id in done for p in problems), tokens=batch_tokens,
                                extra={"tok/s": generated_tokens / max(elapsed, 1e-9)})
                check_keep_rate([done[p.id] for p in problems if p.id in done], float(s.min_keep_rate),
                                final=False, max_new_tokens=settings.max_new_tokens, path=out_path)
        finally:
            if out is not None:
                out.close()
        progress.close()
        if writing:
            log.info("wrote %d trace record(s) to %s", processed, out_path)

    wall = time.perf_counter() - t_start
    loop_s = time.perf_counter() - t_loop if t_loop is not None else 0.0
    summary = {"output": out_path, "problems": len(problems),
               **summarize([done[p.id] for p in problems if p.id in done]),
               "already_done": already, "processed": processed,
               "generated_tokens": generated_tokens,
               "tokens_per_s": generated_tokens / loop_s if loop_s > 0 else None,
               "wall_s": wall, "tau": tau, "tau_source": recipe.tau_source, "reasoning": recipe.reasoning,
               "selection": recipe.selection, "min_keep_rate": float(s.min_keep_rate),
               "seed": seed, "num_samples": n_samples,
               "prompt_widths": {"student": Ps, "expert": Pe}}
    if writing:
        with open(os.path.join(config.workdir, SUMMARY_FILE), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        log.info("wrote the synthesis summary %s", os.path.join(config.workdir, SUMMARY_FILE))
    # The output is complete on disk before any process goes on (the demo's training reads it).
    multihost.sync("dail_synthesize_done")
    log.info("synthesis summary: %s", {k: v for k, v in summary.items() if k != "prompt_widths"})
    if summary["reference_cuts"]:
        log.warning("%d of %d problems' references were cut to fit config.data.max_prompt_tokens=%d "
                    "(prompts.reference_cut; per record in %s)", summary["reference_cuts"], len(problems),
                    config.data.max_prompt_tokens, out_path)
    check_keep_rate([done[p.id] for p in problems if p.id in done], float(s.min_keep_rate), final=True,
                    max_new_tokens=settings.max_new_tokens, path=out_path)
    return summary
