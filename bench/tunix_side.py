"""Tunix's side of bench_vs_tunix.py: Google Tunix 0.1.7's NNX Qwen3 and its Sampler, timed.

Runs in the SEPARATE Tunix venv (never in opdjax's .venv; see bench_vs_tunix.py for its set-up):

    /work/bench_tunix_venv/bin/python bench/tunix_side.py --spec spec.json --out tunix.json

spec.json (written by bench_vs_tunix.py): the HF checkpoint dir and its shape, the forward tokens,
the sampling prompts, the decode-step batch sizes and cache length, repeats / warm-up. Nothing here
imports opdjax (its pins differ in this venv); arrays the two sides compare go to .npy files.

What is timed (jit compiled first, --warmup untimed calls, then median of --repeats):
  forward   `model(tokens, positions, cache=None, attention_mask=causal [B, T, T])`, [B, T, V] logits;
  sample    `Sampler.__call__(prompts, max_generation_steps=N, temperature=1, top_p=1.0)` (Tunix's
            top_p mode; with top_p=1 and no top_k it is `jax.random.categorical` on logits / T),
            eos_tokens=[-1] so that no row stops early (exactly N tokens per row, like ours);
            includes Tunix's host-side tokenize / pad / detokenize of the stub tokenizer (tiny);
  decode    one cached step `model(token [B, 1], position [B, 1], cache, mask [B, 1, S])` with the
            cache donated (as the Sampler donates its state), the same random cache contents as
            ours (numpy default_rng(seed) over [L, B, S, K, hd], split per layer), S-1 slots filled.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class IdTokenizer:
    """Tunix's Sampler takes strings: a prompt is its token ids written out ("5 17 9")."""

    def __init__(self, pad_id: int, eos_id: int):
        self._pad, self._eos = pad_id, eos_id

    def encode(self, text, **kw):
        return [int(t) for t in text.split()]

    def decode(self, ids, **kw):
        return ""

    def bos_id(self):
        return None

    def eos_id(self):
        return self._eos

    def pad_id(self):
        return self._pad


def cache_arrays(seed, L, B, S, K, hd):
    import numpy as np
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((L, B, S, K, hd), dtype=np.float32)
    v = rng.standard_normal((L, B, S, K, hd), dtype=np.float32)
    return k, v


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    with open(args.spec) as f:
        spec = json.load(f)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import jax.numpy as jnp
    import numpy as np
    import flax
    import tunix
    from flax import nnx
    from tunix.generate import sampler as sampler_lib
    from tunix.models.qwen3 import model as qmodel
    from tunix.models.qwen3 import params as qparams

    from bench_forward import _busy_cpu_seconds, _other_busy_cores, _wait_quiet

    try:
        import importlib.metadata as md
        tunix_version = md.version("google-tunix")
    except Exception:  # pragma: no cover
        tunix_version = getattr(tunix, "__version__", "?")
    a = spec["arch"]
    cfg = qmodel.ModelConfig(
        num_layers=a["num_layers"], vocab_size=a["vocab_size"], embed_dim=a["hidden_size"],
        hidden_dim=a["intermediate_size"], num_heads=a["num_heads"], head_dim=a["head_dim"],
        num_kv_heads=a["num_kv_heads"], rope_theta=int(a["rope_theta"]), norm_eps=a["rms_norm_eps"],
        use_tied_embedding=a["tie_word_embeddings"], dtype=jnp.float32, param_dtype=jnp.float32)
    t0 = time.perf_counter()
    model = qparams.create_model_from_safe_tensors(spec["ckpt"], cfg, mesh=None, dtype=jnp.float32)
    load_s = time.perf_counter() - t0
    graphdef, state = nnx.split(model)
    warmup, repeats, wait_quiet = int(spec["warmup"]), int(spec["repeats"]), float(spec["wait_quiet"])
    outdir = spec["outdir"]
    res = {"tunix": tunix_version, "jax": jax.__version__, "flax": flax.__version__, "load_s": load_s,
           "nnx_params": int(sum(x.size for x in jax.tree.leaves(state)))}

    def timed(fn, label):
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        for _ in range(warmup):
            fn()
        times, loads = [], []
        for _ in range(repeats):
            if wait_quiet > 0:
                _wait_quiet(wait_quiet)
            b0, c0, w0 = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            loads.append(_other_busy_cores(b0, c0, w0))
        med = statistics.median(times)
        print(f"[tunix] {label}: median {med:.4f} s (first call {first:.2f} s) times {['%.4f' % t for t in times]}",
              flush=True)
        return {"median_s": med, "min_s": min(times), "times_s": times, "first_call_s": first,
                "other_busy_cores": loads}

    # ---- (a) forward
    fwd_tokens = jnp.asarray(np.asarray(spec["forward_tokens"], np.int32))
    B, T = fwd_tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))

    @jax.jit
    def fwd(state, tokens, positions, mask):
        m = nnx.merge(graphdef, state)
        return m(tokens, positions, None, mask)[0]

    r = timed(lambda: jax.block_until_ready(fwd(state, fwd_tokens, positions, causal)), f"forward B={B} T={T}")
    logits = np.asarray(fwd(state, fwd_tokens, positions, causal))
    np.save(os.path.join(outdir, "tunix_forward_logits.npy"), logits[:, ::spec["forward_check_stride"]])
    del logits
    res["forward"] = {**r, "tokens_per_s": B * T / r["median_s"], "B": B, "T": T}

    # ---- (b) sampling, and the greedy check
    prompts = spec["prompts"]
    tok = IdTokenizer(spec["pad_id"], -1)
    P, N = len(prompts[0]), int(spec["max_new_tokens"])
    strings = [" ".join(str(t) for t in p) for p in prompts]
    cache_cfg = sampler_lib.CacheConfig(cache_size=P + N, num_layers=a["num_layers"],
                                        num_kv_heads=a["num_kv_heads"], head_dim=a["head_dim"])
    sampler = sampler_lib.Sampler(model, tok, cache_cfg)
    seeds = iter(range(1000))

    def run_sample():
        out = sampler(strings, max_generation_steps=N, max_prompt_length=P, temperature=1.0, top_p=1.0,
                      top_k=None, eos_tokens=[-1], seed=next(seeds))
        jax.block_until_ready(out.tokens)
        return out

    out = run_sample()
    assert all(len(t) == N for t in out.tokens), [len(t) for t in out.tokens]
    r = timed(run_sample, f"sample {len(prompts)}x{N}")
    res["sample"] = {**r, "tokens_per_s": len(prompts) * N / r["median_s"], "rows": len(prompts),
                     "new_tokens": N, "prompt_len": P, "cache_size": P + N}
    G = int(spec["greedy_tokens"])
    gsampler = sampler_lib.Sampler(model, tok, sampler_lib.CacheConfig(P + G, a["num_layers"], a["num_kv_heads"],
                                                                       a["head_dim"]))
    gout = gsampler(strings, max_generation_steps=G, max_prompt_length=P, temperature=0.0, eos_tokens=[-1])
    res["greedy_tokens"] = [np.asarray(t).tolist() for t in gout.tokens]

    # ---- (c) one decode step, B in decode_batches, cache length S (S - 1 slots filled)
    S, L, K, hd = int(spec["cache_len"]), a["num_layers"], a["num_kv_heads"], a["head_dim"]

    def step(state, token, pos, cache, mask):
        m = nnx.merge(graphdef, state)
        return m(token, pos, cache, mask)

    step_jit = jax.jit(step, donate_argnums=(3,))

    def decode_case(Bd, S, live):
        """One step of Bd rows on a cache of S slots, the first live - 1 filled; writes slot live - 1."""
        k, v = cache_arrays(spec["cache_seed"], L, Bd, S, K, hd)
        k[:, :, live - 1:] = 0
        v[:, :, live - 1:] = 0
        token = jnp.asarray((np.arange(Bd, dtype=np.int32) * 7919 + 11) % a["vocab_size"])[:, None]
        pos = jnp.full((Bd, 1), live - 1, jnp.int32)
        mask = jnp.asarray(np.arange(S)[None, None].repeat(Bd, 0) < live)  # [B, 1, S]: slots up to the new one

        def fresh():
            return {f"layer_{i}": {"k": jnp.asarray(k[i]), "v": jnp.asarray(v[i]),
                                   "end_index": jnp.full((Bd,), live - 1, jnp.int32)} for i in range(L)}

        holder = {"cache": fresh()}

        def one():
            # the step writes slot live-1 (same value every call), so feeding its output cache back in
            # keeps the contents identical while the input buffer is donated
            c = holder["cache"]
            for layer in c.values():
                layer["end_index"] = jnp.full((Bd,), live - 1, jnp.int32)
            lg, holder["cache"] = step_jit(state, token, pos, c, mask)
            jax.block_until_ready(lg)
            return lg

        lg = np.asarray(one())
        r = timed(one, f"decode step B={Bd} S={S} live={live}")
        holder.clear()
        return lg[:, 0], {**r, "ms": 1000 * r["median_s"]}

    res["decode"] = {}
    for Bd in spec["decode_batches"]:
        lg, res["decode"][str(Bd)] = decode_case(Bd, S, S)
        np.save(os.path.join(outdir, f"tunix_decode_logits_b{Bd}.npy"), lg)
    lc = spec.get("long_cache")
    if lc:
        lg, res["decode_long"] = decode_case(lc["B"], lc["S"], lc["live"])
        np.save(os.path.join(outdir, "tunix_decode_long_logits.npy"), lg)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print("[tunix] done", flush=True)


if __name__ == "__main__":
    main()
