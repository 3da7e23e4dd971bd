"""Tests for opdjax.dail.hints: the landmarks hint h(s) of DAIL's negative context. Expected
landmarks are written by hand from the rules in the module docstring: the extraction in order of
appearance (APPEARANCE), and the default listing, the authors' (every landmark, sorted as Python
sorts strings, an empty list allowed)."""
import ml_collections
import pytest

from opdjax.dail.config import dail_config
from opdjax.dail.hints import HINT_TEXT_EMPTY, HINT_TEXT_NO_ANSWER, Landmarks, check_hint_config, hint_text, landmarks
from opdjax.toy.arithmetic import make_problems

TOY_PROBLEM = "Start with 7. Add 5, then multiply by 3, then subtract 4. What is the result?"
TOY_SOLUTION = ("We start with 7. Adding 5 to 7 gives 12. Multiplying 12 by 3 gives 36. "
                "Subtracting 4 from 36 gives 32. The answer is 32.")

APPEARANCE = dict(order="appearance")  # what the solution reaches, in its order

# (solution, expected landmarks in order of appearance, uncapped, max_expression_chars=24)
CASES = {
    "toy": (TOY_SOLUTION, Landmarks("32", ("7", "5", "12", "3", "36", "4"))),
    # A long formula gives its numbers; the nested boxed fraction is the answer, not an item.
    "nested_boxed_frac": (
        r"We compute $\frac{1}{2} + \frac{1}{3} = \frac{5}{6}$ directly. "
        r"Hence the answer is $\boxed{\frac{5}{6}}$.",
        Landmarks(r"\frac{5}{6}", (r"\frac{1}{2}", r"\frac{1}{3}"))),
    # Short segments are expressions; 10/32 equals the answer 5/16 in value, so it goes too.
    "probability": (
        r"Each of the $2^5 = 32$ sequences is equally likely, and $\binom{5}{2} = 10$ of them have "
        r"exactly two heads. So the probability is 10/32 = 5/16, i.e. $\boxed{\dfrac{5}{16}}$.",
        Landmarks(r"\dfrac{5}{16}", ("2^5 = 32", r"\binom{5}{2} = 10"))),
    # Expressions deduplicated, long \sqrt chain gives 20 and 25 (its lone 5 is dropped), decimals.
    "quadratic_sqrt": (
        r"Squaring gives $x^2 - 3x - 10 = 0$, so $(x-5)(x+2) = 0$ and $x = 5$ or $x = -2$. "
        r"Since $x > 0$, we take $x=5$. Then $y = \sqrt{x + 20} = \sqrt{25} = 5$ and the area is "
        r"$2.5 \cdot 4 = 10.0$. The answer is $\boxed{10}$.",
        Landmarks("10", ("x^2 - 3x - 10 = 0", "(x-5)(x+2) = 0", "x = 5", "x = -2", "x > 0",
                         "20", "25", r"2.5 \cdot 4 = 10.0"))),
    # Thousands separators: 1{,}000 and 1,000 are one landmark; 10{,}080{,}000 is the answer.
    "thousands": (
        r"A day has 60 \cdot 24 = 1440 minutes, so a week has 7 \cdot 1440 = 10080 minutes, and "
        r"1{,}000 weeks have $10{,}080{,}000$ minutes. Checking: 1,000 times 10080 is right. "
        r"The answer is 10080000.",
        Landmarks("10080000", ("60", "24", "1440", "7", "10080", "1{,}000"))),
    # Negative numbers (ASCII and unicode minus); a binary minus is not a sign (12-3 gives 12, 3).
    "negatives": (
        "Here $\\det(A) = 1 \\cdot 4 - 2 \\cdot 3 = -2$, and the trace is 5. The eigenvalues "
        "satisfy $\\lambda^2 - 5\\lambda - 2 = 0$, whose roots sum to 5 and multiply to \u22122; "
        "the quadratic's minimum is \u22128.25 and 12-3 is 9. Final answer: $\\boxed{-2}$.",
        Landmarks("-2", ("5", "-8.25", "12", "3", "9"))),
    # A proof: no final answer; notation ($a$, $b$) is not a landmark, relations are.
    "proof": (
        r"By AM-GM, $a^2 + b^2 \ge 2ab$ for all reals $a$ and $b$, with equality iff $a = b$. "
        r"Summing the three cyclic versions proves the claim.",
        Landmarks(None, (r"a^2 + b^2 \ge 2ab", "a = b"))),
    # \(...\), \[...\] and $$...$$ are math segments too; subscripts and identifiers are not numbers.
    "delimiters_and_subscripts": (
        r"Let \(a_1 = 3\) and \(a_{n+1} = 2a_n + 1\). Then \[a_2 = 7,\] $$a_3 = 15$$ and in "
        r"general \(a_{12} + a_{13} + \cdots + a_{20} = 1999\); x2 and H2O are names. "
        r"So the answer is \(\boxed{a_4 = 31}\).",
        Landmarks("a_4 = 31", ("a_1 = 3", "a_{n+1} = 2a_n + 1", "a_2 = 7", "a_3 = 15", "1999"))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_landmarks_of_realistic_solutions(name):
    solution, want = CASES[name]
    assert landmarks(solution, **APPEARANCE) == want
    # the default listing (authors'): the same landmarks, sorted as strings
    assert landmarks(solution) == Landmarks(want.answer, tuple(sorted(want.items)))


def test_landmarks_are_deterministic():
    for solution, want in CASES.values():
        assert [landmarks(solution, **APPEARANCE) for _ in range(3)] == [want] * 3


def test_toy_solution_with_its_problem_gives_intermediate_values():
    assert landmarks(TOY_SOLUTION, problem=TOY_PROBLEM, **APPEARANCE) == Landmarks("32", ("12", "36"))


def test_toy_task_solutions():
    """Over generated problems: the answer is the toy's answer, and with the problem given the
    landmarks are exactly the intermediate values that are neither 0, 1, a given, nor the answer."""
    for p in make_problems(40, seed=3):
        got = landmarks(p["solution"], problem=p["prompt"], max_landmarks=8, **APPEARANCE)
        assert got.answer == p["answer"]
        givens = {p["start"]} | {arg for _, arg in p["ops"]}
        want = []
        for v in p["values"]:
            if v not in givens | {0, 1, int(p["answer"])} and str(v) not in want:
                want.append(str(v))
        assert got.items == tuple(want[:8]), p["solution"]


def test_dedupe_by_value_and_whitespace_keeps_first_spelling():
    solution = (r"We get $x=12$, then $x = 12$ again; 0.5 and $\frac{1}{2}$ and 1/2 are equal, "
                r"as are 12 and 12.0. The answer is $\boxed{99}$.")
    assert landmarks(solution, **APPEARANCE) == Landmarks("99", ("x=12", "0.5", "12"))


def test_answer_excluded_by_value():
    solution = r"Half is 0.5, also written 2/4, so the answer is $\boxed{\frac{1}{2}}$."
    assert landmarks(solution) == Landmarks(r"\frac{1}{2}", ())


def test_uncapped_by_default_and_the_cap_keeps_the_first_found():
    solution = "Values: 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 100. The answer is 21."
    every = ("20", "19", "18", "17", "16", "15", "14", "13", "12", "11", "100")
    assert landmarks(solution, **APPEARANCE).items == every  # max_landmarks=0: no cap
    # authors' default: all 11, sorted as strings ("100" < "11": '0' < '1' at the second character)
    assert landmarks(solution).items == ("100", "11", "12", "13", "14", "15", "16", "17", "18", "19", "20")
    # the cap keeps the first N found, then lists them as `order` says
    assert landmarks(solution, max_landmarks=3, **APPEARANCE).items == ("20", "19", "18")
    assert landmarks(solution, max_landmarks=3).items == ("18", "19", "20")
    assert landmarks(solution, max_landmarks=11).items == landmarks(solution).items


def test_sorted_listing_on_the_authors_example_formats():
    """Numbers, a fraction, a decimal, a negative, short expressions and a \\boxed answer: sorted
    by code point, so '-' (45) < '0'-'9' (48-57) < '\\' (92) < letters."""
    solution = (r"First $x = 12$, so $3x = 36$; then 36/8 = 4.5 and $\frac{9}{2} = 4.5$ again. "
                r"With $y = -7$ we get -7 + 12 = 5 and $\sqrt{25} = 5$. Hence $\boxed{41}$.")
    # appearance: x = 12, 3x = 36, 36/8, [4.5: = 36/8 in value, dropped], \frac{9}{2} = 4.5, y = -7,
    # -7, 12, 5 (a lone digit in prose other than 0/1 is kept), \sqrt{25} = 5, [41: the answer]
    want = ("-7", "12", "36/8", "3x = 36", "5", r"\frac{9}{2} = 4.5", r"\sqrt{25} = 5", "x = 12", "y = -7")
    assert landmarks(solution) == Landmarks("41", want)
    assert hint_text(solution, dail_config().hint) == (
        "Hint: the final answer is 41; intermediate results might include " + ", ".join(want) + ".")


def test_max_expression_chars():
    solution = r"We find $3x + 12 = 48$, so the answer is $\boxed{12}$."
    assert landmarks(solution).items == ("3x + 12 = 48",)  # one item: sorted or not
    # Too long to be an expression: the segment gives its numbers (3 is a lone digit in a formula).
    assert landmarks(solution, max_expression_chars=11).items == ("48",)
    assert landmarks(solution, max_expression_chars=12).items == ("3x + 12 = 48",)


@pytest.mark.parametrize("kwargs", [{"max_landmarks": -1}, {"max_expression_chars": 2.5},
                                    {"max_landmarks": True}, {"order": "shuffled"}])
def test_landmarks_rejects_bad_limits(kwargs):
    with pytest.raises(ValueError, match="must be (an integer >= 0|one of)"):
        landmarks("The answer is 3.", **kwargs)


def test_landmarks_of_empty_solution():
    assert landmarks("") == Landmarks(None, ())


# ---------------------------------------------------------------------------------------------
# hint_text

def test_hint_text_with_answer_and_landmarks():
    hint = dail_config().hint  # the authors' listing: all, sorted
    assert hint_text(TOY_SOLUTION, hint) == (
        "Hint: the final answer is 32; intermediate results might include 12, 3, 36, 4, 5, 7.")
    assert hint_text(TOY_SOLUTION, hint, problem=TOY_PROBLEM) == (
        "Hint: the final answer is 32; intermediate results might include 12, 36.")
    hint.order = "appearance"
    assert hint_text(TOY_SOLUTION, hint) == (
        "Hint: the final answer is 32; intermediate results might include 7, 5, 12, 3, 36, 4.")
    hint.order = "sorted"
    solution, _ = CASES["nested_boxed_frac"]
    assert hint_text(solution, hint) == (
        r"Hint: the final answer is \frac{5}{6}; intermediate results might include "
        r"\frac{1}{2}, \frac{1}{3}.")


def test_hint_text_answer_only():
    hint = dail_config().hint
    assert hint_text(r"Clearly $\boxed{\frac{5}{6}}$.", hint) == r"Hint: the final answer is \frac{5}{6}."


def test_hint_text_without_answer_uses_landmarks_only():
    solution, _ = CASES["proof"]
    hint = dail_config().hint
    want = r"Hint: intermediate results might include a = b, a^2 + b^2 \ge 2ab."  # sorted: ' ' < '^'
    assert hint_text(solution, hint) == want == HINT_TEXT_NO_ANSWER.replace(
        "{landmarks}", r"a = b, a^2 + b^2 \ge 2ab")
    # A config that has the field overrides the module default.
    hint.text_no_answer = "Useful facts: {landmarks}."
    assert hint_text(solution, hint) == r"Useful facts: a = b, a^2 + b^2 \ge 2ab."


def test_hint_text_with_nothing_to_hint_is_the_empty_text():
    """The authors allow an empty list: a proof in words gets hint.text_empty, not an error; a
    solution whose only landmark is its answer gets the no-landmarks text."""
    hint = dail_config().hint
    assert hint_text("Obvious by symmetry.", hint) == HINT_TEXT_EMPTY == hint.text_empty
    assert landmarks("Obvious by symmetry.") == Landmarks(None, ())
    hint.text_empty = "Hint: none."
    assert hint_text("Obvious by symmetry.", hint) == "Hint: none."
    assert hint_text(r"Trivially $\boxed{7}$.", hint) == "Hint: the final answer is 7."


def test_hint_text_uses_hint_limits():
    hint = dail_config().hint
    hint.max_landmarks = 2  # the first two found (7, 5), then sorted
    assert hint_text(TOY_SOLUTION, hint) == (
        "Hint: the final answer is 32; intermediate results might include 5, 7.")
    hint.max_landmarks = 0  # no cap
    assert hint_text(TOY_SOLUTION, hint) == (
        "Hint: the final answer is 32; intermediate results might include 12, 3, 36, 4, 5, 7.")


def test_hint_text_bad_template_names_field():
    hint = dail_config().hint
    hint.text = "The answer is {answer}."
    with pytest.raises(ValueError, match=r"config\.hint\.text has no \{landmarks\} placeholder"):
        hint_text(TOY_SOLUTION, hint)


def test_check_hint_config():
    check_hint_config(dail_config().hint)
    for field, value, message in [
        ("text", "{landmarks}", r"config\.hint\.text has no \{answer\}"),
        ("text_no_landmarks", "Hint.", r"config\.hint\.text_no_landmarks has no \{answer\}"),
        ("max_landmarks", -1, r"config\.hint\.max_landmarks must be an integer >= 0 \(0 = no cap\)"),
        ("order", "random", r"config\.hint\.order='random': choose one of"),
        ("text_empty", "", r"config\.hint\.text_empty='' must be a non-empty string"),
    ]:
        hint = dail_config().hint
        setattr(hint, field, value)
        with pytest.raises(ValueError, match=message):
            check_hint_config(hint)
    hint = ml_collections.ConfigDict(dail_config().hint.to_dict())
    hint.text_no_answer = "No placeholder."
    with pytest.raises(ValueError, match=r"config\.hint\.text_no_answer has no \{landmarks\}"):
        check_hint_config(hint)
