"""Hugging Face checkpoint I/O: transformers loads what we save, we load what it saves,
sharded checkpoints and shardings, and clear errors before anything is computed."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoModelForCausalLM

from hf_oracle import VOCAB, hf_logits, make_hf_model
from opdjax import sharding
from opdjax.models import hf_io, qwen
from opdjax.models.config import ConfigError, ModelConfig
from opdjax.models.safetensors_io import SafetensorsCheckpoint, save_safetensors

forward = jax.jit(qwen.forward, static_argnames=("cfg", "plan"))


def toks(shape=(2, 24), seed=0):
    return np.random.RandomState(seed).randint(3, VOCAB, shape)


@pytest.fixture
def qwen3_dir(tmp_path):
    model = make_hf_model("qwen3", heads=4, kv_heads=2, bias=True)
    path = tmp_path / "hf"
    model.save_pretrained(path)
    return model, str(path)


def _bits(x):
    x = np.asarray(x)
    return x.view(np.uint16) if x.dtype.itemsize == 2 else x.view(np.uint32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_load_is_bit_exact(qwen3_dir, tmp_path, dtype):
    _, path = qwen3_dir
    params, cfg = hf_io.load_pretrained(path, dtype=dtype)
    hf_io.save_pretrained(params, cfg, str(tmp_path / "ours"))
    again, cfg2 = hf_io.load_pretrained(str(tmp_path / "ours"))
    assert cfg2 == ModelConfig(**{**cfg.__dict__, "dtype": dtype})
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(_bits(a), _bits(b)), params, again)
    assert jax.tree.leaves(again)[0].dtype == jnp.dtype(dtype)


@pytest.mark.parametrize("model_type,kw", [("qwen3", dict(bias=True)), ("qwen2", dict(tied=True))])
def test_transformers_loads_our_checkpoint(tmp_path, model_type, kw):
    """Params from init (not from HF) -> our export -> transformers -> same logits."""
    src = make_hf_model(model_type, **kw)
    src.save_pretrained(tmp_path / "src")
    cfg = ModelConfig.from_pretrained(str(tmp_path / "src"))
    params = qwen.init_params(cfg, jax.random.key(3), std=0.05)
    hf_io.save_pretrained(params, cfg, str(tmp_path / "ours"))
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    t = toks()
    ours, _ = forward(params, jnp.asarray(t), cfg)
    assert np.abs(np.asarray(ours) - hf_logits(theirs, t)).max() <= 1e-4
    with open(tmp_path / "ours" / "config.json") as f:
        written = json.load(f)
    assert "rope_parameters" in written and written["dtype"] == "float32"


def test_index_sharded_checkpoint_round_trip(qwen3_dir, tmp_path):
    model, path = qwen3_dir
    params, cfg = hf_io.load_pretrained(path)
    out = tmp_path / "sharded"
    hf_io.save_pretrained(params, cfg, str(out), max_shard_bytes=40_000)
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    theirs = AutoModelForCausalLM.from_pretrained(str(out)).eval()  # transformers reads our index
    again, _ = hf_io.load_pretrained(str(out))  # and so do we
    t = toks()
    ours, _ = forward(again, jnp.asarray(t), cfg)
    assert np.abs(np.asarray(ours) - hf_logits(theirs, t)).max() <= 1e-4
    assert np.abs(np.asarray(ours) - hf_logits(model, t)).max() <= 1e-4


def test_bf16_checkpoint_written_by_transformers(tmp_path):
    model = make_hf_model("qwen3").to(dtype=__import__("torch").bfloat16)
    model.save_pretrained(tmp_path)
    params, cfg = hf_io.load_pretrained(str(tmp_path))
    assert cfg.dtype == "bfloat16" and jax.tree.leaves(params)[0].dtype == jnp.bfloat16
    sd = model.state_dict()
    q0 = np.asarray(params["layers"]["q"][0], np.float32)
    ref = sd["model.layers.0.self_attn.q_proj.weight"].float().numpy()
    np.testing.assert_array_equal(q0, ref.reshape(cfg.num_heads, cfg.head_dim, -1).transpose(2, 0, 1))


def test_load_straight_into_shardings(qwen3_dir):
    _, path = qwen3_dir
    mesh = sharding.make_mesh((2, 2, 2))
    plan = sharding.ShardingPlan(mesh)
    params, cfg = hf_io.load_pretrained(path, plan=plan)
    single, _ = hf_io.load_pretrained(path)
    expected = qwen.param_shardings(cfg, plan)
    for (p, x), s, y in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(expected),
                            jax.tree.leaves(single)):
        assert x.sharding == s, jax.tree_util.keystr(p)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # the big matrices really are split
    assert params["layers"]["gate"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


# ------------------------------------------------------------------------------------ errors
def _no_arrays(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("an array was created before the checkpoint was validated")
    monkeypatch.setattr(jax, "make_array_from_callback", boom)


def _rewrite(path, drop=(), add=None, reshape=None):
    ckpt = SafetensorsCheckpoint.open(path)
    tensors = {n: np.array(ckpt.get(n)) for n in ckpt.names() if n not in drop}
    tensors.update(add or {})
    for n, shape in (reshape or {}).items():
        tensors[n] = np.zeros(shape, np.float32)
    del ckpt
    os.remove(os.path.join(path, "model.safetensors"))
    save_safetensors(tensors, path)


def test_missing_tensor_error(qwen3_dir, monkeypatch):
    _, path = qwen3_dir
    _rewrite(path, drop=["model.layers.1.mlp.up_proj.weight"])
    _no_arrays(monkeypatch)
    with pytest.raises(hf_io.CheckpointError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        hf_io.load_pretrained(path)


def test_extra_tensor_error(qwen3_dir, monkeypatch):
    _, path = qwen3_dir
    _rewrite(path, add={"model.layers.2.mlp.up_proj.weight": np.zeros((3,), np.float32)})
    _no_arrays(monkeypatch)
    with pytest.raises(hf_io.CheckpointError, match=r"model\.layers\.2\.mlp\.up_proj\.weight.*model\.safetensors.*not part"):
        hf_io.load_pretrained(path)


def test_shape_mismatch_error(qwen3_dir, monkeypatch):
    _, path = qwen3_dir
    _rewrite(path, reshape={"model.layers.0.self_attn.k_proj.weight": (48, 64)})
    _no_arrays(monkeypatch)
    with pytest.raises(hf_io.CheckpointError, match=r"k_proj\.weight.*shape \[48, 64\].*implies \[32, 64\]"):
        hf_io.load_pretrained(path)


def test_unsupported_model_type_error(qwen3_dir, monkeypatch):
    _, path = qwen3_dir
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        d = json.load(f)
    d["model_type"] = "qwen3_moe"
    with open(cfg_path, "w") as f:
        json.dump(d, f)
    _no_arrays(monkeypatch)
    with pytest.raises(ConfigError, match=r"config\.json: model_type='qwen3_moe' is not supported"):
        hf_io.load_pretrained(path)


def test_missing_config_and_bad_fields(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_pretrained(str(tmp_path))
    base = dict(model_type="qwen3", vocab_size=10, hidden_size=8, intermediate_size=8,
                num_hidden_layers=1, num_attention_heads=3, num_key_value_heads=2, head_dim=4)
    with pytest.raises(ConfigError, match="num_attention_heads=3 is not a multiple of num_key_value_heads=2"):
        ModelConfig.from_hf_dict(base)
    with pytest.raises(ConfigError, match="rope_type='dynamic'"):
        ModelConfig.from_hf_dict({**base, "num_attention_heads": 2,
                                  "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(ConfigError, match="required field 'hidden_size'"):
        ModelConfig.from_hf_dict({k: v for k, v in base.items() if k != "hidden_size"})
