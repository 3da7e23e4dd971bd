"""Multiple-choice evaluation (GPQA-style): loading, shuffled options, the prompt, the letter
extractor and grading.

Sources. Any that `opdjax.data.sources` opens (JSON Lines, Parquet, save_to_disk, TFDS, ArrayRecord;
local or gs://); `split` in TFDS syntax, "" = the only split, else "test". Two record layouts:
  - "choices": a question field, a list of options (`choices_field`), and the answer
    (`answer_field`) given as the correct option's text, its letter ("C", "(C)", "C)"), or its
    0-based index (an integer);
  - "gpqa": GPQA's raw columns "Question", "Correct Answer", "Incorrect Answer 1" .. "3"
    (any number of "Incorrect Answer N" columns).
`layout="auto"` (the default) picks "gpqa" for a record that has no `choices_field` but has
"Correct Answer" and "Incorrect Answer 1". Every error names file:line (or row) and the field.

Shown order. GPQA stores the correct answer first; shown as stored, "A" would always be right.
`shuffled(problem, seed)` permutes the options with a generator seeded by (seed, a hash of the
problem's id and question), so the order is the same on every run and machine, differs between
problems, and does not depend on the problem's position in the file.

Extraction. `extract_choice` reads the letter a model chose, looking (after the last `</think>`,
as the math extractor does) for, in order: the last \\boxed{...} holding a letter
(\\boxed{C}, \\boxed{\\text{C}}, \\boxed{(C)}, \\boxed{C) 42}); the last answer phrase ("The answer
is (C)", "Answer: C", "the correct option is C", "**Answer:** C"); the last standalone option
letter ("(C)", "C)", or a bare "C" that is not an article or pronoun before a word). A boxed or
phrased letter always beats a stray capital in the prose.
"""
from __future__ import annotations

import dataclasses
import os
import re
import zlib
from typing import Any, Sequence

import numpy as np

from opdjax.data.grading import _last_boxed  # the same box parser the math grader uses
from opdjax.data.records import PromptDataError, describe_fields, iter_records

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LAYOUTS = ("auto", "choices", "gpqa")
GPQA_QUESTION = "Question"
GPQA_CORRECT = "Correct Answer"
GPQA_INCORRECT = "Incorrect Answer {}"


@dataclasses.dataclass(frozen=True)
class ChoiceProblem:
    id: str
    question: str
    choices: tuple[str, ...]  # as stored (not shuffled)
    correct: int  # index into `choices`
    source: str = ""  # file:line (JSONL), file:row N (Parquet / dataset)


# ---------------------------------------------------------------------------------------------
# Loading

def _as_text(value: Any, where: str, field: str, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise PromptDataError(f"{where}: field {field!r} ({what}) is a {type(value).__name__}, not text.")
    text = value if isinstance(value, str) else str(value)
    if not text.strip():
        raise PromptDataError(f"{where}: field {field!r} ({what}) is empty.")
    return text.strip()


def _letter_of(answer: str) -> str | None:
    m = re.fullmatch(r"\s*\(?\s*([A-Z])\s*[).:]?\s*", answer)
    return m.group(1) if m else None


def _correct_index(answer: Any, choices: Sequence[str], where: str, field: str) -> int:
    if isinstance(answer, (int, np.integer)) and not isinstance(answer, bool):
        if not 0 <= int(answer) < len(choices):
            raise PromptDataError(f"{where}: answer field {field!r} = {answer} is not a 0-based index "
                                  f"into the {len(choices)} options.")
        return int(answer)
    text = _as_text(answer, where, field, "the correct option's text or letter")
    norm = " ".join(text.split())
    matches = [i for i, c in enumerate(choices) if " ".join(c.split()) == norm]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise PromptDataError(f"{where}: answer field {field!r} = {text!r} matches options "
                              f"{[LETTERS[i] for i in matches]}; the options must differ.")
    letter = _letter_of(text)
    if letter is not None and LETTERS.index(letter) < len(choices):
        return LETTERS.index(letter)
    raise PromptDataError(
        f"{where}: answer field {field!r} = {text[:80]!r} is neither one of the {len(choices)} options' "
        f"text nor a letter A-{LETTERS[len(choices) - 1]}. Give the correct option's text or its letter.")


def _gpqa_record(where: str, record: dict, question_field: str, id_field: str, index: int) -> ChoiceProblem:
    qf = question_field if question_field in record else GPQA_QUESTION
    if qf not in record:
        raise PromptDataError(f"{where}: no question field {question_field!r} (nor {GPQA_QUESTION!r}); "
                              f"fields: {describe_fields(record)}.")
    question = _as_text(record[qf], where, qf, "the question")
    choices = [_as_text(record.get(GPQA_CORRECT), where, GPQA_CORRECT, "the correct option")]
    n = 1
    while GPQA_INCORRECT.format(n) in record:
        field = GPQA_INCORRECT.format(n)
        choices.append(_as_text(record[field], where, field, "an incorrect option"))
        n += 1
    if len(choices) < 2:
        raise PromptDataError(f"{where}: GPQA layout without any {GPQA_INCORRECT.format(1)!r} field.")
    _check_distinct(choices, where, GPQA_CORRECT + " / " + GPQA_INCORRECT.format("N"))
    return ChoiceProblem(_record_id(record, id_field, index, where), question, tuple(choices), 0, where)


def _check_distinct(choices: Sequence[str], where: str, field: str) -> None:
    norm = [" ".join(c.split()) for c in choices]
    dup = sorted({c for c in norm if norm.count(c) > 1})
    if dup:
        raise PromptDataError(f"{where}: field {field!r} has the option {dup[0][:60]!r} twice; "
                              "the options must differ.")


def _record_id(record: dict, id_field: str, index: int, where: str) -> str:
    if not id_field:
        return str(index)
    if id_field not in record or record[id_field] is None:
        raise PromptDataError(f"{where}: no id field {id_field!r}; fields: {describe_fields(record)}.")
    return str(record[id_field])


def load_choice_problems(path: str | os.PathLike, *, question_field: str = "question",
                         choices_field: str = "choices", answer_field: str = "answer",
                         id_field: str = "", layout: str = "auto", split: str = "",
                         data_dir: str = "") -> list[ChoiceProblem]:
    """Every multiple-choice problem of a file, in file order (see the module docstring).

    id_field: "" = the record's position (0-based) as its id. layout: auto | choices | gpqa.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: choose one of {LAYOUTS}")
    problems: list[ChoiceProblem] = []
    for where, record in iter_records(path, split=split, data_dir=data_dir, setting="eval.problems"):
        index = len(problems)
        is_gpqa = layout == "gpqa" or (layout == "auto" and choices_field not in record
                                       and GPQA_CORRECT in record and GPQA_INCORRECT.format(1) in record)
        if is_gpqa:
            problems.append(_gpqa_record(where, record, question_field, id_field, index))
            continue
        for field, what in ((question_field, "question"), (choices_field, "choices"), (answer_field, "answer")):
            if field not in record:
                hint = (" (GPQA's raw columns are read with layout='gpqa', or found by layout='auto')"
                        if field == choices_field else "")
                raise PromptDataError(f"{where}: no {what} field {field!r}; this record has fields: "
                                      f"{describe_fields(record)}{hint}.")
        question = _as_text(record[question_field], where, question_field, "the question")
        raw = record[choices_field]
        if isinstance(raw, np.ndarray):
            raw = raw.tolist()
        if not isinstance(raw, (list, tuple)) or len(raw) < 2:
            raise PromptDataError(f"{where}: choices field {choices_field!r} must be a list of at least 2 "
                                  f"options, got {type(raw).__name__}"
                                  f"{' of length ' + str(len(raw)) if isinstance(raw, (list, tuple)) else ''}.")
        if len(raw) > len(LETTERS):
            raise PromptDataError(f"{where}: choices field {choices_field!r} has {len(raw)} options; at most "
                                  f"{len(LETTERS)} can be lettered.")
        choices = [_as_text(c, where, f"{choices_field}[{i}]", "an option") for i, c in enumerate(raw)]
        _check_distinct(choices, where, choices_field)
        correct = _correct_index(record[answer_field], choices, where, answer_field)
        problems.append(ChoiceProblem(_record_id(record, id_field, index, where), question, tuple(choices),
                                      correct, where))
    if not problems:
        raise PromptDataError(f"Problem file {path} holds no records.")
    return problems


# ---------------------------------------------------------------------------------------------
# Shown order and prompt

def shuffled(problem: ChoiceProblem, seed: int = 0) -> tuple[tuple[str, ...], str]:
    """(the options in the order shown, the correct option's letter in that order).

    The permutation is drawn from (seed, crc32 of the problem's id and question): deterministic,
    different for each problem, independent of where the problem sits in the file."""
    h = zlib.crc32(f"{problem.id}\x00{problem.question}".encode("utf-8"))
    order = np.random.default_rng([int(seed), h]).permutation(len(problem.choices))
    shown = tuple(problem.choices[i] for i in order)
    return shown, LETTERS[int(np.flatnonzero(order == problem.correct)[0])]


def choice_prompt(question: str, choices: Sequence[str]) -> str:
    """The problem text of a multiple-choice question: the question, the lettered options, and how
    to answer (a single letter in \\boxed{})."""
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"choice_prompt: need 2..{len(LETTERS)} options, got {len(choices)}")
    letters = LETTERS[:len(choices)]
    options = "\n".join(f"{letter}) {c}" for letter, c in zip(letters, choices))
    valid = ", ".join(letters[:-1]) + f" or {letters[-1]}"
    return (f"{question.strip()}\n\n{options}\n\n"
            f"Exactly one option is correct. Reply with its letter ({valid}) as the final answer, "
            "written as \\boxed{X} with X the letter.")


# ---------------------------------------------------------------------------------------------
# Extraction and grading

_THINK_CLOSE = "</think>"
# Wrappers a letter may sit in inside a box: \text{C}, \textbf{C}, \mathrm{C}, \mathbf{C}, (C), C).
_WRAP_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}")
# "answer is (C)", "Answer: C", "final answer: **C**", "correct option is C", "answer choice (C)".
# A connector (is / : / = / would be) or an "option"/"choice"/"(" must follow the keyword, so
# "the answer I got" is not read as option I.
_PHRASE_RE = re.compile(
    r"(?:\banswer|\b(?:correct|right|best)\s+(?:option|choice|answer))"
    r"(?:\s*(?:is|:|=|would\s+be|should\s+be|must\s+be)\s*:?|\s+(?=(?:option|choice)\b)|\s*(?=[\[(]))"
    r"\s*(?:\*\*|__)?\s*(?:(?:option|choice)\s+)?[\[($]*\s*(?:\\text(?:bf)?\{)?([A-Z])(?![A-Za-z0-9'])",
    re.IGNORECASE)
# A standalone option letter: "(C)", "C)", "C.", or a bare C, with no letter/digit/backslash around.
_STANDALONE_RE = re.compile(r"(?<![A-Za-z0-9\\'])(\()?([A-Z])(\))?(?![A-Za-z0-9'])")


def _letter_in_box(content: str, valid: str) -> str | None:
    s = content.strip()
    for _ in range(3):  # unwrap \text{\textbf{C}} and the like
        s2 = _WRAP_RE.sub(r"\1", s).strip()
        if s2 == s:
            break
        s = s2
    s = s.strip("$ *")
    m = re.fullmatch(r"\(?\s*([A-Za-z])\s*(?:[).:]\s*.*)?", s, re.DOTALL)  # "C", "(C)", "C) 42", "C. text"
    if m and m.group(1).upper() in valid:
        return m.group(1).upper()
    return None


def extract_choice(text: str, num_choices: int) -> str | None:
    """The option letter a model chose, or None (see the module docstring for the order)."""
    if not text or num_choices < 1:
        return None
    valid = LETTERS[:num_choices]
    if _THINK_CLOSE in text:
        text = text.rsplit(_THINK_CLOSE, 1)[1]
    found, boxed = _last_boxed(text)
    if found and boxed is not None:
        letter = _letter_in_box(boxed, valid)
        if letter is not None:
            return letter
    for m in reversed(list(_PHRASE_RE.finditer(text))):
        letter = m.group(1).upper()
        # lower-case "a" only counts when marked as an option ("answer is (a)"), never the article
        if m.group(1).islower() and not re.search(r"[(\[]\s*$", text[:m.start(1)]):
            continue
        if letter in valid:
            return letter
    for m in reversed(list(_STANDALONE_RE.finditer(text))):
        opened, letter, closed = m.groups()
        if letter not in valid:
            continue
        if opened or closed:
            return letter
        after = text[m.end():]
        # "A cat", "I think": an article or pronoun before a word is not an answer.
        if re.match(r"\s+[a-z]", after) or re.match(r"\s*[,;]\s*[a-z]", after):
            continue
        return letter
    return None


def grade_choice(texts: Sequence[str], letters: Sequence[str], num_choices: int | Sequence[int] = 4) -> np.ndarray:
    """Whether each text chose its correct letter; bool array of len(texts)."""
    if len(texts) != len(letters):
        raise ValueError(f"grade_choice: {len(texts)} texts but {len(letters)} letters")
    counts = [int(num_choices)] * len(texts) if np.isscalar(num_choices) else [int(n) for n in num_choices]
    if len(counts) != len(texts):
        raise ValueError(f"grade_choice: {len(texts)} texts but {len(counts)} option counts")
    return np.array([extract_choice(t, n) == str(g).strip().upper() for t, g, n in zip(texts, letters, counts)],
                    dtype=bool)
