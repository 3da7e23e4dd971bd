"""The synthetic multi-step arithmetic task of the embedded demo (opdjax.toy.arithmetic)."""
import re

import pytest

from opdjax.toy import arithmetic
from opdjax.toy.arithmetic import (extract_answer, first_wrong_step, is_correct, make_problems, read_jsonl,
                                  render_problem, write_jsonl)

# The worked example of the module docstring.
EXAMPLE = render_problem(7, [("add", 5), ("mul", 3), ("sub", 4)])


def test_render_example():
    assert EXAMPLE["prompt"] == "Start with 7. Add 5, then multiply by 3, then subtract 4. What is the result?"
    assert EXAMPLE["solution"] == ("We start with 7. Adding 5 to 7 gives 12. Multiplying 12 by 3 gives 36. "
                                   "Subtracting 4 from 36 gives 32. The answer is 32.")
    assert EXAMPLE["answer"] == "32"
    assert arithmetic.num_steps(EXAMPLE) == 5


def test_deterministic_and_prefix_stable():
    a = make_problems(50, seed=3)
    assert a == make_problems(50, seed=3)
    assert make_problems(20, seed=3) == a[:20]
    assert a != make_problems(50, seed=4)
    assert make_problems(30, seed=3, split="eval") == make_problems(30, seed=3, split="eval")


def test_train_eval_disjoint_and_unique():
    train = {p["prompt"] for p in make_problems(3000, seed=0, split="train")}
    evals = [p["prompt"] for p in make_problems(300, seed=0, split="eval")]
    assert len(train) == 3000 and len(set(evals)) == 300
    assert not train & set(evals)
    # also across seeds: the split is a function of the prompt alone
    assert not {p["prompt"] for p in make_problems(300, seed=1, split="eval")} & train
    assert all(arithmetic.split_of(p) == "eval" for p in evals)
    with pytest.raises(ValueError):
        make_problems(1, split="test")


def _check_numbers(p):
    """Recompute every sentence's arithmetic from the sentence itself and the chain of values."""
    steps = p["steps"]
    assert p["solution"] == " ".join(steps)
    v = int(re.fullmatch(r"We start with (\d+)\.", steps[0]).group(1))
    assert f"Start with {v}." in p["prompt"]
    ops = re.findall(r"(add|subtract|multiply by) (\d+)", p["prompt"].lower())
    assert len(ops) == len(steps) - 2 == len(p["ops"])
    for (word, arg), sent in zip(ops, steps[1:-1]):
        arg = int(arg)
        if word == "add":
            m = re.fullmatch(r"Adding (\d+) to (\d+) gives (\d+)\.", sent)
            a, before, after = map(int, m.groups())
            assert after == before + a
        elif word == "subtract":
            m = re.fullmatch(r"Subtracting (\d+) from (\d+) gives (\d+)\.", sent)
            a, before, after = map(int, m.groups())
            assert after == before - a
        else:
            m = re.fullmatch(r"Multiplying (\d+) by (\d+) gives (\d+)\.", sent)
            before, a, after = map(int, m.groups())
            assert after == before * a
        assert a == arg and before == v
        assert 0 <= after <= arithmetic.MAX_VALUE
        v = after
    assert steps[-1] == f"The answer is {v}." and p["answer"] == str(v)


def test_solution_numbers_are_correct():
    problems = make_problems(500, seed=0) + make_problems(100, seed=0, split="eval")
    for p in problems:
        _check_numbers(p)
    n_ops = {len(p["ops"]) for p in problems}
    assert n_ops == set(range(arithmetic.MIN_OPS, arithmetic.MAX_OPS + 1))
    # values grow along the chain on average: the later steps carry the bigger numbers
    mean = lambda k: sum(p["values"][k] for p in problems) / len(problems)
    assert mean(2) > mean(0) * 1.5


def test_extract_answer_and_is_correct():
    assert extract_answer(EXAMPLE["solution"]) == "32"
    assert extract_answer("blah The answer is 5. The answer is 07.") == "7"  # the last one, normalized
    assert extract_answer("The answer is 32") is None  # no final period: not a finished answer
    assert extract_answer("") is None and extract_answer(None) is None
    assert is_correct(EXAMPLE["solution"], "32") and is_correct(EXAMPLE["solution"], 32)
    assert not is_correct(EXAMPLE["solution"].replace("is 32.", "is 31."), "32")
    assert not is_correct("We start with 7.", "32")


def test_first_wrong_step():
    sol = EXAMPLE["solution"]
    assert first_wrong_step(sol, EXAMPLE) is None
    assert first_wrong_step(sol.replace(". ", ".  "), EXAMPLE) is None  # whitespace between sentences
    assert first_wrong_step(sol.replace("start with 7", "start with 8"), EXAMPLE) == 0
    # wrong late: steps 1 and 2 right, the third operation wrong, continued consistently
    late = ("We start with 7. Adding 5 to 7 gives 12. Multiplying 12 by 3 gives 36. "
            "Subtracting 4 from 36 gives 33. The answer is 33.")
    assert first_wrong_step(late, EXAMPLE) == 3 and not is_correct(late, EXAMPLE["answer"])
    # right arithmetic on a wrong operation (subtract instead of multiply) at step 2
    wrong_op = ("We start with 7. Adding 5 to 7 gives 12. Subtracting 3 from 12 gives 9. "
                "Subtracting 4 from 9 gives 5. The answer is 5.")
    assert first_wrong_step(wrong_op, EXAMPLE) == 2
    # only the final sentence wrong; a lucky right answer after a wrong step still has a wrong step
    assert first_wrong_step(sol.replace("The answer is 32.", "The answer is 36."), EXAMPLE) == 4
    lucky = sol.replace("Multiplying 12 by 3 gives 36. Subtracting 4 from 36 gives 32.",
                        "Multiplying 12 by 3 gives 35. Subtracting 4 from 35 gives 32.")
    assert is_correct(lucky, "32") and first_wrong_step(lucky, EXAMPLE) == 2
    # truncated output: the first missing sentence; text after a complete solution: one past the end
    assert first_wrong_step("We start with 7. Adding 5 to 7 gives 12.", EXAMPLE) == 2
    assert first_wrong_step("", EXAMPLE) == 0
    assert first_wrong_step(sol + " The answer is 32.", EXAMPLE) == 5


def test_jsonl_roundtrip(tmp_path):
    problems = make_problems(10, seed=0)
    path = tmp_path / "sub" / "toy.jsonl"
    write_jsonl(problems, path)
    assert read_jsonl(path) == problems
    assert all({"prompt", "solution", "answer"} <= set(p) for p in read_jsonl(path))
