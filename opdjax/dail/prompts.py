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
computed against it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

from opdjax.data.tokenizer import encode_chat, render_chat

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
    user_texts = {
        "student": fill(prompts.student, "prompts.student", problem=problem),
        "expert": fill(prompts.expert, "prompts.expert", problem=problem, solution=solution),
        "hint": fill(prompts.hint, "prompts.hint", problem=problem, hint=hint),
    }
    ids, texts = _render(tokenizer, prompts, user_texts, where, max_prompt_tokens)
    return Contexts(student=ids["student"], expert=ids["expert"], hint=ids["hint"],
                    texts=(texts["student"], texts["expert"], texts["hint"]))


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
