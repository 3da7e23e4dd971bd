"""Prompt sets: problems from any record source, chat-encoding prompts, left padding.

Records. `ProblemSet` reads the problems of a source opened by `opdjax.data.sources` (JSON Lines,
Parquet, save_to_disk, TFDS, ArrayRecord; local or gs://) one record at a time, when it is asked
for. Each record must have a non-empty string prompt field; the answer field is optional unless
`required_answer=True`. A record that breaks a rule is an error naming the record (file and line
or row, or dataset, split and record index), the field, and what to do. Nothing is skipped
silently: only blank JSONL lines are, and they are not records. The order in which a run serves
the problems is `opdjax.data.pipeline`'s.

Encoding. `encode_prompts` renders every prompt through the chat template (optional system
message, then the user message, then the generation prompt) and raises, naming the record and its
token count, when a prompt exceeds `max_prompt_tokens`. A prompt is never truncated: a cut prompt
is a different problem, and the teacher would score the student against it.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import numpy as np

from opdjax.data.sources import PromptDataError, describe_fields, open_source
from opdjax.data.tokenizer import render_chat


@dataclasses.dataclass
class Problem:
    """One prompt-set record. `index` is its position among the loaded problems (0-based);
    `source` says where it came from (`file:line` for JSONL, `file:row N` for Parquet); `record`
    is the whole record, for fields other than prompt and answer."""
    prompt: str
    answer: str | None
    index: int
    source: str
    record: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Loading

def problem_from_record(where: str, record: dict[str, Any], index: int, *, prompt_field: str = "prompt",
                        answer_field: str = "answer", required_answer: bool = False) -> Problem:
    """One record as a Problem, checked: the prompt must be a non-empty string; the answer may be a
    string or a number (kept as its text, e.g. 32 -> "32"); a missing or null answer is None unless
    `required_answer`, which makes it an error. Every error names the record (`where`) and field."""
    if prompt_field not in record:
        raise PromptDataError(
            f"{where}: no prompt field {prompt_field!r}; this record has fields: "
            f"{describe_fields(record)}. Set data.prompt_field (prompt_field=) to the field that "
            "holds the prompt, or add it to the record.")
    prompt = record[prompt_field]
    if not isinstance(prompt, str):
        hint = (" If it holds chat messages, store the user message's text instead."
                if isinstance(prompt, (list, dict)) else "")
        raise PromptDataError(
            f"{where}: prompt field {prompt_field!r} is a {type(prompt).__name__}, not a "
            f"string.{hint} Each prompt must be the user message text.")
    if not prompt.strip():
        raise PromptDataError(
            f"{where}: prompt field {prompt_field!r} is empty. Remove the record or give it "
            "a prompt.")
    answer = record.get(answer_field)
    if answer is None:
        if required_answer:
            present = ("is null" if answer_field in record else
                       f"is missing (this record has fields: {describe_fields(record)})")
            raise PromptDataError(
                f"{where}: answer field {answer_field!r} {present}, and answers are required "
                "here (grading needs them). Set data.answer_field (answer_field=) to the field "
                "that holds the reference answer, or add it to the record.")
    elif isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise PromptDataError(
            f"{where}: answer field {answer_field!r} is a {type(answer).__name__}, not a "
            "string or number. Store the reference answer as text.")
    else:
        answer = answer if isinstance(answer, str) else str(answer)
    return Problem(prompt=prompt, answer=answer, index=index, source=where, record=record)


class ProblemSet(Sequence):
    """The problems of a record source, read and checked when one is asked for: a process that
    feeds some rows reads only those records (`opdjax.data.sources` opens any source)."""

    def __init__(self, source, *, prompt_field: str = "prompt", answer_field: str = "answer",
                 required_answer: bool = False):
        self.source = source
        self._fields = dict(prompt_field=prompt_field, answer_field=answer_field,
                            required_answer=required_answer)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        return problem_from_record(self.source.where(i), self.source[i], i, **self._fields)


def load_problems(path: str | os.PathLike, *, prompt_field: str = "prompt",
                  answer_field: str = "answer", required_answer: bool = False, split: str = "",
                  data_dir: str = "", setting: str = "data.train_file") -> list[Problem]:
    """Every problem of a source (JSONL / Parquet / save_to_disk / TFDS / ArrayRecord), in order,
    checked (see `problem_from_record`)."""
    source = open_source(path, split=split, data_dir=data_dir, setting=setting)
    return list(ProblemSet(source, prompt_field=prompt_field, answer_field=answer_field,
                           required_answer=required_answer))


# ---------------------------------------------------------------------------------------------
# Encoding

def _messages(prompt: str, system_prompt: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


def render_prompt(tokenizer, prompt: str, *, system_prompt: str = "",
                  enable_thinking: bool | None = None, chat_template: str | None = None) -> str:
    """The chat text of one prompt, ending with the assistant generation prompt. `chat_template`
    (a Jinja string) overrides the tokenizer's own, e.g. to render with the other model's."""

    messages = _messages(prompt, system_prompt)
    if chat_template is None:
        return render_chat(tokenizer, messages, add_generation_prompt=True,
                           enable_thinking=enable_thinking)
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=True, **extra)


def encode_prompts(tokenizer, problems: Sequence[Problem | str], *, system_prompt: str = "",
                   enable_thinking: bool | None = None, max_prompt_tokens: int,
                   chat_template: str | None = None) -> list[list[int]]:
    """Token ids of each chat-rendered prompt (the same ids as `tokenizer.encode_chat`).

    Raises PromptDataError naming every over-long record (up to 5 shown) with its token count;
    prompts are never truncated.
    """
    if not isinstance(max_prompt_tokens, (int, np.integer)) or max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be a positive integer, got {max_prompt_tokens!r}")
    texts, sources = [], []
    for i, p in enumerate(problems):
        prompt, source = (p.prompt, p.source) if isinstance(p, Problem) else (p, f"prompt #{i}")
        texts.append(render_prompt(tokenizer, prompt, system_prompt=system_prompt,
                                   enable_thinking=enable_thinking, chat_template=chat_template))
        sources.append(source)
    if not texts:
        return []
    # The template writes every special token itself: no BOS/EOS added on top (as encode_chat).
    ids = [list(map(int, row)) for row in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    too_long = [(s, len(row)) for s, row in zip(sources, ids) if len(row) > max_prompt_tokens]
    if too_long:
        shown = "; ".join(f"{s} has {n} tokens" for s, n in too_long[:5])
        more = f" (and {len(too_long) - 5} more)" if len(too_long) > 5 else ""
        longest = max(n for _, n in too_long)
        raise PromptDataError(
            f"{len(too_long)} of {len(ids)} prompts exceed data.max_prompt_tokens="
            f"{max_prompt_tokens} after chat rendering: {shown}{more}. Either raise "
            f"data.max_prompt_tokens or shorten the prompt (data.max_prompt_tokens={longest} fits "
            "them all); prompts are never truncated.")
    return ids


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, length: int | None = None,
             multiple_of: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token rows so every prompt ends at the same column.

    Returns (tokens [B, P] int32, mask [B, P] bool, True on real tokens). P is `length` if given
    (an error if a row is longer), else the longest row, rounded up to a multiple of `multiple_of`.
    """
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    longest = max((len(r) for r in rows), default=0)
    if length is None:
        length = longest
    elif longest > length:
        i = next(i for i, r in enumerate(rows) if len(r) == longest)
        raise ValueError(f"row {i} has {longest} tokens, more than the padded length {length}")
    length = int(math.ceil(length / multiple_of) * multiple_of)
    tokens = np.full((len(rows), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), length), dtype=bool)
    for i, row in enumerate(rows):
        if len(row):
            tokens[i, length - len(row):] = np.asarray(row, dtype=np.int32)
            mask[i, length - len(row):] = True
    return tokens, mask
