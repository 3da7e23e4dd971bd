"""The dail_train job: synthesis -> contrastive training (LoRA and full fine-tuning) -> exported
student; the epoch plan visits every trace once per epoch; a resumed run continues exactly;
bad traces are named."""
from __future__ import annotations

import json
import os
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
