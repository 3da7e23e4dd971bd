"""Evaluate a model on problems with answers: greedy accuracy, pass@k (unbiased, n samples per
problem) and response statistics. Uses the training sampler, so what is evaluated is exactly
what the student generates during OPD.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from opdjax import sharding
from opdjax.data.grading import grade
from opdjax.data.prompts import left_pad
from opdjax.eval.passk import pass_at_k_table
from opdjax.rollout.sampler import SamplingSettings, sample


@dataclasses.dataclass
class EvalResult:
    metrics: dict  # eval/... scalars
    texts: list  # [problems][n] sampled responses (greedy response first when greedy)
    correct: np.ndarray  # [problems, n] bool (sampled)
    greedy_correct: np.ndarray | None  # [problems] bool


def generate_texts(params, cfg, tokenizer, prompts, settings: SamplingSettings, key, *, plan=None,
                   rows_per_call: int = 64, prompt_len: int | None = None):
    """Responses (text, token count, stopped) for each prompt row; fixed-shape calls (one compile)."""
    shards = plan.batch_shards if plan is not None else 1
    rows_per_call = max(shards, -(-min(rows_per_call, len(prompts)) // shards) * shards)
    P = prompt_len or max(map(len, prompts))
    out = []
    for start in range(0, len(prompts), rows_per_call):
        chunk = list(prompts[start:start + rows_per_call])
        n_real = len(chunk)
        chunk += [chunk[-1]] * (rows_per_call - n_real)  # fill the fixed batch; results dropped
        tok, mask = left_pad(chunk, tokenizer.pad_token_id, length=P)
        r = sample(params, sharding.put_global_batch(plan, tok, ("batch", "length")),
                   sharding.put_global_batch(plan, mask, ("batch", "length")),
                   jax.random.fold_in(key, start), cfg, settings, pad_id=tokenizer.pad_token_id, plan=plan)
        toks, real = np.asarray(r.tokens), np.asarray(r.mask)
        for i in range(n_real):
            ids = toks[i][real[i]]
            stopped = bool(len(ids)) and int(ids[-1]) in settings.stop_ids
            out.append((tokenizer.decode(ids, skip_special_tokens=True), int(real[i].sum()), stopped))
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
        greedy_correct = np.array([grade(t, a) for (t, _, _), a in zip(g, answers)])
        metrics["eval/greedy_accuracy"] = float(greedy_correct.mean())
        metrics["eval/greedy_mean_tokens"] = float(np.mean([n for _, n, _ in g]))
        for i, (t, _, _) in enumerate(g):
            texts[i].append(t)
    rows = [p for p in prompts for _ in range(samples)]
    s = SamplingSettings(max_new_tokens, temperature, candidates=1, stop_ids=tuple(stop_ids))
    res = generate_texts(params, cfg, tokenizer, rows, s, jax.random.fold_in(key, 1), plan=plan,
                         rows_per_call=rows_per_call, prompt_len=prompt_len)
    correct = np.array([grade(t, answers[i // samples]) for i, (t, _, _) in enumerate(res)]).reshape(
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
