"""Tiny random Qwen3 checkpoints in Hugging Face format, built in about a second with no
download: the smoke job's model and a stand-in wherever a real checkpoint is not at hand.
(The trained toy teacher/student pair of the OPD demo is made by its own script.)"""
from __future__ import annotations

import os

import jax

from opdjax.data.tokenizer import build_toy_tokenizer
from opdjax.models import hf_io, qwen
from opdjax.models.config import ModelConfig


def build_random_checkpoint(out_dir: str, *, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=16, intermediate_size=128, tie_word_embeddings=True, seed=0,
                            dtype="float32") -> str:
    """A random-weight Qwen3 checkpoint (config.json, model.safetensors, toy tokenizer)."""
    os.makedirs(out_dir, exist_ok=True)
    tok = build_toy_tokenizer(out_dir)
    cfg = ModelConfig(
        model_type="qwen3", vocab_size=len(tok), hidden_size=hidden_size,
        intermediate_size=intermediate_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, tie_word_embeddings=tie_word_embeddings,
        dtype=dtype, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_position_embeddings=4096,
    )
    params = qwen.init_params(cfg, jax.random.key(seed), std=0.5)  # large std: non-degenerate argmax
    hf_io.save_pretrained(params, cfg, out_dir)
    return out_dir
