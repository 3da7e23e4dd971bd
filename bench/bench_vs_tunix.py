"""Forward, sampler and single decode step: opdjax against Google Tunix 0.1.7 (JAX, NNX Qwen3, its
`tunix.generate.sampler.Sampler`), same random Qwen3 checkpoint, same XLA, CPU, float32 (issue 17).
Also a memory floor: the bytes one decode step must read over this machine's measured bandwidth.

Set-up of the Tunix side (once; Tunix must NOT go into opdjax's .venv, it moves pins):

    python3 -m venv /work/bench_tunix_venv
    /work/bench_tunix_venv/bin/pip install google-tunix==0.1.7 jax==0.10.2 jaxlib==0.10.2 flax==0.12.8 numpy==2.4.6
    /work/bench_tunix_venv/bin/pip install --no-deps -e /work/main
    /work/bench_tunix_venv/bin/python -c "import jax, jaxlib, flax; print(jax.__version__, jaxlib.__version__, flax.__version__)"
    # -> 0.10.2 0.10.2 0.12.8.  (`pip install -e /work/main google-tunix==0.1.7` in one go fails:
    #    tunix pins safetensors<0.8, opdjax safetensors==0.8.0; the Tunix side does not import opdjax.)

Run (repo root, opdjax's venv; the Tunix side runs as a subprocess in the Tunix venv):

    nice -n 10 .venv/bin/python bench/bench_vs_tunix.py            # issue 17's shape (~75.5M), ~6 min on 2 cores
    nice -n 10 .venv/bin/python bench/bench_vs_tunix.py --quick    # tiny shape, smoke run (~1 min)
    .venv/bin/python bench/bench_vs_tunix.py --hlo-dir /tmp/decode_hlo   # + dump our compiled decode step

Like with like:
  * one HF checkpoint (random Qwen3, tied embeddings, normal(--std) weights, built like
    opdjax.toy.checkpoints.build_random_checkpoint but with vocab --vocab: token ids are random,
    the toy tokenizer saved beside it is not used), loaded by each side from its safetensors;
  * (a) forward: B x T random ids, no padding, full [B, T, V] float32 logits, causal attention
    (ours `qwen.forward` jitted, Tunix `Qwen3.__call__` with cache=None and a [B, T, T] mask);
  * (b) sampling: the same R prompts of P random ids, N new tokens, temperature 1, no top-k/top-p,
    no stop token ever matches (stop id -1 both sides: exactly N tokens per row); ours
    `rollout.sampler.sample` (which also records log-probs and the top-8 candidates per position,
    the OPD sampler as it runs), Tunix `Sampler.__call__` (tokens only; its host tokenize/detokenize
    of a stub id tokenizer included); cache of P + N slots on both;
  * (c) one decode step: B rows, cache of S slots of which S-1 hold the same random K/V on both
    sides, the step writes slot S-1; logits + new cache; the cache buffer donated on both sides;
  * checks: forward logits max |diff| (every --check-stride'th position), decode-step logits max
    |diff|, greedy tokens (temperature 0, --greedy-tokens per prompt) identical;
  * (d) floor: stream bandwidth measured here (best of numpy copy / 2-thread numpy copy / jitted
    jax reduction / jitted x * a + b, GB/s) and bytes per decode step = all weights (tied: the embedding once, as the
    unembedding) + the K/V cache of S slots for B rows; floor = bytes / bandwidth. Also printed: a
    compute floor, 2 x params x B FLOPs over the measured float32 matmul peak (B=64 is compute-bound).
Timing: compile excluded, --warmup untimed calls, median of --repeats, each optionally after waiting
for an idle machine (--wait-quiet). The sides run one after the other (ours, then Tunix): other
processes' load is recorded per call (other_busy_cores) -- shared machine, read ratios with it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import opd_bench_common as common  # noqa: E402

DEFAULT_TUNIX_PY = "/work/bench_tunix_venv/bin/python"
# issue 17's shape: D=768, 8 layers, 12/4 heads, hd 64, F=2048, V=32768, tied (~75.5M params)
FULL = dict(hidden_size=768, num_layers=8, num_heads=12, num_kv_heads=4, head_dim=64, intermediate_size=2048)
QUICK = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--std", type=float, default=0.02, help="normal std of the random weights")
    p.add_argument("--fwd-batch", type=int, default=4)
    p.add_argument("--fwd-len", type=int, default=512)
    p.add_argument("--rows", type=int, default=8, help="sampling prompts")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--decode-batches", default="1,8,64", help="decode-step batch sizes (B=8 is the headline)")
    p.add_argument("--tunix-decode-batches", default="1,8,64", help="the same for the Tunix side")
    p.add_argument("--greedy-tokens", type=int, default=16)
    p.add_argument("--check-stride", type=int, default=64, help="forward logits compared every n-th position")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--wait-quiet", type=float, default=0.0,
                   help="before each timed call wait up to this many s for an idle machine (0 = don't)")
    p.add_argument("--bw-mib", type=int, default=512, help="size of the bandwidth test arrays")
    p.add_argument("--tunix-python", default=DEFAULT_TUNIX_PY)
    p.add_argument("--hlo-dir", default="", help="also write our compiled decode step (B=8) HLO text here")
    p.add_argument("--ckpt-root", default=os.path.join(tempfile.gettempdir(), "opdjax_bench_ckpts"))
    p.add_argument("--json", default=None)
    p.add_argument("--long-cache", default="8,2048,160",
                   help="B,S,live: one more decode step on a cache of S slots with only live filled (0 = skip)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    args.arch = dict(QUICK if args.quick else FULL)
    if args.quick:
        args.vocab, args.fwd_len, args.max_new_tokens, args.prompt_len = 1024, 64, 16, 16
        args.decode_batches, args.bw_mib, args.repeats, args.greedy_tokens, args.check_stride = "1,8", 64, 2, 8, 8
        args.tunix_decode_batches = "1,8"
        args.long_cache = "8,512,40"
    if args.json is None:
        args.json = os.path.join(common.RESULTS, "vs_tunix_quick.json" if args.quick else "vs_tunix.json")
    return args


# ------------------------------------------------------------------------------ checkpoint
def make_checkpoint(args) -> str:
    """Random Qwen3 HF checkpoint of the chosen vocab and std (the toy tokenizer rides along, unused:
    token ids are random), built once under args.ckpt_root."""
    from opdjax.data.tokenizer import build_toy_tokenizer
    a = args.arch
    name = f"vs_tunix_d{a['hidden_size']}_l{a['num_layers']}_v{args.vocab}_s{args.std}"
    out = os.path.join(args.ckpt_root, name)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    tok_dir = out + "_tokenizer"
    build_toy_tokenizer(tok_dir)
    return common.random_hf_checkpoint(out, tok_dir, a, args.vocab, seed=0, std=args.std, tie=True)


# ------------------------------------------------------------------------------ bandwidth / floor
def measure_bandwidth(mib: int, repeats: int = 5) -> dict:
    """GB/s (1e9 B/s) of: numpy copy (read + write counted), the same split over 2 threads, and a
    jitted jax sum (read only). Best of `repeats` each."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    n = mib * 2 ** 20 // 4
    a = np.ones(n, np.float32)
    b = np.empty_like(a)
    out = {}

    def best(fn, nbytes):
        fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return nbytes / min(ts) / 1e9

    out["numpy_copy_1t"] = best(lambda: np.copyto(b, a), 2 * a.nbytes)
    threads = os.cpu_count() or 1

    def copy_mt():
        chunks = np.array_split(np.arange(n), threads)
        ths = [threading.Thread(target=np.copyto, args=(b[c[0]:c[-1] + 1], a[c[0]:c[-1] + 1])) for c in chunks]
        for t in ths:
            t.start()
        for t in ths:
            t.join()

    out[f"numpy_copy_{threads}t"] = best(copy_mt, 2 * a.nbytes)
    x = jnp.asarray(a)
    f = jax.jit(lambda x: jnp.sum(x))
    out["jax_sum_read"] = best(lambda: f(x).block_until_ready(), a.nbytes)
    g = jax.jit(lambda x: x * 1.0001 + 1.0)
    out["jax_triad_like"] = best(lambda: g(x).block_until_ready(), 2 * a.nbytes)
    out["best_GBps"] = max(out.values())
    out["array_MiB"] = mib
    return out


def measure_matmul_peak(n: int, repeats: int = 5) -> float:
    """GFLOP/s of a jitted float32 [n, n] @ [n, n] (best of `repeats`): the compute side of the floor."""
    import jax
    import jax.numpy as jnp
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(a, a).block_until_ready()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(ts) / 1e9


def measure_small_m_dot(arch: dict, rows: int = 8, layers: int = 16, repeats: int = 9) -> float:
    """GB/s of weight bytes streamed by a chain of jitted float32 [rows, D] x [D, F] and
    [rows, F] x [F, D] products over `layers` distinct weight pairs (too big for the caches): how
    fast this machine's XLA dot kernels read weights at the decode step's small M. The step's
    matmuls cannot beat it; the gap to the stream bandwidth is the kernels', not the model's."""
    import jax
    import jax.numpy as jnp
    D, F = arch["hidden_size"], arch["intermediate_size"]
    key = jax.random.key(0)
    ups = [jax.random.normal(jax.random.fold_in(key, 2 * i), (D, F)) for i in range(layers)]
    downs = [jax.random.normal(jax.random.fold_in(key, 2 * i + 1), (F, D)) * 0.01 for i in range(layers)]

    def chain(ups, downs, x):
        for u, d in zip(ups, downs):
            x = jnp.tanh(jnp.tanh(x @ u) @ d)
        return x
    f = jax.jit(chain)
    x = jnp.ones((rows, D), jnp.float32)
    f(ups, downs, x).block_until_ready()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(ups, downs, x).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return 2 * layers * D * F * 4 / statistics.median(ts) / 1e9


def decode_bytes(cfg, B: int, S: int, itemsize: int = 4) -> dict:
    weights = cfg.num_params() * itemsize
    kv = cfg.num_layers * 2 * B * S * cfg.num_kv_heads * cfg.head_dim * itemsize
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}


# ------------------------------------------------------------------------------ ours
def timed(fn, label, args):
    fn()  # compile / first call
    for _ in range(args.warmup):
        fn()
    times, loads = [], []
    for _ in range(args.repeats):
        if args.wait_quiet > 0:
            common._wait_quiet(args.wait_quiet)
        m = common.LoadMeter().start()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        loads.append(m.stop())
    med = statistics.median(times)
    print(f"[ours] {label}: median {med:.4f} s times {['%.4f' % t for t in times]}", flush=True)
    return {"median_s": med, "min_s": min(times), "times_s": times, "other_busy_cores": loads}


def run_ours(args, ckpt, data, outdir):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from opdjax.models import hf_io, qwen
    from opdjax.rollout.sampler import SamplingSettings, sample
    from tunix_side import cache_arrays
    params, cfg = hf_io.load_pretrained(ckpt, dtype="float32")
    res = {"params": cfg.num_params()}

    # (a) forward
    toks = jnp.asarray(np.asarray(data["forward_tokens"], np.int32))
    B, T = toks.shape
    fwd = jax.jit(lambda p, t: qwen.forward(p, t, cfg)[0])
    r = timed(lambda: fwd(params, toks).block_until_ready(), f"forward B={B} T={T}", args)
    np.save(os.path.join(outdir, "ours_forward_logits.npy"), np.asarray(fwd(params, toks))[:, ::args.check_stride])
    res["forward"] = {**r, "tokens_per_s": B * T / r["median_s"], "B": B, "T": T}

    # (b) sampling (+ greedy check)
    prompts = jnp.asarray(np.asarray(data["prompts"], np.int32))
    pmask = jnp.ones(prompts.shape, bool)
    R, N = prompts.shape[0], args.max_new_tokens
    s = SamplingSettings(N, 1.0, 1.0, 0, 8, (-1,))
    seeds = iter(range(1000))
    r = timed(lambda: jax.block_until_ready(sample(params, prompts, pmask, jax.random.key(next(seeds)), cfg, s,
                                                   pad_id=data["pad_id"])), f"sample {R}x{N}", args)
    res["sample"] = {**r, "tokens_per_s": R * N / r["median_s"], "rows": R, "new_tokens": N,
                     "prompt_len": prompts.shape[1], "cache_size": prompts.shape[1] + N}
    g = SamplingSettings(args.greedy_tokens, 0.0, 1.0, 0, 8, (-1,))
    res["greedy_tokens"] = np.asarray(sample(params, prompts, pmask, jax.random.key(0), cfg, g,
                                             pad_id=data["pad_id"]).tokens).tolist()

    # (c) one decode step
    S, L, K, hd = data["cache_len"], cfg.num_layers, cfg.num_kv_heads, cfg.head_dim

    def step(params, token, cache):
        logits, cache = qwen.forward(params, token[:, None], cfg, mask=jnp.ones(token.shape + (1,), bool), cache=cache)
        return logits[:, 0], cache

    step_jit = jax.jit(step, donate_argnums=(2,))
    # The decode loop's own weight layout (rollout.decode slices the layers once per generate
    # call, outside its loop; so does this, outside the timed step). Tunix keeps per-layer modules.
    dparams = jax.block_until_ready(qwen.unstack_layers(params))

    def decode_case(Bd, S, live):
        """Time one step of Bd rows on a cache of S slots whose first live - 1 hold K/V; the step
        writes slot live - 1 (slots after it stay zero and invalid)."""
        k, v = cache_arrays(data["cache_seed"], L, Bd, S, K, hd)
        k[:, :, live - 1:] = 0
        v[:, :, live - 1:] = 0
        token = jnp.asarray((np.arange(Bd, dtype=np.int32) * 7919 + 11) % cfg.vocab_size)
        valid = np.arange(S)[None].repeat(Bd, 0) < live - 1
        k, v = k.transpose(0, 1, 3, 2, 4), v.transpose(0, 1, 3, 2, 4)  # our cache is [L, B, K, S, hd]
        holder = {"cache": qwen.KVCache(jnp.asarray(k), jnp.asarray(v), jnp.asarray(valid), jnp.asarray(live - 1, jnp.int32),
                                        jnp.full((Bd,), live - 1, jnp.int32))}
        del k, v

        def one():
            c = holder["cache"]
            c = c._replace(valid=c.valid.at[:, live - 1].set(False), index=jnp.asarray(live - 1, jnp.int32),
                           next_pos=jnp.full((Bd,), live - 1, jnp.int32))
            lg, holder["cache"] = step_jit(dparams, token, c)
            jax.block_until_ready(lg)
            return lg

        lg = np.asarray(one())
        r = timed(one, f"decode step B={Bd} S={S} live={live}", args)
        if args.hlo_dir and Bd == 8 and S == live:
            os.makedirs(args.hlo_dir, exist_ok=True)
            compiled = jax.jit(step).lower(dparams, token, holder["cache"]).compile()
            with open(os.path.join(args.hlo_dir, "ours_decode_step_b8.hlo.txt"), "w") as f:
                f.write(compiled.as_text())
            print(f"[ours] wrote {args.hlo_dir}/ours_decode_step_b8.hlo.txt", flush=True)
        holder.clear()
        return lg, {**r, "ms": 1000 * r["median_s"]}

    res["decode"] = {}
    for Bd in [int(b) for b in args.decode_batches.split(",") if b]:
        lg, res["decode"][str(Bd)] = decode_case(Bd, S, S)
        np.save(os.path.join(outdir, f"ours_decode_logits_b{Bd}.npy"), lg)
    lc = data.get("long_cache")
    if lc:
        lg, res["decode_long"] = decode_case(lc["B"], lc["S"], lc["live"])
        np.save(os.path.join(outdir, "ours_decode_long_logits.npy"), lg)
    return cfg, res


def run_tunix(args, ckpt, cfg, data, outdir):
    spec = {"ckpt": ckpt, "outdir": outdir, "warmup": args.warmup, "repeats": args.repeats,
            "wait_quiet": args.wait_quiet, "forward_check_stride": args.check_stride,
            "arch": {"num_layers": cfg.num_layers, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
                     "intermediate_size": cfg.intermediate_size, "num_heads": cfg.num_heads,
                     "head_dim": cfg.head_dim, "num_kv_heads": cfg.num_kv_heads, "rope_theta": cfg.rope.theta,
                     "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings},
            "decode_batches": [int(b) for b in args.tunix_decode_batches.split(",") if b], **data}
    sp, out = os.path.join(outdir, "spec.json"), os.path.join(outdir, "tunix.json")
    with open(sp, "w") as f:
        json.dump(spec, f)
    cmd = [args.tunix_python, os.path.join(common.BENCH_DIR, "tunix_side.py"), "--spec", sp, "--out", out]
    print("[tunix] " + " ".join(cmd), flush=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, env=env, cwd=common.REPO, capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    for line in lines:
        if line.startswith("[tunix]"):
            print(line, flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"Tunix side failed (rc {proc.returncode}):\n" + "\n".join(lines[-25:]))
    with open(out) as f:
        return json.load(f)


def compare(outdir, res, args):
    import numpy as np
    chk = {}
    a, b = (np.load(os.path.join(outdir, f"{s}_forward_logits.npy")) for s in ("ours", "tunix"))
    chk["forward_logits_max_abs_diff"] = float(np.abs(a - b).max())
    chk["forward_logits_max_abs"] = float(np.abs(a).max())
    chk["decode_logits_max_abs_diff"] = {}
    for Bd in res["tunix"]["decode"]:
        p = [os.path.join(outdir, f"{s}_decode_logits_b{Bd}.npy") for s in ("ours", "tunix")]
        if all(os.path.exists(x) for x in p):
            chk["decode_logits_max_abs_diff"][Bd] = float(np.abs(np.load(p[0]) - np.load(p[1])).max())
    p = [os.path.join(outdir, f"{s}_decode_long_logits.npy") for s in ("ours", "tunix")]
    if all(os.path.exists(x) for x in p):
        chk["decode_logits_max_abs_diff"]["long"] = float(np.abs(np.load(p[0]) - np.load(p[1])).max())
    o, t = np.asarray(res["ours"]["greedy_tokens"]), np.asarray(res["tunix"]["greedy_tokens"])
    chk["greedy_identical"] = bool(o.shape == t.shape and (o == t).all())
    chk["greedy_agreement"] = float((o == t).mean()) if o.shape == t.shape else None
    return chk


def print_table(res):
    o, t, m = res["ours"], res["tunix"], res["machine"]
    print()
    print(f"== opdjax vs Tunix {t['tunix']} (jax {t['jax']}, flax {t['flax']}), float32, {res['params'] / 1e6:.1f}M "
          f"params {res['arch']}, V={res['vocab']}; {m['cores']} cores (shared), {m['cpu']} ==")
    hdr = f"{'measure':<34} {'ours':>12} {'Tunix':>12} {'ours/Tunix':>11} {'load ours/Tunix':>16}"
    print(hdr)
    print("-" * len(hdr))
    lo = lambda r: common.median(r["other_busy_cores"]) or 0.0  # noqa: E731
    f, s = o["forward"], o["sample"]
    lab = f"forward B={f['B']} T={f['T']} tok/s"
    print(f"{lab:<34} {f['tokens_per_s']:12.1f} {t['forward']['tokens_per_s']:12.1f} "
          f"{f['tokens_per_s'] / t['forward']['tokens_per_s']:10.2f}x {lo(f):7.2f}/{lo(t['forward']):.2f}")
    lab = f"sample {s['rows']}x{s['new_tokens']} (P={s['prompt_len']}) tok/s"
    print(f"{lab:<34} {s['tokens_per_s']:12.1f} "
          f"{t['sample']['tokens_per_s']:12.1f} {s['tokens_per_s'] / t['sample']['tokens_per_s']:10.2f}x "
          f"{lo(s):7.2f}/{lo(t['sample']):.2f}")
    for Bd, d in o["decode"].items():
        td = t["decode"].get(Bd)
        lab = f"decode step B={Bd} S={res['cache_len']} ms"
        print(f"{lab:<34} {d['ms']:12.1f} "
              + (f"{td['ms']:12.1f} {td['ms'] / d['ms']:10.2f}x {lo(d):7.2f}/{lo(td):.2f}" if td else
                 f"{'-':>12} {'-':>11} {lo(d):7.2f}/-"))
    if "decode_long" in o and "decode_long" in t:
        lc, d, td = res["long_cache"], o["decode_long"], t["decode_long"]
        lab = f"decode step B={lc['B']} S={lc['S']} live={lc['live']} ms"
        print(f"{lab:<34} {d['ms']:12.1f} {td['ms']:12.1f} {td['ms'] / d['ms']:10.2f}x {lo(d):7.2f}/{lo(td):.2f}")
    c = res["checks"]
    print(f"checks: forward logits max|diff| {c['forward_logits_max_abs_diff']:.2e} (max|logit| "
          f"{c['forward_logits_max_abs']:.2f}); decode logits max|diff| "
          f"{', '.join(f'B={k} {v:.2e}' for k, v in c['decode_logits_max_abs_diff'].items())}; greedy tokens identical: "
          f"{c['greedy_identical']} ({100 * (c['greedy_agreement'] or 0):.1f}%)")
    bw = res["bandwidth"]
    print("bandwidth (GB/s): " + ", ".join(f"{k} {v:.1f}" for k, v in bw.items() if k not in ("array_MiB",)))
    print(f"memory floor of one decode step (weights + K/V of S={res['cache_len']} slots) / {bw['best_GBps']:.1f} GB/s:")
    for Bd, fl in res["floor"].items():
        print(f"  B={Bd:>3}: {fl['bytes']['total'] / 1e6:8.1f} MB (weights {fl['bytes']['weights'] / 1e6:.1f}, KV "
              f"{fl['bytes']['kv_cache'] / 1e6:.1f}) -> floor {fl['floor_ms']:6.2f} ms; ours {fl['ours_ms']:7.1f} ms = "
              f"{fl['ours_over_floor']:5.1f}x floor" + (f"; Tunix {fl['tunix_ms']:.1f} ms = {fl['tunix_over_floor']:.1f}x"
                                                          if fl.get("tunix_ms") else "")
              + f"  [compute floor {fl['compute_floor_ms']:.2f} ms at {res['matmul_peak_GFLOPs']:.0f} GFLOP/s]")
    if "dot_stream_GBps_m8" in res and "8" in res["floor"]:
        fl, r = res["floor"]["8"], res["dot_stream_GBps_m8"]
        at_dot = fl["bytes"]["total"] / (r * 1e9) * 1000
        print(f"  B=8 at the rate XLA's dots stream weights with 8 rows ({r:.1f} GB/s, measured here): {at_dot:.1f} ms; "
              f"ours = {fl['ours_ms'] / at_dot:.2f}x that")
    if "floor_long" in res:
        fl, lc = res["floor_long"], res["long_cache"]
        print(f"  long cache B={lc['B']} S={lc['S']}, {lc['live']} slots live: floor (weights + K/V of the live slots) "
              f"{fl['floor_ms']:.2f} ms; ours {fl['ours_ms']:.1f} ms = {fl['ours_over_floor']:.1f}x; Tunix "
              f"{fl['tunix_ms']:.1f} ms = {fl['tunix_over_floor']:.1f}x (Tunix reads all {lc['S']} slots)")
    print("ratios are speed ratios (ours/Tunix > 1: ours faster); sides ran one after the other on a shared "
          "machine: see the load column (other processes' busy cores, median)")


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if not os.path.exists(args.tunix_python):
        sys.exit(f"no Tunix venv at {args.tunix_python}: see the set-up at the top of {__file__}")
    import numpy as np
    t0 = time.perf_counter()
    ckpt = make_checkpoint(args)
    rng = np.random.default_rng(0)
    lo = 1  # id 0 is the pad id of both sides; prompts never contain it
    data = {"forward_tokens": rng.integers(lo, args.vocab, (args.fwd_batch, args.fwd_len)).tolist(),
            "prompts": rng.integers(lo, args.vocab, (args.rows, args.prompt_len)).tolist(), "pad_id": 0,
            "max_new_tokens": args.max_new_tokens, "cache_len": args.prompt_len + args.max_new_tokens,
            "cache_seed": 0, "greedy_tokens": args.greedy_tokens}
    if args.long_cache not in ("", "0"):
        B_, S_, live_ = (int(x) for x in args.long_cache.split(","))
        data["long_cache"] = {"B": B_, "S": S_, "live": live_}
    res = {"machine": common.machine_info(), "args": {k: v for k, v in vars(args).items()}, "ckpt": ckpt,
           "arch": args.arch, "vocab": args.vocab, "cache_len": data["cache_len"]}
    with tempfile.TemporaryDirectory(prefix="vs_tunix_") as outdir:
        res["bandwidth"] = measure_bandwidth(args.bw_mib)
        res["matmul_peak_GFLOPs"] = measure_matmul_peak(256 if args.quick else 2048)
        res["dot_stream_GBps_m8"] = measure_small_m_dot(args.arch)
        print(f"[bw] {res['bandwidth']}; matmul peak {res['matmul_peak_GFLOPs']:.1f} GFLOP/s; weights streamed by "
              f"[8, D] x [D, F] dots {res['dot_stream_GBps_m8']:.1f} GB/s", flush=True)
        cfg, res["ours"] = run_ours(args, ckpt, data, outdir)
        res["params"] = cfg.num_params()
        res["tunix"] = run_tunix(args, ckpt, cfg, data, outdir)
        res["checks"] = compare(outdir, res, args)
    bw = res["bandwidth"]["best_GBps"] * 1e9
    res["floor"] = {}
    for Bd, d in res["ours"]["decode"].items():
        by = decode_bytes(cfg, int(Bd), data["cache_len"])
        flops = 2 * cfg.num_params() * int(Bd)  # every weight once per row (attention's S-dependent part ignored)
        fl = {"bytes": by, "floor_ms": 1000 * by["total"] / bw, "ours_ms": d["ms"], "flops": flops,
              "compute_floor_ms": 1000 * flops / (res["matmul_peak_GFLOPs"] * 1e9)}
        fl["ours_over_floor"] = d["ms"] / fl["floor_ms"]
        if Bd in res["tunix"]["decode"]:
            fl["tunix_ms"] = res["tunix"]["decode"][Bd]["ms"]
            fl["tunix_over_floor"] = fl["tunix_ms"] / fl["floor_ms"]
        res["floor"][Bd] = fl
    if "decode_long" in res["ours"] and "decode_long" in res["tunix"]:
        lc = res["long_cache"] = data["long_cache"]
        by = decode_bytes(cfg, lc["B"], lc["live"])
        fl = {"bytes": by, "floor_ms": 1000 * by["total"] / bw, "ours_ms": res["ours"]["decode_long"]["ms"],
              "tunix_ms": res["tunix"]["decode_long"]["ms"]}
        fl["ours_over_floor"], fl["tunix_over_floor"] = fl["ours_ms"] / fl["floor_ms"], fl["tunix_ms"] / fl["floor_ms"]
        res["floor_long"] = fl
    res["ratios_ours_over_tunix"] = {
        "forward_tokens_per_s": res["ours"]["forward"]["tokens_per_s"] / res["tunix"]["forward"]["tokens_per_s"],
        "sample_tokens_per_s": res["ours"]["sample"]["tokens_per_s"] / res["tunix"]["sample"]["tokens_per_s"],
        "decode_step_speed": {Bd: res["tunix"]["decode"][Bd]["ms"] / d["ms"] for Bd, d in res["ours"]["decode"].items()
                              if Bd in res["tunix"]["decode"]}}
    res["caveats"] = [
        "ours' sampler also computes log_softmax, top-8 candidates and their log-probs every position (OPD needs "
        "them); Tunix's top_p=1 path samples from logits/T only",
        "at S <= qwen.KV_BLOCK (the S=160 rows) both attend over the whole fixed cache every step; on a longer cache "
        "ours reads only the filled prefix (blocks of KV_BLOCK slots), Tunix all S slots (the long-cache row)",
        "the sides run one after the other in separate processes on a shared 2-core machine: see other_busy_cores",
        "floor = bytes that must be read once (weights + K/V of S slots) / best measured bandwidth; it ignores "
        "compute (B=64 is no longer memory-bound on 2 cores: see compute_floor_ms, 2 x params x B FLOPs over the "
        "measured [2048, 2048] matmul peak) and the logits write",
    ]
    return common.finish(res, t0, print_table, args.json)


if __name__ == "__main__":
    main()
