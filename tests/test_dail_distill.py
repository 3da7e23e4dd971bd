"""The dail_train job: synthesis -> contrastive training (LoRA and full fine-tuning) -> exported
student; the epoch plan visits every trace once per epoch; a resumed run continues exactly;
bad traces are named."""
from __future__ import annotations

import json
import os
import re
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from opdjax.dail import distill, synthesize
from opdjax.dail.config import dail_config
from opdjax.data.tokenizer import build_toy_tokenizer
from opdjax.models import hf_io, lora, qwen
from opdjax.models.config import ModelConfig
from opdjax.train.checkpoint import Checkpointer
from opdjax.train.metrics import read_metrics

VOCAB = 320
PROBLEMS = [{"id": f"q{i}", "problem": f"Start with {i + 2}. Add {i + 3}. What is the result?",
             "solution": f"{i + 2} + {i + 3} = {2 * i + 5}. The answer is {2 * i + 5}.", "answer": None}
            for i in range(6)]


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    """A tiny random model and the traces its synthesis kept (no answers: seeded random choice)."""
    d = tmp_path_factory.mktemp("dail_train")
    tok = build_toy_tokenizer(d / "tok", vocab_size=VOCAB)
    cfg = ModelConfig("qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=16, eos_token_id=tok.eos_token_id)
    hf_io.save_pretrained(qwen.init_params(cfg, jax.random.key(0), std=0.3), cfg, str(d / "model"), tokenizer=tok)
    (d / "problems.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    c = _config(d, "syn")
    c.data.problems = str(d / "problems.jsonl")
    synthesize.run(c)
    return d, os.path.join(c.workdir, "traces.jsonl")


def _config(d, name, **train_over):
    c = dail_config()
    c.workdir = str(d / name)
    c.model.path = str(d / "model")
    c.mesh.shape = (1, 2, 4)  # 8 simulated devices: batch over 2, heads/MLP over 4
    c.data.id_field = "id"
    c.prompts.student = "{problem}"
    c.prompts.expert = "{problem}\nReference: {solution}"
    c.prompts.hint = "{problem}\n{hint}"
    c.prompts.enable_thinking = False
    c.synthesis.num_samples = 2
    c.rollout.max_new_tokens = 8
    c.synthesis.problems_per_batch = 3
    c.synthesis.accept_threshold = 0.3
    c.train.epochs = 2
    c.batch.sequences_per_step = 4
    c.loss.chunk_tokens = 4
    c.lora.rank = 4
    c.lora.alpha = 8.0
    c.optimizer.learning_rate = 1e-2
    c.optimizer.warmup_steps = 1
    c.checkpoint.every = 1
    c.metrics.progress = False
    c.metrics.tensorboard = False
    for k, v in train_over.items():
        section, field = k.split(".")
        c[section][field] = v
    return c


def test_epoch_plan_visits_every_trace_once_per_epoch():
    n, per = 10, 4
    config = ml_collections.ConfigDict({"seed": 1, "batch": {"sequences_per_step": per}})
    pipe = distill.trace_pipeline(config, n)
    assert pipe.steps_per_epoch == 3
    steps = [next(pipe).indices for _ in range(6)]  # 2 epochs of 3 steps
    for e in range(2):
        rows = np.concatenate(steps[3 * e:3 * e + 3])
        assert sorted(rows[rows >= 0].tolist()) == list(range(n)) and (rows < 0).sum() == 2
    assert not np.array_equal(steps[0], steps[3])  # reshuffled each epoch


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full_ft"])
def test_train_logs_both_terms_and_exports(traces, use_lora):
    d, path = traces
    c = _config(d, f"train_{use_lora}", **{"train.traces": path, "lora.enabled": use_lora})
    s = distill.run(c)
    n = sum(1 for line in open(path) if json.loads(line)["trace_ids"] is not None)
    assert s["traces"] == n and s["steps"] == 2 * -(-n // 4)
    recs = [r for r in read_metrics(os.path.join(c.workdir, "metrics.jsonl")) if "loss/total" in r]
    assert [r["step"] for r in recs] == list(range(1, s["steps"] + 1))
    for r in recs:
        assert r["loss/kl_positive"] >= 0 and r["loss/kl_negative"] >= 0 and r["loss/update_finite"] == 1.0
        # the loss is the positive term minus gamma times the (clipped) negative term
        assert r["loss/total"] == pytest.approx(r["loss/kl_positive"] - 0.1 * r["loss/kl_negative"], abs=1e-4)
    assert recs[-1]["loss/kl_positive"] < recs[0]["loss/kl_positive"]  # the student moved toward the expert context
    assert os.path.exists(os.path.join(c.workdir, "curves.png"))
    base, cfg = hf_io.load_pretrained(c.model.path)
    exported, _ = hf_io.load_pretrained(os.path.join(c.workdir, "student_hf"))
    if use_lora:
        adapter, spec = lora.load_adapter(os.path.join(c.workdir, "adapter"), cfg)
        expect = lora.merge(base, adapter, spec)
    else:
        expect = s["final_params"]
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(expect)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(base))) > 1e-6


@pytest.mark.integration
def test_resume_continues_exactly(traces):
    d, path = traces
    ref = _config(d, "ref", **{"train.traces": path, "checkpoint.keep": 20})
    steps = distill.run(ref)["steps"]
    cut = _config(d, "cut", **{"train.traces": path, "checkpoint.keep": 20})
    distill.run(cut)
    ck = Checkpointer(os.path.join(cut.workdir, "checkpoints"))
    assert ck.all_steps() == list(range(1, steps + 1))
    ck.close()
    for step in range(3, steps + 1):  # as if killed after step 2's checkpoint
        shutil.rmtree(os.path.join(cut.workdir, "checkpoints", str(step)))
    assert distill.run(cut)["start_step"] == 2
    a = {r["step"]: r["loss/total"] for r in read_metrics(os.path.join(ref.workdir, "metrics.jsonl")) if "loss/total" in r}
    b = {r["step"]: r["loss/total"] for r in read_metrics(os.path.join(cut.workdir, "metrics.jsonl")) if "loss/total" in r}
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    np.testing.assert_allclose([b[k] for k in sorted(b)], [a[k] for k in sorted(a)], rtol=0, atol=1e-6)


def test_bad_traces_are_named(traces, tmp_path):
    d, _ = traces
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "problem": "p", "solutions": ["s"], "hint": "h"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1.*trace_ids"):
        distill.load_traces(str(bad))
    c = _config(d, "missing", **{"train.traces": str(tmp_path / "nope.jsonl")})
    with pytest.raises(ValueError, match="train.traces"):
        distill.run(c)
    c = _config(d, "div", **{"train.traces": str(bad), "train.divergence": "sideways"})
    with pytest.raises(ValueError, match="train.divergence"):
        distill.run(c)


# ----------------------------------------------------------------------------- loss normalisation

def _tiny_aligned(lengths, seed=0):
    """An aligned batch of random traces with the given response lengths, and a tiny model."""
    from opdjax.dail import contrastive
    cfg = ModelConfig("qwen3", vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8)
    rs = np.random.RandomState(seed)
    prompts = [[rs.randint(1, 40, rs.randint(2, 6)).tolist() for _ in lengths] for _ in range(3)]
    responses = [rs.randint(1, 40, n).tolist() for n in lengths]
    batch = contrastive.align(*prompts, responses, pad_id=0, length_multiple=4)
    return cfg, batch


def test_take_rows_coefficients_closed_form():
    """Per-sequence: 1 / (row length x real rows); token mean: 1 / (step tokens); a top-up row (-1)
    weighs nothing and is not counted as a trace."""
    _, batch = _tiny_aligned([3, 1, 5, 2])
    rows = np.array([2, 0, -1, 1])  # lengths 5, 3, (top-up), 1
    picked, seq = distill.take_rows(batch, rows, "per_sequence")
    _, tok = distill.take_rows(batch, rows, "kept_tokens")
    want_seq = np.zeros(seq.shape)
    want_tok = np.zeros(seq.shape)
    for b, n in enumerate((5, 3, 0, 1)):
        if n:
            want_seq[b, :n] = 1 / (n * 3)
            want_tok[b, :n] = 1 / 9
    np.testing.assert_allclose(seq, want_seq, rtol=1e-7)
    np.testing.assert_allclose(tok, want_tok, rtol=1e-7)
    assert not picked.response_mask[2].any()
    assert seq.sum() == pytest.approx(1.0) and tok.sum() == pytest.approx(1.0)


def test_per_sequence_loss_is_the_mean_of_the_traces_means_and_adds_up_over_microbatches():
    """Closed form: with per_sequence coefficients the step loss (and its gradient) is the plain
    average over traces of each trace's own token-mean loss (each computed alone, with the default
    coefficients); and splitting the step into microbatches, each with its rows of the step's
    coefficients, gives the same loss and gradient summed."""
    from opdjax.dail import contrastive
    lengths = [7, 2, 4, 1]
    cfg, batch = _tiny_aligned(lengths, seed=3)
    student = qwen.init_params(cfg, jax.random.key(1), std=0.5)
    ref = qwen.init_params(cfg, jax.random.key(2), std=0.5)
    picked, coeff = distill.take_rows(batch, np.arange(4), "per_sequence")
    kw = dict(gamma=0.1, chunk_tokens=3, remat=False)

    def loss(params, b, c=None):
        return contrastive.contrastive_loss(params, ref, b, cfg, coeff=c, **kw)[0]

    loss_and_grad = jax.jit(jax.value_and_grad(loss))  # one compile per batch shape (eager is slow)
    whole, g_whole = loss_and_grad(student, picked, coeff)
    rows_alone = [loss_and_grad(student, jax.tree.map(lambda x: x[i:i + 1], picked)) for i in range(4)]
    assert float(whole) == pytest.approx(np.mean([float(v) for v, _ in rows_alone]), rel=2e-6)
    mean_grad = jax.tree.map(lambda *g: sum(g) / 4, *[g for _, g in rows_alone])
    for a, b in zip(jax.tree.leaves(g_whole), jax.tree.leaves(mean_grad)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    # the token mean weighs the long trace more: a different number on traces of unequal lengths
    _, tok_coeff = distill.take_rows(batch, np.arange(4), "kept_tokens")
    by_tokens = float(loss(student, picked, tok_coeff))
    want = sum(n * float(v) for n, (v, _) in zip(lengths, rows_alone)) / sum(lengths)
    assert by_tokens == pytest.approx(want, rel=2e-6) and abs(by_tokens - float(whole)) > 1e-4
    # microbatches: rows [0, 1] and [2, 3] with their rows of the step's coefficients
    parts = [loss_and_grad(student, jax.tree.map(lambda x: x[s], picked), coeff[s])
             for s in (slice(0, 2), slice(2, 4))]
    assert float(sum(v for v, _ in parts)) == pytest.approx(float(whole), rel=2e-6)
    summed = jax.tree.map(lambda a, b: a + b, parts[0][1], parts[1][1])
    for a, b in zip(jax.tree.leaves(g_whole), jax.tree.leaves(summed)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_loss_normalize_is_checked_and_defaults_to_the_authors():
    assert dail_config().loss.normalize == "per_sequence"
    from opdjax.train.validate import validate_dail_train
    c = dail_config()
    c.loss.normalize = "per_token"
    with pytest.raises(ValueError, match="config.loss.normalize='per_token'"):
        validate_dail_train(c, num_devices=1)


# ----------------------------------------------------------------------------- contexts match synthesis

def test_synthesis_stores_the_rendering_settings(traces):
    from opdjax.dail import prompts
    from opdjax.data.tokenizer import load_tokenizer
    d, path = traces
    stored = json.loads(open(prompts.settings_path(path)).read())
    assert prompts.settings_path(path).endswith("traces.settings.json")
    c = _config(d, "syn")
    assert stored == json.loads(json.dumps(prompts.rendered_context_settings(c, load_tokenizer(str(d / "model")))))
    compared = stored["compared"]
    assert compared["prompts.student"] == "{problem}" and compared["prompts.enable_thinking"] is False
    assert compared["prompts.expert"] == "{problem}\nReference: {solution}" and compared["prompts.system"] == ""
    assert len(compared["tokenizer.sha256"]) == 64 and "hint.text" in stored["recorded"]


def test_training_refuses_other_rendering_settings(traces):
    d, path = traces
    c = _config(d, "mismatch", **{"train.traces": path, "prompts.enable_thinking": True, "prompts.system": "Be brief."})
    with pytest.raises(ValueError) as e:
        distill.run(c)
    msg = str(e.value)
    assert "prompts.enable_thinking: synthesis False vs training True" in msg
    assert "prompts.system: synthesis '' vs training 'Be brief.'" in msg
    assert "Set these config fields to the synthesis values" in msg and "prompts.student" not in msg


def test_tokenizer_hash_and_missing_settings(traces, tmp_path, caplog):
    from opdjax.dail import prompts
    from opdjax.data.tokenizer import load_tokenizer
    from opdjax.errors import ConfigError
    d, path = traces
    c = _config(d, "x")
    other = build_toy_tokenizer(tmp_path / "tok2", vocab_size=VOCAB + 8)  # another vocabulary
    with pytest.raises(ConfigError, match=r"tokenizer.sha256: synthesis '[0-9a-f]{64}' vs training '[0-9a-f]{64}'"):
        prompts.check_context_settings(path, prompts.rendered_context_settings(c, other))
    same = prompts.rendered_context_settings(c, load_tokenizer(str(d / "model")))
    prompts.check_context_settings(path, same)  # the synthesis's own settings pass
    old = tmp_path / "old.jsonl"  # an older synthesis: no settings file
    shutil.copy(path, old)
    with pytest.raises(ConfigError, match="no settings file .*old.settings.json.*require_context_settings=False"):
        prompts.check_context_settings(str(old), same)
    with caplog.at_level("WARNING"):
        prompts.check_context_settings(str(old), same, require=False)
    assert "UNCHECKED TRACES" in caplog.text
    # a resumed synthesis with other settings would mix two prompt settings in one file
    changed = json.loads(json.dumps(same))
    changed["compared"]["prompts.hint"] = "{problem} {hint}"
    with pytest.raises(ValueError, match="prompts.hint: synthesis .* vs now .*choose another config.synthesis.output"):
        prompts.write_context_settings(path, changed, write=False, resumed=True)


def test_training_runs_the_alignment_check_on_every_trace(traces, monkeypatch):
    """encode_traces (the trainer's start-up) checks every trace's three tokenisations; a batch that
    does not align (here: align made to shift the hint context) is refused, naming the trace."""
    from opdjax.dail import contrastive
    from opdjax.data.tokenizer import load_tokenizer
    d, path = traces
    c = _config(d, "x")
    tok = load_tokenizer(str(d / "model"))
    recs = distill.load_traces(path)
    real_align = contrastive.align

    def shifted(*args, **kw):
        b = real_align(*args, **kw)
        second = (np.arange(len(b.response)) == 1)[:, None]  # trace #1 only
        return b._replace(positions_hint=b.positions_hint + (b.response_mask & second).astype(np.int32))

    distill.encode_traces(recs, tok, c.prompts, tok.eos_token_id, pad_id=0, max_prompt_tokens=256)  # aligned: fine
    monkeypatch.setattr(contrastive, "align", shifted)
    with pytest.raises(contrastive.AlignmentError,
                       match=re.escape(f"trace {recs[1][0]}: the hint context does not predict response token 0")):
        distill.encode_traces(recs, tok, c.prompts, tok.eos_token_id, pad_id=0, max_prompt_tokens=256)
