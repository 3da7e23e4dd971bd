"""The dail_synthesize job: output records, resuming after a kill, trace selection, and errors
before any compute."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from opdjax.rollout import mixed
from opdjax.dail import synthesize as syn
from opdjax.dail.config import dail_config
from opdjax.data.tokenizer import build_toy_tokenizer
from opdjax.models import hf_io, qwen
from opdjax.models.config import ModelConfig

VOCAB = 320


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Qwen3 with the toy tokenizer; peaked logits (std 0.5) so the two contexts
    disagree often enough for the mixed rule to matter."""
    d = tmp_path_factory.mktemp("m")
    tok = build_toy_tokenizer(d / "tok", vocab_size=VOCAB)
    cfg = ModelConfig("qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, eos_token_id=tok.eos_token_id)
    hf_io.save_pretrained(qwen.init_params(cfg, jax.random.key(0), std=0.5), cfg, str(d / "model"), tokenizer=tok)
    return str(d / "model")


PROBLEMS = [
    {"id": f"q{i}", "problem": f"Start with {i + 2}. Add {i + 3}. What is the result?",
     "solution": f"{i + 2} + {i + 3} = {2 * i + 5}. The answer is {2 * i + 5}.",
     "answer": (str(2 * i + 5) if i != 3 else None)}
    for i in range(5)
]


def _config(tmp_path, model_dir, problems=PROBLEMS, **synthesis):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in problems))
    c = dail_config()
    c.workdir = str(tmp_path / "run")
    c.seed = 3
    c.model.path = model_dir
    c.data.problems = str(path)
    c.data.id_field = "id"
    c.prompts.student = "{problem}"  # short contexts: the toy tokenizer spells most words out
    c.prompts.expert = "{problem}\nReference: {solution}"
    c.prompts.hint = "{problem}\n{hint}"
    c.prompts.enable_thinking = False
    c.synthesis.num_samples = 3
    c.rollout.max_new_tokens = 6
    c.synthesis.problems_per_batch = 2
    c.synthesis.top_n = 8
    c.metrics.progress = False
    for k, v in synthesis.items():
        (c.rollout if k == "max_new_tokens" else c.synthesis)[k] = v
    return c


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_end_to_end_and_resume(tmp_path, model_dir):
    c = _config(tmp_path, model_dir, accept_threshold=0.2, on_no_match="random")
    summary = syn.run(c)
    out = os.path.join(c.workdir, "traces.jsonl")
    recs = _lines(out)
    assert [r["id"] for r in recs] == [p["id"] for p in PROBLEMS]
    tok_eos = hf_io.ModelConfig.from_pretrained(model_dir).eos_token_id
    for r, p in zip(recs, PROBLEMS):
        assert r["problem"] == p["problem"] and r["solutions"] == [p["solution"]] and r["answer"] == p["answer"]
        assert r["hint"].startswith("Hint: the final answer is")
        assert r["trace"] is not None  # on_no_match=random keeps one
        assert r["num_tokens"] == len(r["trace_ids"]) <= c.rollout.max_new_tokens
        assert tok_eos not in r["trace_ids"]
        assert 0.0 <= r["fallback_rate"] <= 1.0 and 0.0 <= r["mean_fallback_rate"] <= 1.0
        assert r["tau"] == 0.2 and r["seed"] == 3 and r["num_samples"] == 3
        assert r["selected"] in ("answer", "random") and r["matched"] == (r["selected"] == "answer")
        assert r["ended"] == (r["stop_id"] is not None)
    fallbacks = [r["mean_fallback_rate"] for r in recs]
    assert 0 < np.mean(fallbacks) < 1  # the mixed rule used both contexts
    assert summary["problems"] == 5 and summary["kept"] == 5 and summary["processed"] == 5
    assert summary["with_answer"] == 4 and summary["tokens_per_s"] > 0
    assert json.load(open(os.path.join(c.workdir, "synthesis_summary.json")))["kept"] == 5

    # Kill simulation: drop q1 (its batch partner q0 stays) and q4 (the filled last batch), and
    # leave a torn half line at the end.
    full = open(out).read().splitlines(keepends=True)
    keep = [line for line in full if json.loads(line)["id"] not in ("q1", "q4")]
    with open(out, "w") as f:
        f.writelines(keep)
        f.write(full[1][: len(full[1]) // 2])
    summary2 = syn.run(c)
    assert summary2["already_done"] == 3 and summary2["processed"] == 2
    redone = _lines(out)
    assert sorted(r["id"] for r in redone) == sorted(p["id"] for p in PROBLEMS)  # no duplicate, no torn line
    by_id = {r["id"]: r for r in redone}
    for r in recs:
        assert by_id[r["id"]] == r  # identical to the uninterrupted run

    # Nothing to do: no weights are loaded at all
    summary3 = syn.run(c)
    assert summary3["processed"] == 0 and summary3["already_done"] == 5 and summary3["kept"] == 5

    # Resuming with another tau is refused, naming the file
    c.synthesis.accept_threshold = 0.3
    with pytest.raises(ValueError, match=r"traces\.jsonl:1: .*tau=0\.2.*accept_threshold=0\.3"):
        syn.run(c)


def test_tau_extremes(tmp_path, model_dir):
    for tau, rate in ((1.0, 1.0), (0.0, 0.0)):
        c = _config(tmp_path / str(tau), model_dir, problems=PROBLEMS[:2], accept_threshold=tau,
                    on_no_match="random", problems_per_batch=2)
        syn.run(c)
        recs = _lines(os.path.join(c.workdir, "traces.jsonl"))
        assert len(recs) == 2
        for r in recs:
            assert r["num_tokens"] > 0
            assert r["fallback_rate"] == rate and r["mean_fallback_rate"] == rate


def _fake_rollout(texts_by_row, tokenizer, stop_id):
    """A stand-in for mixed_rollout that emits given texts (row-major: problem, then sample),
    each ended by the stop token, with every other token marked as the expert's."""
    def fake(params, s_tok, s_mask, e_tok, e_mask, key, cfg, settings, *, pad_id=0, plan=None, samples=1):
        B, N = s_tok.shape[0] * samples, settings.max_new_tokens
        tokens = np.full((B, N), pad_id, np.int32)
        mask = np.zeros((B, N), bool)
        fe = np.zeros((B, N), bool)
        for b in range(B):
            ids = (tokenizer.encode(texts_by_row[b % len(texts_by_row)], add_special_tokens=False) + [stop_id])[:N]
            tokens[b, :len(ids)], mask[b, :len(ids)] = ids, True
            fe[b, :len(ids):2] = True
        return mixed.MixedRollout(tokens, mask, fe)
    return fake


def test_selection_by_answer_and_seeded_random(tmp_path, model_dir, monkeypatch):
    from opdjax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    problems = [
        dict(PROBLEMS[0], answer="5"),  # samples 1 and 2 match: keep 1
        dict(PROBLEMS[1], answer="7"),  # none matches
        dict(PROBLEMS[2], answer=None),  # no answer: seeded random
    ]
    texts = ["The answer is 4.", "so \\boxed{5}", "The answer is 5.",
             "The answer is 8.", "The answer is 9.", "no idea",
             "one", "two", "three"]
    monkeypatch.setattr(mixed, "mixed_rollout", _fake_rollout(texts, tok, tok.eos_token_id))
    c = _config(tmp_path, model_dir, problems=problems, problems_per_batch=3, max_new_tokens=40,
                on_no_match="skip")
    summary = syn.run(c)
    a, b, d = _lines(os.path.join(c.workdir, "traces.jsonl"))
    assert (a["selected"], a["matched"], a["num_matched"], a["trace"]) == ("answer", True, 2, "so \\boxed{5}")
    assert a["trace_ids"] == tok.encode("so \\boxed{5}", add_special_tokens=False)
    assert a["ended"] and a["stop_id"] == tok.eos_token_id
    n = len(a["trace_ids"]) + 1  # the stop token counts as a generated token
    assert a["fallback_rate"] == pytest.approx(((n + 1) // 2) / n)
    assert (b["trace"], b["trace_ids"], b["matched"], b["selected"], b["num_matched"]) == (None, None, False, None, 0)
    assert b["mean_fallback_rate"] > 0
    pick = int(np.random.default_rng([3, 2]).integers(3))
    assert (d["selected"], d["matched"], d["trace"]) == ("random", False, ["one", "two", "three"][pick])
    assert summary["kept"] == 2 and summary["skipped"] == 1 and summary["match_rate"] == 0.5

    # on_no_match=random keeps a seeded-random trace of the unmatched problem
    c2 = _config(tmp_path / "r", model_dir, problems=problems, problems_per_batch=3, max_new_tokens=40,
                 on_no_match="random")
    _, b2, _ = _lines(os.path.join(syn.run(c2)["output"]))
    pick = int(np.random.default_rng([3, 1]).integers(3))
    assert (b2["selected"], b2["matched"], b2["trace"]) == ("random", False, texts[3 + pick])


def _no_compute(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("compute started")
    monkeypatch.setattr(mixed, "mixed_rollout", boom)
    monkeypatch.setattr(hf_io, "load_pretrained", boom)


def test_over_long_reference_fails_before_compute(tmp_path, model_dir, monkeypatch):
    _no_compute(monkeypatch)
    problems = PROBLEMS[:2] + [dict(PROBLEMS[2], solution="We add. " * 60 + "The answer is 9.")]
    c = _config(tmp_path, model_dir, problems=problems)
    c.data.max_prompt_tokens = 120
    with pytest.raises(ValueError, match=r"problem id 'q2' \(.*problems\.jsonl:3\): expert context is \d+ tokens"):
        syn.run(c)
    assert not os.path.exists(os.path.join(c.workdir, "traces.jsonl"))
    # A solution with nothing to hint with (no final answer, no numbers) is named too
    c = _config(tmp_path / "h", model_dir, problems=PROBLEMS[:1] + [dict(PROBLEMS[1], solution="Obvious.")])
    with pytest.raises(ValueError, match=r"problem id 'q1' \(.*problems\.jsonl:2\): .*hint would be empty"):
        syn.run(c)


@pytest.mark.parametrize("field, value, pattern", [
    ("synthesis.accept_threshold", 1.5, r"config\.synthesis\.accept_threshold=1\.5"),
    ("synthesis.accept_threshold", -0.1, r"config\.synthesis\.accept_threshold"),
    ("synthesis.num_samples", 0, r"config\.synthesis\.num_samples=0"),
    ("synthesis.problems_per_batch", 0, r"config\.synthesis\.problems_per_batch=0"),
    ("synthesis.on_no_match", "drop", r"config\.synthesis\.on_no_match='drop'"),
    ("synthesis.top_n", VOCAB + 1, r"config\.synthesis\.top_n=321 exceeds"),
    ("rollout.cache_dtype", "fp8", r"config\.rollout\.cache_dtype"),
    ("prompts.expert", "{problem} only", r"config\.prompts\.expert has no \{solution\}"),
    ("model.path", "/nonexistent", r"config\.model\.path='/nonexistent' has no config\.json"),
    ("data.problems", "/nonexistent.jsonl", r"config\.data\.problems='/nonexistent\.jsonl' does not exist"),
    ("mesh.shape", (3, 1, 1), r"config\.mesh\.shape"),
])
def test_config_errors_name_the_field(tmp_path, model_dir, monkeypatch, field, value, pattern):
    _no_compute(monkeypatch)
    c = _config(tmp_path, model_dir)
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(ValueError, match=pattern):
        syn.run(c)


def test_unknown_field_and_special_ids(tmp_path, model_dir):
    c = _config(tmp_path, model_dir)
    c.synthesis.unknown_knob = 1
    with pytest.raises(ValueError, match=r"config\.synthesis\.unknown_knob is not a DAIL setting"):
        syn.check_config(c)
    from opdjax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    cfg = ModelConfig.from_pretrained(model_dir)
    stop, banned = syn.special_ids(tok, cfg, ("</think>", "<not-a-token>"))
    vocab = tok.get_vocab()
    assert stop == tuple(sorted({vocab["<|im_end|>"], vocab["<|endoftext|>"]}))
    assert banned == (vocab["</think>"],)


def test_read_done_rejects_damaged_middle_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"t\.jsonl:2: not a JSON record"):
        syn.read_done(str(p))
    p.write_text('{"id": "a"}\n{"id": "b", "tr')
    assert list(syn.read_done(str(p))) == ["a"]
    assert p.read_text() == '{"id": "a"}\n'


def test_answer_selection_with_the_toy_student(tmp_path):
    """The shipped toy student, student context only (tau = 0), solves toy problems often enough
    that 8 samples give matching traces: the kept one states the expert's answer."""
    from opdjax.toy import dail_problems
    from opdjax.data.grading import extract_answer

    dail_problems.write_demo_problems(tmp_path / "problems.jsonl", 4)
    c = dail_config()
    c.workdir = str(tmp_path / "run")
    c.model.path = os.path.join(os.path.dirname(syn.__file__), "..", "assets", "toy_pair", "student")
    c.data.problems, c.data.id_field = str(tmp_path / "problems.jsonl"), "id"
    c.prompts.student, c.prompts.expert, c.prompts.hint = dail_problems.TOY_STUDENT, dail_problems.TOY_EXPERT, dail_problems.TOY_HINT
    c.prompts.enable_thinking = False
    c.metrics.progress = False
    c.synthesis.update(dict(accept_threshold=0.0, num_samples=8, problems_per_batch=4))
    c.rollout.max_new_tokens = 96
    summary = syn.run(c)
    recs = _lines(summary["output"])
    assert summary["matched"] >= 1 and len(recs) == 4
    for r in recs:
        if r["matched"]:
            assert r["selected"] == "answer" and r["num_matched"] >= 1 and r["ended"]
            assert extract_answer(r["trace"]) == r["answer"]
            assert r["fallback_rate"] == 0.0
        else:
            assert r["trace"] is None and r["selected"] is None  # on_no_match = skip (the default)
