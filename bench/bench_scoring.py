"""Teacher scoring: the chunked kernel against the full-logits reference, memory and wall time.

    opdjax.teachability.scoring.teacher_logprobs        one forward, logits chunk by chunk
    opdjax.teachability.scoring.naive_teacher_logprobs  one forward, [B, T, V] logits, log_softmax

1. Memory, at the full size (default B=8, T=P+R=64+4032=4096, V=151,936, a 1-layer D=64 model):
   XLA's compiled temp memory (`memory_analysis().temp_size_in_bytes`) of the kernel, the
   reference, the forward alone, and the two scoring heads alone (from hidden states). Inputs
   are ShapeDtypeStructs, so nothing is allocated: these numbers hold on any machine.
2. Time: the reference needs ~19 GiB of temp memory at the full size. Timing runs at the full
   size when the reference's temp fits in --max-temp-gib, else at the largest size that does
   (halving B first, then T with P fixed); the report says which. Compile excluded, one warm-up,
   median of --repeats, both run on the same inputs (and their max |difference| is printed).

    .venv/bin/python bench/bench_scoring.py              # memory at full size, time at <= 6 GiB
    .venv/bin/python bench/bench_scoring.py --quick      # smoke run (~1 min)
    .venv/bin/python bench/bench_scoring.py --max-temp-gib 24 --json out.json   # a big machine
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096, help="T = prompt + response columns")
    p.add_argument("--prompt", type=int, default=64, help="P, prompt columns (R = seq - prompt)")
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--chunk-tokens", type=int, default=512)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-temp-gib", type=float, default=6.0,
                   help="largest reference temp memory to actually run (the machine may be shared)")
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="time at B=2, T=512 with 2 repeats (memory still at full size)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 2
    return args


def main(argv=None):
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from opdjax.models import qwen
    from opdjax.models.config import ModelConfig
    from opdjax.teachability import scoring

    hd = args.hidden // args.heads
    cfg = ModelConfig("qwen3", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.heads, head_dim=hd,
                      dtype=args.dtype)
    P, K, chunk = args.prompt, args.top_k, args.chunk_tokens
    S = jax.ShapeDtypeStruct
    params_abs = qwen.abstract_params(cfg)

    def batch_abs(B, T):
        return S((B, T), jnp.int32), S((B, T), jnp.bool_), S((B, T - P, K), jnp.int32)

    def temp(fn, *a, **kw):
        return fn.lower(*a, **kw).compile().memory_analysis().temp_size_in_bytes

    kern = dict(cfg=cfg, prompt_len=P, chunk_tokens=chunk)
    gib = lambda b: b / 2**30

    # ---------------------------------------------------------------- 1. memory at the full size
    B, T = args.batch, args.seq
    hidden_abs = S((B, T, args.hidden), jnp.dtype(args.dtype))
    mem = {
        "kernel": temp(scoring.teacher_logprobs, params_abs, *batch_abs(B, T), **kern),
        "naive": temp(scoring.naive_teacher_logprobs, params_abs, *batch_abs(B, T), **kern),
        "forward_only": temp(jax.jit(lambda p, t, m: qwen.apply(p, t, cfg, mask=m)[0]), params_abs,
                             *batch_abs(B, T)[:2]),
        "kernel_head": temp(scoring.teacher_logprobs_from_hidden, params_abs, hidden_abs, *batch_abs(B, T),
                            prompt_len=P, chunk_tokens=chunk),
        "naive_head": temp(scoring.naive_teacher_logprobs_from_hidden, params_abs, hidden_abs, *batch_abs(B, T),
                           prompt_len=P),
    }
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} ({jax.devices()[0].platform})")
    print(f"# model: {args.layers} layer(s), D={args.hidden}, {args.heads} head(s), V={args.vocab}, "
          f"{args.dtype}; K={K}, chunk_tokens={chunk}")
    print(f"\nCompiled temp memory at B={B}, T={T} (P={P}, R={T - P}), from memory_analysis (nothing allocated):")
    print(f"  {'':28s}{'kernel':>12s}{'naive':>12s}{'kernel/naive':>14s}")
    print(f"  {'end to end (forward+score)':28s}{gib(mem['kernel']):>10.3f}Gi{gib(mem['naive']):>10.3f}Gi"
          f"{mem['kernel'] / mem['naive']:>14.4f}  (1/{mem['naive'] / mem['kernel']:.1f})")
    print(f"  {'scoring head (from hidden)':28s}{gib(mem['kernel_head']):>10.3f}Gi{gib(mem['naive_head']):>10.3f}Gi"
          f"{mem['kernel_head'] / mem['naive_head']:>14.4f}  (1/{mem['naive_head'] / mem['kernel_head']:.1f})")
    print(f"  {'forward alone':28s}{gib(mem['forward_only']):>10.3f}Gi   (the model's query-chunked float32 "
          "attention scores; the same in both)")

    # ---------------------------------------------------------------- 2. time at a size that fits
    tB, tT = (min(B, 2), min(T, 512)) if args.quick else (B, T)
    while not args.quick and gib(temp(scoring.naive_teacher_logprobs, params_abs, *batch_abs(tB, tT), **kern)) > args.max_temp_gib:
        if tB > 1:
            tB //= 2
        elif tT // 2 > P:
            tT = P + (tT - P) // 2
        else:
            break
    where = ("the full size" if (tB, tT) == (B, T) else f"B={tB}, T={tT} (--quick)" if args.quick else
             f"B={tB}, T={tT}, the largest that fits (the reference's temp at B={B}, T={T} is "
             f"{gib(mem['naive']):.1f} GiB > --max-temp-gib {args.max_temp_gib:.1f})")
    rs = np.random.RandomState(0)
    params = qwen.init_params(cfg, jax.random.key(0), std=0.5)
    tokens = jnp.asarray(rs.randint(0, args.vocab, (tB, tT)), jnp.int32)
    mask = np.ones((tB, tT), bool)
    mask[:, : P // 2] = False  # half-empty prompts, as after left padding
    mask = jnp.asarray(mask)
    cand = jnp.asarray(rs.randint(0, args.vocab, (tB, tT - P, K)), jnp.int32)

    fns = {"kernel": scoring.teacher_logprobs, "naive": scoring.naive_teacher_logprobs}
    compiled = {n: f.lower(params, tokens, mask, cand, **kern).compile() for n, f in fns.items()}
    times, outs = {n: [] for n in fns}, {}
    for n in fns:  # warm-up
        outs[n] = jax.block_until_ready(compiled[n](params, tokens, mask, cand))
    for _ in range(args.repeats):
        for n in fns:  # alternate, so a busy neighbour slows both alike
            t0 = time.perf_counter()
            jax.block_until_ready(compiled[n](params, tokens, mask, cand))
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    diff = max(float(jnp.max(jnp.abs(outs["kernel"][i] - outs["naive"][i]))) for i in range(2))
    print(f"\nWall time at {where}; compile excluded, median of {args.repeats}:")
    print(f"  {'':28s}{'kernel':>12s}{'naive':>12s}{'kernel/naive':>14s}")
    print(f"  {'seconds':28s}{med['kernel']:>12.3f}{med['naive']:>12.3f}{med['kernel'] / med['naive']:>14.3f}")
    print(f"  max |kernel - naive| log-prob: {diff:.2e}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "memory_bytes": mem, "memory_size": [B, T],
                       "time_size": [tB, tT], "seconds": times, "median_seconds": med, "max_abs_diff": diff},
                      f, indent=1)
    return mem, med


if __name__ == "__main__":
    main()
