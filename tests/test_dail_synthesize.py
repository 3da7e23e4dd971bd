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
from opdjax.errors import ConfigError

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


def _fake_rollout(texts_by_row, tokenizer, stop_id, stop=True):
    """A stand-in for mixed_rollout that emits given texts (row-major: problem, then sample),
    each ended by the stop token (unless `stop` is false or max_new_tokens cuts it first), with
    every other token marked as the expert's."""
    def fake(params, s_tok, s_mask, e_tok, e_mask, key, cfg, settings, *, pad_id=0, plan=None, samples=1):
        B, N = s_tok.shape[0] * samples, settings.max_new_tokens
        tokens = np.full((B, N), pad_id, np.int32)
        mask = np.zeros((B, N), bool)
        fe = np.zeros((B, N), bool)
        for b in range(B):
            ids = (tokenizer.encode(texts_by_row[b % len(texts_by_row)], add_special_tokens=False)
                   + [stop_id] * stop)[:N]
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
    # prompts.reference_cut has nothing to cut in a one-solution reference: still the error
    assert c.prompts.reference_cut == "solution_marker"


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
    ("synthesis.selection", "best", r"config\.synthesis\.selection='best': choose one of"),
    ("synthesis.min_keep_rate", 1.5, r"config\.synthesis\.min_keep_rate=1\.5 must be a number in \[0, 1\]"),
    ("prompts.reference_cut", "half", r"config\.prompts\.reference_cut='half'"),
    ("hint.order", "random", r"config\.hint\.order='random'"),
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


# ---------------------------------------------------------------------------------------------
# the recipe: tau and selection per recipe (issue 15), min_keep_rate, the reference cut

NO_SWITCH = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content']"
             " + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
             "{%- endif %}")  # ChatML without a thinking mode (as Qwen2.5's)
ALWAYS_THINKS = NO_SWITCH.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'")


@pytest.fixture
def toy_tok(model_dir):
    from opdjax.data.tokenizer import load_tokenizer
    return load_tokenizer(model_dir)


@pytest.mark.parametrize("template, thinking, reasoning", [
    ("toy", True, True),  # the toy template has Qwen3's enable_thinking switch
    ("toy", False, False),
    (NO_SWITCH, True, False),  # thinking asked for, but the template has no thinking mode
    (ALWAYS_THINKS, True, True),  # R1-style: the generation prompt always opens <think>
    (ALWAYS_THINKS, False, False),
])
def test_tau_and_selection_per_recipe(toy_tok, tmp_path, model_dir, template, thinking, reasoning):
    """The authors' defaults (generate.yaml): tau 1.0 for reasoning, 0.8 otherwise; random
    selection for reasoning (thinking prefixes are not graded), graded otherwise."""
    from opdjax.dail.config import accept_threshold_for
    if template != "toy":
        toy_tok.chat_template = template
    c = _config(tmp_path, model_dir)
    c.prompts.enable_thinking = thinking
    assert c.synthesis.accept_threshold is None and c.synthesis.selection == "auto"  # the defaults
    r = syn.resolve_recipe(c, toy_tok)
    assert syn.template_thinks(toy_tok) == (template != NO_SWITCH)
    assert (r.reasoning, r.tau, r.selection) == (reasoning, 1.0 if reasoning else 0.8,
                                                 "random" if reasoning else "graded")
    assert r.tau_source.startswith("per recipe")
    # explicit settings win
    c.synthesis.accept_threshold, c.synthesis.selection = 0.3, "graded"
    r = syn.resolve_recipe(c, toy_tok)
    assert (r.tau, r.tau_source, r.selection) == (0.3, "config.synthesis.accept_threshold", "graded")
    # without a tokenizer (e.g. compile-only paths) enable_thinking alone decides
    c.synthesis.accept_threshold = None
    assert accept_threshold_for(c) == (1.0 if thinking else 0.8)


def test_shipped_configs_state_the_per_recipe_tau():
    import importlib.util
    from opdjax.dail.config import accept_threshold_for
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    want = {"dail_synthesize_qwen3_8b": 1.0, "dail_synthesize_qwen2p5_7b": 0.8, "dail_demo": 0.8}
    for name, tau in want.items():
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, "configs", f"{name}.py"))
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
        c = m.get_config()
        assert c.synthesis.accept_threshold == tau
        c.synthesis.accept_threshold = None  # the value stated is the recipe's own default
        assert accept_threshold_for(c) == tau, name


def test_default_recipe_end_to_end(tmp_path, model_dir, toy_tok, monkeypatch):
    """Defaults (tau None, selection auto): thinking off -> tau 0.8, graded; thinking on with the
    toy's thinking template -> tau 1.0, one seeded-random trace even where answers match."""
    problems = [dict(PROBLEMS[0], answer="5"), dict(PROBLEMS[1], answer="7"),
                dict(PROBLEMS[2], answer=None, solution="Obvious by symmetry.")]  # nothing to hint with
    texts = ["The answer is 4.", "so \\boxed{5}", "The answer is 5.",
             "The answer is 7.", "The answer is 9.", "no idea",
             "one", "two", "three"]
    monkeypatch.setattr(mixed, "mixed_rollout", _fake_rollout(texts, toy_tok, toy_tok.eos_token_id))
    c = _config(tmp_path / "off", model_dir, problems=problems, problems_per_batch=3, max_new_tokens=40)
    summary = syn.run(c)
    a, b, d = _lines(summary["output"])
    assert (summary["tau"], summary["selection"], summary["reasoning"]) == (0.8, "graded", False)
    assert summary["tau_source"].startswith("per recipe")
    assert [r["tau"] for r in (a, b, d)] == [0.8] * 3
    assert (a["selection"], a["selected"], a["trace"], a["num_matched"]) == ("graded", "answer", "so \\boxed{5}", 2)
    assert (b["selected"], b["trace"]) == ("answer", "The answer is 7.")
    assert (d["selection"], d["selected"]) == ("random", "random")  # no answer: random whatever the rule
    from opdjax.dail.config import HINT_TEXT_EMPTY
    assert d["hint"] == HINT_TEXT_EMPTY  # the authors allow an empty hint: no abort
    assert [r["num_answered"] for r in (a, b, d)] == [3, 2, 0] and [r["num_ended"] for r in (a, b, d)] == [3] * 3
    assert a["reference_cut"] is None and summary["keep_rate"] == 1.0

    c = _config(tmp_path / "on", model_dir, problems=problems, problems_per_batch=3, max_new_tokens=40)
    c.prompts.enable_thinking = True
    summary = syn.run(c)
    a, b, _ = _lines(summary["output"])
    assert (summary["tau"], summary["selection"], summary["reasoning"]) == (1.0, "random", True)
    for i, r in ((0, a), (1, b)):  # seeded random pick (np.random.default_rng([seed, index]))
        pick = int(np.random.default_rng([3, i]).integers(3))
        assert (r["selection"], r["selected"], r["trace"]) == ("random", "random", texts[3 * i + pick])
        assert r["matched"] == (r["trace"] in ("so \\boxed{5}", "The answer is 5.", "The answer is 7."))
    assert a["num_matched"] == 2  # still counted, for the record
    # resuming the thinking-on output with graded selection is refused
    c.synthesis.selection = "graded"
    with pytest.raises(ValueError, match=r"selection='random'.*synthesis\.selection"):
        syn.run(c)


def test_check_keep_rate_by_hand():
    rec = lambda kept, answered, ended: {"trace_ids": [1] if kept else None, "num_samples": 4,  # noqa: E731
                                         "num_answered": answered, "num_ended": ended}
    # 1 kept of 12 = 8.3% < 0.1; the 11 skipped have 44 samples, 4 with an answer (9%), 0 ended
    records = [rec(True, 4, 4)] + [rec(False, 1 if i < 4 else 0, 0) for i in range(11)]
    with pytest.raises(ConfigError, match=r"kept 1 of 12 problems \(8\.3%\) < config\.synthesis\.min_keep_rate=0\.1: "
                                          r"only 9% of the skipped .* 0% end before config\.rollout\.max_new_tokens=256: "
                                          r"traces of 256 tokens rarely close \\boxed\{\}.*selection='random'"):
        syn.check_keep_rate(records, 0.1, final=True, max_new_tokens=256)
    syn.check_keep_rate(records, 0.08, final=True, max_new_tokens=256)  # 8.3% >= 8%
    syn.check_keep_rate(records, 0.0, final=True, max_new_tokens=256)  # 0 = off
    syn.check_keep_rate(records, 0.1, final=False, max_new_tokens=256)  # too few yet for the periodic check
    # answers reached but never matching: the other cause
    records = [rec(False, 3, 4)] * syn.KEEP_RATE_CHECK_AFTER
    with pytest.raises(ConfigError, match=r"kept 0 of 32 problems \(0\.0%\) after the first 32 problems .*"
                                          r"75% of the skipped problems' samples reach a final answer, but none"):
        syn.check_keep_rate(records, 0.1, final=False, max_new_tokens=256)


def test_low_keep_rate_stops_the_run_early(tmp_path, model_dir, toy_tok, monkeypatch):
    """Graded selection on traces cut before any answer (the Qwen3 recipe's failure): after 32
    problems the run stops, naming the rate, the field and the cause; what was done is kept."""
    problems = [dict(PROBLEMS[0], id=f"p{i}", answer="5") for i in range(40)]
    texts = ["Let me think about this problem step by step and then"]  # cut, no answer
    monkeypatch.setattr(mixed, "mixed_rollout", _fake_rollout(texts, toy_tok, toy_tok.eos_token_id, stop=False))
    c = _config(tmp_path, model_dir, problems=problems, problems_per_batch=8, max_new_tokens=8,
                selection="graded")
    with pytest.raises(ConfigError, match=r"kept 0 of 32 problems \(0\.0%\) after the first 32 problems < "
                                          r"config\.synthesis\.min_keep_rate=0\.1: only 0% .* 0% end before "
                                          r"config\.rollout\.max_new_tokens=8: traces of 8 tokens rarely close"):
        syn.run(c)
    assert len(_lines(os.path.join(c.workdir, "traces.jsonl"))) == 32
    # selection="random" keeps every problem (the authors' choice for such traces)
    c = _config(tmp_path / "random", model_dir, problems=problems, problems_per_batch=8, max_new_tokens=8,
                selection="random")
    assert syn.run(c)["keep_rate"] == 1.0


def test_reference_cut_is_recorded_per_trace(tmp_path, model_dir, toy_tok, monkeypatch):
    from opdjax.dail.hints import hint_text
    from opdjax.dail.prompts import render_contexts
    s1, s2 = "Solution 1: 3 + 4 = 7.", "Solution 2: Count up from 3 by 4 steps: 4, 5, 6, 7. So 7."
    problems = [dict(PROBLEMS[1], solution=f"{s1}\n{s2}", answer="7"), PROBLEMS[0]]
    monkeypatch.setattr(mixed, "mixed_rollout", _fake_rollout(["The answer is 7."], toy_tok, toy_tok.eos_token_id))
    c = _config(tmp_path, model_dir, problems=problems, problems_per_batch=2, max_new_tokens=20)
    c.hint.text, c.hint.text_no_landmarks, c.hint.text_no_answer = "H {answer} {landmarks}", "H {answer}", "H {landmarks}"
    lengths = {}
    hint = hint_text(f"{s1}\n{s2}", c.hint, problem=problems[0]["problem"])  # from the whole reference
    for ref in (f"{s1}\n{s2}", s1):
        ctx = render_contexts(toy_tok, c.prompts, problems[0]["problem"], ref, hint, max_prompt_tokens=10_000)
        lengths[ref] = len(ctx.expert)
        assert max(len(ctx.student), len(ctx.hint)) < len(ctx.expert)
    c.data.max_prompt_tokens = lengths[s1]
    assert len(render_contexts(toy_tok, c.prompts, PROBLEMS[0]["problem"], PROBLEMS[0]["solution"], "h",
                               max_prompt_tokens=10_000).expert) <= lengths[s1]  # the other problem fits
    summary = syn.run(c)
    a, b = _lines(summary["output"])
    assert a["reference_cut"] == {"solutions_kept": 1, "solutions": 2, "chars_dropped": 1 + len(s2),
                                  "tokens_before": lengths[f"{s1}\n{s2}"], "tokens_after": lengths[s1]}
    assert a["solutions"] == [f"{s1}\n{s2}"]  # the record keeps the whole reference
    assert b["reference_cut"] is None and summary["reference_cuts"] == 1
