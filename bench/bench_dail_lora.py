"""DAIL's LoRA train step: the activation path (`lora.layer_transform`: y = x @ W + s * (x @ A) @ B
at every adapted projection) against the merge path (W + s * A @ B merged into each layer's weights
inside the layer scan, `lora.merge_layer`), in one run, same model, batch, optimizer and step.

Both are `opdjax.dail.distill.make_step` itself (the jitted, donated step: value_and_grad of the
contrastive loss, microbatch accumulation, the guarded AdamW update); for the merge path the
step is built while `lora.layer_transform` is replaced by the merge hook below, so nothing else
differs. Per path: the compiled step's memory_analysis() (temp bytes = the step's scratch: saved
activations, per-layer working sets, the weight-shaped delta/gradient the merge path makes), its
argument bytes, the median of --steps warm steps (after --warmup; the two paths' steps
alternate, so a busy machine slows both alike), and the first step's loss.

Setups:
  toy   the shipped DAIL toy model M (opdjax/assets/toy_dail, float32, L=2, D=64, V=345) with
        configs/dail_demo.py's batch: 16 traces, prompts 64/200/120 tokens (student/expert/hint),
        96 response tokens, LoRA r=8, alpha=16 on every projection.
  100m  the random ~100M Qwen3 (preset opdjax-100m: L=8, D=768, F=2048, V=32768) in bfloat16, 2
        traces, prompts 48/96/64, 64 response tokens, LoRA r=32, alpha=32 on every projection
        (the authors' rank), 2 microbatches.
  8b    compile only (abstract arrays, nothing allocated): Qwen3-8B with LoRA r=32 on every
        projection, 2 traces of 2,048 + 256 tokens in 2 microbatches (dail_train_qwen3_8b's
        lengths, one row per microbatch). float32 weights: XLA:CPU computes a bfloat16 dot in
        float32 and would show an upcast copy of every weight (~30 GiB) in either path.

    .venv/bin/python bench/bench_dail_lora.py                  # all setups (a few minutes on 2 cores)
    .venv/bin/python bench/bench_dail_lora.py --setups toy --steps 3
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from opdjax.dail import contrastive, distill
from opdjax.dail.config import dail_config
from opdjax.models import hf_io, lora, qwen
from opdjax.models.presets import preset_config
from opdjax.toy.dail_model import load_toy_dail
from opdjax.train.loop import init_state, make_optimizer

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

SETUPS = {
    "toy": dict(model="toy", dtype="float32", traces=16, prompts=(64, 200, 120), response=96, rank=8, alpha=16.0,
                microbatches=1, chunk_tokens=128),
    "100m": dict(model="opdjax-100m", dtype="bfloat16", traces=2, prompts=(48, 96, 64), response=64, rank=32,
                 alpha=32.0, microbatches=2, chunk_tokens=64),
    "8b": dict(model="Qwen3-8B", dtype="float32", traces=2, prompts=(2048, 2048, 2048), response=256, rank=32,
               alpha=32.0, microbatches=2, chunk_tokens=256, compile_only=True),
}


@dataclasses.dataclass(frozen=True)
class MergeHook:
    """The merge path: layer l runs with W_l + s * a_l @ b_l (lora.merge_layer), rounded to W's dtype."""

    def __call__(self, lp, layer_adapter, scale):
        return lora.merge_layer(lp, layer_adapter, scale)


def merge_transform(adapter, scale, plan=None):
    del plan
    return qwen.LayerTransform(MergeHook(), adapter, scale)


def build_abstract(setup: dict):
    """Shapes only (the 8b setup): what `build` returns, as ShapeDtypeStructs."""
    cfg = preset_config(setup["model"])
    c = dail_config()
    c.batch.sequences_per_step, c.batch.microbatches = setup["traces"], setup["microbatches"]
    c.loss.chunk_tokens = setup["chunk_tokens"]
    c.lora.rank, c.lora.alpha = setup["rank"], setup["alpha"]
    spec = lora.LoraSpec.from_config(c.lora)
    B, R, P = setup["traces"], setup["response"], max(setup["prompts"])
    sds = jax.ShapeDtypeStruct
    ctx = [sds((B, P + R), jnp.int32), sds((B, P + R), bool), sds((B, R), jnp.int32)]
    batch = contrastive.AlignedBatch(*ctx, *ctx, *ctx, sds((B, R), jnp.int32), sds((B, R), bool))
    return (cfg, qwen.abstract_params(cfg, setup["dtype"]), c, spec, batch, sds((B, R), jnp.float32),
            lora.abstract_lora(cfg, spec))


def build(setup: dict, seed: int = 0):
    if setup.get("compile_only"):
        return build_abstract(setup)
    if setup["model"] == "toy":
        params, cfg = hf_io.load_pretrained(load_toy_dail())
    else:
        cfg = preset_config(setup["model"])
        params = qwen.init_params(cfg, jax.random.key(seed), std=0.02)
    params = jax.tree.map(lambda x: x.astype(setup["dtype"]), params)
    c = dail_config()
    c.batch.sequences_per_step = setup["traces"]
    c.batch.microbatches = setup["microbatches"]
    c.loss.chunk_tokens = setup["chunk_tokens"]
    c.lora.rank, c.lora.alpha = setup["rank"], setup["alpha"]
    spec = lora.LoraSpec.from_config(c.lora)
    rng = np.random.RandomState(seed)
    B, R = setup["traces"], setup["response"]
    ids = lambda n: list(rng.randint(3, cfg.vocab_size - 8, n))  # noqa: E731
    prompts = [[ids(p) for _ in range(B)] for p in setup["prompts"]]
    batch = contrastive.align(*prompts, [ids(R) for _ in range(B)], pad_id=cfg.pad_token_id or 0)
    coeff = batch.response_mask / batch.response_mask.sum()
    batch = jax.tree.map(jnp.asarray, batch)
    # A trained-looking adapter (b != 0): a from PEFT's init, b small random.
    adapter = lora.init_lora(cfg, spec, jax.random.key(seed + 1))
    adapter = {t: {"a": ab["a"], "b": 0.01 * jax.random.normal(jax.random.key(seed + 2 + i), ab["b"].shape)}
               for i, (t, ab) in enumerate(adapter.items())}
    return cfg, params, c, spec, batch, jnp.asarray(coeff, jnp.float32), adapter


def compile_path(path: str, cfg, params, c, spec, batch, coeff, adapter) -> dict:
    tx = make_optimizer(c.optimizer, 1000)
    hook = merge_transform if path == "merge" else lora.layer_transform
    if isinstance(adapter["q"]["a"], jax.ShapeDtypeStruct):
        state = jax.eval_shape(lambda a: init_state(a, tx), adapter)
    else:
        state = init_state(jax.tree.map(jnp.copy, adapter), tx)
    with mock.patch.object(lora, "layer_transform", hook):  # traced (and compiled) inside
        step = distill.make_step(cfg, tx, c, spec, None)
        t0 = time.perf_counter()
        compiled = step.lower(state, params, batch, coeff).compile()
        compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    return {"path": path, "temp_bytes": int(mem.temp_size_in_bytes), "argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes), "compile_s": compile_s, "step_s_all": [],
            "step_s_median": float("nan"), "first_loss": float("nan"), "_run": (compiled, state)}


def time_paths(rows: list[dict], params, batch, coeff, steps: int, warmup: int) -> None:
    """Alternate one step of each path, warmup + steps rounds; fill in the timings and first loss."""
    for i in range(warmup + steps):
        for r in rows:
            compiled, state = r["_run"]
            t0 = time.perf_counter()
            state, metrics = compiled(state, params, batch, coeff)
            metrics = jax.device_get(metrics)
            dt = time.perf_counter() - t0
            r["_run"] = (compiled, state)
            if i == 0:
                r["first_loss"] = float(metrics["loss/total"])
            if i >= warmup:
                r["step_s_all"].append(dt)
    for r in rows:
        r["step_s_median"] = statistics.median(r["step_s_all"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", default="toy,100m,8b")
    p.add_argument("--steps", type=int, default=5, help="timed steps per path (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default=os.path.join(RESULTS, "dail_lora_step.json"))
    args = p.parse_args(argv)
    out = {"backend": jax.default_backend(), "device": str(jax.devices()[0]), "setups": {}}
    for name in args.setups.split(","):
        setup = SETUPS[name]
        built = build(setup)
        rows = [compile_path(path, *built) for path in ("merge", "activation")]
        if not setup.get("compile_only"):
            time_paths(rows, built[1], built[4], built[5], args.steps, args.warmup)
        for r in rows:
            del r["_run"]
        out["setups"][name] = {"setup": setup, "paths": rows}
        print(f"\n{name}: {setup}")
        print(f"{'path':<11} {'temp MiB':>9} {'args MiB':>9} {'step s (median)':>16} {'compile s':>10} "
              f"{'first loss':>12}")
        for r in rows:
            print(f"{r['path']:<11} {r['temp_bytes'] / 2**20:>9.2f} {r['argument_bytes'] / 2**20:>9.2f} "
                  f"{r['step_s_median']:>16.4f} {r['compile_s']:>10.1f} {r['first_loss']:>12.6f}")
    if args.json:
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
