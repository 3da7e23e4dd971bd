"""Forward-pass throughput on this machine's CPU: opdjax (JAX/XLA) against transformers (PyTorch).

One run does, in order:
  1. this machine's `jnp.dot` peak FLOP/s (jitted square matmuls, best of several repeats);
  2. a random ~100M-parameter Qwen3 checkpoint written by transformers' `Qwen3ForCausalLM`
     and read back with `opdjax.models.hf_io.load_pretrained`, so both frameworks run the
     same weights;
  3. our jitted `qwen.forward` (float32 logits) at [batch, seq]: compile excluded, warm-up,
     median of --repeats;
  4. transformers' `model(tokens).logits` on the same weights and tokens, under
     `torch.inference_mode()` with torch.set_num_threads(cores);
  5. the ratio ours / PyTorch and the max |logits difference| (so we know the timed
     computations are the same).

FLOP count (the same for both frameworks): 2 FLOPs per multiply-add of every matmul
(q/k/v/o, gate/up/down, lm_head) plus attention QK^T and PV over the *causal* average
of (T+1)/2 keys per query, i.e. `cfg.flops_per_token((T+1)/2)`. Norms, RoPE, softmax and other
elementwise work are not counted. The "dense" count (every query against all T keys, which is
what a masked-softmax implementation actually computes) is reported alongside.

    .venv/bin/python bench/bench_forward.py                   # full size (~3-4 min on 2 cores)
    .venv/bin/python bench/bench_forward.py --quick           # smoke run (< 60 s)
    .venv/bin/python bench/bench_forward.py --json out.json --xla-flags "--xla_cpu_use_onednn=true"

`--qwen-module path/to/qwen_copy.py` times a modified copy of opdjax/models/qwen.py (same
`forward` signature) on the same params, to try changes without touching the package.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--tie", action="store_true", help="tie input and output embeddings")
    p.add_argument("--repeats", type=int, default=5, help="timed forward runs per framework (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed forward runs after compile")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="params / activations dtype for both frameworks (logits are float32 in ours)")
    p.add_argument("--peak-sizes", type=str, default="1024,2048,3072,4096",
                   help="comma-separated square matmul sizes for the jnp.dot peak")
    p.add_argument("--peak-repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = os.cpu_count())")
    p.add_argument("--torch-attn", default="sdpa", choices=("sdpa", "eager"),
                   help="transformers attn_implementation")
    p.add_argument("--no-interleave", dest="interleave", action="store_false",
                   help="time all of ours, then all of PyTorch (default: alternate run by run)")
    p.add_argument("--gap", type=float, default=0.5,
                   help="seconds of sleep before each timed run, so neither runtime's idle worker "
                        "threads (XLA's pool, torch's OpenMP) still spin during the other's run")
    p.add_argument("--skip-torch", action="store_true", help="time only our forward")
    p.add_argument("--skip-peak", action="store_true", help="skip the dot peak (fractions then omitted)")
    p.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before jax is imported")
    p.add_argument("--matmul-precision", default=None,
                   help="jax_default_matmul_precision (e.g. highest, default); unset = jax default")
    p.add_argument("--qwen-module", default=None,
                   help="time a modified copy of opdjax/models/qwen.py (path to a .py) instead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results to this path as JSON")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in well under a minute")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.layers = 2, 64, 2
        args.hidden, args.intermediate, args.heads, args.kv_heads, args.head_dim = 128, 256, 4, 2, 32
        args.vocab = 1024
        args.repeats, args.warmup = 3, 1
        args.peak_sizes, args.peak_repeats = "256,512", 3
    return args


# ---------------------------------------------------------------------------------------- timing
def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes on this machine have spent busy (from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _time_runners(runners: dict, repeats: int, warmup: int, interleave: bool, gap: float):
    """Wall and process-CPU seconds of each runner. Interleaved (a, b, a, b, ...) by default so
    that load from other processes on a shared machine hits every runner alike; also reports
    how many cores *other* processes kept busy meanwhile (a warning sign for the numbers)."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    times = {n: [] for n in runners}
    cpu = {n: [] for n in runners}
    order = ([n for _ in range(repeats) for n in runners] if interleave
             else [n for n in runners for _ in range(repeats)])
    busy0, own0, wall0 = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
    for n in order:
        time.sleep(gap)  # let the other runtime's spinning worker threads go to sleep
        c0, t0 = time.process_time(), time.perf_counter()
        runners[n]()
        times[n].append(time.perf_counter() - t0)
        cpu[n].append(time.process_time() - c0)
    busy1, own1, wall1 = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
    other = None
    if busy0 is not None and busy1 is not None:  # the sleeps count: idle time is idle for everyone
        other = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (wall1 - wall0))
    times["_background"] = {"other_processes_busy_cores": other, "loadavg": _loadavg()}
    if other is not None and other > 0.25:
        print(f"WARNING: other processes kept {other:.2f} cores busy while timing "
              f"(loadavg {_loadavg()}); medians are inflated, min is the better estimate", flush=True)
    return times, cpu


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def jax_dot_peak(sizes, repeats, dtype_name):
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(dtype_name)
    dot = jax.jit(jnp.dot)
    rows = []
    for n in sizes:
        ka, kb = jax.random.split(jax.random.PRNGKey(n))
        a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
        b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
        dot(a, b).block_until_ready()  # compile + warm
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            dot(a, b).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        rows.append({"n": n, "seconds": best, "flops_per_s": 2.0 * n ** 3 / best})
    return rows


def torch_mm_peak(sizes, repeats, dtype_name):
    import torch

    dtype = getattr(torch, dtype_name)
    rows = []
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for n in sizes:
            a = torch.randn(n, n, generator=g).to(dtype)
            b = torch.randn(n, n, generator=g).to(dtype)
            torch.mm(a, b)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                torch.mm(a, b)
                best = min(best, time.perf_counter() - t0)
            rows.append({"n": n, "seconds": best, "flops_per_s": 2.0 * n ** 3 / best})
    return rows


# ---------------------------------------------------------------------------------------- model
def make_checkpoint(args, out_dir):
    """Random transformers Qwen3ForCausalLM written to out_dir; returns the torch model."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(args.seed)
    hf_cfg = Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        max_position_embeddings=max(4096, args.seq), tie_word_embeddings=args.tie,
        rms_norm_eps=1e-6, use_sliding_window=False, attention_bias=False,
    )
    hf_cfg._attn_implementation = args.torch_attn
    model = Qwen3ForCausalLM(hf_cfg).eval()  # float32, initializer_range=0.02 normal weights
    with torch.no_grad():  # non-trivial norm weights so a mis-mapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    return model


def load_qwen_module(path):
    if path is None:
        from opdjax.models import qwen
        return qwen
    spec = importlib.util.spec_from_file_location("qwen_variant", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["qwen_variant"] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv=None):
    args = parse_args(argv)
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    if args.matmul_precision:
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    from opdjax.models import hf_io

    cores = os.cpu_count() or 1
    threads = args.threads or cores
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    res = {
        "machine": {"cpu": _cpu_name(), "cores": cores, "platform": platform.platform(),
                    "jax": jax.__version__, "torch": torch.__version__,
                    "transformers": __import__("transformers").__version__,
                    "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
                    "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision),
                    "torch_threads": threads, "torch_attn": args.torch_attn},
        "args": vars(args),
    }
    print(f"# {res['machine']['cpu']}, {cores} cores; jax {jax.__version__} ({jax.devices()[0].platform}), "
          f"torch {torch.__version__} ({threads} threads); XLA_FLAGS={res['machine']['XLA_FLAGS']!r}",
          flush=True)

    # 1. dot peak ------------------------------------------------------------------------
    sizes = [int(s) for s in args.peak_sizes.split(",") if s]
    peak = None
    if not args.skip_peak:
        peak_dtypes = ["float32"] + (["bfloat16"] if args.dtype == "bfloat16" else [])
        res["jax_dot_peak"] = {}
        for dt in peak_dtypes:
            rows = jax_dot_peak(sizes, args.peak_repeats, dt)
            res["jax_dot_peak"][dt] = rows
            for r in rows:
                print(f"  jnp.dot {dt} {r['n']:5d}^2: {r['seconds'] * 1e3:8.2f} ms  "
                      f"{r['flops_per_s'] / 1e9:7.1f} GFLOP/s", flush=True)
        peak = max(r["flops_per_s"] for r in res["jax_dot_peak"][args.dtype])
        res["peak_flops_per_s"] = peak
        print(f"jnp.dot {args.dtype} peak: {peak / 1e9:.1f} GFLOP/s", flush=True)

    # 2. checkpoint ----------------------------------------------------------------------
    with tempfile.TemporaryDirectory(prefix="bench_fwd_") as ckpt:
        t0 = time.perf_counter()
        tmodel = make_checkpoint(args, ckpt)
        params, cfg = hf_io.load_pretrained(ckpt, dtype=args.dtype)
        jax.block_until_ready(params)
        print(f"checkpoint written + loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    n_params = cfg.num_params()
    n_torch = sum(p.numel() for p in tmodel.parameters())
    n_ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert n_params == n_torch == n_ours, (n_params, n_torch, n_ours)
    B, T = args.batch, args.seq
    flops_causal = cfg.flops_per_token((T + 1) / 2) * B * T
    flops_dense = cfg.flops_per_token(T) * B * T
    res["model"] = {"config": {k: getattr(cfg, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
        "head_dim", "tie_word_embeddings", "dtype")},
        "num_params": n_params, "num_params_non_embedding":
            n_params - cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2),
        "flops_per_forward_causal": flops_causal, "flops_per_forward_dense": flops_dense}
    print(f"model: {n_params:,} params ({n_params / 1e6:.2f}M), L={cfg.num_layers} D={cfg.hidden_size} "
          f"F={cfg.intermediate_size} H={cfg.num_heads} K={cfg.num_kv_heads} hd={cfg.head_dim} "
          f"V={cfg.vocab_size}; forward [{B}x{T}]: {flops_causal / 1e9:.1f} GFLOP (causal count), "
          f"{flops_dense / 1e9:.1f} GFLOP (dense attention)", flush=True)

    rng = np.random.default_rng(args.seed)
    tokens_np = rng.integers(0, cfg.vocab_size, size=(B, T), dtype=np.int32)

    # 3./4. ours and PyTorch ----------------------------------------------------------------
    qwen = load_qwen_module(args.qwen_module)
    fwd = jax.jit(lambda p, t: qwen.forward(p, t, cfg)[0])
    tokens_j = jnp.asarray(tokens_np)
    t0 = time.perf_counter()
    compiled = fwd.lower(params, tokens_j).compile()
    compile_s = time.perf_counter() - t0
    runners = {"ours": lambda: compiled(params, tokens_j).block_until_ready()}
    if not args.skip_torch:
        tmodel = tmodel.to(getattr(torch, args.dtype))
        tok_t = torch.from_numpy(tokens_np.astype(np.int64))

        def run_torch():
            with torch.inference_mode():
                return tmodel(input_ids=tok_t, use_cache=False).logits
        runners["torch"] = run_torch
    print(f"ours compiled in {compile_s:.1f} s; timing {', '.join(runners)} "
          f"({args.warmup} warm-up + {args.repeats} runs each, "
          f"{'interleaved' if args.interleave else 'one after the other'})", flush=True)
    times, cpu = _time_runners(runners, args.repeats, args.warmup, args.interleave, args.gap)
    res["background_load"] = times.pop("_background")
    for name in runners:
        r = _result(times[name], cpu[name], B * T, flops_causal, flops_dense, peak)
        res[name] = r
        label = "ours   " if name == "ours" else "pytorch"
        print(f"{label}: median {r['median_s'] * 1e3:.1f} ms (min {r['min_s'] * 1e3:.1f})  "
              f"{r['tokens_per_s']:.0f} tok/s  {r['flops_per_s'] / 1e9:.1f} GFLOP/s  "
              f"(runs: {_fmt(r['times_s'])}; cpu {_fmt(r['cpu_s'])})", flush=True)
    res["ours"]["compile_s"] = compile_s
    res["ours"]["module"] = args.qwen_module or "opdjax.models.qwen"
    ours_logits = np.asarray(compiled(params, tokens_j), dtype=np.float32)

    if not args.skip_torch:
        torch_logits = runners["torch"]().float().numpy()
        if not args.skip_peak:
            rows = torch_mm_peak(sizes, args.peak_repeats, args.dtype)
            res["torch_mm_peak"] = rows
            res["torch_mm_peak_flops_per_s"] = max(r["flops_per_s"] for r in rows)
        diff = np.abs(ours_logits - torch_logits)
        scale = float(np.abs(torch_logits).max())
        res["logits_check"] = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                               "max_abs_logit": scale,
                               "argmax_agreement": float((ours_logits.argmax(-1) == torch_logits.argmax(-1)).mean())}
        res["ratio_ours_over_torch"] = res["ours"]["tokens_per_s"] / res["torch"]["tokens_per_s"]
        res["ratio_ours_over_torch_min"] = res["torch"]["min_s"] / res["ours"]["min_s"]

    res["total_s"] = time.perf_counter() - t_start
    _print_table(res, args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return res


def _result(times, cpu, tokens, flops_causal, flops_dense, peak):
    med, best = statistics.median(times), min(times)
    r = {"median_s": med, "min_s": best, "times_s": times, "cpu_s": cpu, "tokens_per_s": tokens / med,
         "tokens_per_s_min": tokens / best, "flops_per_s": flops_causal / med,
         "flops_per_s_min": flops_causal / best, "flops_per_s_dense_count": flops_dense / med}
    if peak:
        r["fraction_of_peak"] = r["flops_per_s"] / peak
        r["fraction_of_peak_dense_count"] = r["flops_per_s_dense_count"] / peak
        r["fraction_of_peak_min"] = r["flops_per_s_min"] / peak
    return r


def _fmt(times):
    return ", ".join(f"{t * 1e3:.0f}" for t in times) + " ms"


def _print_table(res, args):
    B, T = args.batch, args.seq
    peak = res.get("peak_flops_per_s")
    m = res["model"]
    print()
    print(f"== forward [{B}x{T}] {args.dtype}, {m['num_params'] / 1e6:.2f}M params, "
          f"{m['flops_per_forward_causal'] / 1e9:.1f} GFLOP/forward (causal count) ==")
    if peak:
        tp = res.get("torch_mm_peak_flops_per_s")
        print(f"jnp.dot {args.dtype} peak: {peak / 1e9:.1f} GFLOP/s"
              + (f"   (torch.mm peak: {tp / 1e9:.1f} GFLOP/s)" if tp else ""))
    hdr = (f"{'framework':<9} {'median ms':>10} {'min ms':>8} {'tokens/s':>9} {'tok/s@min':>9} "
           f"{'GFLOP/s':>8} {'%peak':>6} {'%peak@min':>9} {'cpu-s/run':>9}")
    print(hdr)
    print("-" * len(hdr))
    for name in ("ours", "torch"):
        if name not in res:
            continue
        r = res[name]
        fr = f"{100 * r['fraction_of_peak']:5.1f}%" if peak else "   n/a"
        frm = f"{100 * r['fraction_of_peak_min']:8.1f}%" if peak else "      n/a"
        label = "opdjax" if name == "ours" else "pytorch"
        print(f"{label:<9} {r['median_s'] * 1e3:10.1f} {r['min_s'] * 1e3:8.1f} {r['tokens_per_s']:9.0f} "
              f"{r['tokens_per_s_min']:9.0f} {r['flops_per_s'] / 1e9:8.1f} {fr} {frm} "
              f"{statistics.median(r['cpu_s']):9.2f}")
    if "ratio_ours_over_torch" in res:
        c = res["logits_check"]
        print(f"ratio ours/pytorch (tokens/s): {res['ratio_ours_over_torch']:.3f} at the median, "
              f"{res['ratio_ours_over_torch_min']:.3f} at the min")
        print(f"logits: max |diff| {c['max_abs_diff']:.3g} (max |logit| {c['max_abs_logit']:.3g}), "
              f"mean |diff| {c['mean_abs_diff']:.3g}, argmax agreement {100 * c['argmax_agreement']:.2f}%")
    bg = res.get("background_load") or {}
    if bg.get("other_processes_busy_cores") is not None:
        print(f"other processes' load while timing: {bg['other_processes_busy_cores']:.2f} cores "
              f"(loadavg {bg['loadavg']})")
    print(f"total bench time {res['total_s']:.0f} s")


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


if __name__ == "__main__":
    main()
