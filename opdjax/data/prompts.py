"""Prompt sets: loading problem files, chat-encoding prompts, left padding, and a deterministic,
resumable stream of prompt batches.

Files. JSON Lines (`.jsonl`, `.ndjson`, `.json` holding one object per line; any of them may be
gzipped, `.gz`) and Parquet (`.parquet`, `.pq`; needs pyarrow), read by `opdjax.data.records`
(where `PromptDataError` is defined). Each record must have a non-empty string prompt field; the
answer field is optional unless `required_answer=True`. A record that breaks a rule is an error
naming the file, the line (JSONL, 1-based, as an editor counts) or row (Parquet, 0-based, as
pandas/pyarrow count), the field, and what to do. Nothing is skipped silently: only blank lines
are, and they are not records.

Encoding. `encode_prompts` renders every prompt through the chat template (optional system
message, then the user message, then the generation prompt) and raises, naming the record and its
token count, when a prompt exceeds `max_prompt_tokens`. A prompt is never truncated: a cut prompt
is a different problem, and the teacher would score the student against it.

Batching. `PromptStream` serves fixed-size batches of problem indices from a sequence of epochs,
each a fresh permutation drawn from (seed, epoch). Epoch boundary rule: the stream is the
concatenation of the epochs' permutations, cut into consecutive batches of `batch_size`, so a batch
may straddle two epochs (it ends epoch e and starts epoch e+1). Every batch has the same shape (one
jit compilation) and every problem is served exactly once per epoch; none is dropped at an epoch's
end. `batch_size > num_problems` is allowed: a batch then spans several epochs and holds some
problems more than once. Its state (epoch, position) is JSON-able, and a restored stream yields
exactly the batches the uninterrupted one would have.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from opdjax.data.records import PromptDataError, describe_fields, iter_file_records


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

def load_problems(path: str | os.PathLike, *, prompt_field: str = "prompt",
                  answer_field: str = "answer", required_answer: bool = False) -> list[Problem]:
    """Read every problem of a JSONL or Parquet file, in file order.

    The prompt must be a non-empty string. The answer may be a string or a number (kept as its
    text, e.g. 32 -> "32"); a missing or null answer is None unless `required_answer`, which makes
    it an error. Every error names the file, line/row and field.
    """
    path = Path(path)
    if not path.exists():
        raise PromptDataError(f"Prompt file {path} does not exist; check the path "
                              "(data.train_file / data.eval_file).")
    if path.is_dir():
        raise PromptDataError(
            f"Prompt file {path} is a directory. Give a .jsonl or .parquet file; a dataset saved "
            "with HF datasets' save_to_disk can be exported with ds.to_json('file.jsonl') or "
            "ds.to_parquet('file.parquet').")
    records = iter_file_records(path)

    problems: list[Problem] = []
    for where, record in records:
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
        problems.append(Problem(prompt=prompt, answer=answer, index=len(problems), source=where,
                                record=record))
    if not problems:
        raise PromptDataError(f"Prompt file {path} holds no records.")
    return problems


# ---------------------------------------------------------------------------------------------
# Encoding

def _messages(prompt: str, system_prompt: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


def render_prompt(tokenizer, prompt: str, *, system_prompt: str = "",
                  enable_thinking: bool | None = None, chat_template: str | None = None) -> str:
    """The chat text of one prompt, ending with the assistant generation prompt. `chat_template`
    (a Jinja string) overrides the tokenizer's own, e.g. to render with the other model's."""
    from opdjax.data.tokenizer import render_chat

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


# ---------------------------------------------------------------------------------------------
# Batching

class PromptStream:
    """Deterministic, resumable batches of problem indices, endlessly, epoch after epoch.

    Epoch e's order is `np.random.default_rng([seed, e]).permutation(num_problems)` (or 0..n-1
    when `shuffle=False`). Batches are consecutive slices of the concatenated epochs, so one may
    straddle an epoch boundary; see the module docstring. `state()` / `restore()` carry the
    position across a checkpoint.
    """

    def __init__(self, num_problems: int, batch_size: int, seed: int, shuffle: bool = True):
        if int(num_problems) < 1:
            raise ValueError(f"PromptStream needs at least one problem, got num_problems={num_problems}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.num_problems = int(num_problems)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0  # the epoch the next index comes from
        self.position = 0  # how many of that epoch's indices have been served
        self._order_epoch, self._order = -1, None

    def order(self, epoch: int) -> np.ndarray:
        """The problem indices of `epoch`, in serving order."""
        if epoch != self._order_epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_problems)
            else:
                self._order = np.arange(self.num_problems)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> np.ndarray:
        """The next `batch_size` problem indices (int64)."""
        parts, need = [], self.batch_size
        while need:
            order = self.order(self.epoch)
            take = min(need, self.num_problems - self.position)
            parts.append(order[self.position:self.position + take])
            self.position += take
            need -= take
            if self.position == self.num_problems:
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(parts).astype(np.int64)

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.next_batch()

    @property
    def epochs_done(self) -> float:
        """Fractional epochs served so far (for logging)."""
        return self.epoch + self.position / self.num_problems

    def state(self) -> dict[str, Any]:
        """JSON-able position; `restore` also checks that the stream it resumes is the same one."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_problems": self.num_problems, "shuffle": self.shuffle}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state()`. A different seed, problem count or shuffle setting would serve
        a different order, so it is an error; a different batch_size is fine (the position counts
        problems, not batches)."""
        for key in ("seed", "num_problems", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"Cannot resume the prompt stream: the checkpoint's stream had {key}="
                    f"{state[key]!r} but this one has {key}={getattr(self, key)!r}; resuming would "
                    "serve a different order of problems. Use the same prompt file and seed as the "
                    "checkpointed run.")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_problems:
            raise ValueError(f"Invalid prompt stream state {state!r}: need epoch >= 0 and "
                             f"0 <= position < num_problems={self.num_problems}")
        self.epoch, self.position = epoch, position
