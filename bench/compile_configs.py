"""Compile every shipped real-scale config for its TPU topology (the `compile` job) and collect
the per-phase table the README shows. No weights, no TPU: libtpu compiles for abstract devices.

    JAX_PLATFORMS=cpu .venv/bin/python bench/compile_configs.py            # all, ~15 min on 2 cores
    JAX_PLATFORMS=cpu .venv/bin/python bench/compile_configs.py --only opd_qwen3_8b_to_1p7b_v5p

Writes bench/results/compile/<config>/compile_report.{json,md} and bench/results/compile/summary.md.
Every time in them is a roofline estimate from published chip peaks, not a measurement.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, REPO)
OUT = os.path.join(BENCH, "results", "compile")

# config -> the TPU slice it states. GPU configs (h100) are compiled for the TPU slice given here
# as a stand-in with the same chip count, since no GPU compiler runs without a GPU.
CONFIGS = {
    "opd_qwen3_8b_to_1p7b_v5p": None,
    "opd_qwen3_8b_to_0p6b_v6e": None,
    "dail_synthesize_qwen2p5_7b": None,
    "dail_train_qwen2p5_7b": None,
}
GiB = 1024 ** 3


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--only", default="", help="comma-separated config names")
    args = p.parse_args(argv)
    from opdjax.aot import job
    names = [n for n in CONFIGS if not args.only or n in args.only.split(",")]
    for name in names:
        config = load(name)
        config.job = "compile"
        if CONFIGS[name]:
            config.compile.topology = CONFIGS[name]
        config.compile.directory = os.path.join(OUT, name)
        config.workdir = config.compile.directory
        t = time.perf_counter()
        print(f"=== {name} on {config.compile.topology}", flush=True)
        try:
            job.run(config)
        except Exception as e:  # noqa: BLE001 - a config that does not fit is a result too
            print(f"{name}: {type(e).__name__}: {str(e)[:400]}", flush=True)
        print(f"=== {name}: {time.perf_counter() - t:.0f} s", flush=True)
    summarize()


def summarize():
    rows = ["| config | topology | phase | HBM/chip compiler GiB | estimate GiB | TFLOP/call | roofline s/call | "
            "bound | compile s |", "|---|---|---|---|---|---|---|---|---|"]
    steps = []
    for name in CONFIGS:
        path = os.path.join(OUT, name, "compile_report.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            rep = json.load(f)
        est = {r["phase"]: r["estimate_gib"] for r in rep.get("estimate", [])}
        for ph in rep["phases"]:
            if ph["error"]:
                rows.append(f"| {name} | {rep['topology']} | {ph['name']} | out of HBM | | | | | {ph['compile_s']:.0f} |")
                continue
            e = est.get(ph["name"])
            rows.append(f"| {name} | {rep['topology']} | {ph['name']} | {ph['total_bytes'] / GiB:.2f} | "
                        f"{'' if e is None else f'{e:.2f}'} | {ph['flops'] / 1e12:.4g} | "
                        f"{ph['roofline']['time_s']:.3g} | {ph['roofline']['bound']} | {ph['compile_s']:.0f} |")
        steps.append(f"- {name} ({rep['topology']}): roofline step {rep['roofline_step_s']:.3g} s")
    text = ("# Compiled for TPU (libtpu " + _libtpu() + "), per chip\n\n" + "\n".join(rows) + "\n\n"
            + "\n".join(steps) + "\n\nTimes are roofline estimates from published chip peaks, not measurements.\n")
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "summary.md"), "w") as f:
        f.write(text)
    print(text)


def _libtpu():
    import importlib.metadata
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    main()
