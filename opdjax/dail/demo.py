"""The `dail_demo` job: DAIL end to end on the embedded toy model (configs/dail_demo.py).

    python launch/tpu_run.py --config configs/dail_demo.py

1. reads `demo.num_problems` toy arithmetic problems with terse "didactic" expert solutions
   (steps skipped: opdjax.toy.dail_problems.terse_solution) and `demo.num_eval_problems` held-out ones from
   the shipped TFDS dataset `tfds:opdjax_dail_toy/seed<seed>` (train / eval splits; prepared in
   data.data_dir on first use: opdjax.data.builders);
2. synthesis (opdjax.dail.synthesize) -> workdir/traces.jsonl;
3. contrastive training (opdjax.dail.distill) -> workdir/student_hf (LoRA merged);
4. evaluation (opdjax.dail.evaluate): pass@k for k = 1..n, base vs trained, same keys;
5. workdir/report.md: what each step produced, with the pass@k and training-curve pictures.
Each step is the same job a real run launches on its own; the demo only chains them.
On a pod (several processes) process 0 prepares the dataset first, and writes the report and
demo_summary.json; every process takes part in each step.
"""
from __future__ import annotations

import json
import logging
import os
import time

from opdjax import multihost
from opdjax.dail import distill, evaluate, synthesize
from opdjax.data import builders

log = logging.getLogger(__name__)


def _unlocked(config):
    import ml_collections
    return ml_collections.ConfigDict(config.to_dict())


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def run(config) -> dict:
    t0 = time.perf_counter()
    config = _unlocked(config)
    writing = multihost.is_writer()  # process 0 writes the shared files; the others read them
    # The embedded toy problems, read through the data layer: the shipped TFDS dataset
    # opdjax_dail_toy (prepared in data.data_dir on first use), its first num_problems train and
    # num_eval_problems eval records.
    for field, n, cap in (("num_problems", config.demo.num_problems, builders.DAIL_TRAIN),
                          ("num_eval_problems", config.demo.num_eval_problems, builders.DAIL_EVAL)):
        if not 1 <= int(n) <= cap:
            raise ValueError(f"config.demo.{field}={n}: the shipped opdjax_dail_toy dataset holds 1..{cap} problems.")
    if writing:
        os.makedirs(config.workdir, exist_ok=True)
    dataset = f"tfds:opdjax_dail_toy/seed{int(config.seed)}"
    config.data.problems, config.data.split = dataset, f"train[:{int(config.demo.num_problems)}]"
    config.eval.problems, config.eval.split = dataset, f"eval[:{int(config.demo.num_eval_problems)}]"
    timings = {}
    t = time.perf_counter()
    syn = synthesize.run(config)
    timings["synthesis_s"] = time.perf_counter() - t
    t = time.perf_counter()
    tr = distill.run(config)
    tr.pop("final_params", None)
    timings["training_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ev = evaluate.run(config)
    timings["evaluation_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    summary = {"synthesis": syn, "training": tr, "evaluation": ev, "timings": timings}
    if writing:
        write_report(config, summary)
        with open(os.path.join(config.workdir, "demo_summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
        log.info("wrote the demo report %s and demo_summary.json", os.path.join(config.workdir, "report.md"))
    multihost.sync("dail_demo_done")
    log.info("DAIL demo done in %.0f s: report at %s", timings["total_s"], os.path.join(config.workdir, "report.md"))
    return summary


def write_report(config, summary) -> str:
    w = config.workdir
    syn, tr, tm = summary["synthesis"], summary["training"], summary["timings"]
    lines = ["# DAIL demo on the embedded toy model", "",
             f"Model: `{config.model.path}`; tau = {syn.get('tau', config.synthesis.accept_threshold)}, "
             f"{config.synthesis.num_samples} samples per problem, gamma = {config.train.gamma}, "
             f"{config.train.divergence} KL, " + (f"LoRA r={config.lora.rank} alpha={config.lora.alpha}"
                                                  if config.lora.enabled else "full fine-tuning") + ".", "",
             "## 1. Synthesis (mixed rollout)", ""]
    lines += [f"- {k}: {_fmt(v)}" for k, v in syn.items() if not isinstance(v, (dict, list))]
    lines += ["", "## 2. Contrastive training", ""]
    lines += [f"- {k}: {_fmt(v)}" for k, v in tr.items() if not isinstance(v, (dict, list))]
    for k in ("first", "last"):
        if k in tr:
            lines.append(f"- {k} step: " + ", ".join(f"{a} {_fmt(b)}" for a, b in tr[k].items()))
    if os.path.exists(os.path.join(w, "curves.png")):
        lines += ["", "![training curves](curves.png)"]
    lines += ["", "## 3. pass@k, base vs trained (same sampling keys)", ""]
    md = os.path.join(w, "eval", "passk.md")
    if os.path.exists(md):
        with open(md) as f:  # nested one level below this report's sections
            lines += [("#" + ln if ln.startswith("#") else ln) for ln in f.read().strip().splitlines()
                      if not ln.startswith("# ")]
    for name in sorted(os.listdir(os.path.join(w, "eval"))) if os.path.isdir(os.path.join(w, "eval")) else []:
        if name.endswith(".png"):
            lines += ["", f"![{name}](eval/{name})"]
    lines += ["", "## Time", ""] + [f"- {k}: {v:.0f}" for k, v in tm.items()]
    path = os.path.join(w, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
