"""The `dail_eval` job: pass@k curves of the base model and the DAIL-trained one, per thinking budget.

    python launch/tpu_run.py --config configs/<dail config>.py --config.job=dail_eval

What it does (DAIL.md, "Evaluation the authors used"): every problem gets `eval.samples` samples
(n) at `eval.temperature` / `eval.top_p` with `eval.presence_penalty` (vLLM's: subtracted from the
logit of every token the sample has already generated, before temperature and top-p); each sample
has a budget of new tokens (every entry of `eval.budgets` is its own run). As the authors ran it
(opdjax.eval.budget has the exact rule): with thinking on (prompts.enable_thinking) the budget is
the thinking part's (generation stops at `eval.thinking_end`, "</think>") and every sample then gets
`eval.forced_answer` and up to `eval.answer_tokens` more tokens; with thinking off the budget bounds
the whole response and the samples whose text holds no answer the grader can extract are forced. Samples are graded with the
project's math checker (`eval.kind = math`) or the multiple-choice letter extractor
(`eval.kind = choice`, GPQA-style; options shuffled per problem, opdjax.eval.choice). pass@k is
the unbiased estimator for every k = 1..n.

Models: "base" = config.model (M, the student's initial weights; an HF directory or a GGUF file),
"trained" = workdir/student_hf when it exists (the merged student the training job exports), and
every (name, path) of `eval.models`. All of them draw with the same PRNG key, on the same prompt
rows in the same batches: a paired comparison, and identical weights give identical curves.

Writes workdir/eval/passk.json (everything, pass@k for every k), workdir/eval/passk.md (k vs model,
one table per budget) and workdir/eval/passk_<budget>.png (the curves on a log2 k axis).

On a pod every process evaluates the same models (checked: `multihost.agree`), samples through the
boundary (opdjax.eval.budget), and renders and grades its share of the prompts and samples
(`multihost.map_split`); process 0 writes the reports.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from opdjax import multihost, sharding
from opdjax.aot import job as aot_job
from opdjax.dail.prompts import render_student_prompt
from opdjax.data.grading import extract_answer, grade_batch
from opdjax.data.prompts import Problem
from opdjax.data.records import PromptDataError, describe_fields, iter_records
from opdjax.data.tokenizer import TokenizerMismatchError, check_same_tokenizer
from opdjax.eval import choice as choice_lib
from opdjax.eval.budget import generate_with_budget, thinking_end_id
from opdjax.errors import ConfigError
from opdjax.eval.passk import default_ks, pass_at_k_table, plot_pass_at_k
from opdjax.models.load import load_model, model_config, model_tokenizer
from opdjax.rollout.sampler import SamplingSettings
from opdjax.rollout.stops import stop_ids
from opdjax.train import metrics as metrics_lib
from opdjax.train.validate import load_tokenizer_for

log = logging.getLogger(__name__)

KINDS = ("math", "choice")
EVAL_DIR = "eval"
TRAINED_DIR = "student_hf"  # what the training job exports (checkpoint.export_hf)
ROWS_PER_CALL = 64  # sampler rows per call (config.eval.rows_per_call)
EXAMPLE_CHARS = 2000


# ---------------------------------------------------------------------------------------------
# The curves

def _math_item(p) -> tuple[str, str]:
    """(problem text, gold answer) of a math problem: a prompts.Problem or a mapping with
    prompt/problem and answer."""
    if isinstance(p, Problem):
        text, answer = p.prompt, p.answer
    elif isinstance(p, Mapping):
        text, answer = p.get("prompt", p.get("problem")), p.get("answer")
    else:
        raise TypeError(f"a math problem must be an opdjax.data.prompts.Problem or a mapping, got {type(p).__name__}")
    if text is None or answer is None:
        raise ValueError(f"math problem without a text or an answer: {p!r:.200}")
    return str(text), str(answer)


def pass_at_k_curves(models: Mapping[str, Any], tokenizer, problems: Sequence, *,
                     prompt_ids_fn: Callable[[str], list[int]], kind: str = "math", samples: int,
                     budgets: Sequence[int], temperature: float, top_p: float = 1.0,
                     presence_penalty: float = 0.0, thinking: bool = False, thinking_end: str = "</think>",
                     forced_answer: str, answer_tokens: int, stop_ids: Sequence[int], key, plan=None,
                     shuffle_seed: int = 0, rows_per_call: int = ROWS_PER_CALL, length_multiple: int = 32,
                     callback: Callable[[str, int, dict], None] | None = None) -> dict:
    """pass@k (k = 1..samples) per model and budget, every model on the same rows with the same key.

    models: name -> (params, cfg), or name -> a zero-argument function returning (params, cfg)
      (called when that model's turn comes, so only one model's weights are held at a time).
    problems: kind="math": prompts.Problem (or mappings with prompt/answer); kind="choice":
      choice.ChoiceProblem (shown as `choice_prompt` of its options shuffled with `shuffle_seed`).
    prompt_ids_fn: problem text -> token ids of the rendered prompt.
    presence_penalty, thinking, thinking_end: see opdjax.eval.budget (thinking=False: a sample is
      forced when the grader finds no answer in it).
    callback(name, budget, entry): called after each (model, budget), e.g. for progress.

    Returns {"kind", "samples", "ks", "budgets", "num_problems", "temperature", "top_p",
    "presence_penalty", "thinking", "forced_answer", "answer_tokens", "problems": [{id, answer}],
    "models": {name: {budget: entry}}} with entry = {"pass_at_k": {k: float}, "accuracy" (= pass@1),
    "mean_thinking_tokens", "mean_total_tokens", "forced_share", "exhausted_share" (ran out of
    budget), "correct_counts": [per problem], "seconds", "example"}.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {KINDS} (eval.kind).")
    if not (isinstance(samples, (int, np.integer)) and samples >= 1):
        raise ValueError(f"samples={samples!r} must be an integer >= 1 (eval.samples).")
    if not problems:
        raise ValueError("pass_at_k_curves: no problems to evaluate.")
    if not models:
        raise ValueError("pass_at_k_curves: no models to evaluate.")
    budgets = [int(b) for b in budgets]
    if not budgets or any(b < 1 for b in budgets):
        raise ValueError(f"budgets={tuple(budgets)} must be one or more integers >= 1 (eval.budgets).")

    if kind == "math":
        items = [_math_item(p) for p in problems]
        texts, golds = [t for t, _ in items], [g for _, g in items]
        ids = [str(p.get("id", i)) if isinstance(p, Mapping) else
               str((p.record or {}).get("id", p.index)) if isinstance(p, Problem) else str(i)
               for i, p in enumerate(problems)]
        num_choices = None
    else:
        texts, golds, num_choices, ids = [], [], [], []
        for p in problems:
            shown, letter = choice_lib.shuffled(p, shuffle_seed)
            texts.append(choice_lib.choice_prompt(p.question, shown))
            golds.append(letter)
            num_choices.append(len(shown))
            ids.append(p.id)
    # host work split across the processes of a pod (each renders / grades its share; all get all)
    prompt_ids = multihost.map_split(lambda t: list(prompt_ids_fn(t)), texts, "rendering the prompts")
    rows = [row for row in prompt_ids for _ in range(samples)]
    row_golds = [g for g in golds for _ in range(samples)]
    row_choices = [c for c in num_choices for _ in range(samples)] if num_choices is not None else None
    prompt_len = -(-max(map(len, prompt_ids)) // length_multiple) * length_multiple  # same for every call
    settings = SamplingSettings(max(budgets), float(temperature), float(top_p), candidates=1,
                                stop_ids=tuple(sorted({int(i) for i in stop_ids})),
                                presence_penalty=float(presence_penalty))

    def has_answer(row: int, text: str) -> bool:  # thinking off: force the samples without an answer
        if kind == "math":
            return extract_answer(text) is not None
        return choice_lib.extract_choice(text, row_choices[row]) is not None

    out = {"kind": kind, "samples": int(samples), "ks": list(range(1, samples + 1)), "budgets": budgets,
           "num_problems": len(problems), "temperature": float(temperature), "top_p": float(top_p),
           "presence_penalty": float(presence_penalty), "thinking": bool(thinking), "forced_answer": forced_answer, "answer_tokens": int(answer_tokens),
           "problems": [{"id": i, "answer": g} for i, g in zip(ids, golds)], "models": {}}
    for name, model in models.items():
        params, cfg = model() if callable(model) else model
        settings.check(cfg.vocab_size, section="eval")
        per_budget = {}
        for budget in budgets:
            t0 = time.perf_counter()
            res = generate_with_budget(params, cfg, tokenizer, rows, budget=budget, forced_answer=forced_answer,
                                       answer_tokens=answer_tokens, settings=settings, key=key, plan=plan,
                                       rows_per_call=rows_per_call, length_multiple=length_multiple,
                                       prompt_len=prompt_len, thinking=thinking, thinking_end=thinking_end,
                                       has_answer=has_answer)
            correct = np.array(multihost.map_split(_grader(kind), _grading_items(res.texts, row_golds, row_choices),
                                                   "grading the samples", batched=True), bool)
            correct = correct.reshape(len(problems), samples)
            table = pass_at_k_table(correct, range(1, samples + 1))
            entry = {
                "pass_at_k": table,
                "accuracy": float(correct.mean()),
                "mean_thinking_tokens": float(res.thinking_tokens.mean()),
                "mean_total_tokens": float(np.mean([len(t) for t in res.token_ids])),
                "forced_share": float(res.forced.mean()),
                "exhausted_share": float(res.exhausted.mean()),
                "correct_counts": [int(c) for c in correct.sum(axis=1)],
                "seconds": time.perf_counter() - t0,
                "example": res.texts[0][:EXAMPLE_CHARS],
            }
            per_budget[budget] = entry
            if callback is not None:
                callback(name, budget, entry)
        out["models"][name] = per_budget
        del params
    return out


def _grading_items(texts, golds, choices) -> list[tuple]:
    return list(zip(texts, golds, choices if choices is not None else [None] * len(texts)))


def _grader(kind: str):
    """A batched grader over (text, gold, number of choices) items, as `map_split` takes it."""
    def grade(items):
        if not items:
            return []
        texts, golds, choices = (list(x) for x in zip(*items))
        if kind == "math":
            return [bool(c) for c in grade_batch(texts, golds)]
        return [bool(c) for c in choice_lib.grade_choice(texts, golds, choices)]
    return grade


# ---------------------------------------------------------------------------------------------
# Reports

def _fmt(x: float) -> str:
    return f"{x:.3f}"


def markdown_table(summary: dict) -> str:
    """passk.md: one table per budget, k (1, 2, 4, ..., n) down, models across."""
    names = list(summary["models"])
    n = summary["samples"]
    lines = ["# pass@k", "",
             f"{summary['kind']} · {summary['num_problems']} problems · n = {n} samples per problem · "
             f"temperature {summary['temperature']:g} · top-p {summary['top_p']:g} · presence penalty "
             f"{summary.get('presence_penalty', 0.0):g} · unbiased estimator "
             "(passk.json has every k)", ""]
    for budget in summary["budgets"]:
        lines += [f"## Budget {budget} tokens", "", "| k | " + " | ".join(names) + " |",
                  "|---:|" + "---:|" * len(names)]
        for k in default_ks(n):
            lines.append(f"| {k} | " + " | ".join(_fmt(summary["models"][m][budget]["pass_at_k"][k]) for m in names)
                         + " |")
        for label, field, fmt in (("mean thinking tokens", "mean_thinking_tokens", lambda v: f"{v:.1f}"),
                                  ("forced share", "forced_share", _fmt)):
            lines.append(f"| {label} | " + " | ".join(fmt(summary["models"][m][budget][field]) for m in names) + " |")
        lines.append("")
    return "\n".join(lines)


def write_reports(summary: dict, out_dir: str | os.PathLike) -> dict[str, str]:
    """passk.json, passk.md and passk_<budget>.png in `out_dir`; returns their paths."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    files = {"json": os.path.join(out_dir, "passk.json"), "md": os.path.join(out_dir, "passk.md")}
    with open(files["json"], "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)  # int keys (budgets, k) become strings
    with open(files["md"], "w", encoding="utf-8") as f:
        f.write(markdown_table(summary))
    ks = default_ks(summary["samples"])
    for budget in summary["budgets"]:
        curves = {name: {k: per[budget]["pass_at_k"][k] for k in ks} for name, per in summary["models"].items()}
        files[f"png_{budget}"] = plot_pass_at_k(curves, os.path.join(out_dir, f"passk_{budget}.png"),
                                                title=f"pass@k, budget {budget} tokens ({summary['kind']}, "
                                                      f"{summary['num_problems']} problems)")
    return files


# ---------------------------------------------------------------------------------------------
# The job

def _check_eval(config) -> None:
    e = config.eval
    if not e.problems:
        raise ValueError("config.eval.problems is empty: give the evaluation problems (a .jsonl / .parquet "
                         "file or a save_to_disk directory).")
    if e.kind not in KINDS:
        raise ValueError(f"config.eval.kind={e.kind!r}: choose one of {KINDS}.")
    if e.prompt != "student":
        raise ValueError(f"config.eval.prompt={e.prompt!r}: only 'student' (the student template, "
                         "config.prompts.student) can be rendered without an expert solution.")
    if not (isinstance(e.samples, int) and e.samples >= 1):
        raise ValueError(f"config.eval.samples={e.samples!r} must be an integer >= 1.")
    budgets = tuple(e.budgets)
    if not budgets or any(not isinstance(b, int) or b < 1 for b in budgets):
        raise ValueError(f"config.eval.budgets={budgets!r} must be one or more integers >= 1.")
    if not (isinstance(e.answer_tokens, int) and e.answer_tokens >= 1):
        raise ValueError(f"config.eval.answer_tokens={e.answer_tokens!r} must be an integer >= 1.")
    pp = e.presence_penalty
    if isinstance(pp, bool) or not isinstance(pp, (int, float)) or not -2.0 <= pp <= 2.0:
        raise ConfigError(f"config.eval.presence_penalty={pp!r} must be a number in [-2, 2] (vLLM's range; "
                          "0 = off; the authors evaluated with 1.5).")
    if not isinstance(e.thinking_end, str):
        raise ConfigError(f"config.eval.thinking_end={e.thinking_end!r} must be a string: the model's "
                          "end-of-thinking token (\"</think>\"), read when config.prompts.enable_thinking is on.")
    if not (isinstance(e.num_problems, int) and e.num_problems >= 0):
        raise ValueError(f"config.eval.num_problems={e.num_problems!r} must be an integer >= 0 (0 = all).")
    for pair in e.models:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(x, str) and x for x in pair)):
            raise ValueError(f"config.eval.models: {pair!r} is not a (name, path) pair of strings.")


def load_math_problems(path, *, problem_field: str, answer_field: str, split: str = "",
                       data_dir: str = "") -> list[Problem]:
    """Math problems with their reference answers (every one required), in file order."""
    problems = []
    for where, record in iter_records(path, split=split, data_dir=data_dir, setting="eval.problems"):
        if problem_field not in record:
            raise PromptDataError(f"{where}: no problem field {problem_field!r} (config.eval.problem_field); "
                                  f"this record has fields: {describe_fields(record)}.")
        text = record[problem_field]
        if not isinstance(text, str) or not text.strip():
            raise PromptDataError(f"{where}: problem field {problem_field!r} must be a non-empty string, got "
                                  f"{type(text).__name__} {str(text)[:40]!r}.")
        answer = record.get(answer_field)
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
            got = "missing" if answer_field not in record else f"{type(answer).__name__} {str(answer)[:40]!r}"
            raise PromptDataError(f"{where}: answer field {answer_field!r} (config.eval.answer_field) is {got}; "
                                  "every evaluation problem needs its reference answer (text or a number).")
        problems.append(Problem(prompt=text, answer=str(answer).strip(), index=len(problems), source=where,
                                record=record))
    if not problems:
        raise PromptDataError(f"Problem file {path} holds no records (config.eval.problems).")
    return problems


def load_eval_problems(config) -> list:
    e = config.eval
    if e.kind == "choice":
        problems = choice_lib.load_choice_problems(e.problems, question_field=e.problem_field,
                                                   choices_field=e.choices_field, answer_field=e.answer_field,
                                                   id_field=e.id_field, layout=e.choice_layout, split=e.split,
                                                   data_dir=config.data.data_dir)
    else:
        problems = load_math_problems(e.problems, problem_field=e.problem_field, answer_field=e.answer_field,
                                      split=e.split, data_dir=config.data.data_dir)
    return problems[:e.num_problems] if e.num_problems else problems


def encode_student_prompt(tokenizer, config, text: str, source: str = "") -> list[int]:
    """Token ids of the student context for a problem text (opdjax.dail.prompts renders it, and
    raises naming `source` when it is longer than config.data.max_prompt_tokens)."""
    return [int(i) for i in render_student_prompt(tokenizer, config.prompts, text,
                                                     max_prompt_tokens=config.data.max_prompt_tokens, record=source)]


def _model_source(section_or_path) -> tuple[str, str]:
    """('hf' | 'gguf', path) of config.model or of an eval.models path."""
    if isinstance(section_or_path, str):
        return ("gguf" if section_or_path.endswith(".gguf") else "hf"), section_or_path
    return ("gguf", section_or_path.gguf) if section_or_path.gguf else ("hf", section_or_path.path)


def _paths(source: tuple[str, str]) -> tuple[str, str]:
    """(path, gguf) arguments of opdjax.models.load for a (kind, path) source."""
    kind, path = source
    return ("", path) if kind == "gguf" else (path, "")


def _check_tokenizer(tokenizer, source: tuple[str, str], name: str, field: str) -> None:
    """An evaluated model must read the base model's token ids the same way."""
    kind, path = source
    if kind == "hf" and not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return  # no tokenizer files: it is read with the base model's
    other = model_tokenizer(*_paths(source))
    try:
        check_same_tokenizer(tokenizer, other, "model", name)
    except TokenizerMismatchError as e:
        raise ValueError(f"{field}: model {name!r} ({path}) has another tokenizer than config.model: {e}") from e


def evaluated_models(config, tokenizer) -> dict[str, tuple[str, str]]:
    """name -> (kind, path): base, trained (workdir/student_hf, when exported), eval.models."""
    models = {"base": _model_source(config.model)}
    if not models["base"][1]:
        raise ValueError("config.model.path (or config.model.gguf) is empty: the base model to evaluate.")
    trained = os.path.join(config.workdir, TRAINED_DIR)
    if os.path.isfile(os.path.join(trained, "config.json")):
        models["trained"] = ("hf", trained)
        _check_tokenizer(tokenizer, models["trained"], "trained", f"{trained}")
    else:
        log.info("no trained student at %s; evaluating without it", trained)
    for name, path in config.eval.models:
        if name in models:
            raise ValueError(f"config.eval.models: the name {name!r} is taken (base, trained and every name "
                             "must differ).")
        source = _model_source(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"config.eval.models: {name!r} -> {path} does not exist.")
        _check_tokenizer(tokenizer, source, name, "config.eval.models")
        models[name] = source
    return models


def run(config) -> dict:
    """The dail_eval job; returns the summary (also in workdir/eval/passk.json)."""
    t_start = time.perf_counter()
    _check_eval(config)
    e = config.eval
    tokenizer = load_tokenizer_for(config.model, "model")
    if config.prompts.enable_thinking and thinking_end_id(tokenizer, e.thinking_end) is None:
        raise ConfigError(f"config.eval.thinking_end={e.thinking_end!r} is not one token of config.model's "
                          "vocabulary, but config.prompts.enable_thinking is on: the thinking budget needs the "
                          "end-of-thinking token (\"</think>\" for Qwen3); or set prompts.enable_thinking=False "
                          "for a model without thinking tags.")
    problems = load_eval_problems(config)
    sources = evaluated_models(config, tokenizer)
    # every process evaluates the same models (a model seen by some processes only would part them)
    multihost.agree(sorted(sources.items()), "models to evaluate",
                    fix="every worker must see the same files (shared storage), e.g. workdir/student_hf")
    cfgs = {name: model_config(*_paths(src)) for name, src in sources.items()}
    plan = sharding.plan_from_config(config.mesh)
    aot_job.check_at_start(config, plan, "dail_eval")  # TPU: does the sampler fit? (before any weight)
    # called when each model's turn comes: one model's weights held at a time
    loaders = {name: functools.partial(load_model, *_paths(src), plan=plan, dtype=config.model.dtype)
               for name, src in sources.items()}
    log.info("dail_eval: %d %s problems x %d samples, budgets %s, models %s", len(problems), e.kind, e.samples,
             tuple(e.budgets), {n: p for n, (_, p) in sources.items()})

    # Choice problems are rendered from their shuffled options; the problem text is what the student
    # template receives either way.
    where = {}
    if e.kind == "math":
        where = {p.prompt: p.source for p in problems}
    else:
        for p in problems:
            shown, _ = choice_lib.shuffled(p, config.seed)
            where[choice_lib.choice_prompt(p.question, shown)] = p.source

    def prompt_ids_fn(text):
        return encode_student_prompt(tokenizer, config, text, where.get(text, ""))

    progress = metrics_lib.Progress(len(sources) * len(e.budgets), enabled=config.metrics.progress,
                                    min_interval_s=0.0)
    done = [0]

    def on_result(name, budget, entry):
        done[0] += 1
        tokens = round(entry["mean_total_tokens"] * len(problems) * e.samples)
        progress.update(done[0], tokens=tokens, extra={"model": name, "budget": budget, "pass@1": entry["accuracy"],
                                        f"pass@{e.samples}": entry["pass_at_k"][e.samples]})
        log.info("%s, budget %d: pass@1 %.3f, pass@%d %.3f, %.1f thinking tokens, %.0f%% forced (%.1f s)", name,
                 budget, entry["accuracy"], e.samples, entry["pass_at_k"][e.samples], entry["mean_thinking_tokens"],
                 100 * entry["forced_share"], entry["seconds"])

    with progress:
        summary = pass_at_k_curves(
            loaders, tokenizer, problems, prompt_ids_fn=prompt_ids_fn, kind=e.kind, samples=e.samples,
            budgets=tuple(e.budgets), temperature=float(e.temperature), top_p=float(e.top_p),
            presence_penalty=float(e.presence_penalty), thinking=bool(config.prompts.enable_thinking),
            thinking_end=e.thinking_end, forced_answer=e.forced_answer, answer_tokens=e.answer_tokens,
            stop_ids=stop_ids(tokenizer, cfgs.values()), key=jax.random.key(config.seed), plan=plan,
            shuffle_seed=config.seed, rows_per_call=int(e.rows_per_call), callback=on_result)
    summary["model_paths"] = {n: p for n, (_, p) in sources.items()}
    summary["seconds"] = time.perf_counter() - t_start
    if multihost.is_writer():
        summary["files"] = write_reports(summary, os.path.join(config.workdir, EVAL_DIR))
        log.info("wrote the pass@k reports %s", os.path.join(config.workdir, EVAL_DIR))
    multihost.sync("dail_eval_reports")  # the reports are on disk before any process goes on
    return summary
