"""The shipped toy teacher/student pair (opdjax/assets/toy_pair) and the script that builds it."""
import dataclasses
import filecmp
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opdjax.toy import arithmetic
from opdjax.data.tokenizer import check_same_tokenizer, load_tokenizer
from opdjax.models import hf_io, qwen
from opdjax.toy import opd_pair

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def pair():
    return opd_pair.load_toy_pair()


def test_shipped_pair_loads_and_shares_tokenizer(pair):
    teacher, student = pair
    check_same_tokenizer(teacher, student)
    for f in TOKENIZER_FILES:
        assert filecmp.cmp(os.path.join(teacher, f), os.path.join(student, f), shallow=False)
    (tp, tcfg), (sp, scfg) = hf_io.load_pretrained(teacher), hf_io.load_pretrained(student)
    assert tcfg.model_type == scfg.model_type == "qwen3"
    assert tcfg.vocab_size == scfg.vocab_size == len(load_tokenizer(teacher))
    n = lambda p: sum(x.size for x in jax.tree.leaves(p))
    assert n(tp) > 2 * n(sp)  # the teacher is the bigger model
    size = sum(os.path.getsize(os.path.join(d, f)) for d in pair for f in os.listdir(d))
    assert size < 8 * 2**20
    build = json.load(open(os.path.join(os.path.dirname(teacher), "BUILD.json")))
    assert {"teacher", "student"} <= set(build["models"])


def test_shipped_teacher_matches_transformers(pair):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    teacher = pair[0]
    tok = load_tokenizer(teacher)
    problem = arithmetic.make_problems(1, seed=0, split="eval")[0]
    ids = opd_pair.encode_prompt(tok, problem["prompt"]) + tok.encode(problem["solution"], add_special_tokens=False)
    params, cfg = hf_io.load_pretrained(teacher)
    ours, _ = qwen.forward(params, jnp.asarray([ids]), cfg)
    model = transformers.Qwen3ForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-3, rtol=2e-3)


def test_teacher_beats_student_on_held_out(pair):
    problems = arithmetic.make_problems(32, seed=123, split="eval")
    tok = load_tokenizer(pair[0])
    acc = {}
    for name, d in zip(("teacher", "student"), pair):
        params, cfg = hf_io.load_pretrained(d)
        texts = opd_pair.generate_texts(params, cfg, tok, problems, batch_size=32)
        acc[name] = np.mean([arithmetic.is_correct(t, p["answer"]) for t, p in zip(texts, problems)])
    assert acc["teacher"] > acc["student"], acc
    assert acc["teacher"] >= 0.75, acc


def test_sft_loss_mask_covers_solution_and_eos(pair):
    tok = load_tokenizer(pair[0])
    problems = arithmetic.make_problems(3, seed=0)
    tokens, mask, loss_mask = opd_pair.encode_sft(tok, problems)
    for i, p in enumerate(problems):
        prompt = opd_pair.encode_prompt(tok, p["prompt"])
        assert tokens[i, :len(prompt)].tolist() == prompt
        targets = tokens[i, 1:][loss_mask[i, :-1]].tolist()
        assert targets[-1] == tok.eos_token_id
        assert tok.decode(targets[:-1]) == p["solution"]
        assert mask[i].sum() == len(prompt) + len(targets)


@pytest.mark.integration
def test_build_runs_end_to_end_tiny(tmp_path):
    """A handful of steps on tiny models: the build script cannot rot. Also deterministic."""
    arch = opd_pair.ArchSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                             intermediate_size=64)
    spec = opd_pair.TrainSpec(steps=3, batch_size=8, warmup=1)
    kw = dict(seed=5, teacher_arch=arch, student_arch=arch, teacher_train=spec,
              student_train=dataclasses.replace(spec, steps=2), num_train=64, num_eval=8)
    rec = opd_pair.build_toy_pair(tmp_path / "a", **kw)
    teacher, student = opd_pair.load_toy_pair(tmp_path / "a")
    check_same_tokenizer(teacher, student)
    assert set(rec["models"]) == {"teacher", "student"}
    for m in rec["models"].values():
        assert set(m["eval"]) == {"greedy", "temperature_1.0"}
        assert 0.0 <= m["eval"]["greedy"]["accuracy"] <= 1.0
        assert sum(m["eval"]["greedy"]["first_wrong_step_hist"].values()) == 8
    assert json.load(open(tmp_path / "a" / "BUILD.json"))["seed"] == 5
    params, cfg = hf_io.load_pretrained(teacher)
    assert cfg.num_layers == 1 and cfg.vocab_size == rec["vocab_size"]
    # same seed -> same weights
    opd_pair.build_toy_pair(tmp_path / "b", **kw, eval_temperature=False)
    for name in ("teacher", "student"):
        assert filecmp.cmp(tmp_path / "a" / name / "model.safetensors",
                           tmp_path / "b" / name / "model.safetensors", shallow=False)
    # retraining only the student (the --only path) reproduces it and keeps the teacher
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    os.remove(tmp_path / "c" / "student" / "model.safetensors")
    rec_c = opd_pair.build_toy_pair(tmp_path / "c", **kw, models=("student",))
    assert rec_c["rebuilt_only"] == ["student"]
    assert rec_c["models"]["teacher"]["loss_log"] == rec["models"]["teacher"]["loss_log"]
    for name in ("teacher", "student"):
        assert filecmp.cmp(tmp_path / "a" / name / "model.safetensors",
                           tmp_path / "c" / name / "model.safetensors", shallow=False)
    with pytest.raises(FileNotFoundError):
        opd_pair.load_toy_pair(tmp_path / "missing")
