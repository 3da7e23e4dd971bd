"""Published Qwen3 (and Qwen2.5-7B-Instruct) architectures, so sizes and memory can be worked out without any weights.

Each dict is the `config.json` of the Hugging Face checkpoint `Qwen/Qwen3-<size>` as published
(transformers 4.51 layout: top-level `rope_theta`, `torch_dtype`), read by the same
`ModelConfig.from_hf_dict` that reads a real checkpoint. The parameter counts they give
(`ModelConfig.num_params`, embeddings included, the tied unembedding counted once):

| preset | num_params | without the embedding | published |
|---|---|---|---|
| Qwen3-0.6B | 596,049,920 | 440,467,456 | 0.6B, 0.44B non-embedding |
| Qwen3-1.7B | 1,720,574,976 | 1,409,410,048 | 1.7B, 1.4B |
| Qwen3-4B | 4,022,468,096 | 3,633,511,936 | 4.0B, 3.6B |
| Qwen3-8B | 8,190,735,360 | 6,946,075,648 | 8.2B, 6.95B (untied: embed + lm_head) |
| Qwen2.5-7B-Instruct | 7,615,616,512 | 6,525,621,760 (embed + lm_head) | 7.61B, 6.53B |

    from opdjax.models.presets import preset_config
    cfg = preset_config("Qwen3-8B")          # also "qwen3-8b", "8b", "Qwen/Qwen3-8B"
"""
from __future__ import annotations

from typing import Any

from opdjax.errors import ConfigError
from opdjax.models.config import ModelConfig


def _qwen3(hidden: int, intermediate: int, layers: int, heads: int, tied: bool) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": 40960,
        "max_window_layers": layers,
        "model_type": "qwen3",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    }


QWEN3_0P6B = _qwen3(hidden=1024, intermediate=3072, layers=28, heads=16, tied=True)
QWEN3_1P7B = _qwen3(hidden=2048, intermediate=6144, layers=28, heads=16, tied=True)
QWEN3_4B = _qwen3(hidden=2560, intermediate=9728, layers=36, heads=32, tied=True)
QWEN3_8B = _qwen3(hidden=4096, intermediate=12288, layers=36, heads=32, tied=False)

# Qwen/Qwen2.5-7B-Instruct's config.json (transformers 4.43 layout; q/k/v biases are implied by
# model_type qwen2): DAIL's non-thinking real-scale model.
QWEN2P5_7B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}

def _small_qwen3(layers: int) -> dict[str, Any]:
    """bench_forward.py's ~100M random Qwen3 (L=8: 100.7M params) and its ~2x-deep teacher (L=24):
    the architectures the CPU benchmarks and the compile tests use (D=768, F=2048, 12/4 heads of
    64, V=32768, untied)."""
    d = _qwen3(hidden=768, intermediate=2048, layers=layers, heads=12, tied=False)
    d.update(head_dim=64, num_key_value_heads=4, vocab_size=32768, bos_token_id=None, eos_token_id=2,
             max_position_embeddings=8192)
    return d


PRESETS: dict[str, dict[str, Any]] = {
    "Qwen3-0.6B": QWEN3_0P6B,
    "Qwen3-1.7B": QWEN3_1P7B,
    "Qwen3-4B": QWEN3_4B,
    "Qwen3-8B": QWEN3_8B,
    "Qwen2.5-7B-Instruct": QWEN2P5_7B_INSTRUCT,
    "opdjax-100m": _small_qwen3(8),
    "opdjax-200m": _small_qwen3(24),
}


def _key(name: str) -> str:
    """"Qwen/Qwen3-8B", "qwen3-8b" and "8b" (a bare size means Qwen3) -> "qwen3-8b"."""
    n = name.strip().lower().rsplit("/", 1)[-1]
    return n if n.startswith(("qwen", "opdjax")) else f"qwen3-{n}"


_BY_KEY = {_key(k): k for k in PRESETS}


def preset_dict(name: str) -> dict[str, Any]:
    """A copy of the published config.json of `name` ("Qwen3-8B", "qwen3-8b", "8b", "Qwen/Qwen3-8B")."""
    key = _key(name)
    if key not in _BY_KEY:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}.")
    return dict(PRESETS[_BY_KEY[key]])


def preset_config(name: str) -> ModelConfig:
    """ModelConfig of a published architecture (no weights needed)."""
    return ModelConfig.from_hf_dict(preset_dict(name), source=f"preset {name}")
