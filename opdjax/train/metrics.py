"""Training metrics: JSONL + TensorBoard writer, a progress line, and learning-curve plots.

Files in the workdir::

    metrics.jsonl   one JSON object per `write`: {"step": 12, "time": 1718.5, "loss/pg": 0.31, ...}
                    non-finite values are written as null, so every line is valid JSON
    text.jsonl      one object per `write_text`: {"step": 12, "time": ..., "tag": ..., "text": ...}
    tb/             TensorBoard event files (tensorboardX), scalars and text

Keys are flat and namespaced ("loss/pg", "release/rate", "timing/sample_s",
"perf/tokens_per_s"); `namespaced("loss", {...})` builds them. TensorBoard groups them by the
part before the slash.

Resume. ``MetricsWriter(workdir, resume_step=s)`` rewrites metrics.jsonl and text.jsonl without
the records of steps > s (written after checkpoint s by the run that was preempted), and opens
the TensorBoard writer with ``purge_step=s + 1`` so TensorBoard drops those steps too: a resumed
run's curves have no duplicates. On a multi-host run only process 0 makes a writer (`writer_for`).

Host side only (numpy, matplotlib; JAX only to ask which process this is). tensorboardX and tqdm are optional: without them
the writer writes JSONL only and the progress line is plain text.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import numbers
import os
import sys
import time
from typing import Any, Iterable, Mapping

import numpy as np

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TEXT_FILE = "text.jsonl"
TB_DIR = "tb"
RESERVED_KEYS = ("step", "time")


# ----------------------------------------------------------------------------- helpers

def namespaced(prefix: str, d: Mapping[str, Any]) -> dict[str, Any]:
    """``namespaced("loss", {"pg": 1})`` -> ``{"loss/pg": 1}`` (an empty prefix leaves keys as they are)."""
    prefix = prefix.strip("/")
    return {(f"{prefix}/{k}" if prefix else str(k)): v for k, v in d.items()}


def _to_number(v: Any) -> float | int | bool | None:
    """A metric value as a plain Python number; non-finite floats -> None (JSON null)."""
    if v is None:
        return None
    if isinstance(v, bool):
        return v
    if hasattr(v, "shape") and hasattr(v, "dtype"):  # numpy / jax scalar or 0-d array
        a = np.asarray(v)
        if a.size != 1:
            raise ValueError(f"metric values must be scalars, got an array of shape {a.shape}")
        v = a.reshape(()).item()
    if isinstance(v, bool):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        f = float(v)
        return f if math.isfinite(f) else None
    raise TypeError(f"metric values must be numbers, got {type(v).__name__}: {v!r}")


def _read_jsonl(path: str) -> list[dict]:
    out = []
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            # a run killed mid-write leaves a partial last line; anything else is worth a warning too
            log.warning("%s:%d: skipping an unreadable line%s", path, i + 1,
                        " (a partial last line from an interrupted run)" if i == len(lines) - 1 else "")
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl (or of a workdir holding one), in file order; nulls stay None."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no metrics file at {path}")
    return _read_jsonl(path)


def _truncate_jsonl(path: str, step: int) -> int:
    """Rewrite `path` (atomically) keeping only records with step <= `step`; returns how many were dropped."""
    if not os.path.exists(path):
        return 0
    recs = _read_jsonl(path)
    keep = [r for r in recs if not (isinstance(r.get("step"), (int, float)) and r["step"] > step)]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in keep:
            f.write(json.dumps(r, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return len(recs) - len(keep)


# ----------------------------------------------------------------------------- writer

class MetricsWriter:
    """Writes scalar metrics to workdir/metrics.jsonl and TensorBoard (workdir/tb)."""

    def __init__(self, workdir, *, tensorboard: bool = True, resume_step: int | None = None):
        self.workdir = os.fspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.path = os.path.join(self.workdir, METRICS_FILE)
        self.text_path = os.path.join(self.workdir, TEXT_FILE)
        self.resume_step = resume_step
        if resume_step is not None:
            dropped = _truncate_jsonl(self.path, int(resume_step)) + _truncate_jsonl(self.text_path, int(resume_step))
            if dropped:
                log.info("resuming at step %d: dropped %d metric record(s) written after it", resume_step, dropped)
        self._f = open(self.path, "a", encoding="utf-8")
        log.info("writing metrics to %s", self.path)
        self._ftext = None
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                log.warning("tensorboardX is not installed: metrics go to %s only", self.path)
            else:
                purge = int(resume_step) + 1 if resume_step is not None else None
                self._tb = SummaryWriter(logdir=os.path.join(self.workdir, TB_DIR), purge_step=purge,
                                         flush_secs=30)
        self._closed = False

    @property
    def tb_dir(self) -> str:
        return os.path.join(self.workdir, TB_DIR)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Write one record; returns it as written (non-finite values as None)."""
        self._check_open()
        step = int(step)
        rec: dict[str, Any] = {"step": step, "time": round(time.time(), 3)}
        for k, v in metrics.items():
            if not isinstance(k, str):
                raise TypeError(f"metric names must be strings, got {k!r}")
            if k in RESERVED_KEYS:
                raise ValueError(f"metric name {k!r} is reserved; namespace it, e.g. 'train/{k}'")
            rec[k] = _to_number(v)
        self._f.write(json.dumps(rec, allow_nan=False) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if k in RESERVED_KEYS or v is None:
                    continue  # non-finite: skipped in TensorBoard
                self._tb.add_scalar(k, float(v), global_step=step, walltime=rec["time"])
        return rec

    def write_text(self, step: int, tag: str, text: str) -> None:
        """A piece of text (e.g. an example trajectory) at `step`: text.jsonl and TensorBoard's text tab."""
        self._check_open()
        step = int(step)
        rec = {"step": step, "time": round(time.time(), 3), "tag": str(tag), "text": str(text)}
        if self._ftext is None:
            self._ftext = open(self.text_path, "a", encoding="utf-8")
        self._ftext.write(json.dumps(rec, ensure_ascii=False) + "\n")
        if self._tb is not None:
            self._tb.add_text(str(tag), str(text), global_step=step, walltime=rec["time"])

    def flush(self) -> None:
        if self._closed:
            return
        self._f.flush()
        if self._ftext is not None:
            self._ftext.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._f.close()
        if self._ftext is not None:
            self._ftext.close()
        if self._tb is not None:
            self._tb.close()
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"MetricsWriter for {self.workdir} is closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class NullWriter:
    """The writer of a process that writes nothing (on a pod every process but process 0): the
    same calls as MetricsWriter, no files."""

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
        return {"step": int(step), **{k: _to_number(v) for k, v in metrics.items()}}

    def write_text(self, step: int, tag: str, text: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _process_index() -> int:
    import jax
    return jax.process_index()


def writer_for(workdir, *, tensorboard: bool = True, resume_step: int | None = None):
    """A MetricsWriter on process 0, a NullWriter on the other processes of a pod."""
    if _process_index() != 0:
        return NullWriter()
    return MetricsWriter(workdir, tensorboard=tensorboard, resume_step=resume_step)


# ----------------------------------------------------------------------------- progress

def _fmt_num(x: float) -> str:
    x = float(x)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def _fmt_duration(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(max(s, 0.0)))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    hms = f"{h:d}:{m:02d}:{s:02d}"
    return f"{d}d {hms}" if d else hms


def _fmt_extra(k: str, v: Any) -> str:
    try:
        v = _to_number(v)
    except (TypeError, ValueError):
        return f"{k} {v}"
    if v is None:
        return f"{k} nan"
    if isinstance(v, bool) or isinstance(v, int):
        return f"{k} {v}"
    return f"{k} {v:.4g}"


class Progress:
    """A progress line for the training loop: step/total, tokens/s, s/step, ETA and a few extras.

    Rates are over a sliding window of the last `window` updates (so the first, compiling step
    stops counting after a while). On a TTY it drives a tqdm bar (when tqdm is installed);
    otherwise (logs, pipes, a StringIO) it prints a plain line at most every `min_interval_s`
    seconds, always for the first update and for the last step.
    """

    def __init__(self, total_steps: int, start_step: int = 0, *, enabled: bool = True, stream=None,
                 min_interval_s: float = 5.0, window: int = 20, max_extras: int = 4):
        self.total = int(total_steps)
        self.start = int(start_step)
        self.enabled = enabled and _process_index() == 0  # one progress line per pod, not one per worker
        self.stream = sys.stderr if stream is None else stream
        self.min_interval_s = float(min_interval_s)
        self.max_extras = max_extras
        self._t0 = time.perf_counter()
        self._hist: collections.deque = collections.deque(maxlen=max(int(window), 1) + 1)
        self._hist.append((self._t0, self.start, 0))  # (time, step, tokens in that update)
        self._last_print = -math.inf
        self._printed_line = None
        self._tokens_total = 0
        self.last_line = ""
        self._bar = None
        if enabled and self._isatty():
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=self.total, initial=self.start, file=self.stream, unit="step",
                                 dynamic_ncols=True, smoothing=0.1)

    def _isatty(self) -> bool:
        try:
            return bool(self.stream.isatty())
        except (AttributeError, ValueError):
            return False

    # -- rates -------------------------------------------------------------------------------
    def rates(self) -> dict[str, float | None]:
        """tokens/s, s/step and ETA (s) over the window."""
        (t_a, s_a, _), (t_b, s_b, _) = self._hist[0], self._hist[-1]
        dt = t_b - t_a
        toks = sum(n for _, _, n in list(self._hist)[1:])
        steps = s_b - s_a
        tps = toks / dt if dt > 0 else None
        sps = dt / steps if steps > 0 else None
        eta = max(self.total - s_b, 0) * sps if sps is not None else None
        return {"tokens_per_s": tps, "s_per_step": sps, "eta_s": eta}

    def update(self, step: int, *, tokens: int = 0, extra: Mapping[str, Any] | None = None) -> str:
        """Record that `step` finished, having processed `tokens` tokens; returns the status text."""
        now = time.perf_counter()
        step = int(step)
        self._tokens_total += int(tokens)
        self._hist.append((now, step, int(tokens)))
        if not self.enabled:
            return ""
        r = self.rates()
        parts = [f"{_fmt_num(r['tokens_per_s'])} tok/s" if r["tokens_per_s"] is not None else "? tok/s",
                 f"{r['s_per_step']:.2f} s/step" if r["s_per_step"] is not None else "? s/step",
                 f"ETA {_fmt_duration(r['eta_s'])}"]
        for k, v in list((extra or {}).items())[: self.max_extras]:
            parts.append(_fmt_extra(k, v))
        status = " | ".join(parts)
        pct = 100.0 * step / self.total if self.total > 0 else 100.0
        self.last_line = f"step {step}/{self.total} ({pct:.0f}%) | {status}"
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(status, refresh=False)
            self._bar.refresh()
        else:
            last = step >= self.total
            if self._printed_line is None or last or now - self._last_print >= self.min_interval_s:
                self._print(self.last_line)
                self._last_print = now
        return self.last_line

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.last_line and self._printed_line != self.last_line:
            self._print(self.last_line)  # the final state, if throttling held it back

    def _print(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()
        self._printed_line = line

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# ----------------------------------------------------------------------------- plots

def _series(records: Iterable[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for r in records:
        if key in r and "step" in r:
            v = r[key]
            xs.append(float(r["step"]))
            ys.append(np.nan if v is None else float(v))
    return np.asarray(xs), np.asarray(ys)


def plot_curves(records: Mapping[str, list[dict]], keys: list[str], out_png, *, title: str | None = None,
                ncols: int | None = None) -> str:
    """Learning curves: one subplot per key, one line per run (x = step). Returns the PNG path.

    `records` maps a run name to its records (e.g. ``read_metrics(workdir)``); null values are
    gaps, and a run without a key is left out of that subplot.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = list(keys)
    if not keys:
        raise ValueError("plot_curves needs at least one metric key")
    n = len(keys)
    ncols = ncols or min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.2 * nrows + (0.4 if title else 0)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, key in enumerate(keys):
        ax = axes[i // ncols][i % ncols]
        drawn = 0
        for run, recs in records.items():
            x, y = _series(recs, key)
            if x.size == 0:
                continue
            order = np.argsort(x, kind="stable")
            ax.plot(x[order], y[order], label=str(run), lw=1.4, marker="." if x.size < 30 else None)
            drawn += 1
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn == 0:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
        elif len(records) > 1:
            ax.legend(fontsize=8)
    for j in range(n, nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = os.fspath(out_png)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png)
    return out_png


__all__ = ["MetricsWriter", "read_metrics", "namespaced", "Progress", "plot_curves"]
