"""DAIL's input: problems with expert solutions (config.data).

    load_expert_problems("problems.jsonl")            # or .jsonl.gz / .parquet
    load_expert_problems("saved_dataset_dir", split="train")

Sources: any that `opdjax.data.sources` opens (read by `opdjax.data.records.iter_records`): a JSON
Lines file (`.jsonl`, `.ndjson`, `.json` with one object per line, optionally `.gz`), a Parquet file,
ArrayRecord files, a directory written by Hugging Face `datasets`' `save_to_disk`, a prepared TFDS
directory or `tfds:NAME` under `data_dir`; local or gs://. `split` (config data.split, default
"train") is a TFDS split expression ("train[:90%]"); a single file has one split, whose name is only
a label.

Records. Every record needs
  - the problem field: a non-empty string;
  - the solution field: a non-empty string, or a non-empty list of non-empty strings (several
    expert solutions of one problem; they are joined into one reference later, see
    `opdjax.dail.prompts.join_solutions`);
  - the answer field, when `answer_field` is not "": present in every record (strict: a record
    without it is an error, since a mistyped field name would otherwise silently turn every problem
    into one without a checkable answer). Its value may be a string or a number (kept as its text,
    stripped; 32 -> "32"); null, NaN (pandas' missing value) or an empty string means this problem
    has no checkable answer, and its trace is then chosen at random. `answer_field=""` means no
    problem has one.
  - the id field, when `id_field` is not "": a non-empty string or an integer, unique across the
    file. With `id_field=""` the id is the record's position among the records ("0", "1", ...;
    blank JSONL lines are not records).
A record that breaks a rule is a `PromptDataError` naming the file, the line (JSONL, 1-based) or
row (Parquet and datasets directories, 0-based), the field and the config setting to change.
Nothing is skipped silently. `limit` > 0 reads (and checks) only the first `limit` records.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from opdjax.data.records import PromptDataError, describe_fields, iter_records

__all__ = ["ExpertProblem", "load_expert_problems", "PromptDataError"]


@dataclasses.dataclass(frozen=True)
class ExpertProblem:
    """One problem with its expert solution(s). `record` says where it came from, as errors name
    it: "path:18" (JSONL line 18) or "path:row 17" (Parquet / datasets directory row 17)."""
    id: str
    problem: str
    solutions: tuple[str, ...]
    answer: str | None
    record: str


# ---------------------------------------------------------------------------------------------
# Records

def _missing(where: str, what: str, field: str, setting: str, record: dict[str, Any]) -> PromptDataError:
    return PromptDataError(
        f"{where}: no {what} field {field!r}; this record has fields: {describe_fields(record)}. Set "
        f"{setting} to the field that holds the {what}, or add it to the record.")


def _problem(where, record, field) -> str:
    if field not in record:
        raise _missing(where, "problem", field, "data.problem_field (problem_field=)", record)
    value = record[field]
    if not isinstance(value, str):
        raise PromptDataError(f"{where}: problem field {field!r} is a {type(value).__name__}, not a "
                              "string. Store the problem statement as text.")
    if not value.strip():
        raise PromptDataError(f"{where}: problem field {field!r} is empty. Remove the record or give "
                              "it a problem.")
    return value


def _solutions(where, record, field) -> tuple[str, ...]:
    if field not in record:
        raise _missing(where, "solution", field, "data.solution_field (solution_field=)", record)
    value = record[field]
    if isinstance(value, str):
        if not value.strip():
            raise PromptDataError(f"{where}: solution field {field!r} is empty (or only whitespace). "
                                  "Every problem needs an expert solution; remove the record or add one.")
        return (value,)
    if isinstance(value, (list, tuple)):
        if not value:
            raise PromptDataError(f"{where}: solution field {field!r} is an empty list. Give at least "
                                  "one expert solution, or remove the record.")
        for i, s in enumerate(value):
            if not isinstance(s, str):
                raise PromptDataError(f"{where}: solution field {field!r}, item {i}, is a "
                                      f"{type(s).__name__}, not a string. Each solution must be text.")
            if not s.strip():
                raise PromptDataError(f"{where}: solution field {field!r}, item {i}, is empty (or only "
                                      "whitespace). Remove it from the list.")
        return tuple(value)
    raise PromptDataError(f"{where}: solution field {field!r} is a {type(value).__name__}; it must be a "
                          "string or a list of strings (several expert solutions).")


def _answer(where, record, field) -> str | None:
    if not field:
        return None
    if field not in record:
        raise PromptDataError(
            f"{where}: no answer field {field!r}; this record has fields: {describe_fields(record)}. "
            "Give every record the field (null for a problem without a checkable answer), set "
            "data.answer_field (answer_field=) to the field that holds the answer, or set it to '' if "
            "no problem has one.")
    value = record[field]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise PromptDataError(f"{where}: answer field {field!r} is a {type(value).__name__}, not a string "
                              "or number. Store the final answer as text (null for none).")
    if isinstance(value, float) and math.isnan(value):
        return None
    text = str(value).strip()
    return text or None


def _id(where, record, field, position: int) -> str:
    if not field:
        return str(position)
    if field not in record:
        raise _missing(where, "id", field, "data.id_field (id_field=, '' = the record's position)", record)
    value = record[field]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise PromptDataError(f"{where}: id field {field!r} is a {type(value).__name__}, not a string or "
                              "integer.")
    text = str(value)
    if not text.strip():
        raise PromptDataError(f"{where}: id field {field!r} is empty; every problem needs an id.")
    return text


def load_expert_problems(path: str | os.PathLike, *, id_field: str = "", problem_field: str = "problem",
                         solution_field: str = "solution", answer_field: str = "answer",
                         split: str = "train", limit: int = 0, data_dir: str = "") -> list[ExpertProblem]:
    """Every problem (the first `limit` when > 0) of a JSONL / Parquet file or a save_to_disk
    directory, in order; see the module docstring for the rules. Raises PromptDataError."""
    if not isinstance(limit, int) or limit < 0:
        raise ValueError(f"data.limit={limit!r} must be an integer >= 0 (0 = every problem).")
    records = iter_records(path, split=split, data_dir=data_dir, default_split="train", setting="data.problems")

    problems: list[ExpertProblem] = []
    seen: dict[str, str] = {}
    for where, record in records:
        if limit and len(problems) >= limit:
            break
        pid = _id(where, record, id_field, len(problems))
        if pid in seen:
            raise PromptDataError(f"{where}: id {pid!r} (field {id_field!r}) is also the id of {seen[pid]}; "
                                  "ids must be unique (data.id_field).")
        seen[pid] = where
        problems.append(ExpertProblem(
            id=pid, problem=_problem(where, record, problem_field),
            solutions=_solutions(where, record, solution_field),
            answer=_answer(where, record, answer_field), record=where))
    if not problems:
        raise PromptDataError(f"Problem source {path} holds no records.")
    return problems
