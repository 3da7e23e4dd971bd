"""Generation under a thinking-token budget, with a forced final-answer continuation.

DAIL's evaluation as the authors ran it (their eval/eval.py, vLLM, `force_answer` on). For a
budget B every row first generates up to B tokens after its prompt (phase 1); B counts every token
generated there, the stop token included, as vLLM's max_tokens does. Then (phase 2) some rows are
*forced*: their phase-1 tokens, less a final stop token, are followed by `forced_answer` (ours by
default: "\n</think>\n\nThe final answer is \\boxed{", which closes the thinking and opens the
answer), and the model writes up to `answer_tokens` more tokens (the authors: 100). Which rows:

  thinking=True (a thinking model, prompts.enable_thinking; `thinking_end` = "</think>" must be one
    token of the vocabulary): phase 1 also stops at `thinking_end`, so B is the budget of the
    thinking part (its closing tag counted). EVERY row is then forced: the model's own `</think>`
    (or stop token) is dropped and `forced_answer` takes its place: the thinking is closed by the
    forced text, and the answer is always the forced continuation (the authors stop at "</think>"
    and append their forced text to every sample).
  thinking=False (Qwen2.5-Instruct, the toy models): the budget bounds the whole response; a row
    is forced when `has_answer(row, text)` is false for its phase-1 text (the authors: no
    "\\boxed{" in it; dail_eval passes the grader's own answer extractor); without `has_answer`,
    when it did not end with a stop token (ran out of budget).

`exhausted` marks the rows that ran out of budget (no stop token, no `</think>` within it), and
`thinking_tokens` is each row's phase-1 length (<= B).

A presence penalty (settings.presence_penalty, vLLM's definition) counts the tokens generated in
the current call: phase 2 is a new request whose prompt holds the thinking (the authors' second
`llm.chat` call on prompt + thinking + forced text), so its "already generated" set starts empty.

Two batched calls of the jitted sampler (`opdjax.rollout.sampler.sample`):
  1. every row: prompt -> up to `budget` tokens;
  2. the forced rows only: prompt + generated + forced text -> up to `answer_tokens` tokens.
Both run in fixed shapes: `rows_per_call` rows per call (the last chunk is filled with copies of
its last row, whose results are dropped) and a prompt length rounded up to `length_multiple`, so
one compilation serves every chunk, and every model of one architecture.

On a pod each process pads, feeds and reads back only the rows its devices hold
(`multihost.feeding_rows` / `from_local_rows` / `rows_of`); the generated ids are gathered (small
lists), so every process builds the same forced call, and the decoding is split across the
processes (`multihost.map_split`). Every process returns the whole result.

Randomness: chunk c of call 1 draws with fold_in(fold_in(key, 0), c), of call 2 with
fold_in(fold_in(key, 1), c). Results depend on the key, the rows and `rows_per_call`, so two models
evaluated with the same key and rows get the same random numbers (a paired comparison).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np

from opdjax import multihost
from opdjax.data.prompts import left_pad
from opdjax.rollout.sampler import SamplingSettings, sample

DEFAULT_FORCED_ANSWER = "\n</think>\n\nThe final answer is \\boxed{"


@dataclasses.dataclass
class BudgetResult:
    texts: list[str]  # per row: generated; forced rows: generated less its stop token + forced_answer + continuation
    token_ids: list[list[int]]  # the same, as ids (an unforced row's stop token included where it has one)
    forced: np.ndarray  # [rows] bool: got the forced answer continuation
    thinking_tokens: np.ndarray  # [rows] int: tokens generated within the budget (stop / </think> included)
    exhausted: np.ndarray  # [rows] bool: ran out of budget (no stop token, no </think> within it)


def _round_up(x: int, multiple: int) -> int:
    return -(-int(x) // multiple) * multiple


def _sample_rows(params, cfg, rows: Sequence[Sequence[int]], settings: SamplingSettings, key, *, plan,
                 pad_id: int, rows_per_call: int, length: int):
    """(ids, stopped) per row, on every process: the tokens `sample` generated after each row, in
    fixed-shape calls. Each process pads, feeds and reads back only the rows its devices hold
    (`multihost.feeding_rows` / `rows_of`); the (small) token lists are then gathered, so that
    every process can build the forced call and its share of the decoding."""
    out_ids, out_stopped = [], []
    stops = set(settings.stop_ids)
    names = ("batch", "length")
    shape = (rows_per_call, length)
    mine = multihost.feeding_rows(plan, shape, names)
    for chunk_index, start in enumerate(range(0, len(rows), rows_per_call)):
        n_real = min(rows_per_call, len(rows) - start)
        # fill the fixed batch with copies of the chunk's last row; their results are dropped
        members = [start + min(i, n_real - 1) for i in range(rows_per_call)]
        tok, mask = left_pad([list(rows[members[i]]) for i in mine], pad_id, length=length)
        r = sample(params, multihost.from_local_rows(plan, tok, names, shape),
                   multihost.from_local_rows(plan, mask, names, shape),
                   jax.random.fold_in(key, chunk_index), cfg, settings, pad_id=pad_id, plan=plan)
        toks, real = multihost.rows_of((r.tokens, r.mask), mine)
        got = {i: [int(t) for t in tk[m]] for i, tk, m in zip(mine.tolist(), toks, real) if i < n_real}
        merged = {i: ids for part in multihost.gather_objects(got) for i, ids in part.items()}
        for i in range(n_real):
            ids = merged[i]
            out_ids.append(ids)
            out_stopped.append(bool(ids) and ids[-1] in stops)
    return out_ids, out_stopped


def thinking_end_id(tokenizer, thinking_end: str) -> int | None:
    """The id of the end-of-thinking token, or None when `thinking_end` is "" or not one token of
    the vocabulary."""
    tid = tokenizer.get_vocab().get(thinking_end) if thinking_end else None
    return None if tid is None else int(tid)


def generate_with_budget(params, cfg, tokenizer, prompt_ids: Sequence[Sequence[int]], *, budget: int,
                         forced_answer: str = DEFAULT_FORCED_ANSWER, answer_tokens: int,
                         settings: SamplingSettings, key, plan=None, pad_id: int | None = None,
                         rows_per_call: int = 64, length_multiple: int = 32,
                         prompt_len: int | None = None, thinking: bool = False, thinking_end: str = "</think>",
                         has_answer: Callable[[int, str], bool] | None = None) -> BudgetResult:
    """Sample up to `budget` tokens after each prompt row, then force an answer where the rule of
    the module docstring says so.

    settings: temperature / top_p / top_k / presence_penalty / stop ids (its max_new_tokens is
      replaced by `budget`, then by `answer_tokens`; `candidates=1` is the cheapest, nothing here
      reads the top-K).
    prompt_ids: token ids of each rendered prompt (one row per sample: repeat a prompt n times
      for n samples).
    rows_per_call: rows per sampler call (rounded up to a multiple of the plan's batch shards).
    prompt_len: columns the prompts are left-padded to (default: the longest prompt, rounded up
      to `length_multiple`); the forced call pads to prompt_len + budget + len(forced ids), also
      rounded up.
    thinking / thinking_end: a thinking model and its end-of-thinking token (module docstring);
      thinking=True with a `thinking_end` that is not one token of the vocabulary is an error.
    has_answer(row, phase-1 text): thinking=False only; whether the row already holds an answer.
    """
    if not prompt_ids:
        return BudgetResult([], [], np.zeros((0,), bool), np.zeros((0,), np.int64), np.zeros((0,), bool))
    if not (isinstance(budget, (int, np.integer)) and budget >= 1):
        raise ValueError(f"budget={budget!r} must be an integer >= 1 (eval.budgets).")
    if not (isinstance(answer_tokens, (int, np.integer)) and answer_tokens >= 1):
        raise ValueError(f"answer_tokens={answer_tokens!r} must be an integer >= 1 (eval.answer_tokens).")
    if not settings.stop_ids:
        raise ValueError("settings.stop_ids is empty: without a stop token every row would be forced.")
    think_id = None
    if thinking:
        think_id = thinking_end_id(tokenizer, thinking_end)
        if think_id is None:
            raise ValueError(f"eval.thinking_end={thinking_end!r} is not one token of this vocabulary, but the "
                             "prompts enable thinking (config.prompts.enable_thinking): name the model's "
                             "end-of-thinking token, or switch thinking off.")
        if think_id in settings.stop_ids:
            raise ValueError(f"eval.thinking_end={thinking_end!r} (id {think_id}) is also a stop token.")
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (cfg.pad_token_id or 0)
    shards = plan.batch_shards if plan is not None else 1
    rows_per_call = max(shards, _round_up(min(int(rows_per_call), len(prompt_ids)), shards))
    longest = max(map(len, prompt_ids))
    P = _round_up(prompt_len if prompt_len is not None else longest, length_multiple)
    if longest > P:
        raise ValueError(f"a prompt has {longest} tokens, more than prompt_len={prompt_len}")

    ends = set(settings.stop_ids) | ({think_id} if think_id is not None else set())
    think = dataclasses.replace(settings, max_new_tokens=int(budget), stop_ids=tuple(sorted(ends)))
    gen, stopped = _sample_rows(params, cfg, prompt_ids, think, jax.random.fold_in(key, 0), plan=plan,
                                pad_id=pad_id, rows_per_call=rows_per_call, length=P)
    exhausted = np.array([not s for s in stopped], dtype=bool)
    thinking_tokens = np.array([len(g) for g in gen], dtype=np.int64)
    # what a forced row keeps of phase 1: its tokens less a final stop token / </think>
    kept = [g[:-1] if s else g for g, s in zip(gen, stopped)]
    if thinking:
        forced = np.ones(len(gen), bool)
    elif has_answer is None:
        forced = exhausted.copy()
    else:
        texts1 = multihost.map_split(lambda i: tokenizer.decode(gen[i], skip_special_tokens=True), range(len(gen)),
                                     "decoding the budgeted samples")
        forced = np.array([not has_answer(i, t) for i, t in enumerate(texts1)], dtype=bool)

    forced_ids = list(tokenizer.encode(forced_answer, add_special_tokens=False)) if forced_answer else []
    continuation: dict[int, list[int]] = {}
    forced_rows = np.flatnonzero(forced).tolist()
    if forced_rows:
        answer = dataclasses.replace(settings, max_new_tokens=int(answer_tokens))
        contexts = [list(prompt_ids[i]) + kept[i] + forced_ids for i in forced_rows]
        L = _round_up(P + int(budget) + len(forced_ids), length_multiple)
        cont, _ = _sample_rows(params, cfg, contexts, answer, jax.random.fold_in(key, 1), plan=plan,
                               pad_id=pad_id, rows_per_call=rows_per_call, length=L)
        continuation = dict(zip(forced_rows, cont))

    def finish(i):
        if i not in continuation:
            return tokenizer.decode(gen[i], skip_special_tokens=True), gen[i]
        # Decoded piece by piece, so the forced text appears verbatim (a joint decode could merge or
        # clean up spaces across the seams).
        text = (tokenizer.decode(kept[i], skip_special_tokens=True) + forced_answer
                + tokenizer.decode(continuation[i], skip_special_tokens=True))
        return text, kept[i] + forced_ids + continuation[i]

    # every process decodes its share of the rows; every process gets every text
    decoded = multihost.map_split(finish, range(len(gen)), "decoding the budgeted samples")
    texts, token_ids = [t for t, _ in decoded], [g for _, g in decoded]
    return BudgetResult(texts, token_ids, forced, thinking_tokens, exhausted)
