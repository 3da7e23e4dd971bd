"""The teachability diagnosis, drawn and written (teachability.diagnosis computes the numbers).

    margin_by_position.png   mean margin per position decile, one panel per variant, one line
                             per group (all / correct / incorrect)
    detection_vs_chance.png  per variant: downward and upward change-point rates beside their
                             chance levels, plain BIC and permutation calibration
    delta_bic.png            observed delta BIC per variant (how far from the threshold)
    examples/<variant>/...   a few trajectories per variant: sentence scores, the two fitted
                             means, the release point, and the text with the released suffix grey
    report.md                the verdict and the recommended release settings, then every number
                             in tables, then the pictures
Every number in report.md is read from the results dict that diagnosis.json holds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from opdjax.teachability import pictures

GROUP_STYLE = {"all": ("black", "-"), "correct": ("tab:green", "--"), "incorrect": ("tab:red", ":")}


def _figure(w, h):
    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_margin_by_position(path, variants: dict[str, dict]) -> str:
    n = len(variants)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig = _figure(5.2 * cols, 3.4 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (v, groups) in zip(axes, variants.items()):
        for g, s in groups.items():
            color, ls = GROUP_STYLE.get(g, ("gray", "-"))
            y = np.array([np.nan if x is None else x for x in s["margin_by_decile"]], float)
            ax.plot(np.arange(10) * 10 + 5, y, color=color, ls=ls, marker="o", ms=3,
                    label=f"{g} ({s['rollouts']})")
        ax.set_title(v, fontsize=10)
        ax.set_xlabel("position in the response (%)")
        ax.set_ylabel("mean margin")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle("teacher margin by position decile")
    fig.tight_layout()
    fig.savefig(path)
    return os.fspath(path)


def plot_detection_vs_chance(path, variants: dict[str, dict], significance: float) -> str:
    fig = _figure(max(6.0, 2.6 * len(variants)), 3.8)
    ax = fig.subplots()
    bars = [("bic", "down", "BIC ↓", "tab:blue"), ("permutation", "down", "perm ↓", "tab:purple"),
            ("bic", "up", "BIC ↑", "tab:cyan"), ("permutation", "up", "perm ↑", "tab:pink")]
    width = 0.8 / len(bars)
    for i, (v, groups) in enumerate(variants.items()):
        s = groups["all"]
        for j, (c, d, label, color) in enumerate(bars):
            x = i + (j - (len(bars) - 1) / 2) * width
            rate, chance, p = s[c][f"{d}_rate"], s[c][f"{d}_chance"], s[c][f"{d}_p_value"]
            ax.bar(x, rate, width * 0.95, color=color, label=label if i == 0 else None)
            ax.plot([x - width / 2, x + width / 2], [chance, chance], color="black", lw=2,
                    label="chance (shuffled sentence orders)" if i == 0 and j == 0 else None)
            if p < significance:
                ax.text(x, rate + 0.01, "*", ha="center", fontsize=12)
    ax.set_xticks(range(len(variants)), list(variants), fontsize=9)
    ax.set_ylabel("share of rollouts")
    ax.set_title(f"change points vs chance (* = above chance, p < {significance})", fontsize=10)
    ax.legend(fontsize=7, ncol=3)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    return os.fspath(path)


def plot_delta_bic(path, per_variant: dict[str, dict]) -> str:
    fig = _figure(5.5, 3.4)
    ax = fig.subplots()
    for v, per in per_variant.items():
        d = np.asarray(per["delta_bic"], float)
        d = d[np.isfinite(d)]
        if d.size:
            ax.hist(d, bins=30, histtype="step", lw=1.4, label=v)
    ax.axvline(0, color="black", lw=1)
    ax.set_xlabel("ΔBIC of the best downward split (> 0: plain BIC releases)")
    ax.set_ylabel("rollouts")
    if ax.get_legend_handles_labels()[0]:  # no finite delta BIC (responses too short to split): no legend
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return os.fspath(path)


def draw_examples(out_dir, per_variant, arrays, tokenizer, n: int) -> dict[str, list[str]]:
    """Up to n trajectories per variant, picked as the trainer picks them (the released rows with
    the largest ΔBIC first, then unreleased ones), released under the permutation calibration."""
    out = {}
    mask = np.asarray(arrays["response_mask"], bool)
    for v, per in per_variant.items():
        if n == 0:
            break
        r = np.asarray(per["permutation/release_index"])
        w = (np.arange(mask.shape[1])[None, :] < r[:, None]) & mask
        paths = pictures.write_release_report(
            Path(out_dir) / "examples", 0, folder_name=v, response_mask=mask, sent_ids=arrays["sent_ids"],
            margins=per["margin"], sentence_scores=per["sentence_scores"], split=per["release_sentence"],
            detected=per["permutation/detected"], delta_bic=per["delta_bic"], mean_left=per["mean_left"],
            mean_right=per["mean_right"], release_index=r, weights=w.astype(np.float32),
            token_ids=arrays["response_ids"], tokenizer=tokenizer, margin_name=v, max_trajectories=n)
        out[v] = [os.path.relpath(p, out_dir) for p in paths]
    return out


def draw(out_dir, results: dict[str, Any], per_variant, arrays, *, tokenizer, examples: int = 3) -> dict[str, Any]:
    """Draw every picture; their paths (relative to out_dir) go into results["pictures"]. The
    examples' text is decoded from the token ids, so it matches the tokens exactly."""
    out_dir = Path(out_dir)
    variants = results["variants"]
    sig = results["verdict"]["level"]  # the verdict's per-test level (Bonferroni)
    pics = {"margin_by_position": plot_margin_by_position(out_dir / "margin_by_position.png", variants),
            "detection_vs_chance": plot_detection_vs_chance(out_dir / "detection_vs_chance.png", variants, sig),
            "delta_bic": plot_delta_bic(out_dir / "delta_bic.png", per_variant)}
    results["pictures"] = {k: os.path.relpath(p, out_dir) for k, p in pics.items()}
    results["pictures"]["examples"] = draw_examples(out_dir, per_variant, arrays, tokenizer, examples)
    return results


def _f(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def _pct(x) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def _p(x) -> str:
    return "–" if x is None or not math.isfinite(x) else (f"{x:.2g}" if x >= 1e-4 else f"{x:.1e}")


def markdown(results: dict[str, Any], title: str = "teachability diagnosis") -> str:
    st = results["settings"]
    lines = [f"# {title}", "", "## Verdict", "", results["verdict"]["text"], ""]
    rec = results["verdict"].get("recommendation")
    if rec:  # what release_settings.json holds (diagnoses older than the file have none)
        why = ("the verdict's best finding" if rec["detected"] else
               "nothing detected: the variant closest to chance-beating, under the permutation calibration, "
               "which keeps random cuts near α")
        lines += [f"Recommended release settings (`release_settings.json`; a training config reads them with "
                  f"`release.from_diagnosis`): `release.margin={rec['margin']}`, "
                  f"`release.calibration={rec['calibration']}` ({why}).", ""]
    ro = results.get("rollouts")
    if ro:
        lines += [f"{ro['count']} rollouts ({ro['prompts']} prompts × {ro['samples_per_prompt']} samples, "
                  f"at most {ro['max_new_tokens']} new tokens, {ro['response_tokens']} response tokens)"
                  + (f"; graded against the prompts' answers: {ro['correct']} correct, {ro['incorrect']} incorrect."
                     if ro.get("graded") else "; the prompts carry no answers, so there is no correct/incorrect split.")]
        if ro.get("reused_from"):
            lines += ["", f"The rollouts and teacher scores were reused from `{ro['reused_from']}` (no sampling, "
                      "no scoring in this run); the statistics are this run's."]
        lines.append("")
    lines += [f"Settings: BIC penalty λ={st['penalty']}, min_segment={st['min_segment']}, variance={st['variance']}, "
              f"sentence score={st['sentence_reduce']}, top-K={st['top_k']}, permutation calibration α={st['alpha']} "
              f"with P={st['permutations']} reorderings per rollout; the verdict's tests at {st['significance']} "
              f"overall, {_p(results['verdict']['level'])} each (Bonferroni over variants × calibrations).", "",
              "Chance = the share of rollouts the same test flags once each rollout's sentence scores are "
              "put in a random order (mean over the P reorderings); p = one-sided exact Poisson-binomial "
              "tail of the observed count under those per-rollout chances.", ""]
    for v, groups in results["variants"].items():
        lines += [f"## {v}", "", "| group | rollouts | calibration | ↓ rate | ↓ chance | ↓ p | ↑ rate | ↑ chance "
                  "| ↑ p | mean r/T | margin before | margin after | abs(A) before | abs(A) after |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for g, s in groups.items():
            for c in ("bic", "permutation"):
                b = s[c]
                lines.append(f"| {g} | {s['rollouts']} | {c} | {_pct(b['down_rate'])} | {_pct(b['down_chance'])} | "
                             f"{_p(b['down_p_value'])} | {_pct(b['up_rate'])} | {_pct(b['up_chance'])} | "
                             f"{_p(b['up_p_value'])} | {_f(b['mean_release_frac'])} | {_f(b['margin_before'])} | "
                             f"{_f(b['margin_after'])} | {_f(b['abs_adv_before'])} | {_f(b['abs_adv_after'])} |")
        lines += ["", "Margin by position decile (mean over the tokens of the decile):", "",
                  "| group | " + " | ".join(f"{10 * k}–{10 * k + 10}%" for k in range(10)) + " |",
                  "|---|" + "---|" * 10]
        for g, s in groups.items():
            lines.append(f"| {g} | " + " | ".join(_f(x) for x in s["margin_by_decile"]) + " |")
        lines += ["", "First vs last third of each rollout (paired; sign-flip test):", "",
                  "| group | pairs | first third | last third | last − first | s.e. | share lower | p |",
                  "|---|---|---|---|---|---|---|---|"]
        for g, s in groups.items():
            th = s["thirds"]
            lines.append(f"| {g} | {th['pairs']} | {_f(th['first_mean'])} | {_f(th['last_mean'])} | "
                         f"{_f(th['mean_diff'])} | {_f(th['se_diff'])} | {_pct(th['share_lower'])} | {_p(th['p_value'])} |")
        ex = results.get("pictures", {}).get("examples", {}).get(v, [])
        pngs = [p for p in ex if p.endswith(".png")]
        if pngs:
            lines += ["", "Examples (permutation calibration; grey = released suffix in the .html pages):", ""]
            lines += [f"![{v} example]({p})" for p in pngs]
        lines.append("")
    pics = results.get("pictures", {})
    if pics:
        lines += ["## Pictures", ""] + [f"![{k}]({pics[k]})" for k in ("detection_vs_chance", "margin_by_position",
                                                                         "delta_bic") if k in pics] + [""]
    tm = results.get("timings")
    if tm:
        total = tm["total_s"]
        phases = ("load_s", "sample_s", "score_s", "segment_s", "grade_s", "analysis_s", "report_s")
        lines += ["## Time", "", "| phase | seconds | share |", "|---|---|---|"]
        for k in phases:
            if k in tm:
                lines.append(f"| {k[:-2]} | {tm[k]:.1f} | {_pct(tm[k] / total)} |")
        other = total - sum(tm.get(k, 0.0) for k in phases)
        own = tm["segment_s"] + tm["analysis_s"]
        core = max(own + tm["sample_s"] + tm["score_s"], 1e-9)
        lines += [f"| other (config checks, tokenizers, writing) | {other:.1f} | {_pct(other / total)} |",
                  f"| total | {total:.1f} | |", "",
                  f"The diagnosis' own cost beyond sampling and scoring (sentence segments, then margins, scans, "
                  f"P={st['permutations']} reorderings per rollout and the tests): {own:.1f} s, "
                  f"{_pct(tm['share_beyond_sampling_and_scoring'])} of the total and {_pct(own / core)} of "
                  "sampling + scoring + diagnosis.", ""]
    return "\n".join(lines)


def write_markdown(out_dir, results: dict[str, Any], *, title: str = "teachability diagnosis") -> str:
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write(markdown(results, title))
    return path


def main(argv=None) -> int:
    """Re-render report.md from a diagnosis folder's diagnosis.json (after editing this module)."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("folder", help="a diagnosis folder (holds diagnosis.json)")
    p.add_argument("--title", default="teachability diagnosis")
    args = p.parse_args(argv)
    with open(os.path.join(args.folder, "diagnosis.json")) as f:
        results = json.load(f)
    nan = float("nan")
    fix = lambda x: ({k: fix(v) for k, v in x.items()} if isinstance(x, dict)  # noqa: E731
                     else [fix(v) for v in x] if isinstance(x, list) else nan if x is None else x)
    print(write_markdown(args.folder, fix(results), title=args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
