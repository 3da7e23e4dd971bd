"""DAIL memory estimates: the real-scale configs fit their chips, each job counts only its own
phase, and the KV-cache and LoRA-branch terms equal their hand counts."""
import importlib.util
import os

import pytest

from opdjax.dail.memory_estimate import estimate_dail_memory
from opdjax.models.presets import preset_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2 ** 30


def _config(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m, m.get_config()


@pytest.mark.parametrize("name,peak_gib", [("dail_synthesize_qwen3_8b", 40.3), ("dail_train_qwen3_8b", 28.2),
                                           ("dail_synthesize_qwen2p5_7b", 13.3), ("dail_train_qwen2p5_7b", 10.3)])
def test_real_scale_configs_fit(name, peak_gib):
    m, c = _config(name)
    est = estimate_dail_memory(c, preset_config(m.MODEL), num_devices=m.NUM_CHIPS)
    assert est.fits
    assert est.total_bytes / GiB == pytest.approx(peak_gib, abs=0.1)  # the number the config's docstring gives


def test_each_job_counts_its_own_phase_and_the_cache_by_hand():
    m, c = _config("dail_synthesize_qwen3_8b")
    cfg = preset_config(m.MODEL)
    syn = estimate_dail_memory(c, cfg, num_devices=1)
    assert {t.phase for t in syn.terms} == {"resident", "rollout"}
    rows, T = 32, 2048 + 256
    assert syn.term("two KV caches").bytes == 2 * 2 * cfg.num_layers * rows * T * cfg.num_kv_heads * cfg.head_dim * 2
    both = estimate_dail_memory(c, cfg, num_devices=1, job="dail_demo")
    assert {t.phase for t in both.terms} == {"resident", "rollout", "train step"}
    assert both.total_bytes >= syn.total_bytes
    c.lora.enabled = False  # full fine-tuning: a trainable copy and its AdamW moments
    full = estimate_dail_memory(c, cfg, num_devices=1, job="dail_train")
    assert full.term("trainable copy + AdamW").bytes == 3 * full.term("M params").bytes


def test_the_jobs_refuse_a_config_that_cannot_fit(tmp_path):
    """The check runs in each job's config validation, before any weight is loaded."""
    from opdjax.dail import distill, synthesize
    from opdjax.train.memory import DoesNotFitError
    m, c = _config("dail_train_qwen3_8b")
    cfg = preset_config(m.MODEL)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(__import__("json").dumps(cfg.to_hf_dict()))
    (tmp_path / "traces.jsonl").write_text("{}\n")
    (tmp_path / "p.jsonl").write_text("{}\n")
    c.model.path = str(tmp_path / "m")
    c.mesh.shape = (1, -1, 1)
    c.train.traces = str(tmp_path / "traces.jsonl")
    c.batch.microbatches = 1
    c.batch.sequences_per_step = 512  # 512 sequences x 2,304 tokens at once: far beyond 8 H100s
    with pytest.raises(DoesNotFitError, match="does not fit on h100"):
        distill.validate(c)
    m, c = _config("dail_synthesize_qwen3_8b")
    c.model.path = str(tmp_path / "m")
    c.mesh.shape = (1, -1, 1)
    c.data.problems = str(tmp_path / "p.jsonl")
    c.synthesis.num_samples = 2048
    with pytest.raises(DoesNotFitError, match="two KV caches"):
        synthesize.check_config(c)


def test_lora_branch_term_by_hand():
    """LoRA runs on the activations: the train step counts 2 float32 [rows, T, width] adapter terms,
    width = the widest flattened input/output of the adapted projections (F when an MLP projection
    is adapted), rows = sequences_per_step / microbatches; none for full fine-tuning."""
    m, c = _config("dail_train_qwen3_8b")
    cfg = preset_config(m.MODEL)
    rows, T = 16 // 4, 2048 + 256
    est = estimate_dail_memory(c, cfg, num_devices=1)
    assert est.term("LoRA branch (float32)").bytes == 2 * rows * T * cfg.intermediate_size * 4
    c.lora.targets = ("k", "v")  # in = D = 4096 > out = K * hd = 1024
    assert estimate_dail_memory(c, cfg, num_devices=1).term("LoRA branch (float32)").bytes == 2 * rows * T * 4096 * 4
    c.lora.enabled = False
    assert all(t.name != "LoRA branch (float32)" for t in estimate_dail_memory(c, cfg, num_devices=1).terms)
