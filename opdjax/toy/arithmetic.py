"""The embedded demo's synthetic task: multi-step arithmetic word problems with one sentence per
step, so that a weak model can be right early and go off course late in its answer.

    prompt   "Start with 7. Add 5, then multiply by 3, then subtract 4. What is the result?"
    solution "We start with 7. Adding 5 to 7 gives 12. Multiplying 12 by 3 gives 36.
              Subtracting 4 from 36 gives 32. The answer is 32."
    answer   "32"

Design (all deterministic given the seed):
- start value 2..12, then 3..6 operations: add 2..9, subtract 2..9 (never below 0), multiply by
  2..4, never the same operation twice in a row, and never past MAX_VALUE = 99: every value is in
  [0, 99], at most two digits, so a 4-layer model can learn the arithmetic in minutes on a CPU.
- Values tend to grow along the chain (multiplications compound), so later sentences carry
  bigger numbers and more carries: the easy steps come first, the hard ones last. A weak model
  also has to find the k-th operation in the prompt for step k, which gets harder further in.
- The split is a stable hash of the prompt text: a problem is "eval" iff crc32(prompt) % 8 == 0,
  so train and eval never share a prompt, whatever the seeds. Within one `make_problems` list
  prompts are unique.

Sentence/step numbering (used by `first_wrong_step` and `solution_steps`): sentence 0 is
"We start with N.", sentence i (1..k) is the i-th operation, sentence k+1 is "The answer is N.".
"""
from __future__ import annotations

import json
import os
import re
import zlib
from typing import Any, Iterable

import numpy as np

MIN_START, MAX_START = 2, 12
MIN_OPS, MAX_OPS = 3, 6
MAX_VALUE = 99
ADD_RANGE = (2, 9)
SUB_RANGE = (2, 9)
MUL_RANGE = (2, 4)
EVAL_MODULUS = 8  # 1 prompt in 8 belongs to the eval split

SPLITS = ("train", "eval")
_ANSWER_RE = re.compile(r"The answer is (-?\d+)\.")
_SENTENCE_SPLIT = re.compile(r"(?<=[.?!])\s+")

Problem = dict[str, Any]


def split_of(prompt: str) -> str:
    """'eval' or 'train' for a prompt (a stable hash of its text, not of any seed)."""
    return "eval" if zlib.crc32(prompt.encode()) % EVAL_MODULUS == 0 else "train"


def _op_prompt(op: str, arg: int) -> str:
    return {"add": f"add {arg}", "sub": f"subtract {arg}", "mul": f"multiply by {arg}"}[op]


def _op_sentence(op: str, arg: int, before: int, after: int) -> str:
    if op == "add":
        return f"Adding {arg} to {before} gives {after}."
    if op == "sub":
        return f"Subtracting {arg} from {before} gives {after}."
    return f"Multiplying {before} by {arg} gives {after}."


def _apply(op: str, arg: int, v: int) -> int:
    return v + arg if op == "add" else v - arg if op == "sub" else v * arg


def render_problem(start: int, ops: list[tuple[str, int]]) -> Problem:
    """The problem dict for a start value and a list of (op, arg), op in {"add", "sub", "mul"}.

    Keys: prompt, solution, answer (str), start, ops (list of [op, arg]), values (the value after
    each operation), steps (the solution's sentences, numbered as in the module docstring)."""
    parts = [_op_prompt(op, a) for op, a in ops]
    body = parts[0][0].upper() + parts[0][1:] + "".join(f", then {p}" for p in parts[1:])
    prompt = f"Start with {start}. {body}. What is the result?"
    steps = [f"We start with {start}."]
    values, v = [], start
    for op, a in ops:
        nv = _apply(op, a, v)
        steps.append(_op_sentence(op, a, v, nv))
        values.append(nv)
        v = nv
    steps.append(f"The answer is {v}.")
    return {"prompt": prompt, "solution": " ".join(steps), "answer": str(v), "start": start,
            "ops": [[op, a] for op, a in ops], "values": values, "steps": steps}


def _random_problem(rng: np.random.Generator) -> Problem:
    start = int(rng.integers(MIN_START, MAX_START + 1))
    n_ops = int(rng.integers(MIN_OPS, MAX_OPS + 1))
    v, ops = start, []
    while len(ops) < n_ops:
        op = ("add", "sub", "mul")[int(rng.integers(3))]
        lo, hi = {"add": ADD_RANGE, "sub": SUB_RANGE, "mul": MUL_RANGE}[op]
        a = int(rng.integers(lo, hi + 1))
        if op == "sub" and v - a < 0:
            continue
        if (op == "add" and v + a > MAX_VALUE) or (op == "mul" and v * a > MAX_VALUE):
            continue
        if ops and ops[-1][0] == op:  # no two same operations in a row: more varied chains
            continue
        ops.append((op, a))
        v = _apply(op, a, v)
    return render_problem(start, ops)


def make_problems(n: int, seed: int = 0, split: str = "train") -> list[Problem]:
    """`n` distinct problems of `split` ("train" or "eval"), deterministic in (n, seed, split):
    the first m of make_problems(n, ...) are make_problems(m, ...)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    rng = np.random.default_rng([int(seed), SPLITS.index(split)])
    out, seen = [], set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"could not draw {n} distinct {split} problems")
        p = _random_problem(rng)
        if p["prompt"] in seen or split_of(p["prompt"]) != split:
            continue
        seen.add(p["prompt"])
        out.append(p)
    return out


def extract_answer(text: str) -> str | None:
    """The N of the last "The answer is N." in `text` (normalized: no leading zeros), or None."""
    found = _ANSWER_RE.findall(text or "")
    return str(int(found[-1])) if found else None


def is_correct(text: str, answer: str | int) -> bool:
    got = extract_answer(text)
    return got is not None and got == str(int(answer))


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_SPLIT.split((text or "").strip()) if s]


def solution_steps(problem: Problem) -> list[str]:
    """The reference sentences: start, one per operation, the answer."""
    return list(problem["steps"]) if "steps" in problem else split_sentences(problem["solution"])


def first_wrong_step(text: str, problem: Problem) -> int | None:
    """Index of the first sentence of `text` that differs from the reference solution's sentence
    at the same index (0 = "We start with N.", i = the i-th operation, k+1 = the answer
    sentence); a missing sentence counts as wrong there, and extra text after a fully correct
    solution counts as wrong at index k+2. None when the text is exactly the reference solution
    (up to whitespace between sentences)."""
    ref = solution_steps(problem)
    got = split_sentences(text)
    for i, want in enumerate(ref):
        if i >= len(got) or got[i].strip() != want:
            return i
    return len(ref) if len(got) > len(ref) else None


def num_steps(problem: Problem) -> int:
    """Number of sentences of the reference solution (operations + 2)."""
    return len(solution_steps(problem))


def write_jsonl(problems: Iterable[Problem], path: str | os.PathLike) -> None:
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for p in problems:
            f.write(json.dumps(p, sort_keys=True) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[Problem]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
