"""DAIL on the embedded toy task (`opdjax.toy.arithmetic`): the "didactic" expert solutions, the
three prompt templates, the landmarks hint and the demo's problem files.

A toy problem's full solution spells out every step ("We start with 7. Adding 5 to 7 gives 12.
Multiplying 12 by 3 gives 36. Subtracting 4 from 36 gives 32. The answer is 32."). The expert
solution DAIL starts from is *terse*: it groups the operations and writes down only some of the
values (`terse_solution`), the way a textbook skips the steps its author finds obvious:

    (7 + 5) x 3 = 36, 36 - 4 = 32. The answer is 32.

The model M of the toy demo (`opdjax.toy.dail_model`) was trained to solve the problem in the
student context and, better, to read numbers off such a reference in the expert context.

Templates (one user turn, thinking off, rendered by `render`; placeholders replaced by plain
`str.replace`, as `opdjax.dail.prompts.fill` does):

    TOY_STUDENT  "{problem}"                          exactly the shipped toy pair's prompt
    TOY_EXPERT   "Reference: {solution}\\n{problem}"
    TOY_HINT     "{hint}\\n{problem}"
    TOY_HINT_TEXT "Hint: the final answer is {answer}; intermediate results might include {landmarks}."

They are short on purpose: the toy tokenizer (345 byte-level BPE tokens learned on toy text) spells
most new words letter by letter. TOY_HINT_TEXT is the config's default `hint.text`
(`opdjax.dail.config.HINT_TEXT`), so the demo can keep that default.

`toy_hint` builds the hint from the problem's own intermediate values (a simple local builder).
The DAIL demo itself builds its hints with the general landmarks builder (`opdjax.dail.hints`)
from the terse solution, as for any dataset; M was trained on both kinds of landmark lists (see
`opdjax.toy.dail_model`), so either reads plausibly to it.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

from opdjax.toy import arithmetic
from opdjax.data.tokenizer import encode_chat

TOY_STUDENT = "{problem}"
TOY_EXPERT = "Reference: {solution}\n{problem}"
TOY_HINT = "{hint}\n{problem}"
TOY_HINT_TEXT = "Hint: the final answer is {answer}; intermediate results might include {landmarks}."
TOY_HINT_TEXT_NO_LANDMARKS = "Hint: the final answer is {answer}."

def _fill(template: str, **fields: str) -> str:
    """Plain substitution of the {name} placeholders of `template` (never str.format: other braces
    are kept), in one pass, so a value that itself contains "{solution}" is not substituted again."""
    if not fields:
        return template
    pattern = re.compile("|".join(re.escape("{" + name + "}") for name in fields))
    return pattern.sub(lambda m: fields[m.group(0)[1:-1]], template)


def shown_steps(num_ops: int, keep: int = 3) -> list[int]:
    """The operations (1-based) whose sentence the terse solution keeps: every `keep`-th and the last."""
    return sorted({j for j in range(keep, num_ops + 1, keep)} | {num_ops})


def terse_solution(problem: dict[str, Any], keep: int = 3) -> str:
    """The "didactic" expert solution of a toy problem: the full solution's sentences for every
    `keep`-th operation and the last one only, each skipped run marked "...", then the answer:

        start 7; +5, x3, -4, +9, x2  (keep=3)  ->
        "... Subtracting 4 from 36 gives 32. ... Multiplying 41 by 2 gives 82. The answer is 82."

    The start sentence and the other operations are left out, so the values after operations
    1, keep + 1, ... are never written (with >= 3 operations, at least the first one). A kept
    sentence is word for word the one a full solution has at that step, so a model that writes
    full solutions can read it off as it gets there. Deterministic: a function of (start, ops)
    only. It ends with the toy answer sentence "The answer is N.", which
    `opdjax.data.grading.extract_answer` and `arithmetic.extract_answer` read."""
    if not isinstance(keep, int) or keep < 2:
        raise ValueError(f"keep={keep!r}: a terse solution keeps one operation in `keep` >= 2")
    steps, k = arithmetic.solution_steps(problem), len(problem["ops"])
    if len(steps) != k + 2 or k < 1:
        raise ValueError(f"problem {problem.get('prompt')!r}: {k} operations but {len(steps)} sentences")
    parts, last = [], 0
    for j in shown_steps(k, keep):
        if j > last + 1:
            parts.append("...")
        parts.append(steps[j])
        last = j
    return " ".join(parts + [steps[-1]])


def hint_landmarks(problem: dict[str, Any], max_landmarks: int = 8) -> list[str]:
    """The intermediate values of a toy problem (the value after each operation but the last),
    in order, without repeats, at most `max_landmarks`."""
    out: list[str] = []
    for v in problem["values"][:-1]:
        if str(v) not in out:
            out.append(str(v))
    return out[:max_landmarks]


def toy_hint(problem: dict[str, Any], text: str = TOY_HINT_TEXT,
             text_no_landmarks: str = TOY_HINT_TEXT_NO_LANDMARKS,
             landmarks: list[str] | None = None) -> str:
    """The landmarks hint h(s) of a toy problem: "Hint: the final answer is 32; intermediate
    results might include 12, 36." (`landmarks` default: `hint_landmarks(problem)`)."""
    marks = hint_landmarks(problem) if landmarks is None else list(landmarks)
    answer = str(problem["answer"])
    if not marks:
        return _fill(text_no_landmarks, answer=answer)
    return _fill(text, answer=answer, landmarks=", ".join(marks))


def student_text(problem: dict[str, Any]) -> str:
    return _fill(TOY_STUDENT, problem=problem["prompt"])


def expert_text(problem: dict[str, Any], solution: str | None = None) -> str:
    """The expert context's user turn; `solution` default: the terse solution."""
    return _fill(TOY_EXPERT, problem=problem["prompt"],
                 solution=terse_solution(problem) if solution is None else solution)


def hint_text(problem: dict[str, Any], hint: str | None = None) -> str:
    """The hint context's user turn; `hint` default: `toy_hint(problem)`."""
    return _fill(TOY_HINT, problem=problem["prompt"], hint=toy_hint(problem) if hint is None else hint)


def render(tok, text: str) -> list[int]:
    """Prompt ids of one user turn, thinking off, with the generation prompt (how every toy
    context is fed to the model)."""

    return encode_chat(tok, [{"role": "user", "content": text}], add_generation_prompt=True,
                       enable_thinking=False)


def demo_records(n: int, seed: int = 0, split: str = "train") -> list[dict[str, str]]:
    """DAIL problem records {id, problem, solution (terse), answer} of `arithmetic.make_problems`."""
    return [{"id": f"toy-{split}-{seed}-{i}", "problem": p["prompt"], "solution": terse_solution(p),
             "answer": str(p["answer"])}
            for i, p in enumerate(arithmetic.make_problems(n, seed, split))]


def write_demo_problems(path: str | os.PathLike, n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """Write `demo_records(n, seed, split)` as JSONL to `path` (the DAIL `data.problems` /
    `eval.problems` file of the toy demo) and return them."""
    records = demo_records(n, seed, split)
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return records
