"""Tests for opdjax.dail.prompts: template filling, template checks, and the three chat-rendered
DAIL contexts on the toy tokenizer."""
import types

import pytest

from opdjax.dail.config import dail_config
from opdjax.dail.prompts import (
    REQUIRED, Contexts, check_templates, fill, join_solutions, render_contexts, render_student_prompt,
)
from opdjax.data.tokenizer import build_toy_tokenizer, encode_chat, load_tokenizer

PROBLEM = r"Find $x$ if $\frac{x}{2} = 3$ and {weird} braces stay."
SOLUTION = r"Multiply both sides by 2: $x = 6$. The answer is $\boxed{6}$."
HINT = "Hint: the final answer is 6."
LIMIT = dail_config().data.max_prompt_tokens
GENERATION_PROMPT = "<|im_start|>assistant\n"
NO_THINKING = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy_tok")
    build_toy_tokenizer(path)
    return load_tokenizer(path)


def prompts(**changes):
    section = dail_config().prompts
    for name, value in changes.items():
        setattr(section, name, value)
    return section


def loose_prompts(**changes):
    """A plain namespace copy of the section, so fields can take values of any type."""
    return types.SimpleNamespace(**{**dail_config().prompts.to_dict(), **changes})


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


# ---------------------------------------------------------------------------------------------
# fill

def test_fill_keeps_latex_braces():
    template = "Q: {problem}\nGive \\boxed{answer}; note \\frac{1}{2} and {unknown}."
    out = fill(template, "prompts.student", problem=r"Is $\frac{3}{4} > \sqrt{x}$ for {x}?")
    assert out == ("Q: Is $\\frac{3}{4} > \\sqrt{x}$ for {x}?\n"
                   "Give \\boxed{answer}; note \\frac{1}{2} and {unknown}.")


def test_fill_substitutes_in_one_pass():
    template = "{problem} | {solution} | {problem}"
    out = fill(template, "prompts.expert", problem="P has {solution} in it",
               solution=r"S has {problem}, \1 and \g<0>")
    assert out == r"P has {solution} in it | S has {problem}, \1 and \g<0> | P has {solution} in it"


def test_fill_missing_placeholder_names_field():
    with pytest.raises(ValueError, match=r"config\.prompts\.expert has no \{solution\} placeholder"):
        fill("{problem} only", "prompts.expert", problem="p", solution="s")
    with pytest.raises(ValueError, match=r"^config\.hint\.text has no \{landmarks\}"):
        fill("{answer}", "config.hint.text", answer="1", landmarks="2")


def test_fill_rejects_non_string_values():
    with pytest.raises(TypeError, match=r"\{problem\}"):
        fill("{problem}", "prompts.student", problem=None)


def test_fill_without_values_returns_template():
    assert fill("a {problem} b", "prompts.student") == "a {problem} b"


# ---------------------------------------------------------------------------------------------
# check_templates

def test_required_placeholders():
    assert REQUIRED == {"student": ("problem",), "expert": ("problem", "solution"),
                        "hint": ("problem", "hint")}


def test_default_templates_pass():
    check_templates(dail_config().prompts)


@pytest.mark.parametrize("changes, message", [
    ({"expert": ""}, r"config\.prompts\.expert is empty"),
    ({"student": "  \n "}, r"config\.prompts\.student is empty"),
    ({"expert": "{problem} and no reference"},
     r"config\.prompts\.expert has no \{solution\} placeholder: '\{problem\} and no reference'"),
    ({"hint": "{problem}"}, r"config\.prompts\.hint has no \{hint\} placeholder"),
    ({"student": "Solve."}, r"config\.prompts\.student has no \{problem\} placeholder"),
    ({"student": "{problem} {solution}"},
     r"config\.prompts\.student has a \{solution\} placeholder, but the student context is filled "
     r"with \{problem\} only"),
    ({"hint": "{problem} {hint} {solution}"}, r"config\.prompts\.hint has a \{solution\} placeholder"),
    ({"expert": "{problem} {solution} {hint}"}, r"config\.prompts\.expert has a \{hint\} placeholder"),
])
def test_check_templates_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        check_templates(prompts(**changes))


@pytest.mark.parametrize("changes, message", [
    ({"enable_thinking": "yes"}, r"config\.prompts\.enable_thinking must be true or false"),
    ({"system": None}, r"config\.prompts\.system must be a string"),
    ({"solution_separator": None}, r"config\.prompts\.solution_separator must be a string"),
    ({"expert": None}, r"config\.prompts\.expert is empty"),
])
def test_check_templates_rejects_bad_types(changes, message):
    with pytest.raises(ValueError, match=message):
        check_templates(loose_prompts(**changes))


# ---------------------------------------------------------------------------------------------
# join_solutions

def test_join_solutions():
    assert join_solutions("  one \n", "|") == "one"
    assert join_solutions(["one\n", " two", "three"], "\n---\n") == "one\n---\ntwo\n---\nthree"
    assert join_solutions(("a", "b"), "") == "ab"


@pytest.mark.parametrize("solutions, message", [
    ([], "no expert solution"),
    ("   ", "the expert solution is empty"),
    (["fine", " \n"], "expert solution #1 is empty"),
    (["fine", 3], r"expert solution #1 is not a string \(got int\)"),
])
def test_join_solutions_errors(solutions, message):
    with pytest.raises(ValueError, match=message):
        join_solutions(solutions, "\n")


# ---------------------------------------------------------------------------------------------
# render_contexts

def test_render_contexts_match_chat_encoding(tokenizer):
    section = prompts()
    ctx = render_contexts(tokenizer, section, PROBLEM, SOLUTION, HINT, record="problem 0", max_prompt_tokens=LIMIT)
    assert isinstance(ctx, Contexts)
    users = {
        "student": fill(section.student, "prompts.student", problem=PROBLEM),
        "expert": fill(section.expert, "prompts.expert", problem=PROBLEM, solution=SOLUTION),
        "hint": fill(section.hint, "prompts.hint", problem=PROBLEM, hint=HINT),
    }
    for i, name in enumerate(("student", "expert", "hint")):
        ids = getattr(ctx, name)
        want = encode_chat(tokenizer, [{"role": "user", "content": users[name]}],
                           add_generation_prompt=True, enable_thinking=True)
        assert ids == want
        assert all(isinstance(t, int) for t in ids)
        text = decode(tokenizer, ids)
        assert text == ctx.texts[i]
        assert text.startswith("<|im_start|>user\n")
        assert text.endswith("<|im_end|>\n" + GENERATION_PROMPT)
        assert PROBLEM in text and "\\boxed{answer}" in text
    expert, hint, student = (decode(tokenizer, ctx.expert), decode(tokenizer, ctx.hint),
                             decode(tokenizer, ctx.student))
    assert SOLUTION in expert and SOLUTION not in student and SOLUTION not in hint
    assert HINT in hint and HINT not in student and HINT not in expert
    assert "{problem}" not in student + expert + hint and "{solution}" not in expert


def test_enable_thinking_switches_generation_prompt(tokenizer):
    on = render_contexts(tokenizer, prompts(enable_thinking=True), PROBLEM, SOLUTION, HINT, max_prompt_tokens=LIMIT)
    off = render_contexts(tokenizer, prompts(enable_thinking=False), PROBLEM, SOLUTION, HINT, max_prompt_tokens=LIMIT)
    for name in ("student", "expert", "hint"):
        text_on, text_off = decode(tokenizer, getattr(on, name)), decode(tokenizer, getattr(off, name))
        assert text_on.endswith(GENERATION_PROMPT)
        assert text_off.endswith(GENERATION_PROMPT + NO_THINKING)
        assert text_off == text_on + NO_THINKING


def test_system_turn_comes_first(tokenizer):
    ctx = render_contexts(tokenizer, prompts(system="You are a careful mathematician."),
                          PROBLEM, SOLUTION, HINT, max_prompt_tokens=LIMIT)
    for ids in (ctx.student, ctx.expert, ctx.hint):
        text = decode(tokenizer, ids)
        assert text.startswith("<|im_start|>system\nYou are a careful mathematician.<|im_end|>\n"
                               "<|im_start|>user\n")
        assert text.count("<|im_start|>") == 3  # system, user, generation prompt
    plain = render_contexts(tokenizer, prompts(), PROBLEM, SOLUTION, HINT, max_prompt_tokens=LIMIT)
    assert "<|im_start|>system" not in decode(tokenizer, plain.expert)


def test_several_solutions_joined_with_separator(tokenizer):
    section = prompts(solution_separator="\n\n=== another solution ===\n\n")
    ctx = render_contexts(tokenizer, section, PROBLEM, [SOLUTION + "\n", "  Or: x = 6."], HINT, max_prompt_tokens=LIMIT)
    expert = decode(tokenizer, ctx.expert)
    assert SOLUTION + "\n\n=== another solution ===\n\nOr: x = 6." in expert
    single = render_contexts(tokenizer, section, PROBLEM, SOLUTION, HINT, max_prompt_tokens=LIMIT)
    assert ctx.student == single.student and ctx.hint == single.hint


def test_over_long_context_names_record_context_and_limit(tokenizer):
    short = render_contexts(tokenizer, prompts(), PROBLEM, SOLUTION, HINT, max_prompt_tokens=LIMIT)
    limit = max(len(short.student), len(short.hint))
    assert len(short.expert) > limit
    record = "problem id 17 (problems.jsonl line 18)"
    with pytest.raises(ValueError) as info:
        render_contexts(tokenizer, prompts(), PROBLEM, SOLUTION, HINT, max_prompt_tokens=limit, record=record)
    message = str(info.value)
    assert message.startswith(f"{record}: expert context is {len(short.expert)} tokens > "
                              f"config.data.max_prompt_tokens={limit}: shorten the reference")
    assert "raise the limit" in message and "student" not in message and "hint context" not in message
    # Exactly at the limit is fine.
    ok = render_contexts(tokenizer, prompts(), PROBLEM, SOLUTION, HINT, max_prompt_tokens=len(short.expert))
    assert ok == short


def test_every_over_long_context_is_named(tokenizer):
    with pytest.raises(ValueError) as info:
        render_contexts(tokenizer, prompts(), PROBLEM, SOLUTION, HINT, max_prompt_tokens=5,
                        record="problem 3")
    message = str(info.value)
    for name in ("student", "expert", "hint"):
        assert f"problem 3: {name} context is" in message


@pytest.mark.parametrize("problem, solutions, hint, message", [
    ("", SOLUTION, HINT, "problem 9: the problem is empty"),
    (PROBLEM, [], HINT, "problem 9: no expert solution"),
    (PROBLEM, ["  "], HINT, "problem 9: the expert solution is empty"),
    (PROBLEM, SOLUTION, "", "problem 9: the hint is empty"),
    (None, SOLUTION, HINT, r"problem 9: the problem is not a string \(got NoneType\)"),
])
def test_render_contexts_rejects_empty_inputs(tokenizer, problem, solutions, hint, message):
    with pytest.raises(ValueError, match=message):
        render_contexts(tokenizer, prompts(), problem, solutions, hint, record="problem 9", max_prompt_tokens=LIMIT)


def test_render_contexts_checks_templates(tokenizer):
    with pytest.raises(ValueError, match=r"config\.prompts\.hint has no \{hint\}"):
        render_contexts(tokenizer, prompts(hint="{problem}"), PROBLEM, SOLUTION, HINT, max_prompt_tokens=LIMIT)


def test_render_student_prompt(tokenizer):
    for thinking in (True, False):
        section = prompts(enable_thinking=thinking, system="Be exact.")
        ids = render_student_prompt(tokenizer, section, PROBLEM, record="eval problem 2", max_prompt_tokens=LIMIT)
        assert ids == render_contexts(tokenizer, section, PROBLEM, SOLUTION, HINT, max_prompt_tokens=LIMIT).student
    with pytest.raises(ValueError, match=r"eval problem 2: student context is \d+ tokens > "
                                         r"config\.data\.max_prompt_tokens=4: shorten the problem"):
        render_student_prompt(tokenizer, prompts(), PROBLEM, max_prompt_tokens=4, record="eval problem 2")
    # Only the student template matters for evaluation.
    render_student_prompt(tokenizer, prompts(expert="{problem}"), PROBLEM, max_prompt_tokens=LIMIT)


@pytest.mark.parametrize("limit", [0, True, "8"])
def test_bad_limit_is_named(tokenizer, limit):
    with pytest.raises(ValueError, match=r"config\.data\.max_prompt_tokens must be a positive integer"):
        render_contexts(tokenizer, prompts(), PROBLEM, SOLUTION, HINT, max_prompt_tokens=limit)


# ---------------------------------------------------------------------------------------------
# the reference cut (prompts.reference_cut = "solution_marker", the authors' build_expert_prompt)

S1 = "Solution 1: Add 2 and 3 to get 5."
S2 = "Solution 2: Note 5 = 2 + 3."
S3 = "Solution 3: Count: five."
MULTI = f"{S1}\n\n{S2}\n\n{S3}"  # one string holding three solutions, as e1-proof's references do


def test_reference_prefixes_cut_at_solution_markers_and_list_items():
    from opdjax.dail.prompts import reference_prefixes
    text, shorter = reference_prefixes(MULTI, "\n\n---\n\n")
    assert text == MULTI
    assert shorter == [f"{S1}\n\n{S2}", S1]  # the marker at the very start is not a cut
    # A list of solutions: item boundaries are cuts too; a marker right after the separator is the
    # same cut, and the separator is not kept.
    text, shorter = reference_prefixes(["A is 1.  ", "Solution 2: B is 2.", "C"], "\n\n---\n\n")
    assert text == "A is 1.\n\n---\n\nSolution 2: B is 2.\n\n---\n\nC"
    assert shorter == ["A is 1.\n\n---\n\nSolution 2: B is 2.", "A is 1."]
    assert reference_prefixes(SOLUTION, "\n\n---\n\n") == (SOLUTION, [])  # one solution: nothing to cut
    # "Solution 12:" mid-line counts (the authors' pattern is unanchored); "Solution:" does not.
    assert reference_prefixes("Intro. Solution 12: x. Solution: y.", "|")[1] == ["Intro."]


def _expert_len(tokenizer, reference):
    return len(render_contexts(tokenizer, prompts(reference_cut="none"), PROBLEM, reference, HINT,
                               max_prompt_tokens=LIMIT).expert)


def test_reference_cut_drops_trailing_solutions_until_the_expert_context_fits(tokenizer, caplog):
    full, two, one = (_expert_len(tokenizer, r) for r in (MULTI, f"{S1}\n\n{S2}", S1))
    assert full > two > one
    uncut = render_contexts(tokenizer, prompts(), PROBLEM, MULTI, HINT, max_prompt_tokens=full)
    assert uncut.reference_cut is None and len(uncut.expert) == full  # fits: nothing cut
    record = "problem id 'p7' (refs.jsonl:8)"
    with caplog.at_level("WARNING", logger="opdjax.dail.prompts"):
        ctx = render_contexts(tokenizer, prompts(), PROBLEM, MULTI, HINT, max_prompt_tokens=two, record=record)
    # Solution 3 and the blank line before it go: 2 + len("Solution 3: Count: five.") = 2 + 24 chars
    assert ctx.reference_cut == {"solutions_kept": 2, "solutions": 3, "chars_dropped": 26,
                                 "tokens_before": full, "tokens_after": two}
    assert ctx.expert == render_contexts(tokenizer, prompts(), PROBLEM, f"{S1}\n\n{S2}", HINT,
                                         max_prompt_tokens=LIMIT).expert
    assert S3 not in ctx.texts[1] and S2 in ctx.texts[1]
    assert ctx.student == uncut.student and ctx.hint == uncut.hint  # only the reference is cut
    assert any(record in m and "first 2 of 3 solutions" in m and "26 characters" in m for m in caplog.messages)
    # One token short of two solutions: the cut repeats down to Solution 1 alone.
    ctx = render_contexts(tokenizer, prompts(), PROBLEM, MULTI, HINT, max_prompt_tokens=two - 1)
    assert ctx.reference_cut == {"solutions_kept": 1, "solutions": 3, "chars_dropped": len(MULTI) - len(S1),
                                 "tokens_before": full, "tokens_after": one}
    assert len(ctx.expert) == one


def test_reference_cut_that_cannot_fit_is_the_usual_error(tokenizer):
    one = _expert_len(tokenizer, S1)
    with pytest.raises(ValueError) as info:
        render_contexts(tokenizer, prompts(), PROBLEM, MULTI, HINT, max_prompt_tokens=one - 1, record="problem 4")
    message = str(info.value)
    assert message.startswith(f"problem 4: expert context is {one} tokens > config.data.max_prompt_tokens={one - 1}")
    assert "cut the reference to its first solution (3 found) and it is still too long" in message
    # reference_cut = none: never cut, the error names the whole reference's length
    full = _expert_len(tokenizer, MULTI)
    with pytest.raises(ValueError, match=rf"problem 4: expert context is {full} tokens"):
        render_contexts(tokenizer, prompts(reference_cut="none"), PROBLEM, MULTI, HINT,
                        max_prompt_tokens=full - 1, record="problem 4")


def test_reference_cut_setting_is_checked():
    with pytest.raises(ValueError, match=r"config\.prompts\.reference_cut='truncate': choose one of"):
        check_templates(prompts(reference_cut="truncate"))
