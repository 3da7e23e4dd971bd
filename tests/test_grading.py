"""Answer extraction and equivalence (fast path + math-verify), in and off the main thread."""
import signal
import threading
import time

import numpy as np
import pytest

from opdjax.data import grading
from opdjax.data.grading import answers_equivalent, extract_answer, grade, grade_batch

EXTRACT_CASES = [
    ("So the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # nested braces
    ("First \\boxed{3}, then corrected: \\boxed{4}", "4"),  # the last box
    ("\\boxed {5}", "5"),
    ("$\\fbox{7}$", "7"),
    ("Thus $\\boxed{-3}$.", "-3"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces inside
    ("\\boxed{\\text{(B)}}", "\\text{(B)}"),
    ("\\boxed 5$ done", "5"),
    ("\\boxed{2} and then the answer is 3.", "2"),  # a box beats a later phrase
    ("The answer is 32.", "32"),
    ("The answer is 32. So we are done.", "32"),
    ("The answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
    ("The final answer is 3.5", "3.5"),
    ("Answer: 12", "12"),
    ("**Final Answer:** **42**", "42"),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("#### 1,000", "1,000"),
    ("#### Step 1\nAdd the numbers.", None),  # a markdown heading, not a GSM8K answer
    ("<think>maybe \\boxed{1}</think>\nThe answer is 2.", "2"),  # only after the reasoning
    ("We get 3 + 4 = 7 apples.", None),  # no last-number fallback by default
    ("Almost: \\boxed{3", None),  # cut-off box: no answer
    ("\\boxed{}", None),
    ("", None),
]


@pytest.mark.parametrize("text,want", EXTRACT_CASES)
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_extract_last_number_only_when_asked():
    text = "We get 3 + 4 = 7 apples, then 1,234.5 grams."
    assert extract_answer(text) is None
    assert extract_answer(text, last_number=True) == "1234.5"
    assert extract_answer("It drops to -2.5 degrees", last_number=True) == "-2.5"
    assert extract_answer("The answer is 5", last_number=True) == "5"  # a phrase still comes first


POSITIVES = [
    ("32", "32.0"), ("1/2", "0.5"), ("1,000", "1000"), ("1{,}000", "1000"), ("\\frac{1}{2}", "0.5"),
    ("0.5", "\\frac{1}{2}"), ("\\dfrac{3}{4}", "0.75"), ("\\frac34", "0.75"), ("-3", "-3.0"),
    ("-\\frac{1}{2}", "-0.5"), ("\u22123", "-3"), ("1e3", "1000"), ("$32$", "32"),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"), ("2\\sqrt{3}", "\\sqrt{12}"),
    ("\\{2, 1\\}", "\\{1,2\\}"), ("(0, 1]", "(0,1]"), ("(x+1)^2", "x^2+2x+1"), ("x = 5", "5"),
    ("0.333333", "\\frac{1}{3}"), ("5 \\text{ cm}", "5"), ("\\text{(B)}", "B"),
]
NEGATIVES = [
    ("-3", "3"), ("31", "32"), ("0.33", "\\frac{1}{3}"), ("2.0000001", "2"), ("1000000.1", "1000000"),
    ("(0,1)", "(0,1]"), ("\\frac{1}{3}", "\\frac{1}{2}"), ("x^2", "x^3"), ("3.14", "\\pi"), ("A", "B"),
    ("", "5"), (None, "5"), ("5", None), ("12,5", "12.5"),
]


@pytest.mark.parametrize("pred,gold", POSITIVES)
def test_equivalent(pred, gold):
    assert answers_equivalent(pred, gold)


@pytest.mark.parametrize("pred,gold", NEGATIVES)
def test_not_equivalent(pred, gold):
    assert not answers_equivalent(pred, gold)


def test_fast_path_decides_plain_numbers():
    assert grading._fast_path("1,000", "1000.0") is True
    assert grading._fast_path("-\\frac{1}{4}", "-0.25") is True
    assert grading._fast_path("7", "8") is False
    assert grading._fast_path("0.3333333", "1/3") is None  # near-equal: math-verify decides
    assert grading._fast_path("\\sqrt{2}", "1.41") is None


def test_grade_and_grade_batch():
    assert grade("... so $x = \\boxed{\\dfrac{1}{2}}$.", "0.5")
    assert not grade("I am not sure.", "0.5")
    out = grade_batch(["\\boxed{72}", "The answer is 71.", "#### 72", "none"], ["72", "72", "72.0", "72"])
    assert out.dtype == np.bool_ and out.tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="3 texts but 2"):
        grade_batch(["a", "b", "c"], ["1", "2"])


def in_thread(fn):
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive(), "grading hung in a worker thread"
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_works_in_a_worker_thread():
    pairs = [("\\frac{1}{2}", "0.5"), ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"), ("\\{1,2\\}", "\\{2,1\\}"),
             ("x^2", "x^3"), ("-3", "3"), ("(x+1)^2", "x^2+2x+1")]
    got = in_thread(lambda: [answers_equivalent(p, g) for p, g in pairs])
    assert got == [True, True, True, False, False, True]
    assert in_thread(lambda: grade_batch(["\\boxed{\\frac{3}{6}}"], ["0.5"]).tolist()) == [True]
    # Without a timeout math-verify runs in-process in any thread (its signal timeouts disabled).
    assert in_thread(lambda: answers_equivalent("\\frac{\\sqrt{8}}{2}", "\\sqrt{2}", timeout_s=None))
    with pytest.raises(ValueError, match="main thread"):
        in_thread(lambda: answers_equivalent("\\sqrt{8}", "2\\sqrt{2}", isolate=False))


def test_pathological_input_returns_false_in_both_threads():
    tower = "10^{10^{10}}"  # sympy would work on this for hours
    t0 = time.monotonic()
    assert answers_equivalent(tower, "5", timeout_s=1) is False  # main thread: signal timeout
    assert in_thread(lambda: answers_equivalent(tower, "5", timeout_s=1)) is False  # helper process
    assert in_thread(lambda: answers_equivalent("\\frac{1}{2}", "0.5000")) is True  # helper still fine
    assert time.monotonic() - t0 < 30
    assert answers_equivalent("\\frac{1}{0}", "5") is False
    assert answers_equivalent("\\boxed{\\frac{" * 50, "5") is False
    assert answers_equivalent("1e999999999", "1e999999998") is False  # no billion-digit integers
    assert answers_equivalent("9" * 5000, "9" * 4999) is False  # past Python's int-parsing limit
    assert answers_equivalent("x" * 5000, "y") is False  # too long for sympy: string compare only


def test_hung_helper_is_killed_and_replaced(monkeypatch):
    # A helper stuck where no signal reaches it (C code) is killed after 2*timeout + grace.
    monkeypatch.setattr(grading, "_WORKER_CODE",
                        "import sys, time; print('{\"ready\": true}', flush=True); time.sleep(600)")
    helper = grading._Helper()
    helper.GRACE_S = 0.5
    t0 = time.monotonic()
    assert helper.equal("\\sqrt{2}", "\\sqrt{2}", 1) is False
    assert time.monotonic() - t0 < 10 and helper.proc is None
    monkeypatch.undo()
    assert helper.equal("\\sqrt{8}", "2\\sqrt{2}", 5) is True  # a fresh helper on the next call
    helper.kill()


def test_main_thread_keeps_callers_alarm_timer():
    # math-verify cancels SIGALRM after each comparison; a caller's timer (pytest-timeout's) survives.
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 50.0)
        assert answers_equivalent("\\frac{\\sqrt{8}}{2}", "\\sqrt{2}")
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 40.0 < remaining <= 50.0
        assert signal.getsignal(signal.SIGALRM) is not old
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not fired
