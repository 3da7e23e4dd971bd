"""Pictures of what the release rule decided, per trajectory (host side: numpy + matplotlib).

For one trajectory:
  plot_trajectory  PNG: token margins (light), sentence scores (one bar per sentence over its
                   tokens), the two fitted means over their sentence ranges, the release line.
  render_html      the response text, supervised prefix in normal ink, released suffix greyed
                   (opacity follows the fade weight), sentence boundaries marked, numbers on top.
  render_markdown  the same as plain text, one sentence a line, for logs and notebooks.
write_release_report makes all three for a few trajectories of a batch, from the arrays the
train step already holds, so the trainer can call it every N steps.

Matplotlib is used through `Figure` + the Agg canvas, never pyplot: no display, no global state.
"""
from __future__ import annotations

import base64
import html
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

log = logging.getLogger(__name__)


def sentence_token_ranges(sent_ids: np.ndarray) -> list[tuple[int, int]]:
    """[(start, end)) token range of each sentence, in order, from a real-token row of sentence ids."""
    ids = np.asarray(sent_ids)
    if ids.size == 0:
        return []
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], ids.size]
    return [(int(s), int(e)) for s, e in zip(starts, ends)]


def _fmt(x: Any) -> str:
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (float, np.floating)):
        return "nan" if math.isnan(x) else f"{x:.4g}"  # -inf (no candidate split) stays -inf
    return str(x)


# ----------------------------------------------------------------------------- PNG

def plot_trajectory(path_png: str | Path, token_margins: np.ndarray, sent_ids: np.ndarray,
                    sentence_scores: np.ndarray, split: int, detected: bool, delta_bic: float,
                    mean_left: float, mean_right: float, release_index: int, *,
                    title: str = "", margin_name: str = "margin") -> Path:
    """Draws one trajectory's margins, sentence scores, fitted means and release point.

    Arrays cover the real response tokens only (length T); `sentence_scores` may be padded past
    the number of sentences. The fitted means are drawn solid when a change point was detected
    and dotted (the best split, rejected) otherwise.
    """
    g = np.asarray(token_margins, np.float64)
    sent = np.asarray(sent_ids)
    T = g.size
    ranges = sentence_token_ranges(sent)
    scores = np.asarray(sentence_scores, np.float64)[:len(ranges)]
    r = int(release_index)

    fig = Figure(figsize=(10, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    verdict = "change point detected" if detected else "no change point"
    released = detected and r < T
    head = f"ΔBIC = {_fmt(float(delta_bic))} — {verdict}"
    sub = f"T = {T} tokens, J = {len(ranges)} sentences, " + (
        f"release at r = {r} (r/T = {r / max(T, 1):.2f})" if r < T else "whole trajectory supervised")
    ax.set_title(f"{title + ': ' if title else ''}{head}\n{sub}", fontsize=10)
    ax.set_xlabel("response token position t")
    ax.set_ylabel(margin_name)
    if T == 0:
        ax.text(0.5, 0.5, "empty response", ha="center", va="center", transform=ax.transAxes)
        fig.savefig(path_png)
        return Path(path_png)

    t = np.arange(T)
    ax.plot(t, g, color="0.72", lw=0.7, marker=".", ms=2.5, label="token margin $g_t$", zorder=1)
    top = blended_transform_factory(ax.transData, ax.transAxes)
    for j, (s, e) in enumerate(ranges):
        if s > 0:
            ax.axvline(s - 0.5, color="0.88", lw=0.6, zorder=0)
        if len(ranges) <= 40:  # sentence numbers along the top edge, while they still fit
            ax.text((s + e - 1) / 2, 0.985, str(j), transform=top, ha="center", va="top",
                    fontsize=7, color="0.45")
    if len(scores):
        ax.hlines(scores, [s - 0.5 for s, _ in ranges[:len(scores)]],
                  [e - 0.5 for _, e in ranges[:len(scores)]],
                  color="tab:blue", lw=2.5, label="sentence score $M_j$", zorder=3)

    # The fitted means span the left sentences [0, split) and the right ones [split, J).
    if 0 < split < len(ranges) and np.isfinite(mean_left) and np.isfinite(mean_right):
        cut = ranges[split][0] - 0.5
        style = dict(lw=2.0, zorder=4, linestyles="solid" if detected else "dotted")
        what = "" if detected else " (best split, rejected)"
        ax.hlines(mean_left, -0.5, cut, color="tab:green", label=f"left mean μ1 = {_fmt(float(mean_left))}{what}", **style)
        ax.hlines(mean_right, cut, T - 0.5, color="tab:orange", label=f"right mean μ2 = {_fmt(float(mean_right))}{what}", **style)
    if r < T:
        ax.axvspan(r - 0.5, T - 0.5, color="tab:red", alpha=0.06, zorder=0)
        ax.axvline(r - 0.5, color="tab:red", ls="--", lw=1.5, zorder=5,
                   label=f"release r = {r} (r/T = {r / T:.2f})" + ("" if released else ", not the rule's"))

    # Keep a few outlier tokens from flattening the picture: clip to the 1–99% range of the
    # token margins, widened to show every sentence score and mean.
    shown = [np.nanpercentile(g, 1), np.nanpercentile(g, 99)] if np.isfinite(g).any() else [0.0, 1.0]
    shown += [v for v in (*scores, mean_left, mean_right) if np.isfinite(v)]
    lo, hi = min(shown), max(shown)
    pad = 0.12 * (hi - lo) or 0.5
    ax.set_ylim(lo - pad, hi + 2 * pad)  # headroom for the sentence numbers
    ax.set_xlim(-0.5, T - 0.5)
    ax.legend(loc="lower left", fontsize=8, framealpha=0.85)
    fig.tight_layout()
    fig.savefig(path_png)
    return Path(path_png)


# ----------------------------------------------------------------------------- token texts

def token_texts_from_char_spans(text: str, spans: np.ndarray) -> list[str]:
    """Per-token text from the full response text and each token's [start, end) char span.

    Characters no span covers (gaps) are attached to the token before them (leading ones to the
    first token), so joining the pieces gives back `text` whenever spans are in order.
    """
    spans = np.asarray(spans, np.int64).reshape(-1, 2)
    if len(spans) == 0:
        return []
    starts = np.maximum.accumulate(np.clip(spans[:, 0], 0, len(text)))
    starts[0] = 0
    ends = np.r_[starts[1:], len(text)]
    return [text[s:e] for s, e in zip(starts, ends)]


def decode_token_texts(decode: Callable[[list[int]], str], token_ids: Sequence[int],
                       context: int = 4) -> list[str]:
    """Per-token text with a tokenizer's `decode(ids) -> str`, in linear time.

    Token i's text is decode(ids[c:i+1]) minus decode(ids[c:a]), with a few tokens of context c
    (decoders may treat the first token specially). A token that ends in the middle of a UTF-8
    character (decode gives U+FFFD) gets "" and its bytes go to the token completing the
    character, so multi-byte characters are never shown as replacement marks.
    """
    ids = [int(i) for i in token_ids]
    texts, a = [], 0  # a: first token whose text has not been emitted yet
    for i in range(len(ids)):
        c = max(0, a - context)
        full = decode(ids[c:i + 1])
        if full.endswith("\ufffd") and i < len(ids) - 1:
            texts.append("")
            continue
        head = decode(ids[c:a])
        texts.append(full[len(head):] if full.startswith(head) else decode(ids[a:i + 1]))
        a = i + 1
    return texts


# ----------------------------------------------------------------------------- HTML / Markdown

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 60em; color: #111; }
table.numbers { border-collapse: collapse; font-size: 0.9em; margin-bottom: 0.8em; }
table.numbers td { border: 1px solid #ccc; padding: 0.15em 0.6em; }
table.numbers td:first-child { color: #555; }
.legend { font-size: 0.85em; color: #444; }
.text { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.7;
        border: 1px solid #ddd; padding: 0.8em; }
.sent { border-left: 2px solid #7a9cc6; padding-left: 1px; }
.sent.odd { background: #f3f6fb; }
.tok.rel { color: #888; background: #eee; }
.release-mark { border-left: 3px solid #d62728; }
.release-mark::before { content: "released \\2192"; color: #d62728; font-size: 0.7em;
                        font-family: system-ui, sans-serif; vertical-align: super; }
img { max-width: 100%; }
"""


def render_html(path_html: str | Path, token_texts: Sequence[str], sent_ids: np.ndarray,
                weights: np.ndarray, release_index: int, numbers: Mapping[str, Any], *,
                title: str = "Release rule", png_path: str | Path | None = None,
                token_margins: np.ndarray | None = None) -> Path:
    """One self-contained HTML page (no external resources; the PNG, if given, is inlined).

    Every sentence is one `<span class="sent ...">` (a blue left bar: the boundary marker);
    every token a `<span class="tok">`, with class `rel` from the release index on, greyed, with
    opacity 0.3 + 0.7·w so a fade shows as a gradient. A red `release-mark` precedes token r.
    Hovering a token shows its position, sentence, weight (and margin).
    """
    T = len(token_texts)
    sent = np.asarray(sent_ids)[:T]
    w = np.asarray(weights, np.float64)[:T]
    r = int(release_index)
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in numbers.items())
    parts = [f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body>\n<h2>{html.escape(title)}</h2>",
             f"<table class=\"numbers\">{rows}</table>",
             "<p class=\"legend\">normal ink: supervised (t &lt; r) · <span style=\"color:#888;background:#eee\">grey</span>: "
             "released (opacity follows the loss weight) · blue bar: sentence start · "
             "red bar: release point</p>"]
    if png_path is not None:
        data = base64.b64encode(Path(png_path).read_bytes()).decode("ascii")
        parts.append(f"<img alt=\"margins and release point\" src=\"data:image/png;base64,{data}\">")
    parts.append("<div class=\"text\">")
    for j, (s, e) in enumerate(sentence_token_ranges(sent)):
        parts.append(f"<span class=\"sent {'odd' if j % 2 else 'even'}\" data-sent=\"{j}\">")
        for t in range(s, e):
            if t == r:
                parts.append(f"<span class=\"release-mark\" title=\"release r = {r}\"></span>")
            tip = f"t={t} · sentence {j} · w={w[t]:.2f}"
            if token_margins is not None:
                tip += f" · g={float(token_margins[t]):.3g}"
            if t >= r:
                parts.append(f"<span class=\"tok rel\" style=\"opacity:{0.3 + 0.7 * w[t]:.2f}\" "
                             f"title=\"{tip}\">{html.escape(token_texts[t])}</span>")
            else:
                parts.append(f"<span class=\"tok\" title=\"{tip}\">{html.escape(token_texts[t])}</span>")
        parts.append("</span>")
    parts.append("</div>\n</body></html>\n")
    Path(path_html).write_text("".join(parts), encoding="utf-8")
    return Path(path_html)


def render_markdown(path_md: str | Path, token_texts: Sequence[str], sent_ids: np.ndarray,
                    release_index: int, numbers: Mapping[str, Any], *, title: str = "Release rule") -> Path:
    """Plain-text view: a numbers table, then one sentence a line (`[j] ...`, newlines shown as
    ↵) in a code block, with a `---- release ----` line at the release point (mid-sentence if
    the release point falls inside a sentence, as the baselines' may)."""
    r = int(release_index)
    lines = [f"## {title}", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in numbers.items()]
    body = []
    for j, (s, e) in enumerate(sentence_token_ranges(np.asarray(sent_ids)[:len(token_texts)])):
        pieces = [(s, min(e, r)), (max(s, r), e)] if s < r < e else [(s, e)]
        for a, b in pieces:
            if a == r:
                body.append(f"---- release (r = {r}) ----")
            body.append(f"[{j:2d}] " + "".join(token_texts[a:b]).replace("\n", "↵"))
    longest_ticks = max((len(m) for line in body for m in re.findall("`+", line)), default=0)
    fence = "`" * max(3, longest_ticks + 1)  # a fence the text itself cannot close
    lines += ["", fence + "text", *body, fence, ""]
    Path(path_md).write_text("\n".join(lines), encoding="utf-8")
    return Path(path_md)


# ----------------------------------------------------------------------------- batch report

def pick_trajectories(released: np.ndarray, delta_bic: np.ndarray, n: int) -> list[int]:
    """Up to n rows: half the released ones with the largest ΔBIC, the rest unreleased rows in
    order (either group fills in when the other runs short), returned in row order."""
    released = np.asarray(released, bool)
    rel = [int(i) for i in np.argsort(-np.nan_to_num(np.asarray(delta_bic, np.float64), nan=-np.inf),
                                      kind="stable") if released[i]]
    unrel = [int(i) for i in np.flatnonzero(~released)]
    n_rel = min(len(rel), max(n - len(unrel), (n + 1) // 2))
    return sorted(rel[:n_rel] + unrel[:n - n_rel])


def write_release_report(out_dir: str | Path, step: int, *, response_mask, sent_ids, margins,
                         sentence_scores, split, detected, delta_bic, mean_left, mean_right,
                         release_index, weights, token_ids=None, tokenizer=None,
                         token_texts: Sequence[Sequence[str]] | None = None,
                         margin_name: str = "advantage_gap", max_trajectories: int = 4,
                         indices: Sequence[int] | None = None, folder_name: str | None = None,
                         labels: Sequence[int] | None = None) -> list[Path]:
    """PNG + HTML + Markdown for a few trajectories of one batch, under out_dir/release_step{step}.

    Arrays are the batch's [B, R] / [B, J] / [B] arrays (jax or numpy). The text comes from
    `token_texts` (per row, per real token) or from `token_ids` [B, R] with `tokenizer` (an HF
    tokenizer or any `decode(ids) -> str` callable). Rows: `indices`, else `pick_trajectories`.
    `folder_name` replaces the release_step<step> folder. `labels`: the trajectory number shown
    for each row (its row in the global batch when these are one process's rows; default: the
    row). Returns the written paths.
    """
    mask = np.asarray(response_mask, bool)
    arr = {k: np.asarray(v) for k, v in dict(sent_ids=sent_ids, margins=margins, scores=sentence_scores,
                                             split=split, detected=detected, dbic=delta_bic,
                                             mu1=mean_left, mu2=mean_right, r=release_index,
                                             w=weights).items()}
    lengths = mask.sum(1)
    if token_texts is None and (token_ids is None or tokenizer is None):
        raise ValueError("write_release_report needs token_texts, or token_ids together with tokenizer")
    # An HF tokenizer is itself callable (it encodes), so look for `.decode` first.
    decode = ((lambda ids: tokenizer.decode(ids, skip_special_tokens=False))
              if hasattr(tokenizer, "decode") else tokenizer)
    if indices is None:
        indices = pick_trajectories(arr["r"] < lengths, arr["dbic"], max_trajectories)
    folder = Path(out_dir) / (folder_name if folder_name is not None else f"release_step{int(step):07d}")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for b in indices:
        T = int(lengths[b])
        texts = (list(token_texts[b])[:T] if token_texts is not None
                 else decode_token_texts(decode, np.asarray(token_ids)[b, :T]))
        r = int(arr["r"][b])
        label = int(labels[b]) if labels is not None else int(b)
        numbers = {"step": int(step), "trajectory": label, "margin": margin_name,
                   "detected": bool(arr["detected"][b]), "ΔBIC": float(arr["dbic"][b]),
                   "split τ* (sentences left)": int(arr["split"][b]),
                   "mean left μ1": float(arr["mu1"][b]), "mean right μ2": float(arr["mu2"][b]),
                   "release r": r, "T": T, "r/T": r / T if T else float("nan"),
                   "Σw (kept weight)": float(arr["w"][b, :T].sum())}
        title = f"step {int(step)} · trajectory {label}"
        stem = folder / f"traj{label:03d}"
        png = plot_trajectory(stem.with_suffix(".png"), arr["margins"][b, :T], arr["sent_ids"][b, :T],
                              arr["scores"][b], int(arr["split"][b]), bool(arr["detected"][b]),
                              float(arr["dbic"][b]), float(arr["mu1"][b]), float(arr["mu2"][b]), r,
                              title=title, margin_name=margin_name)
        page = render_html(stem.with_suffix(".html"), texts, arr["sent_ids"][b, :T], arr["w"][b, :T], r,
                           numbers, title=title, png_path=png, token_margins=arr["margins"][b, :T])
        md = render_markdown(stem.with_suffix(".md"), texts, arr["sent_ids"][b, :T], r, numbers, title=title)
        paths += [png, page, md]
    log.info("wrote the release pictures of %d trajectories to %s", len(indices), folder)
    return paths
