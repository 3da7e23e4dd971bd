"""Does `model.attention="splash"` lower for TPU, and what does it change? (No TPU needed.)

    JAX_PLATFORMS=cpu .venv/bin/python bench/compile_attention.py            # ~1 min on 2 cores
    JAX_PLATFORMS=cpu .venv/bin/python bench/compile_attention.py --topology v6e:2x2 --mesh 1,2,2

Compiles one forward + backward of `qwen.apply` (remat, a masked sum-of-squares loss on the final
hidden states; no logits, so attention is a larger share) for the devices of a TPU topology from
libtpu (`jax.experimental.topologies`), once with attention="xla" and once with "splash"
(interpret=False: the real Mosaic kernel), under the same ShardingPlan, and prints side by side:
XLA's memory_analysis (per device), cost_analysis FLOPs (loop bodies counted once, as XLA does;
opdjax.aot.hlo's loop-aware count beside it when that module is there), how many Mosaic kernels
(tpu_custom_call) the HLO holds, and every all-gather with its shape (parameters are gathered by
FSDP in both, and the int32 token ids by the embedding lookup; a float all-gather with the
sequence length in its shape would be q, k or v, and must not appear).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import time

# No TPU on this host: tell libtpu so before it loads (values only for its start-up).
for _k, _v in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5p-8"),
               ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(_k, _v)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

from opdjax.models import qwen  # noqa: E402
from opdjax.models.presets import preset_config  # noqa: E402
from opdjax.sharding import MESH_AXES, ShardingPlan  # noqa: E402


def compile_one(cfg, plan: ShardingPlan, batch: int, seq: int):
    def loss(params, tokens, mask):
        hidden, _ = qwen.apply(params, tokens, cfg, mask=mask, plan=plan, remat=True)
        sq = jnp.where(mask[..., None], jnp.square(hidden.astype(jnp.float32)), 0.0)
        return jnp.sum(sq) / jnp.maximum(jnp.sum(mask), 1)

    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          qwen.abstract_params(cfg), qwen.param_shardings(cfg, plan))
    rows = plan.sharding(("batch", "length"), (batch, seq))
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=rows)
    mask = jax.ShapeDtypeStruct((batch, seq), jnp.bool_, sharding=rows)
    t0 = time.time()
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tokens, mask).compile()
    return compiled, time.time() - t0


def summarize(compiled, seq: int, seconds: float) -> dict:
    text = compiled.as_text()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    gathers = collections.Counter(m.group(1) for m in
                                  re.finditer(r"= (\S+\[[0-9,]*\])\S* all-gather(?:-start)?\(", text))
    out = {
        "compile_s": round(seconds, 1),
        "temp_bytes": mem.temp_size_in_bytes,
        "argument_bytes": mem.argument_size_in_bytes,
        "output_bytes": mem.output_size_in_bytes,
        "xla_flops": cost.get("flops"),
        "xla_bytes_accessed": cost.get("bytes accessed"),
        "tpu_custom_calls": text.count('custom_call_target="tpu_custom_call"'),
        "all_gathers": dict(gathers),
        # every all-gather op, however its result prints (a check that `all_gathers` missed none)
        "all_gather_ops": len(re.findall(r" all-gather(?:-start)?\(", text)),
        # a float array with the sequence in its shape: q, k, v or an attention output
        "qkv_all_gathers": sum(n for s, n in gathers.items()
                               if s.startswith(("bf16", "f32")) and re.search(rf"[\[,]{seq}[,\]]", s)),
    }
    try:  # loop-aware counts (the layer scan's body times its trip count), when opdjax.aot is there
        from opdjax.aot import hlo
        c = hlo.analyze(text)
        out.update(loop_flops=c.flops, loop_hbm_bytes=c.bytes)
    except ImportError:
        pass
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", default="v5p:2x2x1")
    ap.add_argument("--mesh", default="1,2,2", help="data,fsdp,tensor")
    ap.add_argument("--preset", default="Qwen3-1.7B")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--json", default="", help="also write the numbers here")
    a = ap.parse_args()

    devices = topologies.get_topology_desc(platform="tpu", topology_name=a.topology).devices
    shape = tuple(int(s) for s in a.mesh.split(","))
    mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    plan = ShardingPlan(mesh)
    base = dataclasses.replace(preset_config(a.preset), num_layers=a.layers, dtype="bfloat16")
    print(f"{a.preset} ({a.layers} layers, H={base.num_heads}, K={base.num_kv_heads}, head_dim={base.head_dim}), "
          f"bf16, B={a.batch}, T={a.seq}, forward + backward (remat) on {a.topology} "
          f"({devices[0].device_kind}), mesh {dict(mesh.shape)}")

    results = {}
    for kind in ("xla", "splash"):
        compiled, seconds = compile_one(dataclasses.replace(base, attention=kind), plan, a.batch, a.seq)
        results[kind] = summarize(compiled, a.seq, seconds)

    rows = [k for k in results["xla"] if k != "all_gathers"]
    print(f"\n{'per device':<24}{'xla':>22}{'splash':>22}")
    for k in rows:
        x, s = results["xla"].get(k), results["splash"].get(k)
        fmt = (lambda v: f"{v:,.0f}" if isinstance(v, (int, float)) and abs(v) >= 1000 else str(v))
        print(f"{k:<24}{fmt(x):>22}{fmt(s):>22}")
    for kind in ("xla", "splash"):
        print(f"all-gathers ({kind}): {results[kind]['all_gathers'] or 'none'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "device_kind": devices[0].device_kind, **results}, f, indent=1)


if __name__ == "__main__":
    main()
