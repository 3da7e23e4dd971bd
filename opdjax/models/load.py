"""Model loading for every job: a Hugging Face checkpoint directory or a GGUF file, by path."""
from __future__ import annotations

from opdjax.data.tokenizer import load_tokenizer
from opdjax.models import gguf_io, hf_io, qwen
from opdjax.models.config import ModelConfig
from opdjax.sharding import ShardingPlan


def load_model(path: str = "", gguf: str = "", *, plan: ShardingPlan | None = None,
               dtype=None) -> tuple[qwen.Params, ModelConfig]:
    """(params, cfg) of the GGUF file `gguf` when given, else of the HF directory `path`; params
    placed by `plan` (one device without) and cast to `dtype` (None or "": the checkpoint's)."""
    if gguf:
        return gguf_io.load_gguf(gguf, plan=plan, dtype=dtype or None)
    return hf_io.load_pretrained(path, plan=plan, dtype=dtype or None)


def load_section(section, plan: ShardingPlan | None = None) -> tuple[qwen.Params, ModelConfig]:
    """(params, cfg) of a config model section (.path, .gguf, .dtype)."""
    return load_model(section.path, section.gguf, plan=plan, dtype=section.dtype)


def model_config(path: str = "", gguf: str = "") -> ModelConfig:
    """The ModelConfig alone (config.json or the GGUF header), without reading any weight."""
    if gguf:
        return gguf_io.config_from_gguf(gguf)
    return ModelConfig.from_pretrained(path)


def model_tokenizer(path: str = "", gguf: str = ""):
    """The tokenizer shipped with the checkpoint (the GGUF's own vocabulary for a GGUF file)."""
    if gguf:
        return gguf_io.load_gguf_tokenizer(gguf)
    return load_tokenizer(path)
