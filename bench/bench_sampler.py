"""Sampler throughput: opdjax's `rollout.sampler.sample` against transformers' `model.generate`,
same checkpoint, same prompts, same batch, float32, CPU, in one run.

Both sample with temperature --temperature (default 1), no top-k / top-p, --max-new-tokens new
tokens per row, KV cache on (ours: the fixed-size cache of `sample`; transformers: its default
DynamicCache, `use_cache=True`, attn_implementation="sdpa"). Both decode exactly max_new_tokens
columns: ours always does; transformers is told there is no EOS (`eos_token_id=None`) so it cannot
stop early, and the output length is checked. The prompts are the toy task's, chat-rendered by the
checkpoint's tokenizer and left-padded to one width, exactly as OPD feeds them (so both handle
left padding). Ours also records what OPD needs from every position (log-probs under the sampled
and the model distribution, the top-K candidates): that work is in its time.

Timing: compile excluded (ours is compiled once first), --warmup untimed calls each, then
--repeats calls alternating ours / transformers (each after waiting, up to --wait-quiet s, for
an idle machine); median. tokens/s = rows x max_new_tokens / call
time (the prompt's prefill is inside each call, for both). A greedy (temperature 0) check on a
few rows confirms both run the same model: the share of identical greedy tokens is printed.

Setups: toy (the shipped toy student, or its random stand-in; 64 rows x 96 new tokens, the demo's
rollout batch) and 100m (bench_forward.py's ~100M config, random weights; 8 rows x 128 new tokens).

    .venv/bin/python bench/bench_sampler.py                 # both setups (~3 min on 2 cores)
    .venv/bin/python bench/bench_sampler.py --setups toy
    .venv/bin/python bench/bench_sampler.py --quick         # smoke run (< 1 min)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import opd_bench_common as common  # noqa: E402

SETUPS = {"toy": dict(pair="toy", rows=64, new=96), "100m": dict(pair="100m", rows=8, new=128),
          "tiny": dict(pair="tiny", rows=4, new=16)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", default="toy,100m")
    p.add_argument("--rows", type=int, default=0, help="override the setup's batch rows")
    p.add_argument("--max-new-tokens", type=int, default=0, help="override the setup's new tokens")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--wait-quiet", type=float, default=20.0,
                   help="before each timed call wait up to this many s for other processes to leave the machine "
                        "idle (0 = don't wait)")
    p.add_argument("--gap", type=float, default=0.5, help="sleep before each timed call (idle threads settle)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--greedy-check-tokens", type=int, default=16)
    p.add_argument("--ckpt-root", default=os.path.join(tempfile.gettempdir(), "opdjax_bench_ckpts"))
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.setups, args.repeats, args.wait_quiet = "tiny", 2, 0.0
    if args.json is None:
        args.json = os.path.join(common.RESULTS, "sampler_quick.json" if args.quick else "sampler.json")
    return args


def prompts_for(tok, rows):
    from opdjax.data import prompts as prompt_data
    from opdjax.toy import arithmetic
    probs = arithmetic.make_problems(rows, seed=0, split="train")
    ids = prompt_data.encode_prompts(tok, [p["prompt"] for p in probs], max_prompt_tokens=4096)
    return prompt_data.left_pad(ids, tok.pad_token_id)


def run_setup(name, args):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from opdjax.data.tokenizer import load_tokenizer
    from opdjax.models import hf_io
    from opdjax.rollout.sampler import SamplingSettings, sample

    spec = SETUPS[name]
    B, N = args.rows or spec["rows"], args.max_new_tokens or spec["new"]
    pair = common.make_pair(spec["pair"], args.ckpt_root)
    d = pair["student"]
    tok = load_tokenizer(d)
    params, cfg = hf_io.load_pretrained(d, dtype="float32")
    tmodel = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa").eval()
    tmodel.generation_config.eos_token_id = None
    tokens_np, mask_np = prompts_for(tok, B)
    P = tokens_np.shape[1]
    print(f"[{name}] {pair['source']}\n[{name}] student {cfg.num_params() / 1e6:.2f}M params, V={cfg.vocab_size}; "
          f"{B} rows x {N} new tokens, prompt columns {P}", flush=True)
    tokens, mask = jnp.asarray(tokens_np), jnp.asarray(mask_np)
    eos = tok.eos_token_id

    def ours_fn(temperature, n, rows, seed):
        s = SamplingSettings(n, temperature, 1.0, 0, 8, (eos,)).check(cfg.vocab_size)
        return lambda: jax.block_until_ready(sample(params, tokens[:rows], mask[:rows], jax.random.key(seed), cfg, s,
                                                    pad_id=tok.pad_token_id))

    t_ids, t_mask = torch.from_numpy(tokens_np.astype(np.int64)), torch.from_numpy(mask_np.astype(np.int64))

    def torch_fn(temperature, n, rows):
        kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
        gc = GenerationConfig(max_new_tokens=n, use_cache=True, pad_token_id=tok.pad_token_id, eos_token_id=None, **kw)

        def f():
            with torch.inference_mode():
                return tmodel.generate(input_ids=t_ids[:rows], attention_mask=t_mask[:rows], generation_config=gc)
        return f

    # greedy agreement (same model check)
    g = args.greedy_check_tokens
    gr = min(B, 4)
    ours_g = np.asarray(ours_fn(0.0, g, gr, 0)().tokens)
    torch_g = torch_fn(0.0, g, gr)()[:, P:].numpy()
    agree = float((ours_g == torch_g).mean())

    ours, theirs = ours_fn(args.temperature, N, B, 1), torch_fn(args.temperature, N, B)
    t0 = time.perf_counter()
    ours()
    compile_s = time.perf_counter() - t0
    out = theirs()
    assert out.shape[1] == P + N, f"transformers generated {out.shape[1] - P} columns, not {N}"
    for _ in range(args.warmup):
        ours()
        theirs()
    times = {"ours": [], "torch": []}
    load = {"ours": [], "torch": []}
    for i in range(args.repeats):
        torch.manual_seed(i)
        for k, fn in (("ours", ours), ("torch", theirs)):
            if args.wait_quiet > 0:
                common._wait_quiet(args.wait_quiet)
            time.sleep(args.gap)
            m = common.LoadMeter().start()
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
            load[k].append(m.stop())
    med = {k: statistics.median(v) for k, v in times.items()}
    r = {"pair": pair, "params": cfg.num_params(), "vocab": cfg.vocab_size, "rows": B, "new_tokens": N,
         "prompt_columns": P, "ours_compile_plus_first_call_s": compile_s, "times_s": times, "other_busy_cores": load,
         "median_s": med, "min_s": {k: min(v) for k, v in times.items()},
         "tokens_per_s": {k: B * N / v for k, v in med.items()},
         "ratio_ours_over_torch": med["torch"] / med["ours"],
         "ratio_ours_over_torch_min": min(times["torch"]) / min(times["ours"]),
         "greedy_agreement": agree, "greedy_check": f"{gr} rows x {g} tokens, temperature 0"}
    print(f"[{name}] ours {med['ours']:.3f} s, transformers {med['torch']:.3f} s per call; greedy agreement "
          f"{100 * agree:.1f}%", flush=True)
    return r


def print_table(res):
    m = res["machine"]
    print()
    print(f"== sampler: opdjax sample vs transformers generate (do_sample, T={res['args']['temperature']}, KV cache, "
          f"float32); {m['cores']} cores (shared), {m['cpu']}, torch threads {res['torch_threads']} ==")
    hdr = (f"{'setup':<6} {'params':>8} {'rows x new':>11} {'P':>4} {'ours s':>8} {'hf s':>8} {'ours tok/s':>10} "
           f"{'hf tok/s':>9} {'ours/hf':>8} {'@min':>6} {'greedy=':>8} {'load ours/hf':>13}")
    print(hdr)
    print("-" * len(hdr))
    for name, r in res["setups"].items():
        lo = lambda k: common.median(r["other_busy_cores"][k])
        print(f"{name:<6} {r['params'] / 1e6:7.1f}M {str(r['rows']) + 'x' + str(r['new_tokens']):>11} "
              f"{r['prompt_columns']:4d} {r['median_s']['ours']:8.3f} {r['median_s']['torch']:8.3f} "
              f"{r['tokens_per_s']['ours']:10.0f} {r['tokens_per_s']['torch']:9.0f} "
              f"{r['ratio_ours_over_torch']:7.2f}x {r['ratio_ours_over_torch_min']:5.2f}x "
              f"{100 * r['greedy_agreement']:7.1f}% {(lo('ours') or 0):6.2f}/{(lo('torch') or 0):.2f}")
    for name, r in res["setups"].items():
        if "RANDOM" in r["pair"]["source"]:
            print(f"NOTE [{name}]: {r['pair']['source']}")


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    res = {"machine": common.machine_info(), "args": vars(args), "torch_threads": threads, "setups": {}}
    for name in [s for s in args.setups.split(",") if s]:
        res["setups"][name] = run_setup(name, args)
    return common.finish(res, t0, print_table, args.json)


if __name__ == "__main__":
    main()
