"""Memory estimate: a hand-computed case, the sharding divisions, the real configs, and the error."""
import importlib.util
import os

import pytest

from opdjax.models.config import ConfigError, ModelConfig
from opdjax.models.presets import preset_config
from opdjax.train import memory
from opdjax.train.config import opd_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_CONFIGS = ["opd_qwen3_8b_to_1p7b_v5p", "opd_qwen3_8b_to_0p6b_v6e", "opd_qwen3_8b_to_0p6b_h100"]

# V=64, D=8, F=12, H=2 heads, K=1 kv head, hd=4, L=2 layers, tied: 1,528 params
# (embed 512 + final norm 8 + 2 layers x (norms 16 + q 64 + k 32 + v 32 + o 64 + mlp 288 + qk norms 8)).
TINY = ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=8, intermediate_size=12, num_layers=2,
                   num_heads=2, num_kv_heads=1, head_dim=4, tie_word_embeddings=True, dtype="float32")


def tiny_config(mesh=(1, 1, 1), microbatches=2, loss="pg"):
    c = opd_config()
    c.mesh.shape = mesh
    c.student.dtype = "float32"
    c.teacher.dtype = "bfloat16"
    c.data.max_prompt_tokens = 6
    c.rollout.max_new_tokens = 10  # T = 16
    c.batch.prompts_per_step = 2
    c.rollout.samples_per_prompt = 2  # 4 rollout rows
    c.batch.microbatches = microbatches
    c.loss.name = loss
    c.loss.chunk_tokens = 4
    return c


def test_hand_computed_single_chip():
    assert TINY.num_params() == 1528
    est = memory.estimate_memory(tiny_config(), TINY, TINY, num_devices=1, chip="v5e")
    got = {t.name: t.bytes for t in est.terms}
    # one layer's working set, elements: 4 x [r,T,D] + 2 x [r,T,H,hd] + 2 x [r,T,K,hd] + 3 x [r,T,F];
    # attention [r,H,block,keys] float32 scores + probs in the param dtype.
    def layer(r, T, keys, block, b):
        return (4 * r * T * 8 + 2 * r * T * 2 * 4 + 2 * r * T * 1 * 4 + 3 * r * T * 12) * b + r * 2 * block * keys * (4 + b)

    want = {
        "student params": 1528 * 4,
        "AdamW mu, nu": 2 * 1528 * 4,
        "teacher params": 1528 * 2,
        "sampler KV cache": 2 * (2 * 4 * 16 * 1 * 4) * 4 + 4 * 16,  # k, v [L,4,T,K,hd] f32 + bool mask
        "prefill layer": layer(4, 6, 16, 6, 4) + 4 * 6 * 8 * 4,
        "sampling logits": 6 * 4 * 64 * 4,
        # cache (4160) - prefill layer (>4160): the prefill peak is the larger
        "decode loop: second cache": max(0, 2 * (2 * 4 * 16 * 1 * 4) * 4 + 4 * 16 - (layer(4, 6, 16, 6, 4) + 4 * 6 * 8 * 4)),
        "teacher hidden states": 2 * 16 * 8 * 2,  # microbatch rows 2, bf16
        "gathered unembedding": 64 * 8 * 2,  # [V, D] bf16, tensor = 1
        "teacher layer fwd": layer(2, 16, 16, 16, 2),
        "teacher logits chunk": 2 * (2 * 10 * 64) * 4,  # c = min(R=10, 512 // 2)
        "gradients (+ accumulator)": 2 * 1528 * 4,
        "saved layer inputs": 3 * 2 * 16 * 8 * 4,
        "backward stack": 2 * 2 * 16 * 8 * 4,  # L x [r, T, D]
        "layer fwd + bwd": 2 * layer(2, 16, 16, 16, 4),
        "loss chunk": 2 * (2 * 4 * 64) * 4,  # pg: student logits only, x2 for backward
    }
    assert got == want
    assert want["prefill layer"] == 15744 and want["layer fwd + bwd"] == 39936  # the arithmetic, once by hand
    assert est.resident_bytes == 21392
    assert est.peak_phase == "train step" and est.phase_bytes("train step") == 59328 + 2048  # + backward stack
    assert est.total_bytes == 21392 + 61376 + round(0.1 * (21392 + 61376)) + 512 * 1024 ** 2
    assert est.fits and est.hbm_bytes == 16 * 1024 ** 3


def test_teacher_logit_losses_double_the_loss_chunk_and_keep_teacher_hidden():
    pg = memory.estimate_memory(tiny_config(), TINY, TINY, num_devices=1, chip="cpu")
    jsd = memory.estimate_memory(tiny_config(loss="jsd"), TINY, TINY, num_devices=1, chip="cpu")
    assert jsd.term("loss chunk").bytes == 2 * pg.term("loss chunk").bytes
    assert jsd.term("teacher hidden (loss)").bytes == 2 * 16 * 8 * 2
    with pytest.raises(KeyError):
        pg.term("teacher hidden (loss)")
    assert pg.usable_bytes is None and pg.fits  # cpu: no check
    assert memory.check_fits(pg) is pg


def test_sharding_divides_the_right_terms():
    # mesh (data, fsdp, tensor) = (2, 2, 2); microbatches=1 so the 4 rows divide data x fsdp = 4.
    one = memory.estimate_memory(tiny_config(microbatches=1), TINY, TINY, num_devices=1, chip="v5e")
    est = memory.estimate_memory(tiny_config(mesh=(2, 2, 2), microbatches=1), TINY, TINY, num_devices=8,
                                 chip="v5e")
    assert est.mesh == {"data": 2, "fsdp": 2, "tensor": 2}
    # Params per DEFAULT_RULES: embed [V,D] vocab/tensor, embed/fsdp -> 128; final norm 8 (replicated);
    # per layer-stack: norms 16+16, q/o [2,8,2,4] 128/4 each, k/v [2,8,1,4]: 1 kv head not divisible by
    # tensor=2 -> only embed/fsdp: 64/2 each, gate/up/down 192/4 each, q/k norms 8 each. data replicates.
    per_chip = 128 + 8 + 16 + 16 + 32 + 32 + 32 + 32 + 48 * 3 + 8 + 8
    assert per_chip == 456
    assert est.term("student params").bytes == per_chip * 4
    assert est.term("AdamW mu, nu").bytes == 2 * per_chip * 4
    assert est.term("teacher params").bytes == per_chip * 2
    assert est.term("gradients").bytes == per_chip * 4  # microbatches=1: no accumulator
    # Batch terms: rows over data x fsdp = 4; kv_heads (1) cannot split over tensor.
    assert est.term("sampler KV cache").bytes == one.term("sampler KV cache").bytes // 4
    assert est.term("saved layer inputs").bytes == one.term("saved layer inputs").bytes // 4
    assert est.term("teacher hidden states").bytes == one.term("teacher hidden states").bytes // 4
    # Vocabulary columns also over tensor: rows/4 and vocab/2.
    assert est.term("loss chunk").bytes == one.term("loss chunk").bytes // 8
    assert est.term("sampling logits").bytes == one.term("sampling logits").bytes // 8
    # One layer: q, attention output, MLP and attention scores split over tensor too; [r,T,D] and
    # k, v (1 kv head) only over the rows.
    r, T, b = 4 // 4, 16, 4
    layer = (4 * r * T * 8 + 2 * r * T * 1 * 4 + 2 * r * T * 1 * 4 + 3 * r * T * 6) * b + r * 1 * 16 * 16 * (4 + b)
    assert est.term("layer fwd + bwd").bytes == 2 * layer


def test_rows_that_do_not_divide_the_batch_axes_are_replicated():
    # 2 microbatch rows on data x fsdp = 4: the rules replicate (validate_config rejects it earlier).
    one = memory.estimate_memory(tiny_config(microbatches=2), TINY, TINY, num_devices=1, chip="v5e")
    est = memory.estimate_memory(tiny_config(mesh=(2, 2, 2), microbatches=2), TINY, TINY, num_devices=8,
                                 chip="v5e")
    assert est.term("saved layer inputs").bytes == one.term("saved layer inputs").bytes


def load_config_module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_real_configs_fit(name):
    m = load_config_module(name)
    config = m.get_config()
    assert config.job == "opd" and config.chip in memory.CHIPS and config.chip != "cpu"
    assert m.__doc__.lstrip().startswith("Release-rule OPD") and "launch/tpu_run.py" in m.__doc__ or \
        "gcloud_tpu.sh run" in m.__doc__
    est = memory.estimate_memory(config, preset_config(m.STUDENT), preset_config(m.TEACHER),
                                 num_devices=m.NUM_CHIPS)
    print()
    print(memory.format_table(est))
    assert memory.check_fits(est) is est
    assert est.total_bytes < 0.95 * est.usable_bytes
    rows = config.batch.prompts_per_step * config.rollout.samples_per_prompt
    assert rows % config.batch.microbatches == 0
    assert (rows // config.batch.microbatches) % (est.mesh["data"] * est.mesh["fsdp"]) == 0


def test_8b_to_1p7b_on_one_v5e_does_not_fit():
    m = load_config_module("opd_qwen3_8b_to_1p7b_v5p")
    config, s, t = m.get_config(), preset_config(m.STUDENT), preset_config(m.TEACHER)
    est = memory.estimate_memory(config, s, t, num_devices=1, chip="v5e")
    assert not est.fits
    with pytest.raises(memory.DoesNotFitError) as info:
        memory.check_fits(est, config, s, t)
    msg = str(info.value)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, MemoryError)
    assert "does not fit on v5e" in msg and "16.00 GiB HBM" in msg
    assert "Biggest term: sampler KV cache" in msg
    assert "| sampler KV cache | rollout |" in msg and "DOES NOT FIT" in msg
    assert "--config.student.dtype=bfloat16" in msg and "--config.rollout.samples_per_prompt=4" in msg
    assert "more chips:" in msg and "(fits)" in msg


def test_suggestions_name_fsdp_and_microbatches():
    # Params and activations dominate: a data-parallel mesh and one microbatch on 8 v5e chips.
    m = load_config_module("opd_qwen3_8b_to_1p7b_v5p")
    config, s, t = m.get_config(), preset_config(m.STUDENT), preset_config(m.TEACHER)
    config.mesh.shape = (8, 1, 1)
    config.batch.prompts_per_step = 64
    config.rollout.samples_per_prompt = 1
    config.batch.microbatches = 1
    config.rollout.max_new_tokens = 1024
    est = memory.estimate_memory(config, s, t, num_devices=8, chip="v5e")
    fixes = memory.suggestions(est, config, s, t)
    text = "\n".join(fixes)
    assert "more fsdp: --config.mesh.shape='(1, -1, 1)'" in text
    assert "--config.batch.microbatches=8" in text


def test_unknown_chip_and_gpu_fraction(monkeypatch):
    with pytest.raises(ConfigError, match="chip='tpu9' is unknown"):
        memory.estimate_memory(tiny_config(), TINY, TINY, num_devices=1, chip="tpu9")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    est = memory.estimate_memory(tiny_config(), TINY, TINY, num_devices=1, chip="h100")
    assert est.usable_bytes == int(80 * 1024 ** 3 * 0.75)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    assert memory.estimate_memory(tiny_config(), TINY, TINY, num_devices=1, chip="h200").usable_bytes == \
        int(141 * 1024 ** 3 * 0.9)
