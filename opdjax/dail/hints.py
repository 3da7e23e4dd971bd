"""The landmarks hint h(s) of DAIL's negative context (DAIL.md, step 2).

The negative reference is the model told where the solution goes: its final answer and the
results it passes through, without the reasoning that connects them. The −γ·KL term to it
pushes the student away from "I know where I am going, so I steer there". So the hint holds what
a solution's *destination and waypoints* are, and nothing of how to get there:

    answer  the final answer: grading's `extract_answer` (last \\boxed{...}, nested braces kept,
            else "The answer is X" / "Answer: X"); None when the solution has none (proofs).
    items   the landmarks (what counts: below), listed as `order` says and, with `max_landmarks`
            > 0, only the first `max_landmarks` found (in order of appearance) kept:
            - numbers: integers, decimals, 5/16, \\frac{5}{16} (also \\dfrac, \\tfrac, \\frac12),
              negatives (-3: a minus sign attached to the number and not preceded by a letter,
              digit or closing bracket, so x-3 and 5 - 3 give 3), thousands written 1,000,
              1{,}000 or 10\\,080;
            - short expressions: a math segment ($...$, $$...$$, \\(...\\), \\[...\\]) whose
              content, whitespace collapsed, has at most `max_expression_chars` characters is one
              item ("x = 5", "2^{10}", "\\sqrt{7}"); a segment that is just a number is that number;
              a longer segment contributes the numbers inside it, as plain text does.
            \\boxed{X} counts as X, so the boxed answer is found (and excluded) like any other.

Dropped as uninformative (deterministic, spelling-based):
    - lone unsigned digits: 0 and 1 everywhere; 2-9 inside a long math segment (exponents,
      coefficients), but kept in prose and as a segment of their own, where they are results
      ("there are 4 cases", "gives 7", "$k = 3$" as an expression);
    - digits inside identifiers and subscripts (x2, a_1, a_{12});
    - expressions that are notation, not results: no digit and no operator or relation once
      subscripts are removed ("$n$", "$ABC$", "$f(x)$", "$a_1$"); "$a+b \\ge 2$" stays;
    - the answer itself: any item equal to it in value (numbers: 0.5 = 1/2 = \\frac{1}{2}, so the
      10/32 of "10/32 = 5/16" goes when the answer is 5/16) or as text, whitespace ignored. An
      expression that merely contains the answer ("x = 5") stays;
    - with `problem=` given: any item the problem statement already contains (same extraction,
      same keys), so the landmarks are the results the solution reaches, not its givens.
Deduplication: numbers by exact value (the first spelling is kept), expressions by their text
with whitespace removed.

Listing (the authors' rule by default; their train/dail_train.py `form_cheating_hint` builds a
set of extracted entities, lists `sorted(...)` of it in full, and allows an empty list):
    order="sorted" (default, config hint.order)  the items sorted as Python sorts strings, by code
            point ("10" < "2" < "3/4" < "\\frac..." < "x = 5"), as the authors sort; so the hint
            gives the waypoints without the order in which the solution reaches them;
    order="appearance"  the order of first appearance in the solution (the toy model M was
            trained with hints in this order);
    max_landmarks=0 (default, config hint.max_landmarks)  every landmark, uncapped (authors);
            N > 0 keeps the first N found, by appearance, before they are ordered.
    No landmarks and no answer (a proof in words): `hint_text` uses hint.text_empty, not an error.

Known limits: a `$` used as currency pairs with the next `$` as if it were math (competition
solutions write \\$); "(1,234)" reads as one thousand two hundred thirty-four.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterator

from opdjax.dail.config import HINT_TEXT_EMPTY, HINT_TEXT_NO_ANSWER  # hints of a solution with no final answer
from opdjax.dail.prompts import fill
from opdjax.data.grading import extract_answer

LANDMARK_SEPARATOR = ", "

_MINUS = "\u2212"  # unicode minus sign, read as "-"
# Lone unsigned digits that are not landmarks: 0 and 1 anywhere; any digit inside a long formula
# (exponents, coefficients, indices), while in prose "there are 4 cases" / "gives 7" is a result.
_DROPPED_IN_PROSE = "01"
_DROPPED_IN_FORMULAS = "0123456789"

# sign: a minus attached to the number, not preceded by a word character or a closing bracket.
# Plain numbers must not start inside an identifier or a subscript (x2, a_1, a_{12}).
_NUMBER_RE = re.compile(
    r"(?P<sign>(?<![\w)\]}])[-\u2212])?"
    r"(?P<body>"
    r"\\[dt]?frac\s*\{\s*[-\u2212]?\d+\s*\}\s*\{\s*[-\u2212]?\d+\s*\}"  # \frac{5}{16}
    r"|\\[dt]?frac\d\d"  # \frac12
    r"|(?<![\w.])(?<!_\{)(?:"
    r"\d+/\d+(?![\d/])"  # 5/16
    r"|\d{1,3}(?:(?:,|\{,\}|\\,)\d{3})+(?!\d)(?:\.\d+)?"  # 1,000  1{,}000  10\,080
    r"|\d+(?:\.\d+)?"  # 12  0.50
    r"))")
_FRACTION_RE = re.compile(r"\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}|\\[dt]?frac(\d)(\d)|(\d+)/(\d+)")
_MATH_RE = re.compile(
    r"\$\$(?P<display>.+?)\$\$|(?<!\\)\$(?P<inline>.+?)(?<!\\)\$"
    r"|\\\((?P<paren>.+?)\\\)|\\\[(?P<bracket>.+?)\\\]", re.DOTALL)
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_SUBSCRIPT_RE = re.compile(r"_(?:\{[^{}]*\}|\\[A-Za-z]+|.)")
_RESULT_MARK_RE = re.compile(
    r"\d|[=<>+\-*/^!]|\\(?:[dt]?frac|sqrt|binom|cdot|times|div|pm|mp|leq?|geq?|neq?|equiv|approx"
    r"|sim|cong|mid)(?![A-Za-z])")


@dataclass(frozen=True)
class Landmarks:
    """A solution's final answer (None: it has none) and its landmarks, in order."""
    answer: str | None
    items: tuple[str, ...]


def _compact(text: str) -> str:
    return re.sub(r"\s+", "", text).replace(_MINUS, "-")


def _unbox(text: str) -> str:
    """`text` with every \\boxed{X} / \\fbox{X} replaced by X (an unclosed box loses its command)."""
    while (m := _BOX_RE.search(text)) is not None:
        depth, i = 1, m.end()
        while i < len(text) and depth:
            if text[i] == "\\":
                i += 2
                continue
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth:
            return text[:m.start()] + text[m.end():]
        text = text[:m.start()] + text[m.end():i - 1] + text[i:]
    return text


def _number_key(number: str) -> tuple[str, Any]:
    """("num", exact value) of a compact number matched by _NUMBER_RE; ("text", it) if it has
    none (a zero denominator)."""
    negative = number.startswith("-")
    body = number[1:] if negative else number
    m = _FRACTION_RE.fullmatch(body)
    if m:
        num, den = (int(g) for g in m.groups() if g is not None)
        if den == 0:
            return ("text", number)
        value = Fraction(num, den)
    else:
        value = Fraction(re.sub(r"\{,\}|\\,|,", "", body))
    return ("num", -value if negative else value)


def _key(item: str) -> tuple[str, Any]:
    """The dedupe key of an item or answer: its exact value if it is a number, else its text
    without whitespace."""
    compact = _compact(item)
    if _NUMBER_RE.fullmatch(compact):
        return _number_key(compact)
    return ("text", compact)


def _numbers(text: str, dropped_digits: str = _DROPPED_IN_PROSE) -> Iterator[tuple[str, tuple[str, Any]]]:
    for m in _NUMBER_RE.finditer(text):
        body = m.group("body")
        if m.group("sign") is None and len(body) == 1 and body in dropped_digits:
            continue
        number = ("-" if m.group("sign") else "") + _compact(m.group("body"))
        yield number, _number_key(number)


def _segment(content: str, max_expression_chars: int) -> Iterator[tuple[str, tuple[str, Any]]]:
    """The landmarks of one math segment: itself when short, else the numbers inside."""
    expression = " ".join(content.split()).replace(_MINUS, "-").rstrip(".,;: ")
    if not expression:
        return
    if len(expression) > max_expression_chars:
        yield from _numbers(content, _DROPPED_IN_FORMULAS)
        return
    compact = _compact(expression)
    if _NUMBER_RE.fullmatch(compact):
        yield from _numbers(compact)
    elif _RESULT_MARK_RE.search(_SUBSCRIPT_RE.sub("", expression)):
        yield expression, ("text", compact)


def _candidates(text: str, max_expression_chars: int) -> Iterator[tuple[str, tuple[str, Any]]]:
    """(item, key) of every non-trivial number or expression, in order of appearance."""
    position = 0
    for m in _MATH_RE.finditer(text):
        yield from _numbers(text[position:m.start()])
        content = next(g for g in m.groups() if g is not None)
        yield from _segment(content, max_expression_chars)
        position = m.end()
    yield from _numbers(text[position:])


ORDERS = ("sorted", "appearance")  # hint.order


def landmarks(solution: str, *, max_landmarks: int = 0, max_expression_chars: int = 24,
              problem: str = "", order: str = "sorted") -> Landmarks:
    """The final answer and the landmarks of `solution` (module docstring: what counts, what is
    dropped, how they are listed): every one with max_landmarks=0 (default), else the first
    `max_landmarks` found; sorted by text (default) or in order of appearance. With `problem`,
    numbers and expressions that the problem statement already gives are not landmarks either.
    Pure and deterministic."""
    for name, value in (("max_landmarks", max_landmarks), ("max_expression_chars", max_expression_chars)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    answer = extract_answer(solution or "")
    seen = {key for _, key in _candidates(_unbox(problem or ""), max_expression_chars)}
    if answer is not None:
        seen.add(_key(answer))
    items: list[str] = []
    for item, key in _candidates(_unbox(solution or ""), max_expression_chars):
        if max_landmarks and len(items) >= max_landmarks:
            break
        if key not in seen:
            seen.add(key)
            items.append(item)
    if order == "sorted":
        items.sort()
    return Landmarks(answer=answer, items=tuple(items))


def check_hint_config(hint: Any) -> None:
    """Raise ValueError naming the config field when the `hint` section cannot build hints."""
    fill(hint.text, "hint.text", answer="", landmarks="")
    fill(hint.text_no_landmarks, "hint.text_no_landmarks", answer="")
    fill(getattr(hint, "text_no_answer", HINT_TEXT_NO_ANSWER), "hint.text_no_answer", landmarks="")
    empty = getattr(hint, "text_empty", HINT_TEXT_EMPTY)
    if not isinstance(empty, str) or not empty.strip():
        raise ValueError(f"config.hint.text_empty={empty!r} must be a non-empty string: the hint of a "
                         "solution with no final answer and no landmarks.")
    for name in ("max_landmarks", "max_expression_chars"):
        value = getattr(hint, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"config.hint.{name} must be an integer >= 0"
                             + (" (0 = no cap)" if name == "max_landmarks" else "") + f", got {value!r}")
    order = getattr(hint, "order", "sorted")
    if order not in ORDERS:
        raise ValueError(f"config.hint.order={order!r}: choose one of {ORDERS} (sorted = the authors' "
                         "listing, appearance = the solution's order).")


def hint_text(solution: str, hint: Any, *, problem: str = "") -> str:
    """h(s): the hint of the negative context, from the config's `hint` section. Pass the
    `problem` to leave out what it already gives (`landmarks`).

    answer and landmarks -> hint.text; answer only -> hint.text_no_landmarks; landmarks only (a
    proof) -> hint.text_no_answer if the config has it, else HINT_TEXT_NO_ANSWER; neither ->
    hint.text_empty if the config has it, else HINT_TEXT_EMPTY (the authors allow an empty list).
    """
    found = landmarks(solution, max_landmarks=hint.max_landmarks,
                      max_expression_chars=hint.max_expression_chars, problem=problem,
                      order=getattr(hint, "order", "sorted"))
    listed = LANDMARK_SEPARATOR.join(found.items)
    if found.answer is not None and found.items:
        return fill(hint.text, "hint.text", answer=found.answer, landmarks=listed)
    if found.answer is not None:
        return fill(hint.text_no_landmarks, "hint.text_no_landmarks", answer=found.answer)
    if found.items:
        template = getattr(hint, "text_no_answer", HINT_TEXT_NO_ANSWER)
        return fill(template, "hint.text_no_answer", landmarks=listed)
    return getattr(hint, "text_empty", HINT_TEXT_EMPTY)
