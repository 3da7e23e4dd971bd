"""Generation under a thinking-token budget, with a forced final-answer continuation.

DAIL's evaluation (DAIL.md, "Evaluation the authors used") gives every sample a budget of new
tokens. A sample that ends on its own (a stop token within the budget) is kept as it is. A sample
that runs out of budget is *forced*: a fixed text is appended that closes the reasoning and opens
the answer (by default "\\n</think>\\n\\nThe final answer is \\\\boxed{"), and the model writes up
to `answer_tokens` more tokens from there, so the grader still finds a boxed answer. Without the
forcing, every cut-off sample would count as wrong, and the budget would measure how often the
model finishes rather than what it knows after that much thinking.

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
from typing import Sequence

import jax
import numpy as np

from opdjax import multihost
from opdjax.data.prompts import left_pad
from opdjax.rollout.sampler import SamplingSettings, sample

DEFAULT_FORCED_ANSWER = "\n</think>\n\nThe final answer is \\boxed{"


@dataclasses.dataclass
class BudgetResult:
    texts: list[str]  # per row: generated (+ forced_answer + continuation for forced rows)
    token_ids: list[list[int]]  # the same, as ids (stop token included where there is one)
    forced: np.ndarray  # [rows] bool: ran out of budget and got the forced continuation
    thinking_tokens: np.ndarray  # [rows] int: tokens generated within the budget (stop token included)


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


def generate_with_budget(params, cfg, tokenizer, prompt_ids: Sequence[Sequence[int]], *, budget: int,
                         forced_answer: str = DEFAULT_FORCED_ANSWER, answer_tokens: int,
                         settings: SamplingSettings, key, plan=None, pad_id: int | None = None,
                         rows_per_call: int = 64, length_multiple: int = 32,
                         prompt_len: int | None = None) -> BudgetResult:
    """Sample up to `budget` tokens after each prompt row; force an answer where the budget ran out.

    settings: temperature / top_p / top_k / stop ids (its max_new_tokens is replaced by `budget`,
      then by `answer_tokens`; `candidates=1` is the cheapest, nothing here reads the top-K).
    prompt_ids: token ids of each rendered prompt (one row per sample: repeat a prompt n times
      for n samples).
    rows_per_call: rows per sampler call (rounded up to a multiple of the plan's batch shards).
    prompt_len: columns the prompts are left-padded to (default: the longest prompt, rounded up
      to `length_multiple`); the forced call pads to prompt_len + budget + len(forced ids), also
      rounded up.
    """
    if not prompt_ids:
        return BudgetResult([], [], np.zeros((0,), bool), np.zeros((0,), np.int64))
    if not (isinstance(budget, (int, np.integer)) and budget >= 1):
        raise ValueError(f"budget={budget!r} must be an integer >= 1 (eval.budgets).")
    if not (isinstance(answer_tokens, (int, np.integer)) and answer_tokens >= 1):
        raise ValueError(f"answer_tokens={answer_tokens!r} must be an integer >= 1 (eval.answer_tokens).")
    if not settings.stop_ids:
        raise ValueError("settings.stop_ids is empty: without a stop token every row would be forced.")
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (cfg.pad_token_id or 0)
    shards = plan.batch_shards if plan is not None else 1
    rows_per_call = max(shards, _round_up(min(int(rows_per_call), len(prompt_ids)), shards))
    longest = max(map(len, prompt_ids))
    P = _round_up(prompt_len if prompt_len is not None else longest, length_multiple)
    if longest > P:
        raise ValueError(f"a prompt has {longest} tokens, more than prompt_len={prompt_len}")

    think = dataclasses.replace(settings, max_new_tokens=int(budget))
    gen, stopped = _sample_rows(params, cfg, prompt_ids, think, jax.random.fold_in(key, 0), plan=plan,
                                pad_id=pad_id, rows_per_call=rows_per_call, length=P)
    forced = np.array([not s for s in stopped], dtype=bool)
    thinking_tokens = np.array([len(g) for g in gen], dtype=np.int64)

    forced_ids = list(tokenizer.encode(forced_answer, add_special_tokens=False)) if forced_answer else []
    continuation: dict[int, list[int]] = {}
    forced_rows = np.flatnonzero(forced).tolist()
    if forced_rows:
        answer = dataclasses.replace(settings, max_new_tokens=int(answer_tokens))
        contexts = [list(prompt_ids[i]) + gen[i] + forced_ids for i in forced_rows]
        L = _round_up(P + int(budget) + len(forced_ids), length_multiple)
        cont, _ = _sample_rows(params, cfg, contexts, answer, jax.random.fold_in(key, 1), plan=plan,
                               pad_id=pad_id, rows_per_call=rows_per_call, length=L)
        continuation = dict(zip(forced_rows, cont))

    def finish(i):
        g = gen[i]
        text = tokenizer.decode(g, skip_special_tokens=True)
        if i in continuation:
            # Decoded piece by piece, so the forced text appears verbatim (a joint decode could merge
            # or clean up spaces across the seams).
            text += forced_answer + tokenizer.decode(continuation[i], skip_special_tokens=True)
            g = g + forced_ids + continuation[i]
        return text, g

    # every process decodes its share of the rows; every process gets every text
    decoded = multihost.map_split(finish, range(len(gen)), "decoding the budgeted samples")
    texts, token_ids = [t for t, _ in decoded], [g for _, g in decoded]
    return BudgetResult(texts, token_ids, forced, thinking_tokens)
