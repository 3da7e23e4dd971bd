"""The comparison report: accuracy before/after per arm, learning and release curves, the step
time split, example trajectories, and a verdict that states the result with its sampling error.
Markdown (report.md) and HTML (report.html) with PNGs beside them in the workdir."""
from __future__ import annotations

import glob
import html
import math
import os

import numpy as np

from opdjax.eval import paired_bootstrap
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


METRICS = {"sample_accuracy": ("sample_correct", "sampled accuracy (pass@1 over eval.samples draws)"),
           "greedy_accuracy": ("greedy_correct", "greedy accuracy")}


def rule_arm(arms) -> str:
    """The arm the others are measured against: the release rule when it ran, else the first."""
    return "bic" if "bic" in arms else next(iter(arms))


def per_problem_scores(runs: dict, metric: str, which: str = "eval_after") -> dict[str, np.ndarray] | None:
    """{arm: [seeds, problems]} scores from each run's summary (None when an arm has no
    per-problem evaluation, e.g. eval.num_problems=0). runs: {seed: {arm: summary}}."""
    field = METRICS[metric][0]
    out: dict[str, list] = {}
    for per_arm in runs.values():
        for arm, s in per_arm.items():
            pp = s.get(f"{which}_per_problem")
            if not pp or pp.get(field) is None:
                return None
            x = np.asarray(pp[field], np.float64)
            out.setdefault(arm, []).append(x.mean(axis=1) if x.ndim == 2 else x)
    return {arm: np.stack(v) for arm, v in out.items()}


def bootstrap_verdicts(runs: dict, metric: str = "sample_accuracy", n_boot: int = 10_000) -> dict | None:
    """The paired bootstrap (eval/paired_bootstrap.py) of the arms' final scores, with the untrained
    student as one more row when it was evaluated (first arm of each seed)."""
    scores = per_problem_scores(runs, metric)
    if scores is None:
        return None
    res = paired_bootstrap.compare_arms(scores, rule_arm(scores), n_boot=n_boot)
    first = {seed: dict(list(per_arm.items())[:1]) for seed, per_arm in runs.items()}
    before = per_problem_scores(first, metric, "eval_before")
    if before is not None:
        arm0 = next(iter(before))
        si, pi = paired_bootstrap.draws(*before[arm0].shape, n_boot)
        res["untrained"] = paired_bootstrap.interval(
            before[arm0], paired_bootstrap.replicate_means(before[arm0], si, pi)).as_dict()
    res["metric"] = metric
    return res


def _ci(iv: dict) -> str:
    return f"{iv['mean']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]"


def verdict_text(res: dict | None) -> str:
    """One paragraph: every paired difference with its interval and word."""
    if res is None:
        return "No per-problem evaluation was run (eval.num_problems=0), so there is no verdict."
    what = METRICS[res["metric"]][1]
    scope = (f"{res['seeds']} seeds x {res['problems']} held-out problems" if res["seeds"] > 1 else
             f"{res['problems']} held-out problems, one seed (the interval covers which problems were drawn, "
             "not run-to-run variation: only compare.seeds measures that)")
    parts = [f"On {what}, {int(res['level'] * 100)}% paired-bootstrap intervals over {scope}:"]
    if "untrained" in res:
        parts.append(f"untrained student {_ci(res['untrained'])};")
    parts.append("; ".join(f"{arm} {_ci(iv)}" for arm, iv in res["arms"].items()) + ".")
    for name, d in res["differences"].items():
        parts.append(f"{name} = {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]: {d['verdict']}"
                     + (" (the interval covers 0)." if d["verdict"] == "not distinguishable" else "."))
    return " ".join(parts)


def _verdict(out, config) -> str:
    runs = {str(config.seed): out["arms"]}
    return "\n\n".join(verdict_text(bootstrap_verdicts(runs, m)) for m in METRICS)


def _plot_intervals(results: dict, path: str) -> None:
    """Per-arm means with their intervals, one panel per metric (the untrained student first)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(4.8 * len(results), 3.6), squeeze=False)
    for ax, (metric, res) in zip(axes[0], results.items()):
        rows = ([("untrained", res["untrained"])] if "untrained" in res else []) + list(res["arms"].items())
        x = np.arange(len(rows))
        m = np.array([iv["mean"] for _, iv in rows])
        err = np.array([[iv["mean"] - iv["low"] for _, iv in rows], [iv["high"] - iv["mean"] for _, iv in rows]])
        ax.bar(x, m, yerr=err, capsize=4, color=["#999"] * (len(rows) - len(res["arms"])) + ["C0"] * len(res["arms"]))
        ax.set_xticks(x)
        ax.set_xticklabels([n for n, _ in rows])
        ax.set_ylim(0, 1)
        ax.set_title(f"{METRICS[metric][1].split(' (')[0]}\n{res['seeds']} seeds x {res['problems']} problems, "
                     f"{int(res['level'] * 100)}% intervals", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_seeds_report(config, out) -> str:
    """compare.seeds: per-arm means and paired-bootstrap intervals over seeds and problems, the
    paired differences rule − baseline with a verdict, every seed's numbers, curves per arm × seed."""
    wd = config.workdir
    runs = out["runs"]
    results = {m: bootstrap_verdicts(runs, m) for m in METRICS}
    out["bootstrap"] = results
    arms = list(next(iter(runs.values())))
    md = [f"# OPD comparison over seeds: {', '.join(arms)}", "",
          f"Seeds {', '.join(runs)}; {config.train.steps} steps per arm and seed, {config.batch.prompts_per_step} "
          f"prompts x {config.rollout.samples_per_prompt} samples per step, loss `{config.loss.name}`, margin "
          f"`{config.release.margin}`, calibration `{config.release.calibration}`; every arm of a seed starts from "
          f"the same student with the same data order and eval draws; total wall time {out['wall_s'] / 60:.1f} min.", "",
          "## Verdict", ""]
    md += [verdict_text(results[m]) + "\n" for m in METRICS]
    if all(results.values()):
        _plot_intervals(results, os.path.join(wd, "accuracy.png"))
        md += ["![accuracy](accuracy.png)", "", "## Per-arm means and paired differences", "",
               "| | " + " | ".join(METRICS[m][1].split(" (")[0] for m in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
        r0 = results["sample_accuracy"]
        names = (["untrained"] if "untrained" in r0 else []) + arms
        for name in names:
            md.append(f"| {name} | " + " | ".join(_ci(results[m]["untrained"] if name == "untrained" else
                                                      results[m]["arms"][name]) for m in METRICS) + " |")
        for d in r0["differences"]:
            md.append(f"| {d} | " + " | ".join(
                f"{results[m]['differences'][d]['mean']:+.3f} [{results[m]['differences'][d]['low']:+.3f}, "
                f"{results[m]['differences'][d]['high']:+.3f}] {results[m]['differences'][d]['verdict']}"
                for m in METRICS) + " |")
    md += ["", "## Every seed", "", "| seed | arm | greedy | sampled | kept token share | release rate | wall min |",
           "|---|---|---|---|---|---|---|"]
    for seed, per_arm in runs.items():
        for arm, sm in per_arm.items():
            e = sm.get("eval_after", {})
            md.append(f"| {seed} | {arm} | {e.get('eval/greedy_accuracy', float('nan')):.3f} | "
                      f"{e.get('eval/sample_accuracy', float('nan')):.3f} | "
                      f"{sm.get('mean_release/kept_share', float('nan')):.3f} | "
                      f"{sm.get('mean_release/release_rate', float('nan')):.3f} | {sm.get('wall_s', float('nan')) / 60:.1f} |")
    records = {f"{arm} s{seed}": metrics_lib.read_metrics(os.path.join(wd, f"seed{seed}", arm, "metrics.jsonl"))
               for seed, per_arm in runs.items() for arm in per_arm}
    metrics_lib.plot_curves(records, CURVE_KEYS, os.path.join(wd, "curves.png"),
                            title="OPD learning and release curves per arm and seed")
    md += ["", "## Curves", "", "![curves](curves.png)", ""]
    return _write_report(wd, md)


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
          "## Verdict", "", _verdict(out, config), "",
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
    return _write_report(wd, md)


def _write_report(wd: str, md: list[str]) -> str:
    """report.md and report.html in `wd`; returns the Markdown's path."""
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
