"""Multiple choice: loading (both layouts), seeded shuffling, the prompt, letter extraction, grading."""
import json

import numpy as np
import pytest

from opdjax.data.prompts import PromptDataError
from opdjax.eval.choice import (ChoiceProblem, choice_prompt, extract_choice, grade_choice, load_choice_problems,
                                shuffled)


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_load_choices_layout_answer_as_text_letter_or_index(tmp_path):
    f = _jsonl(tmp_path / "mc.jsonl", [
        {"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": "4"},
        {"question": "Capital of France?", "choices": ["Rome", "Paris", "Oslo"], "answer": "C"},
        {"question": "Odd one?", "choices": ["1", "2"], "answer": "(A)"},
        {"question": "Index?", "choices": ["x", "y", "z"], "answer": 2},
    ])
    ps = load_choice_problems(f)
    assert [p.correct for p in ps] == [1, 2, 0, 2]
    assert ps[0] == ChoiceProblem("0", "2+2?", ("3", "4", "5", "6"), 1, f"{f}:1")
    assert [p.id for p in ps] == ["0", "1", "2", "3"]


def test_load_gpqa_raw_layout_auto_detected_and_explicit(tmp_path):
    rec = {"Record ID": "rec42", "Question": "Which particle is a lepton?", "Correct Answer": "electron",
           "Incorrect Answer 1": "proton", "Incorrect Answer 2": "neutron", "Incorrect Answer 3": "pion"}
    f = _jsonl(tmp_path / "gpqa.jsonl", [rec])
    (auto,) = load_choice_problems(f, id_field="Record ID")
    (explicit,) = load_choice_problems(f, layout="gpqa", id_field="Record ID")
    assert auto == explicit
    assert auto.id == "rec42" and auto.question == rec["Question"]
    assert auto.choices == ("electron", "proton", "neutron", "pion") and auto.correct == 0


def test_load_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "mc.parquet"
    pq.write_table(pa.table({"q": ["a?", "b?"], "opts": [["x", "y"], ["u", "v", "w"]], "gold": ["y", "B"]}), path)
    ps = load_choice_problems(path, question_field="q", choices_field="opts", answer_field="gold")
    assert [(p.choices, p.correct) for p in ps] == [(("x", "y"), 1), (("u", "v", "w"), 1)]
    assert ps[1].source == f"{path}:row 1"


@pytest.mark.parametrize("record, match", [
    ({"question": "q", "choices": ["a", "b"]}, r":2: no answer field 'answer'"),
    ({"question": "q", "answer": "a"}, r":2: no choices field 'choices'.*gpqa"),
    ({"question": "q", "choices": ["a", "b"], "answer": "zebra"}, r":2: answer field 'answer' = 'zebra'.*A-B"),
    ({"question": "q", "choices": ["a", "b"], "answer": "E"}, r":2: answer field 'answer' = 'E'"),
    ({"question": "q", "choices": ["a", "b"], "answer": 5}, r":2: .*not a 0-based index"),
    ({"question": "q", "choices": "a b", "answer": "a"}, r":2: choices field 'choices' must be a list"),
    ({"question": "q", "choices": ["a", "a"], "answer": "a"}, r":2: field 'choices' has the option 'a' twice"),
    ({"question": "", "choices": ["a", "b"], "answer": "a"}, r":2: field 'question' \(the question\) is empty"),
    ({"Question": "q", "Correct Answer": "a", "Incorrect Answer 1": ""}, r":2: field 'Incorrect Answer 1'"),
])
def test_errors_name_file_line_and_field(tmp_path, record, match):
    good = {"question": "ok", "choices": ["a", "b"], "answer": "a"}
    f = _jsonl(tmp_path / "bad.jsonl", [good, record])
    with pytest.raises(PromptDataError, match=match) as e:
        load_choice_problems(f)
    assert str(f) in str(e.value)


def test_shuffled_is_deterministic_per_problem_and_spreads_the_correct_letter():
    problems = [ChoiceProblem(str(i), f"question {i}", ("right", "w1", "w2", "w3"), 0) for i in range(200)]
    first = [shuffled(p, seed=0) for p in problems]
    assert first == [shuffled(p, seed=0) for p in problems]
    for (shown, letter), p in zip(first, problems):
        assert sorted(shown) == sorted(p.choices)
        assert shown["ABCD".index(letter)] == "right"
    counts = {x: sum(letter == x for _, letter in first) for x in "ABCD"}
    assert min(counts.values()) > 25, counts  # about 50 each, not always A
    assert [s for s, _ in first] != [s for s, _ in (shuffled(p, seed=1) for p in problems)]
    # the order is a property of the problem, not of its position in a file
    assert shuffled(problems[7], 0) == shuffled(ChoiceProblem("7", "question 7", problems[7].choices, 0), 0)


def test_choice_prompt_letters_the_options_and_asks_for_a_boxed_letter():
    text = choice_prompt("Which is prime?", ["4", "6", "7", "9"])
    assert text.startswith("Which is prime?\n\nA) 4\nB) 6\nC) 7\nD) 9\n\n")
    assert "\\boxed{" in text and "A, B, C or D" in text
    with pytest.raises(ValueError):
        choice_prompt("q", ["only one"])


@pytest.mark.parametrize("text, want", [
    ("The answer is \\boxed{C}.", "C"),
    ("so the final answer is $\\boxed{\\text{C}}$", "C"),
    ("\\boxed{\\textbf{(B)}}", "B"),
    ("Therefore \\boxed{(D)}", "D"),
    ("\\boxed{B) 4.2 eV}", "B"),
    ("\\boxed{b}", "B"),
    ("The answer is (C).", "C"),
    ("The answer is C", "C"),
    ("Answer: D", "D"),
    ("**Answer:** B", "B"),
    ("Final Answer: **(A)**", "A"),
    ("The correct option is B, since the mass is conserved.", "B"),
    ("The correct answer is option D.", "D"),
    ("I would pick answer choice (C) here.", "C"),
    ("The answer is (a).", "A"),
    ("**Final Answer**\n\n\\[\n\\boxed{C}\n\\]", "C"),
    ("Answer: (B) 3.2 x 10^-5 M", "B"),
    ("the correct choice is **D**", "D"),
    ("Thus, the answer is option (A).", "A"),
    ("$\\boxed{\\mathrm{B}}$", "B"),
    ("ANSWER: C", "C"),
    ("The best answer would be C because it conserves charge.", "C"),
    ("Since A is the electrophile and B the nucleophile, the answer is A.", "A"),
    ("Answer is [D]", "D"),
    # an article at a sentence start never wins over a boxed or phrased letter
    ("A careful look at the spectrum shows the peak. The answer is \\boxed{D}.", "D"),
    ("\\boxed{B}\nA short check confirms it.", "B"),
    ("Answer: C\n\nA quick sanity check: the units match.", "C"),
    ("The answer is a bit subtle; after the algebra, the answer is B.", "B"),
    # fallback: the last standalone option letter
    ("Comparing the options, (B) fits best.", "B"),
    ("It has to be C.", "C"),
    ("Options A and B fail the symmetry test, so D", "D"),
    ("A reaction like this is exothermic.", None),  # only an article
    ("I think it is hard to say.", None),
    ("The answer is 42.", None),
    ("The answer is \\boxed{E}.", None),  # not one of 4 options ...
    ("", None),
    # the answer after the reasoning wins over letters inside it
    ("<think>Maybe (A)? no, the answer is B</think>\n\nThe answer is \\boxed{C}", "C"),
    ("<think>the answer is A</think>", None),
    ("Wait: \\boxed{A}? Recheck... the final answer is \\boxed{C}", "C"),
])
def test_extract_choice(text, want):
    assert extract_choice(text, 4) == want


def test_extract_choice_respects_the_number_of_options():
    assert extract_choice("The answer is \\boxed{E}.", 5) == "E"
    assert extract_choice("The answer is \\boxed{E}.", 4) is None
    assert extract_choice("The answer is (C).", 2) is None
    assert extract_choice("I think the answer is J", 10) == "J"
    assert extract_choice("I am not sure, I guess.", 10) is None  # the pronoun I is not option I


def test_forced_continuation_output_is_graded():
    forced = "Let me think about D... \n</think>\n\nThe final answer is \\boxed{" + "B}."
    assert extract_choice(forced, 4) == "B"
    cut = "Let me think about D... \n</think>\n\nThe final answer is \\boxed{"  # never closed
    assert extract_choice(cut, 4) is None


def test_grade_choice():
    got = grade_choice(["\\boxed{A}", "The answer is (B)", "no idea", "\\boxed{E}"], ["A", "C", "A", "E"],
                       num_choices=[4, 4, 4, 5])
    np.testing.assert_array_equal(got, [True, False, False, True])
    assert grade_choice([], []).shape == (0,)
    with pytest.raises(ValueError):
        grade_choice(["x"], [])


def test_load_saved_dataset_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"question": ["q0", "q1"], "choices": [["a", "b"], ["c", "d"]], "answer": ["b", "A"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "flat"))
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows),
                          "train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "dict"))
    for path in (tmp_path / "flat", tmp_path / "dict"):
        ps = load_choice_problems(path)
        assert [(p.choices, p.correct) for p in ps] == [(("a", "b"), 1), (("c", "d"), 0)]
        assert ps[1].source.endswith(":row 1")
    assert load_choice_problems(tmp_path / "dict", split="train")[0].question == "q0"
