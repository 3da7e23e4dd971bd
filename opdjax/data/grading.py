"""Answer extraction and grading for math-style problems.

`extract_answer` finds a model's final answer: the last `\\boxed{...}` (or `\\fbox{...}`) after
the reasoning, else the last "The answer is X" / "Answer: X" / "#### X" phrase, else None.
`answers_equivalent` compares it with the reference: a fast exact and exact-numeric path first,
then math-verify (https://github.com/huggingface/Math-Verify) for mathematical equivalence
(LaTeX fractions, radicals, sets, intervals, expressions, equations like `x = 5`).

Timeouts. math-verify bounds its sympy work with `signal.alarm`, which only works in the main
thread (elsewhere it raises ValueError), and a signal cannot interrupt a long computation inside C
code. So:
  * main thread: math-verify runs in-process with its own signal timeouts (`timeout_s`);
  * any other thread (a grading thread beside the train loop, a thread pool) or `isolate=True`:
    math-verify runs in a helper process (`python -c ...`, started on first use, reused, one
    request at a time). In that process math-verify is in its main thread, so its signal
    timeouts work there too; if it still gives no reply within 2 * timeout_s + a grace period
    (stuck in C code, or dead), the helper is killed, the pair counts as not equivalent, and the
    next call starts a fresh helper.
  * math-verify's own switch for threads, `parsing_timeout=None` / `timeout_seconds=None`, turns
    the signals off and with them every bound on time; it is used only when the caller asks for
    `timeout_s=None` (trusted answers), in-process, in any thread.
In the main thread the caller's SIGALRM timer (pytest-timeout, a watchdog), which math-verify's
`signal.alarm(0)` would cancel, is re-armed afterwards. No input hangs or crashes grading:
anything math-verify cannot parse or compare in time is False.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import re
import select
import signal
import time
import subprocess
import sys
import threading
from fractions import Fraction
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
MAX_ANSWER_CHARS = 1000  # longer "answers" are not sent to sympy (only compared as strings)

# ---------------------------------------------------------------------------------------------
# Extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b\s*")
_THINK_CLOSE = "</think>"
# "The (final) answer is X", "Answer: X", "Final answer: X": X runs to the end of the line.
# "#### X" (GSM8K) only when X starts like a number, so a markdown heading is not an answer.
_PHRASE_RE = re.compile(
    r"(?:\banswer\s*(?:is|:)[ \t]*:?|^[ \t]*#{4}(?!#)(?=[ \t]*[-+$\\.\d]))[ \t]*(?P<x>[^\n]*)",
    re.IGNORECASE | re.MULTILINE)
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the brace group opening at text[start] == '{', and the index after its
    closing brace; None when it never closes. Escaped braces (\\{ \\}) do not count."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
        i += 1
    return None


def _last_boxed(text: str) -> tuple[bool, str | None]:
    """(found a box, content of the last one). An unclosed last box (a cut-off generation) gives
    (True, None): the final answer was never finished, so an earlier box does not stand in."""
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return False, None
    m = matches[-1]
    if m.end() < len(text) and text[m.end()] == "{":
        group = _braced(text, m.end())
        return True, (None if group is None else group[0])
    # \boxed 5 : an unbraced argument runs to whitespace or '$'.
    arg = re.match(r"[^\s$]+", text[m.end():])
    return True, arg.group(0) if arg else None


def _clean(answer: str) -> str | None:
    """Strip the decorations around a phrase answer: **bold**, $...$, \\(...\\), trailing
    punctuation and spaces."""
    s = answer.strip()
    for _ in range(3):
        before = s
        s = s.strip().strip("*").strip()
        s = re.sub(r"[.。!;,]+$", "", s).strip()
        if s.startswith("\\(") and s.endswith("\\)"):
            s = s[2:-2]
        if s.startswith("\\[") and s.endswith("\\]"):
            s = s[2:-2]
        s = s.strip("$").strip()
        if s == before:
            break
    return s or None


def extract_answer(text: str, *, last_number: bool = False) -> str | None:
    """The final answer in a model's output, or None.

    Searched after the last `</think>` when there is one (the answer follows the reasoning).
    1. the content of the last `\\boxed{...}` / `\\boxed {...}` / `\\fbox{...}` (nested braces
       kept); an unclosed last box means no answer;
    2. else the last "... answer is X", "Answer: X", "Final answer: X" or "#### X" line ending,
       with a trailing period, `$`, `**` and spaces stripped ("The answer is 32." -> "32");
    3. else, only with `last_number=True`, the last number in the text (commas dropped).
    """
    if not text:
        return None
    if _THINK_CLOSE in text:
        text = text.rsplit(_THINK_CLOSE, 1)[1]
    found, boxed = _last_boxed(text)
    if found:
        return (boxed.strip() or None) if boxed is not None else None
    phrases = list(_PHRASE_RE.finditer(text))
    for m in reversed(phrases):
        x = m.group("x")
        # "The answer is 32. So we are done": the sentence ends at a period followed by a space.
        x = re.split(r"(?<=[^\d\s])\.\s|(?<=\d)\.\s+(?=[A-Z])", x, maxsplit=1)[0]
        cleaned = _clean(x)
        if cleaned is not None:
            return cleaned
    if last_number:
        numbers = _NUMBER_RE.findall(text)
        if numbers:
            return numbers[-1].replace(",", "")
    return None


# ---------------------------------------------------------------------------------------------
# Fast path

_SPACING_RE = re.compile(r"\\[,;:! ]|\\q?quad|~|\\left|\\right|\\displaystyle")
_DECIMAL_RE = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][+-]?\d+)?|[+-]?\.\d+(?:[eE][+-]?\d+)?")
_FRAC_RE = re.compile(r"([+-]?)\\[dt]?frac\{([+-]?\d+)\}\{([+-]?\d+)\}|([+-]?)\\[dt]?frac(\d)(\d)")
_SLASH_RE = re.compile(r"([+-]?\d+)/([+-]?\d+)")


def _normalize(s: str) -> str:
    s = s.strip().replace("\u2212", "-").replace("{,}", ",")
    s = _SPACING_RE.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\$", "")
    s = re.sub(r"\s+", "", s).strip("$")
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s)
    return s.rstrip(".")


def _as_number(s: str) -> Fraction | None:
    """The exact value of a plain number: integer, decimal, 1,000-style, scientific, a/b or
    \\frac{a}{b} with integers. None for anything else."""
    if _DECIMAL_RE.fullmatch(s):
        exponent = re.search(r"[eE][+-]?(\d+)$", s)
        if exponent and (len(exponent.group(1)) > 3 or int(exponent.group(1)) > 400):
            return None  # 1e999999999 would build a billion-digit integer
        try:
            return Fraction(s.replace(",", ""))
        except (ValueError, ZeroDivisionError):
            return None
    m = _FRAC_RE.fullmatch(s) or _SLASH_RE.fullmatch(s)
    if m is None:
        return None
    g = [x for x in m.groups() if x is not None]
    sign = -1 if len(g) == 3 and g[0] == "-" else 1
    num, den = (int(g[-2]), int(g[-1]))
    if den == 0:
        return None
    return sign * Fraction(num, den)


def _fast_path(pred: str, gold: str) -> bool | None:
    """True/False when decided without sympy, None to ask math-verify."""
    p, g = _normalize(pred), _normalize(gold)
    if not p or not g:
        return False
    if p == g:
        return True
    pn, gn = _as_number(p), _as_number(g)
    if pn is None or gn is None:
        return None
    if pn == gn:
        return True
    # Clearly different numbers are decided here; near-equal ones (0.333333 vs 1/3) go to
    # math-verify, whose float rounding decides them.
    if abs(pn - gn) > Fraction(1, 10**5) * max(1, abs(gn)):
        return False
    return None


# ---------------------------------------------------------------------------------------------
# math-verify, in-process (main thread) or in a helper process

@contextlib.contextmanager
def _keep_real_timer():
    """math-verify's timeout sets and then cancels SIGALRM (signal.alarm(0)), which would silently
    disarm any timer the caller had (e.g. pytest-timeout's, or a watchdog): re-arm it after."""
    handler = signal.getsignal(signal.SIGALRM)
    delay, interval = signal.getitimer(signal.ITIMER_REAL)
    t0 = time.monotonic()
    try:
        yield
    finally:
        signal.signal(signal.SIGALRM, handler)
        if delay > 0:
            signal.setitimer(signal.ITIMER_REAL, max(delay - (time.monotonic() - t0), 1e-3), interval)


def _math_verify_equal(pred: str, gold: str, timeout_s: int | None) -> bool:
    """math-verify's verdict. With `timeout_s` it uses math-verify's signal timeouts (the main
    thread of the process only); with None, math-verify's `parsing_timeout=None` /
    `timeout_seconds=None`, which work in any thread but put no bound on the time taken."""
    import math_verify

    def parsed(s):
        # math-verify extracts LaTeX from $...$ (a bare "\\frac{1}{2}" is not found), plain
        # expressions ("1/2", "0.5") without.
        out = math_verify.parse(f"${s}$", parsing_timeout=timeout_s)
        return out or math_verify.parse(s, parsing_timeout=timeout_s)

    try:
        with _keep_real_timer() if timeout_s is not None else contextlib.nullcontext():
            g = parsed(gold)
            if not g:
                return False
            p = parsed(pred)
            if not p:
                return False
            return bool(math_verify.verify(g, p, timeout_seconds=timeout_s))
    except Exception:  # noqa: BLE001 - grading never raises on a model's output
        logger.debug("math-verify failed on %r vs %r", pred, gold, exc_info=True)
        return False


_WORKER_CODE = "from opdjax.data.grading import _worker_main; _worker_main()"


def _worker_main() -> None:
    """The helper process: one JSON request per stdin line, one JSON reply per stdout line."""
    import math_verify  # noqa: F401 - import before saying ready

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the replies
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            ok = _math_verify_equal(req["pred"], req["gold"], req["timeout"])
        except BaseException:  # noqa: BLE001 - e.g. a TimeoutException escaping math-verify
            ok = False
        out.write(json.dumps({"ok": ok}) + "\n")
        out.flush()


class _Helper:
    """A reusable math-verify helper process, restarted after a timeout or a crash."""

    STARTUP_TIMEOUT_S = 120.0
    GRACE_S = 5.0

    def __init__(self):
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None

    def _readline(self, timeout_s: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            return None
        return self.proc.stdout.readline() or None

    def _start(self) -> bool:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER_CODE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                     text=True, bufsize=1)
        if self._readline(self.STARTUP_TIMEOUT_S) is None:
            logger.warning("math-verify helper process did not start; answers that need "
                           "symbolic comparison are graded as not equivalent")
            self.kill()
            return False
        return True

    def kill(self) -> None:
        if self.proc is not None:
            try:
                self.proc.kill()
                self.proc.wait(timeout=10)
            except Exception:  # noqa: BLE001
                pass
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    stream.close()
                except Exception:  # noqa: BLE001
                    pass
            self.proc = None

    def equal(self, pred: str, gold: str, timeout_s: int) -> bool:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self.kill()
                if not self._start():
                    return False
            try:
                self.proc.stdin.write(json.dumps({"pred": pred, "gold": gold, "timeout": timeout_s}) + "\n")
                self.proc.stdin.flush()
                reply = self._readline(2 * timeout_s + self.GRACE_S)
            except (BrokenPipeError, OSError, ValueError):
                reply = None
            try:
                return bool(json.loads(reply)["ok"]) if reply is not None else self._lost(pred, gold)
            except (ValueError, KeyError, TypeError):
                return self._lost(pred, gold)

    def _lost(self, pred: str, gold: str) -> bool:
        logger.warning("math-verify gave no verdict in time on %.80r vs %.80r; graded as "
                       "not equivalent (helper process restarted)", pred, gold)
        self.kill()
        return False


_HELPER = _Helper()


atexit.register(_HELPER.kill)


def answers_equivalent(pred: str | None, gold: str | None, *,
                       timeout_s: float | None = DEFAULT_TIMEOUT_S, isolate: bool | None = None) -> bool:
    """Whether a predicted answer equals the reference answer.

    Exact and exact-numeric first ("32" = "32.0", "1/2" = "0.5" = "\\frac{1}{2}", "1,000" =
    "1000", "-3" != "3"), then math-verify for the rest (gold first: its comparison is not
    symmetric). Never raises on model output; a None answer is False.

    Where math-verify runs: `isolate=None` (default) in-process on the main thread and in the
    helper process on any other thread; True always in the helper (which also bounds hangs in C
    code and keeps sympy's caches out of this process); False always in-process, which off the main
    thread needs `timeout_s=None`. `timeout_s=None` turns math-verify's timeouts off
    (parsing_timeout=None, timeout_seconds=None): in-process it then runs in any thread, unbounded,
    for trusted answers only.
    """
    if pred is None or gold is None:
        return False
    pred, gold = str(pred), str(gold)
    decided = _fast_path(pred, gold)
    if decided is not None:
        return decided
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    in_main = threading.current_thread() is threading.main_thread()
    if timeout_s is None:
        if isolate:
            raise ValueError("answers_equivalent(isolate=True) needs a timeout_s")
        return _math_verify_equal(pred, gold, None)
    seconds = max(1, int(math.ceil(timeout_s)))  # signal.alarm counts whole seconds
    if isolate is None:
        isolate = not in_main
    if not isolate:
        if not in_main:
            raise ValueError(
                "answers_equivalent(isolate=False) off the main thread: math-verify's timeouts use "
                "signal.alarm, which only works in the main thread. Use isolate=None (a helper "
                "process), or timeout_s=None for no timeout.")
        return _math_verify_equal(pred, gold, seconds)
    return _HELPER.equal(pred, gold, seconds)


def grade(text: str, gold: str | None, *, last_number: bool = False, **kwargs) -> bool:
    """Whether the final answer in `text` equals `gold` (extract_answer + answers_equivalent)."""
    return answers_equivalent(extract_answer(text, last_number=last_number), gold, **kwargs)


def grade_batch(texts: Sequence[str], golds: Sequence[str | None], **kwargs) -> np.ndarray:
    """`grade` over pairs; bool array of len(texts)."""
    if len(texts) != len(golds):
        raise ValueError(f"grade_batch: {len(texts)} texts but {len(golds)} gold answers")
    return np.array([grade(t, g, **kwargs) for t, g in zip(texts, golds)], dtype=bool)
