"""The comparison report: accuracy before/after per arm, learning and release curves, the step
time split, example trajectories, and a verdict that states the result with its sampling error.
Markdown (report.md) and HTML (report.html) with PNGs beside them in the workdir."""
from __future__ import annotations

import glob
import html
import math
import os

import numpy as np

from opdjax.train import metrics as metrics_lib

CURVE_KEYS = ["eval/greedy_accuracy", "eval/pass@1", "loss/total", "teacher/advantage_mean",
              "release/kept_share", "release/release_rate", "release/rule_release_rate",
              "release/shuffled_release_rate", "rollout/mean_tokens"]


def _se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def _acc_rows(out, config):
    rows = [("untrained student", out["untrained"])]
    rows += [(f"OPD, release.mode={arm}", s.get("eval_after", {})) for arm, s in out["arms"].items()]
    return rows


def _plot_accuracy(rows, ks, n_problems, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = ["eval/greedy_accuracy"] + [f"eval/pass@{k}" for k in ks]
    fig, ax = plt.subplots(figsize=(1.6 + 1.6 * len(keys) * len(rows) / 3, 3.6))
    width = 0.8 / len(rows)
    for i, (name, m) in enumerate(rows):
        vals = [m.get(k, np.nan) for k in keys]
        errs = [_se(v, n_problems) if np.isfinite(v) else 0 for v in vals]
        ax.bar(np.arange(len(keys)) + i * width, vals, width, yerr=errs, capsize=3, label=name)
    ax.set_xticks(np.arange(len(keys)) + width * (len(rows) - 1) / 2)
    ax.set_xticklabels([k.split("/")[1] for k in keys])
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"held-out accuracy ({n_problems} problems; bars ± 1 s.e.)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _verdict(rows, n):
    base = rows[0][1].get("eval/greedy_accuracy")
    arms = {name: m.get("eval/greedy_accuracy") for name, m in rows[1:]}
    if base is None or any(v is None for v in arms.values()):
        return "No evaluation was run (eval.num_problems=0), so there is no verdict."
    parts = [f"Untrained student: greedy accuracy {base:.3f} on {n} held-out problems."]
    for name, v in arms.items():
        d = v - base
        se = math.sqrt(_se(v, n) ** 2 + _se(base, n) ** 2)
        word = "better than" if d > 2 * se else ("worse than" if d < -2 * se else "not distinguishable from")
        parts.append(f"{name}: {v:.3f} ({d:+.3f}; {word} the untrained student at 2 s.e. = {2 * se:.3f}).")
    names = list(arms)
    if len(names) >= 2:
        a, b = names[0], names[1]
        d = arms[a] - arms[b]
        se = math.sqrt(_se(arms[a], n) ** 2 + _se(arms[b], n) ** 2)
        word = "ahead of" if d > 2 * se else ("behind" if d < -2 * se else "level with (within sampling error)")
        parts.append(f"{a} is {word} {b}: difference {d:+.3f}, 2 s.e. = {2 * se:.3f}. "
                     "Same student, data, seed and step budget; one seed, so this is one draw, not a "
                     "distribution over runs.")
    return " ".join(parts)


def write_compare_report(config, out) -> str:
    wd = config.workdir
    n = int(config.eval.num_problems)
    ks = [k for k in config.eval.k if k <= config.eval.samples]
    rows = _acc_rows(out, config)
    _plot_accuracy(rows, ks, n, os.path.join(wd, "accuracy.png"))
    records = {arm: metrics_lib.read_metrics(os.path.join(wd, arm, "metrics.jsonl")) for arm in out["arms"]}
    metrics_lib.plot_curves(records, CURVE_KEYS, os.path.join(wd, "curves.png"),
                            title="OPD learning and release curves per arm")
    pics = sorted(glob.glob(os.path.join(wd, next(iter(out["arms"])), "pictures", "**", "*.png"),
                            recursive=True))[-2:]

    md = [f"# OPD comparison: {', '.join(out['arms'])}", "",
          f"{config.train.steps} steps per arm, {config.batch.prompts_per_step} prompts x "
          f"{config.rollout.samples_per_prompt} samples per step, loss `{config.loss.name}`, "
          f"margin `{config.release.margin}`; total wall time {out['wall_s'] / 60:.1f} min.", "",
          "## Verdict", "", _verdict(rows, n), "",
          "## Held-out accuracy", "",
          "| model | greedy | " + " | ".join(f"pass@{k}" for k in ks) + " | mean tokens |",
          "|---|---|" + "---|" * len(ks) + "---|"]
    for name, m in rows:
        cells = [f"{m.get('eval/greedy_accuracy', float('nan')):.3f}"] + \
                [f"{m.get(f'eval/pass@{k}', float('nan')):.3f}" for k in ks] + \
                [f"{m.get('eval/mean_tokens', float('nan')):.1f}"]
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    md += ["", "![accuracy](accuracy.png)", "", "## Curves", "", "![curves](curves.png)", "",
           "## Step time split (mean over steps after the first)", "",
           "Sentence segmentation runs on the host while the teacher scores (it is inside score s); the "
           "release share counts the decision after scoring, and in brackets with the segmentation added.", "",
           "| arm | sample s | score s | segment s | release s | update s | release share | rollout tokens/s |",
           "|---|---|---|---|---|---|---|---|"]
    for arm, s in out["arms"].items():
        g = lambda k: s.get(f"mean_{k}", float("nan"))
        md.append(f"| {arm} | {g('timing/sample_s'):.3f} | {g('timing/score_s'):.3f} | {g('timing/segment_s'):.3f} | "
                  f"{g('timing/release_s'):.3f} | {g('timing/update_s'):.3f} | {100 * g('timing/release_share'):.1f}% "
                  f"({100 * g('timing/release_share_incl_segments'):.1f}%) | "
                  f"{g('perf/rollout_tokens_per_s'):.0f} |")
    md += ["", "## Release decisions", "",
           "Release rate = share of rollouts whose supervision was cut in that arm; the rule's rate is "
           "where the BIC rule would cut (computed in every arm); chance = the rule on each rollout's "
           "sentence scores in a random order.", "",
           "| arm | release rate | rule's rate | shuffled-order rate (chance) | kept token share |",
           "|---|---|---|---|---|"]
    for arm, s in out["arms"].items():
        g = lambda k: s.get(f"mean_{k}", float("nan"))
        md.append(f"| {arm} | {g('release/release_rate'):.3f} | {g('release/rule_release_rate'):.3f} | "
                  f"{g('release/shuffled_release_rate'):.3f} | "
                  f"{g('release/kept_share'):.3f} |")
    if pics:
        md += ["", "## Example trajectories (last pictures of the first arm)", ""]
        md += [f"![trajectory]({os.path.relpath(p, wd)})" for p in pics]
    md_text = "\n".join(md) + "\n"
    path = os.path.join(wd, "report.md")
    with open(path, "w") as f:
        f.write(md_text)
    with open(os.path.join(wd, "report.html"), "w") as f:
        f.write(_markdown_to_html(md_text))
    return path


def _markdown_to_html(md: str) -> str:
    """Just enough Markdown for this report: headings, tables, images, paragraphs."""
    out = ["<html><head><meta charset='utf-8'><title>OPD comparison</title>"
           "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}td,th{border:1px solid #ccc;"
           "padding:3px 8px}table{border-collapse:collapse}</style></head><body>"]
    table = []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                table.append(line.strip("|").split("|"))
            continue
        if table:
            out.append("<table>" + "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>"
                                           for r in table) + "</table>")
            table = []
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.startswith("!["):
            src = line[line.index("(") + 1:-1]
            out.append(f"<img src='{html.escape(src)}' style='max-width:100%'>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    out.append("</body></html>")
    return "\n".join(out)
