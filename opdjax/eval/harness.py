"""Evaluate a model on problems with answers: greedy accuracy, pass@k (unbiased, n samples per
problem) and response statistics. Uses the training sampler, so what is evaluated is exactly
what the student generates during OPD.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import time

import jax
import numpy as np

from opdjax import multihost
from opdjax.data.grading import grade
from opdjax.data.prompts import left_pad
from opdjax.eval.passk import pass_at_k_table
from opdjax.rollout.sampler import SamplingSettings, sample


class _Repeated(collections.abc.Sequence):
    """Each prompt `n` times in a row, without encoding any (prompts may encode on first use)."""

    def __init__(self, prompts, n: int):
        self._prompts, self._n = prompts, n

    def __len__(self):
        return len(self._prompts) * self._n

    def __getitem__(self, i):
        return self._prompts[i // self._n]


@dataclasses.dataclass
class EvalResult:
    metrics: dict  # eval/... scalars
    texts: list  # [problems][n] sampled responses (greedy response first when greedy)
    correct: np.ndarray  # [problems, n] bool (sampled)
    greedy_correct: np.ndarray | None  # [problems] bool


def sample_rows(params, cfg, prompts, rows, settings: SamplingSettings, key, *, plan, pad_id: int, length: int):
    """One fixed-shape sampler call over the prompt `rows` (indices into `prompts`). Each process
    encodes, feeds and reads back only the rows its devices hold. Returns {global row: (ids,
    stopped)} for this process's rows (ids: the generated tokens, the stop token included)."""
    shape = (len(rows), length)
    mine = multihost.feeding_rows(plan, shape, ("batch", "length"))
    tok, mask = left_pad([prompts[rows[i]] for i in mine], pad_id, length=length)
    r = sample(params, multihost.from_local_rows(plan, tok, ("batch", "length"), shape),
               multihost.from_local_rows(plan, mask, ("batch", "length"), shape), key, cfg, settings,
               pad_id=pad_id, plan=plan)
    toks, real = multihost.rows_of((r.tokens, r.mask), mine)
    stops = set(settings.stop_ids)
    out = {}
    for i, t, m in zip(mine.tolist(), toks, real):
        ids = [int(x) for x in t[m]]
        out[i] = (ids, bool(ids) and ids[-1] in stops)
    return out


def generate_texts(params, cfg, tokenizer, prompts, settings: SamplingSettings, key, *, plan=None,
                   rows_per_call: int = 64, prompt_len: int | None = None):
    """Responses (text, token count, stopped) for each prompt row, on every process; fixed-shape
    calls (one compile). On a pod each process decodes its own rows; the results are gathered."""
    shards = plan.batch_shards if plan is not None else 1
    rows_per_call = max(shards, -(-min(rows_per_call, len(prompts)) // shards) * shards)
    P = prompt_len or max(map(len, prompts))
    out = []
    for start in range(0, len(prompts), rows_per_call):
        n_real = min(rows_per_call, len(prompts) - start)
        # fill the fixed batch with the last prompt; those rows' results are dropped
        rows = [start + min(i, n_real - 1) for i in range(rows_per_call)]
        got = sample_rows(params, cfg, prompts, rows, settings, jax.random.fold_in(key, start), plan=plan,
                          pad_id=tokenizer.pad_token_id, length=P)
        mine = {i: (tokenizer.decode(ids, skip_special_tokens=True), len(ids), stopped)
                for i, (ids, stopped) in got.items() if i < n_real}
        merged = {i: v for part in multihost.gather_objects(mine) for i, v in part.items()}
        out += [merged[i] for i in range(n_real)]
    return out


def evaluate(params, cfg, tokenizer, prompts, answers, *, samples: int, ks, temperature: float,
             greedy: bool, max_new_tokens: int, stop_ids, key, plan=None, rows_per_call: int = 64,
             prompt_len: int | None = None) -> EvalResult:
    """prompts: encoded prompt ids per problem; answers: gold answer strings."""
    t0 = time.perf_counter()
    metrics = {}
    greedy_correct = None
    texts = [[] for _ in prompts]
    if greedy:
        g = generate_texts(params, cfg, tokenizer, prompts,
                           SamplingSettings(max_new_tokens, 0.0, candidates=1, stop_ids=tuple(stop_ids)),
                           key, plan=plan, rows_per_call=rows_per_call, prompt_len=prompt_len)
        greedy_correct = np.array(multihost.map_split(lambda ta: grade(*ta), [(t, a) for (t, _, _), a in zip(g, answers)],
                                                      "grading"), bool)
        metrics["eval/greedy_accuracy"] = float(greedy_correct.mean())
        metrics["eval/greedy_mean_tokens"] = float(np.mean([n for _, n, _ in g]))
        for i, (t, _, _) in enumerate(g):
            texts[i].append(t)
    rows = _Repeated(prompts, samples)
    s = SamplingSettings(max_new_tokens, temperature, candidates=1, stop_ids=tuple(stop_ids))
    res = generate_texts(params, cfg, tokenizer, rows, s, jax.random.fold_in(key, 1), plan=plan,
                         rows_per_call=rows_per_call, prompt_len=prompt_len)
    correct = np.array(multihost.map_split(lambda ta: grade(*ta), [(t, answers[i // samples]) for i, (t, _, _) in
                                                                   enumerate(res)], "grading"), bool).reshape(
        len(prompts), samples)
    for i, (t, _, _) in enumerate(res):
        texts[i // samples].append(t)
    for k, v in pass_at_k_table(correct, [k for k in ks if k <= samples]).items():
        metrics[f"eval/pass@{k}"] = float(v)
    metrics["eval/sample_accuracy"] = float(correct.mean())
    metrics["eval/mean_tokens"] = float(np.mean([n for _, n, _ in res]))
    metrics["eval/stop_rate"] = float(np.mean([s for _, _, s in res]))
    metrics["eval/seconds"] = time.perf_counter() - t0
    return EvalResult(metrics, texts, correct, greedy_correct)
