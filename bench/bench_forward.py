"""Forward-pass throughput on this machine's CPU: opdjax (JAX/XLA) against transformers (PyTorch).

One run does, in order:
  1. this machine's `jnp.dot` peak FLOP/s (jitted square matmuls, best of several repeats);
  2. a random ~100M-parameter Qwen3 checkpoint written by transformers' `Qwen3ForCausalLM`
     and read back with `opdjax.models.hf_io.load_pretrained`, so both frameworks run the
     same weights (param counts are checked equal);
  3. our jitted `qwen.forward` (float32 logits) at [batch, seq]: compile excluded, warm-up,
     median of --repeats;
  4. transformers' `model(tokens).logits` (attn_implementation="sdpa": no mask is built for an
     unpadded batch, so SDPA runs its causal flash kernel) on the same weights and tokens, under
     `torch.inference_mode()` with torch.set_num_threads(cores);
  5. the ratio ours / PyTorch and the max |logits difference| (so we know the timed
     computations are the same).

FLOP count (the same for both frameworks): 2 FLOPs per multiply-add of every matmul
(q/k/v/o, gate/up/down, lm_head) plus attention QK^T and PV over the *causal* average
of (T+1)/2 keys per query, i.e. `cfg.flops_per_token((T+1)/2)`. Norms, RoPE, softmax and other
elementwise work are not counted. The "dense" count (every query against all T keys, which is
what a masked-softmax implementation actually computes) is in the JSON.

Timing on a shared machine: the runs of the frameworks alternate (ours, torch, ours, ...), each
after a short sleep (--gap) so neither runtime's spinning worker threads steal the other's
cores; every run records how many cores *other* processes used meanwhile, and the table shows
min, median and the median over quiet runs. `--wait-quiet S` waits (up to S s) for an idle
machine before each timed run. Under load, torch's OpenMP barriers degrade much more than XLA's
thread pool does, so a loaded run says little about the ratio.

    .venv/bin/python bench/bench_forward.py                   # full size (~1.5 min on 2 cores)
    .venv/bin/python bench/bench_forward.py --quick           # smoke run (< 30 s)
    .venv/bin/python bench/bench_forward.py --wait-quiet 20 --json out.json --xla-flags="--xla_cpu_use_onednn=true"
    .venv/bin/python bench/bench_forward.py --compare-module /tmp/qwen_copy.py   # A/B a change

`--qwen-module path.py` times a modified copy of opdjax/models/qwen.py (same `forward`
signature) instead of the package's; `--compare-module path.py` times one *in addition*, on the
same params and interleaved with ours, to try a change without touching the package.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root


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
    p.add_argument("--wait-quiet", type=float, default=0.0,
                   help="before each timed run wait up to this many seconds for other processes "
                        "to leave the machine idle (for shared machines; 0 = don't wait)")
    p.add_argument("--skip-torch", action="store_true", help="time only our forward")
    p.add_argument("--skip-peak", action="store_true", help="skip the dot peak (fractions then omitted)")
    p.add_argument("--xla-flags", default="",
                   help="appended to XLA_FLAGS before jax is imported; pass as --xla-flags=\"--a=1 --b=2\"")
    p.add_argument("--matmul-precision", default=None,
                   help="jax_default_matmul_precision (e.g. highest, default); unset = jax default")
    p.add_argument("--qwen-module", default=None,
                   help="time a modified copy of opdjax/models/qwen.py (path to a .py) instead")
    p.add_argument("--compare-module", default=None,
                   help="also time this modified copy of qwen.py (reported as 'variant'), "
                        "interleaved with ours, on the same params")
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


def _other_busy_cores(busy0, own0, wall0):
    """Cores other processes kept busy since (busy0, own0, wall0) = (_busy_cpu_seconds(),
    time.process_time(), time.perf_counter())."""
    busy1, own1, wall1 = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
    if busy0 is None or busy1 is None or wall1 <= wall0:
        return None
    return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (wall1 - wall0))


def _wait_quiet(max_wait: float, threshold: float = 0.1, window: float = 1.0) -> float | None:
    """Sleep until other processes use < threshold cores over `window` s (or max_wait passes);
    returns the last measured load."""
    deadline = time.perf_counter() + max_wait
    while True:
        b0, o0, w0 = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
        time.sleep(window)
        other = _other_busy_cores(b0, o0, w0)
        if other is None or other < threshold or time.perf_counter() > deadline:
            return other


def _time_runners(runners: dict, repeats: int, warmup: int, interleave: bool, gap: float,
                  wait_quiet: float = 0.0):
    """Wall and process-CPU seconds of each runner, and the load other processes put on the
    machine during each run. Interleaved (a, b, a, b, ...) by default so that load from other
    processes on a shared machine hits every runner alike. With wait_quiet > 0, each run first
    waits (up to that many seconds) for the machine to be idle."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    times = {n: [] for n in runners}
    cpu = {n: [] for n in runners}
    load = {n: [] for n in runners}
    order = ([n for _ in range(repeats) for n in runners] if interleave
             else [n for n in runners for _ in range(repeats)])
    b_all, o_all, w_all = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
    for n in order:
        if wait_quiet > 0:
            _wait_quiet(wait_quiet)
        time.sleep(gap)  # let the other runtime's spinning worker threads go to sleep
        b0, c0, t0 = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
        runners[n]()
        times[n].append(time.perf_counter() - t0)
        cpu[n].append(time.process_time() - c0)
        load[n].append(_other_busy_cores(b0, c0, t0))
    other = _other_busy_cores(b_all, o_all, w_all)  # the sleeps count: idle is idle for everyone
    times["_background"] = {"other_processes_busy_cores": other, "loadavg": _loadavg(),
                            "per_run_other_busy_cores": load}
    worst = max((x for v in load.values() for x in v if x is not None), default=None)
    if worst is not None and worst > 0.25:
        print(f"WARNING: other processes kept up to {worst:.2f} cores busy during timed runs "
              f"(loadavg {_loadavg()}); medians are inflated: see min and the quiet-run median",
              flush=True)
    return times, cpu, load


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def jax_dot_peak(sizes, repeats, dtype_name, wait_quiet=0.0):
    """Best FLOP/s of jitted square `jnp.dot`s. For bfloat16 both output types are timed: XLA:CPU
    only uses AMX for a bf16 x bf16 dot that accumulates to float32 (preferred_element_type)."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(dtype_name)
    variants = {"": jax.jit(jnp.dot)}
    if dtype != jnp.float32:
        variants["->f32"] = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    rows = []
    for n in sizes:
        ka, kb = jax.random.split(jax.random.PRNGKey(n))
        a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
        b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
        for suffix, dot in variants.items():
            dot(a, b).block_until_ready()  # compile + warm
            if wait_quiet > 0:
                _wait_quiet(wait_quiet)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                dot(a, b).block_until_ready()
                best = min(best, time.perf_counter() - t0)
            rows.append({"n": n, "variant": dtype_name + suffix, "seconds": best,
                         "flops_per_s": 2.0 * n ** 3 / best})
    return rows


def torch_mm_peak(sizes, repeats, dtype_name, wait_quiet=0.0):
    import torch

    dtype = getattr(torch, dtype_name)
    rows = []
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for n in sizes:
            a = torch.randn(n, n, generator=g).to(dtype)
            b = torch.randn(n, n, generator=g).to(dtype)
            torch.mm(a, b)
            if wait_quiet > 0:
                _wait_quiet(wait_quiet)
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


LABELS = {"ours": "opdjax", "variant": "variant", "torch": "pytorch"}


def load_qwen_module(path, name="qwen_variant"):
    if path is None:
        from opdjax.models import qwen
        return qwen
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
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
            rows = jax_dot_peak(sizes, args.peak_repeats, dt, args.wait_quiet)
            res["jax_dot_peak"][dt] = rows
            for r in rows:
                print(f"  jnp.dot {r['variant']:<13} {r['n']:5d}^2: {r['seconds'] * 1e3:8.2f} ms  "
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
    if args.compare_module:
        alt = load_qwen_module(args.compare_module, "qwen_compare")
        t0 = time.perf_counter()
        alt_compiled = jax.jit(lambda p, t: alt.forward(p, t, cfg)[0]).lower(params, tokens_j).compile()
        alt_compile_s = time.perf_counter() - t0
        runners["variant"] = lambda: alt_compiled(params, tokens_j).block_until_ready()
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
    times, cpu, load = _time_runners(runners, args.repeats, args.warmup, args.interleave, args.gap,
                                     args.wait_quiet)
    res["background_load"] = times.pop("_background")
    for name in runners:
        r = _result(times[name], cpu[name], load[name], B * T, flops_causal, flops_dense, peak)
        res[name] = r
        label = LABELS[name].ljust(7)
        print(f"{label}: median {r['median_s'] * 1e3:.1f} ms (min {r['min_s'] * 1e3:.1f})  "
              f"{r['tokens_per_s']:.0f} tok/s  {r['flops_per_s'] / 1e9:.1f} GFLOP/s  "
              f"(runs: {_fmt(r['times_s'])}; cpu {_fmt(r['cpu_s'])}; other load "
              f"{', '.join('?' if x is None else f'{x:.2f}' for x in r['other_load'])} cores)", flush=True)
    res["ours"]["compile_s"] = compile_s
    res["ours"]["module"] = args.qwen_module or "opdjax.models.qwen"
    if "variant" in res:
        res["variant"]["module"] = args.compare_module
        res["variant"]["compile_s"] = alt_compile_s
        v_logits = np.asarray(alt_compiled(params, tokens_j), dtype=np.float32)
        res["variant"]["max_abs_diff_vs_ours"] = float(np.abs(v_logits - np.asarray(
            compiled(params, tokens_j), dtype=np.float32)).max())
        res["ratio_variant_over_ours"] = res["ours"]["median_s"] / res["variant"]["median_s"]
        res["ratio_variant_over_ours_min"] = res["ours"]["min_s"] / res["variant"]["min_s"]
    ours_logits = np.asarray(compiled(params, tokens_j), dtype=np.float32)

    if not args.skip_torch:
        torch_logits = runners["torch"]().float().numpy()
        if not args.skip_peak:
            rows = torch_mm_peak(sizes, args.peak_repeats, args.dtype, args.wait_quiet)
            res["torch_mm_peak"] = rows
            res["torch_mm_peak_flops_per_s"] = max(r["flops_per_s"] for r in rows)
        diff = np.abs(ours_logits - torch_logits)
        scale = float(np.abs(torch_logits).max())
        res["logits_check"] = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                               "max_abs_logit": scale,
                               "argmax_agreement": float((ours_logits.argmax(-1) == torch_logits.argmax(-1)).mean())}
        res["ratio_ours_over_torch"] = res["ours"]["tokens_per_s"] / res["torch"]["tokens_per_s"]
        res["ratio_ours_over_torch_min"] = res["torch"]["min_s"] / res["ours"]["min_s"]
        if "variant" in res:
            res["ratio_variant_over_torch"] = res["torch"]["median_s"] / res["variant"]["median_s"]
            res["ratio_variant_over_torch_min"] = res["torch"]["min_s"] / res["variant"]["min_s"]

    res["total_s"] = time.perf_counter() - t_start
    _print_table(res, args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return res


QUIET = 0.1  # a run counts as quiet when other processes used fewer cores than this meanwhile


def _result(times, cpu, load, tokens, flops_causal, flops_dense, peak):
    med, best = statistics.median(times), min(times)
    quiet = [t for t, x in zip(times, load) if x is not None and x < QUIET]
    r = {"median_s": med, "min_s": best, "times_s": times, "cpu_s": cpu, "other_load": load,
         "quiet_runs": len(quiet), "quiet_median_s": statistics.median(quiet) if quiet else None,
         "tokens_per_s": tokens / med,
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
           f"{'GFLOP/s':>8} {'%peak':>6} {'%peak@min':>9} {'cpu-s/run':>9} {'quiet med ms (n)':>17}")
    print(hdr)
    print("-" * len(hdr))
    for name in ("ours", "variant", "torch"):
        if name not in res:
            continue
        r = res[name]
        fr = f"{100 * r['fraction_of_peak']:5.1f}%" if peak else "   n/a"
        frm = f"{100 * r['fraction_of_peak_min']:8.1f}%" if peak else "      n/a"
        label = LABELS[name]
        print(f"{label:<9} {r['median_s'] * 1e3:10.1f} {r['min_s'] * 1e3:8.1f} {r['tokens_per_s']:9.0f} "
              f"{r['tokens_per_s_min']:9.0f} {r['flops_per_s'] / 1e9:8.1f} {fr} {frm} "
              f"{statistics.median(r['cpu_s']):9.2f} "
              + (f"{r['quiet_median_s'] * 1e3:11.1f} ({r['quiet_runs']})" if r["quiet_runs"] else f"{'none':>17}"))
    if "ratio_ours_over_torch" in res:
        c = res["logits_check"]
        print(f"ratio ours/pytorch (tokens/s): {res['ratio_ours_over_torch']:.3f} at the median, "
              f"{res['ratio_ours_over_torch_min']:.3f} at the min")
        if "ratio_variant_over_torch" in res:
            print(f"ratio variant/pytorch: {res['ratio_variant_over_torch']:.3f} at the median, "
                  f"{res['ratio_variant_over_torch_min']:.3f} at the min")
        print(f"logits: max |diff| {c['max_abs_diff']:.3g} (max |logit| {c['max_abs_logit']:.3g}), "
              f"mean |diff| {c['mean_abs_diff']:.3g}, argmax agreement {100 * c['argmax_agreement']:.2f}%")
    if "ratio_variant_over_ours" in res:
        print(f"variant ({res['variant']['module']}) / ours: {res['ratio_variant_over_ours']:.3f}x "
              f"at the median, {res['ratio_variant_over_ours_min']:.3f}x at the min; max |logits "
              f"diff| {res['variant']['max_abs_diff_vs_ours']:.3g}")
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
