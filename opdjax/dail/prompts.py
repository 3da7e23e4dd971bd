"""DAIL's three contexts (DAIL.md): the prompts the same model M sees as student, as expert and
as hinted reference, rendered with the checkpoint's chat template.

    student  the problem alone                        -> pi_theta, and the P of synthesis
    expert   the problem + the expert solution(s)     -> positive reference, the V of synthesis
    hint     the problem + the landmarks hint h(s)    -> negative reference

The three contexts are followed by the same response tokens, so each must be a complete prompt
that ends with the chat template's generation prompt: the response is then the assistant turn in
all three, and position t of the response means the same token everywhere.

Templates are filled by plain one-pass substitution (`fill`), never `str.format`: problems and
solutions are LaTeX (`\\frac{1}{2}`, `\\boxed{answer}`), and a solution that happens to contain
the text `{problem}` must reach the model as written, not be substituted again.

A context longer than `data.max_prompt_tokens` is an error naming the record: a truncated
context is a different problem (or a reference cut mid-solution), and both KL terms would be
computed against it. One exception, the authors' (their build_expert_prompt): with
`prompts.reference_cut = "solution_marker"` an expert context over the limit loses its trailing
solutions, whole ones, until it fits (`cut_reference`); the cut is logged per record and returned
in `Contexts.reference_cut` (synthesis stores it with the trace). If even the first solution alone
is too long, the usual error.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Iterable

from opdjax.dail.config import REFERENCE_CUTS
from opdjax.data.tokenizer import encode_chat, render_chat

log = logging.getLogger(__name__)

# The placeholders each context template must contain; no template may contain the others'
# (a {solution} in the student template would leak the reference, and an unfilled one would reach
# the model as literal text).
REQUIRED = {"student": ("problem",), "expert": ("problem", "solution"), "hint": ("problem", "hint")}
PLACEHOLDERS = ("problem", "solution", "hint")

# What to shorten when a context is too long, by context.
_SHORTEN = {
    "student": "shorten the problem",
    "expert": "shorten the reference solution(s)",
    "hint": "shorten the problem or the hint (config.hint.max_landmarks)",
}


def _config_name(field: str) -> str:
    return field if field.startswith("config.") else f"config.{field}"


def _excerpt(text: str, limit: int = 80) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit - 3] + "...")


def fill(template: str, field: str, **values: str) -> str:
    """`template` with every `{name}` of the given names replaced by its value, in one pass.

    Other braces (LaTeX, or placeholders of names not given) are left untouched, and substituted
    values are never scanned again. `field` names the template in the config (e.g.
    "prompts.expert") for the error raised when a given name has no placeholder in it.
    """
    for name, value in values.items():
        if not isinstance(value, str):
            raise TypeError(f"fill({field}): value of {{{name}}} must be a str, got "
                            f"{type(value).__name__}")
        if "{" + name + "}" not in template:
            raise ValueError(f"{_config_name(field)} has no {{{name}}} placeholder: "
                             f"{_excerpt(template)}. Put {{{name}}} where the {name} goes.")
    if not values:
        return template
    pattern = re.compile(r"\{(" + "|".join(map(re.escape, values)) + r")\}")
    return pattern.sub(lambda m: values[m.group(1)], template)


def _check_template(prompts: Any, context: str) -> None:
    field = f"config.prompts.{context}"
    template = getattr(prompts, context)
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"{field} is empty: it must be a prompt template containing "
                         + " and ".join("{" + n + "}" for n in REQUIRED[context]) + ".")
    for name in REQUIRED[context]:
        if "{" + name + "}" not in template:
            raise ValueError(f"{field} has no {{{name}}} placeholder: {_excerpt(template)}")
    for name in PLACEHOLDERS:
        if name not in REQUIRED[context] and "{" + name + "}" in template:
            allowed = " and ".join("{" + n + "}" for n in REQUIRED[context])
            raise ValueError(f"{field} has a {{{name}}} placeholder, but the {context} context is "
                             f"filled with {allowed} only: remove {{{name}}} from it.")


def check_templates(prompts: Any) -> None:
    """Raise ValueError naming the config field when the `prompts` section cannot render the
    three contexts: an empty template, a missing or foreign placeholder, a bad setting."""
    for context in REQUIRED:
        _check_template(prompts, context)
    _check_settings(prompts)


def _check_settings(prompts: Any) -> None:
    if not isinstance(prompts.system, str):
        raise ValueError(f"config.prompts.system must be a string (\"\" = no system turn), got "
                         f"{prompts.system!r}")
    if not isinstance(prompts.enable_thinking, bool):
        raise ValueError(f"config.prompts.enable_thinking must be true or false, got "
                         f"{prompts.enable_thinking!r}")
    if not isinstance(prompts.solution_separator, str):
        raise ValueError(f"config.prompts.solution_separator must be a string, got "
                         f"{prompts.solution_separator!r}")
    if getattr(prompts, "reference_cut", "none") not in REFERENCE_CUTS:
        raise ValueError(f"config.prompts.reference_cut={prompts.reference_cut!r}: choose one of "
                         f"{REFERENCE_CUTS} (solution_marker = drop trailing solutions of an over-long "
                         "expert context, the authors' cut; none = an error).")


def join_solutions(solutions: str | Iterable[str], separator: str) -> str:
    """One reference text from one or several expert solutions, each stripped of surrounding
    whitespace, joined by `separator`. An empty solution (or none) is a ValueError: the expert
    context would then be the student's with extra instructions."""
    items = [solutions] if isinstance(solutions, str) else list(solutions)
    if not items:
        raise ValueError("no expert solution (an empty list)")
    for i, s in enumerate(items):
        what = "the expert solution" if len(items) == 1 else f"expert solution #{i}"
        if not isinstance(s, str):
            raise ValueError(f"{what} is not a string (got {type(s).__name__})")
        if not s.strip():
            raise ValueError(f"{what} is empty")
    return separator.join(s.strip() for s in items)


@dataclass(frozen=True)
class Contexts:
    """Token ids of the three rendered contexts, each ending with the generation prompt, and
    `texts`: the chat-rendered strings they encode (student, expert, hint)."""
    student: list[int]
    expert: list[int]
    hint: list[int]
    texts: tuple[str, str, str] = ("", "", "")
    # None, or how prompts.reference_cut shortened the reference (`cut_reference`): solutions_kept,
    # solutions, chars_dropped, tokens_before, tokens_after (of the expert context)
    reference_cut: dict | None = None


def _messages(prompts: Any, user_text: str) -> list[dict[str, str]]:
    system = [{"role": "system", "content": prompts.system}] if prompts.system else []
    return system + [{"role": "user", "content": user_text}]


def _require_text(value: Any, what: str, where: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{where}: the {what} is not a string (got {type(value).__name__})")
    if not value.strip():
        raise ValueError(f"{where}: the {what} is empty")


def _render(tokenizer, prompts: Any, user_texts: dict[str, str], where: str, limit: int
            ) -> tuple[dict[str, list[int]], dict[str, str]]:
    """(ids, texts) per context; ValueError naming `where` and every context over the limit."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"config.data.max_prompt_tokens must be a positive integer, got {limit!r}")
    messages = {k: _messages(prompts, u) for k, u in user_texts.items()}
    kwargs = dict(add_generation_prompt=True, enable_thinking=prompts.enable_thinking)
    ids = {k: list(encode_chat(tokenizer, m, **kwargs)) for k, m in messages.items()}
    too_long = [k for k in ids if len(ids[k]) > limit]
    if too_long:
        raise ValueError("; ".join(
            f"{where}: {k} context is {len(ids[k])} tokens > config.data.max_prompt_tokens="
            f"{limit}: {_SHORTEN[k]} or raise the limit" for k in too_long)
            + " (contexts are never truncated)")
    texts = {k: render_chat(tokenizer, m, **kwargs) for k, m in messages.items()}
    return ids, texts


def render_contexts(tokenizer, prompts: Any, problem: str, solutions: str | Iterable[str],
                    hint: str, *, max_prompt_tokens: int, record: str = "") -> Contexts:
    """The student, expert and hint contexts of one problem: each one user turn (after a system
    turn when `prompts.system` is set) with the generation prompt, thinking switched by
    `prompts.enable_thinking`. `record` names the problem in errors (e.g. "problem id 17
    (problems.jsonl line 18)")."""
    check_templates(prompts)
    where = record or "this problem"
    _require_text(problem, "problem", where)
    _require_text(hint, "hint", where)
    try:
        solution = join_solutions(solutions, prompts.solution_separator)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    cut = None
    if getattr(prompts, "reference_cut", "none") == "solution_marker":
        solution, cut = cut_reference(tokenizer, prompts, problem, solutions, max_prompt_tokens)
    user_texts = {
        "student": fill(prompts.student, "prompts.student", problem=problem),
        "expert": fill(prompts.expert, "prompts.expert", problem=problem, solution=solution),
        "hint": fill(prompts.hint, "prompts.hint", problem=problem, hint=hint),
    }
    try:
        ids, texts = _render(tokenizer, prompts, user_texts, where, max_prompt_tokens)
    except ValueError as e:
        if cut is None or cut["tokens_after"] <= max_prompt_tokens:
            raise
        raise ValueError(f"{e}; prompts.reference_cut=solution_marker cut the reference to its first "
                         f"solution ({cut['solutions']} found) and it is still too long") from None
    if cut is not None:
        log.warning("%s: expert context of %d tokens > config.data.max_prompt_tokens=%d: reference cut "
                    "to its first %d of %d solutions (%d characters dropped; prompts.reference_cut="
                    "solution_marker)", where, cut["tokens_before"], max_prompt_tokens, cut["solutions_kept"],
                    cut["solutions"], cut["chars_dropped"])
    return Contexts(student=ids["student"], expert=ids["expert"], hint=ids["hint"],
                    texts=(texts["student"], texts["expert"], texts["hint"]), reference_cut=cut)


# The authors' marker of one of several solutions in a reference text ("Solution 2: ...").
SOLUTION_MARKER = re.compile(r"Solution \d+:")


def reference_prefixes(solutions: str | Iterable[str], separator: str) -> tuple[str, list[str]]:
    """(the joined reference, its shorter references): the whole solutions it starts with, from
    the longest to the shortest. A solution ends where the next one starts: at a "Solution N:"
    marker (the authors' marker; one at the very start is not a cut) or at the boundary between
    two items of a list of solutions; the separator and surrounding whitespace are not kept."""
    text = join_solutions(solutions, separator)
    items = [solutions] if isinstance(solutions, str) else list(solutions)
    points, pos = set(), 0
    for item in items[:-1]:
        pos += len(item.strip())
        points.add(pos)
        pos += len(separator)
    points.update(m.start() for m in SOLUTION_MARKER.finditer(text))
    sep = separator.strip()
    prefixes = set()
    for point in points:
        kept = text[:point].rstrip()
        if sep and kept.endswith(sep):  # a marker right after the separator: the same cut
            kept = kept[:-len(sep)].rstrip()
        if kept:
            prefixes.add(kept)
    return text, sorted(prefixes, key=len, reverse=True)


def cut_reference(tokenizer, prompts: Any, problem: str, solutions: str | Iterable[str], limit: int
                  ) -> tuple[str, dict | None]:
    """prompts.reference_cut="solution_marker": (the reference to use, None or what was cut). While
    the rendered expert context is over `limit` tokens, the last solution is dropped (the authors'
    build_expert_prompt: cut at the last "Solution N:" marker, repeated). When even the first
    solution alone is over, the shortest reference is returned (the caller's length check then
    raises)."""
    text, shorter = reference_prefixes(solutions, prompts.solution_separator)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        return text, None  # the caller's length check names the bad limit

    def tokens(reference: str) -> int:
        user = fill(prompts.expert, "prompts.expert", problem=problem, solution=reference)
        return len(encode_chat(tokenizer, _messages(prompts, user), add_generation_prompt=True,
                               enable_thinking=prompts.enable_thinking))

    before = tokens(text)
    if before <= limit or not shorter:
        return text, None
    kept, after = shorter[-1], None
    for reference in shorter:  # longest first: drop one trailing solution at a time
        after = tokens(reference)
        if after <= limit:
            kept = reference
            break
    return kept, {"solutions_kept": len(shorter) - shorter.index(kept), "solutions": len(shorter) + 1,
                  "chars_dropped": len(text) - len(kept), "tokens_before": before, "tokens_after": after}


def render_student_prompt(tokenizer, prompts: Any, problem: str, *, max_prompt_tokens: int,
                          record: str = "") -> list[int]:
    """The student context alone (what evaluation prompts with), under the same rules."""
    _check_template(prompts, "student")
    _check_settings(prompts)
    where = record or "this problem"
    _require_text(problem, "problem", where)
    user = fill(prompts.student, "prompts.student", problem=problem)
    ids, _ = _render(tokenizer, prompts, {"student": user}, where, max_prompt_tokens)
    return ids["student"]


# ----------------------------------------------------------------------------- settings of the traces
# Training re-renders the three contexts of every trace from its record; they must be the contexts
# synthesis rendered, or the KL terms compare other prompts than the ones the trace was written under.
# Synthesis stores the rendering settings beside its output (`<traces>.settings.json`), training
# compares them with its own (`check_context_settings`).

SETTINGS_FORMAT = 1


def settings_path(traces_path: str) -> str:
    """The settings file of a traces file: traces.jsonl -> traces.settings.json."""
    base = traces_path[:-len(".jsonl")] if traces_path.endswith(".jsonl") else traces_path
    return base + ".settings.json"


def tokenizer_sha256(tokenizer) -> str:
    """sha256 of what decides how text becomes ids: vocabulary, merges, added and special tokens and
    the chat template (opdjax.data.tokenizer.tokenizer_fingerprint)."""
    import hashlib
    import json

    from opdjax.data.tokenizer import tokenizer_fingerprint
    blob = json.dumps(tokenizer_fingerprint(tokenizer), sort_keys=True, ensure_ascii=False, default=list)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def rendered_context_settings(config, tokenizer) -> dict:
    """What decides the rendered contexts of a trace: every config.prompts field (the three
    templates, system prompt, enable_thinking, solution separator, ...) and the tokenizer's sha256
    ("compared": training must have the same), and the hint settings ("recorded": synthesis renders
    each hint once and stores its text in the trace record, which training reads, so a training
    config's hint.* never reaches the model and is not compared)."""
    compared = {f"prompts.{k}": _plain(v) for k, v in sorted(config.prompts.items())}
    compared["tokenizer.sha256"] = tokenizer_sha256(tokenizer)
    recorded = {f"hint.{k}": _plain(v) for k, v in sorted(config.hint.items())}
    return {"format": SETTINGS_FORMAT, "compared": compared, "recorded": recorded}


def _differences(stored: dict, current: dict) -> list[str]:
    a, b = stored.get("compared", {}), current["compared"]
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            sa, sb = (repr(x.get(k, "<absent>")) for x in (a, b))
            short = lambda t: t if len(t) <= 120 else t[:117] + "..."  # noqa: E731
            out.append(f"{k}: synthesis {short(sa)} vs training {short(sb)}")
    return out


def write_context_settings(traces_path: str, settings: dict, *, write: bool, resumed: bool) -> None:
    """Synthesis: store `settings` beside its output, or check them against the stored ones when it
    resumes (a resumed run with other rendering settings would mix traces of two prompts: an error).
    `write`: this process writes (process 0); every process checks."""
    import json
    import logging
    import os

    path = settings_path(traces_path)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
        diff = _differences(stored, settings)
        if diff:
            raise ValueError(f"{traces_path} was synthesised with other rendering settings ({path}): "
                             + "; ".join(d.replace(" vs training ", " vs now ") for d in diff)
                             + ". Resuming would mix traces of two prompt settings: choose another "
                             "config.synthesis.output, or restore those settings.")
        if stored.get("recorded") == settings["recorded"]:
            return
    elif resumed:
        logging.getLogger(__name__).warning(
            "%s holds traces but no settings file %s (written by an older synthesis): the settings of this "
            "run are stored for all of them, unchecked", traces_path, path)
    if write:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=1, ensure_ascii=False)


def check_context_settings(traces_path: str, settings: dict, *, require: bool = True) -> None:
    """Training: refuse traces synthesised with other rendering settings (ConfigError naming each
    differing field, synthesis value vs training value, and the fix). Traces without a settings file
    (an older synthesis, or a dataset prepared from the traces): an error when `require`
    (config.train.require_context_settings), else a loud warning."""
    import json
    import logging
    import os

    from opdjax.errors import ConfigError
    path = settings_path(traces_path)
    if not os.path.isfile(path):
        msg = (f"{traces_path} has no settings file {path} (synthesis writes one beside its output; older "
               "ones did not, nor does a dataset prepared from the traces), so training cannot check that "
               "it renders the contexts the traces were synthesised under")
        if require:
            raise ConfigError(msg + ". Re-run the synthesis, copy its settings file beside the traces, or set "
                              "config.train.require_context_settings=False to train unchecked.")
        logging.getLogger(__name__).warning("UNCHECKED TRACES: %s; the config's prompts.* and tokenizer must be "
                                            "exactly those of the synthesis.", msg)
        return
    with open(path, encoding="utf-8") as f:
        stored = json.load(f)
    diff = _differences(stored, settings)
    if diff:
        raise ConfigError(f"the traces {traces_path} were synthesised with other rendering settings ({path}): "
                          + "; ".join(diff) + ". Set these config fields to the synthesis values (the "
                          "tokenizer: config.model must be the synthesis model), or re-synthesise with these.")
