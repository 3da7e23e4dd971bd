"""The DAIL toy: terse expert solutions, templates, demo problem files (opdjax.toy.dail_problems) and the
shipped model M (opdjax/assets/toy_dail, built by opdjax.toy.dail_model)."""
import json
import os
import re

import numpy as np
import pytest

from opdjax.dail import config as dail_config
from opdjax.toy import dail_problems
from opdjax.data import grading
from opdjax.toy import arithmetic
from opdjax.data.tokenizer import check_same_tokenizer, load_tokenizer
from opdjax.models import hf_io
from opdjax.toy import dail_model, opd_pair

def test_terse_solution_format():
    p = arithmetic.render_problem(7, [("add", 5), ("mul", 3), ("sub", 4), ("add", 9), ("mul", 2)])
    assert dail_problems.terse_solution(p) == ("... Subtracting 4 from 36 gives 32. ... Multiplying 41 by 2 gives 82. "
                                     "The answer is 82.")
    assert dail_problems.terse_solution(p, keep=2) == ("... Multiplying 12 by 3 gives 36. ... Adding 9 to 32 gives 41. "
                                             "Multiplying 41 by 2 gives 82. The answer is 82.")
    assert dail_problems.shown_steps(5) == [3, 5] and dail_problems.shown_steps(6) == [3, 6] and dail_problems.shown_steps(3) == [3]
    with pytest.raises(ValueError):
        dail_problems.terse_solution(p, keep=1)


def test_terse_solutions_skip_steps_keep_answer_and_are_deterministic():
    problems = arithmetic.make_problems(300, seed=5) + arithmetic.make_problems(100, seed=5, split="eval")
    for p in problems:
        s = dail_problems.terse_solution(p)
        assert s == dail_problems.terse_solution(dict(p))
        assert arithmetic.extract_answer(s) == grading.extract_answer(s) == p["answer"]
        k, steps = len(p["ops"]), p["steps"]
        kept = [x for x in arithmetic.split_sentences(s) if x != "..."]
        assert kept[-1] == steps[-1] and kept[:-1] == [steps[j] for j in dail_problems.shown_steps(k)], s
        assert k >= 3 and not {1, 2} & set(dail_problems.shown_steps(k))  # the value after op 1 is never written
        assert len(s) < len(p["solution"])
    assert dail_problems.terse_solution(problems[0]) == dail_problems.terse_solution(arithmetic.make_problems(1, seed=5)[0])


def test_templates_and_hint():
    p = arithmetic.render_problem(9, [("sub", 8), ("mul", 4), ("add", 8)])
    assert dail_problems.student_text(p) == p["prompt"]
    assert dail_problems.expert_text(p) == "Reference: ... Adding 8 to 4 gives 12. The answer is 12.\n" + p["prompt"]
    assert dail_problems.toy_hint(p) == "Hint: the final answer is 12; intermediate results might include 1, 4."
    assert dail_problems.hint_text(p) == dail_problems.toy_hint(p) + "\n" + p["prompt"]
    assert dail_problems.TOY_HINT_TEXT == dail_config.HINT_TEXT
    assert dail_problems.TOY_HINT_TEXT_NO_LANDMARKS == dail_config.HINT_TEXT_NO_LANDMARKS
    assert dail_problems.toy_hint(p, landmarks=[]) == "Hint: the final answer is 12."
    braces = dict(p, prompt="Start with {x}. {solution}")  # plain substitution: other braces survive
    assert dail_problems.expert_text(braces, "{solution} {hint}") == "Reference: {solution} {hint}\nStart with {x}. {solution}"


def test_write_demo_problems(tmp_path):
    recs = dail_problems.write_demo_problems(tmp_path / "d" / "problems.jsonl", 5, seed=3, split="eval")
    back = [json.loads(line) for line in open(tmp_path / "d" / "problems.jsonl")]
    assert back == recs and len(recs) == 5 and len({r["id"] for r in recs}) == 5
    for r, p in zip(recs, arithmetic.make_problems(5, seed=3, split="eval")):
        assert set(r) == {"id", "problem", "solution", "answer"}
        assert (r["problem"], r["solution"], r["answer"]) == (p["prompt"], dail_problems.terse_solution(p), p["answer"])


@pytest.fixture(scope="module")
def model_dir():
    return dail_model.load_toy_dail()


def test_shipped_model_loads_and_shares_the_toy_tokenizer(model_dir):
    student = opd_pair.load_toy_pair()[1]
    check_same_tokenizer(model_dir, student)
    tok = load_tokenizer(model_dir)
    p = arithmetic.make_problems(1, seed=0, split="eval")[0]
    assert dail_problems.render(tok, dail_problems.TOY_STUDENT.replace("{problem}", p["prompt"])) == opd_pair.encode_prompt(tok, p["prompt"])
    params, cfg = hf_io.load_pretrained(model_dir)
    assert cfg.model_type == "qwen3" and cfg.vocab_size == len(tok)
    assert (cfg.num_layers, cfg.hidden_size) == (opd_pair.STUDENT_ARCH.num_layers, opd_pair.STUDENT_ARCH.hidden_size)
    size = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir))
    assert size < 2 * 2**20
    build = json.load(open(os.path.join(os.path.dirname(model_dir), "BUILD.json")))
    assert set(build["accuracy"]) == {"student", "expert", "hint"}


def test_shipped_model_solves_problems_in_every_context(model_dir):
    """M answers in all three contexts (BUILD.json, 128 held-out problems, greedy: student 0.88,
    expert 0.91, hint 0.85; at T=1 the expert context is the weakest, 0.39 vs 0.57 — on this toy
    the reference does not make M better, see the README's DAIL demo), and the shipped asset was
    built from the templates the code uses now."""
    build = json.load(open(os.path.join(os.path.dirname(model_dir), "BUILD.json")))
    assert build["templates"] == {"student": dail_problems.TOY_STUDENT, "expert": dail_problems.TOY_EXPERT, "hint": dail_problems.TOY_HINT,
                                  "hint_text": dail_problems.TOY_HINT_TEXT}
    problems = arithmetic.make_problems(32, seed=123, split="eval")
    tok = load_tokenizer(model_dir)
    params, cfg = hf_io.load_pretrained(model_dir)
    for context in ("student", "expert", "hint"):
        prompts = [dail_problems.render(tok, dail_model.context_text(p, context)) for p in problems]
        texts = opd_pair.generate_from_ids(params, cfg, tok, prompts, batch_size=32)
        acc = np.mean([arithmetic.is_correct(t, p["answer"]) for t, p in zip(texts, problems)])
        assert acc >= 0.7, (context, acc)
