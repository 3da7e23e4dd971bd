"""The dail_eval job: pass@k curves per model and budget, on the shipped toy student (it solves
about 40% of the toy arithmetic problems greedily and says "The answer is N.")."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from opdjax.dail import evaluate
from opdjax.dail.config import dail_config
from opdjax.toy.dail_problems import write_demo_problems
from opdjax.toy import arithmetic
from opdjax.data.grading import extract_answer, grade_batch
from opdjax.data.prompts import Problem
from opdjax.data.tokenizer import load_tokenizer
from opdjax.eval.budget import BudgetResult
from opdjax.eval.choice import ChoiceProblem, shuffled
from opdjax.models import hf_io
from opdjax.toy import opd_pair

FORCED = "\n</think>\n\nThe final answer is \\boxed{"


@pytest.fixture(scope="module")
def toy():
    _, student = opd_pair.load_toy_pair()
    tok = load_tokenizer(student)
    params, cfg = hf_io.load_pretrained(student)
    return student, tok, params, cfg


def _toy_problems(n):
    return [Problem(prompt=p["prompt"], answer=p["answer"], index=i, source=f"toy:{i}", record=p)
            for i, p in enumerate(arithmetic.make_problems(n, seed=0, split="eval"))]


def test_toy_answers_are_graded_by_the_math_checker():
    p = arithmetic.make_problems(1, seed=0, split="eval")[0]
    assert extract_answer("We start with 7. Adding 5 to 7 gives 12. The answer is 32.") == "32"
    np.testing.assert_array_equal(
        grade_batch([p["solution"], p["solution"].replace(f"is {p['answer']}.", "is 1000."),
                     "Out of budget\n</think>\n\nThe final answer is \\boxed{" + p["answer"] + "}"],
                    [p["answer"]] * 3), [True, False, True])


def test_curves_on_the_toy_student(toy):
    student, tok, params, cfg = toy
    problems = _toy_problems(6)
    n = 4
    summary = evaluate.pass_at_k_curves(
        {"a": (params, cfg), "b": lambda: (params, cfg)}, tok, problems,
        prompt_ids_fn=lambda text: opd_pair.encode_prompt(tok, text), kind="math", samples=n, budgets=(96,),
        temperature=1.0, top_p=0.95, forced_answer=FORCED, answer_tokens=4, stop_ids=(tok.eos_token_id,),
        key=jax.random.key(0), rows_per_call=8)
    assert summary["ks"] == [1, 2, 3, 4] and summary["budgets"] == [96]
    a, b = summary["models"]["a"][96], summary["models"]["b"][96]
    for field in ("pass_at_k", "correct_counts", "mean_thinking_tokens", "forced_share", "example"):
        assert a[field] == b[field]  # same weights, same key: the same samples
    curve = [a["pass_at_k"][k] for k in range(1, n + 1)]
    assert all(x <= y + 1e-12 for x, y in zip(curve, curve[1:]))  # monotone in k
    counts = np.array(a["correct_counts"])
    assert a["pass_at_k"][1] == pytest.approx(counts.sum() / (len(problems) * n)) == pytest.approx(a["accuracy"])
    assert a["pass_at_k"][n] == pytest.approx(np.mean(counts > 0))
    assert 0 < a["pass_at_k"][1] < a["pass_at_k"][n]  # the toy student is right sometimes, not always
    assert 40 < a["mean_thinking_tokens"] <= 96 and 0 <= a["forced_share"] <= 1
    assert "We start with" in a["example"]


def test_choice_curves_shuffle_and_grade_letters(monkeypatch):
    """kind=choice without a model: a fake generator answers \\boxed{A} for every row, so pass@k is
    the share of problems whose correct option was shuffled into place A."""
    seen = {}

    def fake(params, cfg, tokenizer, rows, **kw):
        seen["rows"], seen["key"], seen["kw"] = rows, kw["key"], kw
        return BudgetResult(["I pick... \\boxed{A}"] * len(rows), [[1]] * len(rows), np.zeros(len(rows), bool),
                            np.full(len(rows), 7), np.zeros(len(rows), bool))

    monkeypatch.setattr(evaluate, "generate_with_budget", fake)
    problems = [ChoiceProblem(str(i), f"q{i}", ("right", "w1", "w2", "w3"), 0) for i in range(40)]
    texts = []
    summary = evaluate.pass_at_k_curves(
        {"m": (None, type("Cfg", (), {"vocab_size": 100})())}, None, problems,
        prompt_ids_fn=lambda text: texts.append(text) or [1, 2, 3], kind="choice", samples=2, budgets=(16,),
        temperature=0.6, top_p=0.95, forced_answer=FORCED, answer_tokens=4, stop_ids=(0,), key=jax.random.key(0),
        shuffle_seed=3)
    letters = [shuffled(p, 3)[1] for p in problems]
    want = np.mean([x == "A" for x in letters])
    assert 0 < want < 1
    entry = summary["models"]["m"][16]
    assert entry["pass_at_k"][1] == pytest.approx(want) and entry["pass_at_k"][2] == pytest.approx(want)
    assert [p["answer"] for p in summary["problems"]] == letters
    assert len(seen["rows"]) == 80 and texts[0].startswith("q0\n\nA) ") and "\\boxed{" in texts[0]
    assert entry["mean_thinking_tokens"] == 7 and entry["forced_share"] == 0 and entry["exhausted_share"] == 0
    # thinking off: a sample is forced when the choice extractor finds no letter in it
    kw = seen["kw"]
    assert kw["thinking"] is False and kw["settings"].presence_penalty == 0.0
    assert kw["has_answer"](0, "so \\boxed{C}") and not kw["has_answer"](0, "I am not sure yet")


def test_run_writes_json_markdown_and_pictures(toy, tmp_path):
    student, tok, params, cfg = toy
    workdir = tmp_path / "run"
    shutil.copytree(student, workdir / "student_hf")  # the "trained" model: here the same weights
    write_demo_problems(tmp_path / "eval.jsonl", 4, seed=0, split="eval")
    c = dail_config()
    c.job = "dail_eval"
    c.workdir = str(workdir)
    c.model.path = student
    c.prompts.student = "{problem}"  # the toy student was trained on the raw problem, thinking off
    c.prompts.enable_thinking = False
    c.eval.problems = str(tmp_path / "eval.jsonl")
    c.eval.samples = 2
    c.eval.budgets = (8,)  # one budget keeps the test to two compilations; no toy solution fits in 8
    c.eval.answer_tokens = 4
    c.eval.models = (("copy", student),)
    c.metrics.progress = False
    summary = evaluate.run(c)

    out = workdir / "eval"
    for name in ("passk.json", "passk.md", "passk_8.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert set(summary["models"]) == {"base", "trained", "copy"}
    base = summary["models"]["base"][8]
    for other in ("trained", "copy"):
        assert summary["models"][other][8]["correct_counts"] == base["correct_counts"]
        assert summary["models"][other][8]["example"] == base["example"]
    assert base["forced_share"] == 1.0 and base["mean_thinking_tokens"] == 8
    assert base["example"].startswith("We start with") and FORCED in base["example"]
    on_disk = json.loads((out / "passk.json").read_text())
    assert on_disk["models"]["base"]["8"]["pass_at_k"]["2"] == base["pass_at_k"][2]
    assert on_disk["model_paths"]["trained"] == str(workdir / "student_hf")
    md = (out / "passk.md").read_text()
    assert "## Budget 8 tokens" in md and "| k | base | trained | copy |" in md


def test_reports_one_table_and_picture_per_budget(tmp_path):
    def entry(curve):
        return {"pass_at_k": dict(enumerate(curve, start=1)), "mean_thinking_tokens": 100.0, "forced_share": 0.25}

    summary = {"kind": "math", "samples": 4, "num_problems": 3, "temperature": 0.6, "top_p": 0.95,
               "budgets": [512, 1024],
               "models": {"base": {512: entry([0.1, 0.2, 0.25, 0.3]), 1024: entry([0.2, 0.3, 0.35, 0.4])},
                          "trained": {512: entry([0.2, 0.3, 0.4, 0.5]), 1024: entry([0.3, 0.4, 0.5, 0.6])}}}
    files = evaluate.write_reports(summary, tmp_path)
    assert sorted(os.path.basename(f) for f in files.values()) == [
        "passk.json", "passk.md", "passk_1024.png", "passk_512.png"]
    md = (tmp_path / "passk.md").read_text()
    assert "## Budget 512 tokens" in md and "## Budget 1024 tokens" in md
    assert "| 1 | 0.100 | 0.200 |" in md and "| 4 | 0.400 | 0.600 |" in md  # k = 1, 2, 4 shown
    assert "| 3 |" not in md and "| forced share | 0.250 | 0.250 |" in md
    assert json.loads((tmp_path / "passk.json").read_text())["models"]["trained"]["1024"]["pass_at_k"]["4"] == 0.6


def test_run_config_errors(tmp_path):
    c = dail_config()
    with pytest.raises(ValueError, match="config.eval.problems is empty"):
        evaluate.run(c)
    c.eval.problems = str(tmp_path / "x.jsonl")
    c.eval.kind = "essay"
    with pytest.raises(ValueError, match="config.eval.kind='essay'"):
        evaluate.run(c)
    c.eval.kind = "math"
    c.eval.budgets = (0,)
    with pytest.raises(ValueError, match="config.eval.budgets"):
        evaluate.run(c)


def test_math_problem_errors_name_the_line_and_field(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n" + json.dumps({"problem": "2+2?"}) + "\n")
    with pytest.raises(ValueError, match=rf"{f}:2: answer field 'answer' \(config.eval.answer_field\) is missing"):
        evaluate.load_math_problems(f, problem_field="problem", answer_field="answer")
    with pytest.raises(ValueError, match=rf"{f}:1: no problem field 'question'"):
        evaluate.load_math_problems(f, problem_field="question", answer_field="answer")


def test_authors_evaluation_defaults():
    """authors' code (eval/eval.py, eval_array.sbatch, run_eval_dataset_reasoning.sh): presence
    penalty 1.5, forced answer up to 100 tokens, Qwen2.5 budget 4096 (thinking off), Qwen3 budgets
    512..4096 of thinking (thinking on, stop at </think>)."""
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def load(name):
        spec = importlib.util.spec_from_file_location(f"_cfg_{name}", os.path.join(root, "configs", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config()

    c = dail_config()
    assert c.eval.presence_penalty == 1.5 and c.eval.answer_tokens == 100 and c.eval.thinking_end == "</think>"
    assert (c.eval.temperature, c.eval.top_p) == (0.6, 0.95)
    q25 = load("dail_train_qwen2p5_7b")
    assert q25.eval.budgets == (4096,) and q25.prompts.enable_thinking is False
    q3 = load("dail_train_qwen3_8b")
    assert q3.eval.budgets == (512, 1024, 2048, 4096) and q3.prompts.enable_thinking is True


def test_math_rows_are_forced_when_no_answer_is_found(monkeypatch):
    seen = {}

    def fake(params, cfg, tokenizer, rows, **kw):
        seen.update(kw)
        return BudgetResult(["x"] * len(rows), [[1]] * len(rows), np.zeros(len(rows), bool),
                            np.full(len(rows), 3), np.zeros(len(rows), bool))

    monkeypatch.setattr(evaluate, "generate_with_budget", fake)
    evaluate.pass_at_k_curves({"m": (None, type("Cfg", (), {"vocab_size": 100})())}, None,
                              [{"prompt": "1+1?", "answer": "2"}], prompt_ids_fn=lambda t: [1, 2], kind="math",
                              samples=2, budgets=(8,), temperature=0.6, top_p=0.95, presence_penalty=1.5,
                              thinking=True, forced_answer=FORCED, answer_tokens=4, stop_ids=(0,),
                              key=jax.random.key(0))
    assert seen["thinking"] is True and seen["thinking_end"] == "</think>"
    assert seen["settings"].presence_penalty == 1.5
    assert seen["has_answer"](0, "... so \\boxed{2}") and seen["has_answer"](1, "The answer is 2.")
    assert not seen["has_answer"](0, "Let me think about 1 + 1")


def test_eval_setting_errors_name_the_field(tmp_path, toy):
    student, *_ = toy
    c = dail_config()
    c.eval.problems = str(tmp_path / "x.jsonl")
    c.eval.presence_penalty = 3.0
    with pytest.raises(ValueError, match=r"config.eval.presence_penalty=3.0 must be a number in \[-2, 2\]"):
        evaluate.run(c)
    c.eval.presence_penalty = 1.5
    write_demo_problems(tmp_path / "x.jsonl", 2, seed=0, split="eval")
    c.model.path = student
    c.eval.thinking_end = "</reasoning>"
    c.prompts.enable_thinking = True
    with pytest.raises(ValueError, match=r"config.eval.thinking_end='</reasoning>' is not one token"):
        evaluate.run(c)
