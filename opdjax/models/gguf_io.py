"""GGUF (llama.cpp) checkpoints of Qwen2/Qwen2.5/Qwen3 decoders: config, params, tokenizer.

A GGUF file is read through `GGUFSource`, a `hf_io.TensorSource` that speaks Hugging Face tensor
names, so loading shares `hf_io`'s validation and sharded placement. Tensors are dequantized to
float32 lazily, one at a time, when the loader asks for them (`gguf.quants.dequantize`, the same
routine transformers uses); the numpy shape is the GGUF dims reversed, i.e. HF's [out, in].
The config is rebuilt from the metadata as a synthesized HF config dict, so `ModelConfig`'s
checks apply unchanged.

Only the `qwen2` and `qwen3` GGUF architectures are read: their q/k weights are stored as in HF.
llama-arch files store q/k permuted for llama.cpp's RoPE and are refused rather than mis-read.

    python -m opdjax.models.gguf_io model.gguf out_dir [--dtype bfloat16]   # -> HF checkpoint dir
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time
from typing import Any

import gguf
import numpy as np
from transformers import AutoTokenizer

from opdjax.errors import CheckpointError, ConfigError
from opdjax.models import hf_io
from opdjax.models.config import ModelConfig

SUPPORTED_ARCHITECTURES = ("qwen2", "qwen3")

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
    "output_norm.weight": "model.norm.weight",
}
LAYER_NAMES = {  # blk.{i}.<gguf> -> model.layers.{i}.<hf>
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor of a qwen2/qwen3 model, or None if it has none."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    m = _LAYER_TENSOR.fullmatch(gguf_name)
    if m and m[2] in LAYER_NAMES:
        return f"model.layers.{m[1]}.{LAYER_NAMES[m[2]]}.{m[3]}"
    return None


def _open(path_or_reader) -> tuple[Any, str]:
    """(GGUFReader, file path for messages)."""
    if isinstance(path_or_reader, gguf.GGUFReader):
        return path_or_reader, str(getattr(path_or_reader.data, "filename", "<gguf>"))
    path = os.fspath(path_or_reader)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path} does not exist.")
    return gguf.GGUFReader(path), path


def _metadata(reader, key: str, path: str, default: Any = KeyError) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is KeyError:
            raise ConfigError(f"{path}: GGUF metadata key {key!r} is missing; it is needed to build "
                              "the model config.")
        return default
    return field.contents()


def _architecture(reader, path: str) -> str:
    arch = _metadata(reader, "general.architecture", path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{path}: general.architecture={arch!r} is not supported; opdjax reads "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} GGUFs. (llama-arch GGUFs store q/k permuted for "
            "llama.cpp's RoPE, and other architectures need their own model module.)"
        )
    return arch


class GGUFSource:
    """A GGUF file as HF-named float32 tensors, dequantized on demand.

    The loader calls `get` once per device shard, and for a layer-stacked parameter walks every
    layer per shard, so dequantized tensors stay in an LRU cache of up to `cache_bytes` (the last
    one always). 2 GiB holds every layer of the largest parameter of a ~1.5B model, so under a
    sharding plan each tensor is dequantized once; for much larger models raise it, or each shard
    dequantizes the layers again (correct, only slower).
    """

    def __init__(self, path_or_reader, cache_bytes: int = 2 * 2**30):
        self.reader, self.description = _open(path_or_reader)
        arch = _architecture(self.reader, self.description)
        self._tensors = {}
        for t in self.reader.tensors:
            name = hf_tensor_name(t.name)
            if name is None:
                raise CheckpointError(
                    f"{self.description}: GGUF tensor {t.name!r} has no counterpart in a {arch} model "
                    f"(known: {', '.join(GLOBAL_NAMES)} and blk.N.{{{','.join(LAYER_NAMES)}}}.weight/bias)."
                )
            self._tensors[name] = t
        self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._cache_bytes = cache_bytes

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[name].shape))  # GGUF dims: fastest first

    def location(self, name: str) -> str:
        return f"{self.description} (GGUF tensor {self._tensors[name].name!r})"

    def gguf_type(self, name: str) -> str:
        return self._tensors[name].tensor_type.name

    def get(self, name: str) -> np.ndarray:
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        t = self._tensors[name]
        array = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        array = array.reshape(self.shape(name))
        self._cache[name] = array
        while len(self._cache) > 1 and sum(a.nbytes for a in self._cache.values()) > self._cache_bytes:
            self._cache.popitem(last=False)
        return array


def config_from_gguf(path_or_reader) -> ModelConfig:
    """ModelConfig from a GGUF's metadata, via a synthesized HF config dict (shared validation)."""
    reader, path = _open(path_or_reader)
    arch = _architecture(reader, path)

    def need(key):
        return _metadata(reader, f"{arch}.{key}", path)

    def optional(key, default=None):
        return _metadata(reader, key, path, default)

    def per_model(key):  # some converters write per-layer arrays; a Qwen dense model has one value
        value = need(key)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise ConfigError(f"{path}: {arch}.{key}={value} varies by layer; opdjax needs one value.")
            value = value[0]
        return value

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ConfigError(f"{path}: GGUF tensor 'token_embd.weight' is missing; the vocabulary size is read "
                          "from its shape.")
    num_heads, hidden = int(per_model("attention.head_count")), int(need("embedding_length"))
    d: dict[str, Any] = {
        "model_type": arch,
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),  # GGUF dims [D, V]
        "hidden_size": hidden,
        "intermediate_size": int(per_model("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(per_model("attention.head_count_kv")),
        # llama.cpp writes key_length only when head_dim != hidden / heads (Qwen3 often).
        "head_dim": int(optional(f"{arch}.attention.key_length", hidden // num_heads)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(need("context_length")),
        "rope_parameters": _rope_parameters(reader, arch, path),
        # llama.cpp writes output.weight only when it is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in tensors,
        # Qwen3 with attention_bias has q/k/v/o biases; Qwen2 always has q/k/v ones.
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "dtype": "float32",  # what dequantization yields
        "bos_token_id": optional("tokenizer.ggml.bos_token_id"),
        "eos_token_id": optional("tokenizer.ggml.eos_token_id"),
        "pad_token_id": optional("tokenizer.ggml.padding_token_id"),
    }
    return ModelConfig.from_hf_dict(d, source=path)


def _rope_parameters(reader, arch: str, path: str) -> dict[str, Any]:
    key = lambda k: f"{arch}.rope.{k}"  # noqa: E731
    params: dict[str, Any] = {"rope_type": "default",
                              "rope_theta": float(_metadata(reader, key("freq_base"), path))}
    scaling = _metadata(reader, key("scaling.type"), path, "none")
    if scaling == "none":
        return params
    if scaling not in ("linear", "yarn"):
        raise ConfigError(f"{path}: {key('scaling.type')}={scaling!r} is not supported (linear or yarn).")
    params.update(rope_type=scaling, factor=float(_metadata(reader, key("scaling.factor"), path)))
    if scaling == "yarn":
        original = _metadata(reader, key("scaling.original_context_length"), path, None)
        if original is not None:
            params["original_max_position_embeddings"] = int(original)
        for gguf_key, hf_key in (("scaling.yarn_beta_fast", "beta_fast"), ("scaling.yarn_beta_slow", "beta_slow")):
            value = _metadata(reader, key(gguf_key), path, None)
            if value is not None:
                params[hf_key] = float(value)
    return params


def load_gguf(path, plan=None, dtype=None):
    """(params, cfg) from a GGUF file; params placed by `plan` (one device without), cast to
    `dtype` (default float32, the dequantized precision)."""
    reader, _ = _open(path)
    cfg = config_from_gguf(reader)
    # On one device each tensor is read exactly once, so a cache would only hold dead float32
    # copies (measured: 1.5 GiB of peak RSS on Qwen2.5-Coder-0.5B); with several devices each
    # device's slice re-reads the tensor, and the cache saves re-dequantizing it.
    single = plan is None or plan.mesh.size == 1
    source = GGUFSource(reader, cache_bytes=0 if single else 2 * 2**30)
    return hf_io.load_params(source, cfg, plan, dtype), cfg


def load_gguf_tokenizer(path):
    """The tokenizer a GGUF describes, built by transformers' own GGUF conversion (offline)."""
    reader, path = _open(path)
    # transformers prefers a tokenizer.json lying next to the GGUF over the GGUF's own vocabulary,
    # silently; so it gets a directory holding nothing but (a link to) the file.
    with tempfile.TemporaryDirectory() as folder:
        os.symlink(os.path.abspath(path), os.path.join(folder, "model.gguf"))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="model.gguf", local_files_only=True)
    tokenizer.name_or_path = path
    template = _metadata(reader, "tokenizer.chat_template", path, None)
    if template and not tokenizer.chat_template:
        tokenizer.chat_template = template
    return tokenizer


def convert_gguf_to_hf(gguf_path, out_dir, dtype: str = "bfloat16", log=lambda msg: None) -> ModelConfig:
    """Write a HF checkpoint directory (config.json, safetensors, tokenizer) for a GGUF file."""
    start = time.perf_counter()
    log(f"reading {gguf_path}")
    params, cfg = load_gguf(gguf_path, dtype=dtype)
    log(f"dequantized {cfg.num_params() / 1e6:.1f}M params ({cfg.model_type}, {cfg.num_layers} layers) "
        f"to {dtype} in {time.perf_counter() - start:.1f} s")
    tokenizer = load_gguf_tokenizer(gguf_path)
    log(f"tokenizer: {len(tokenizer)} tokens, chat template {'yes' if tokenizer.chat_template else 'no'}")
    hf_io.save_pretrained(params, cfg, os.fspath(out_dir), tokenizer=tokenizer, dtype=dtype)
    log(f"wrote {out_dir} in {time.perf_counter() - start:.1f} s total")
    return cfg


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Convert a qwen2/qwen3 GGUF file to a Hugging Face checkpoint.")
    parser.add_argument("input", help="model .gguf file")
    parser.add_argument("out_dir", help="output directory (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    convert_gguf_to_hf(args.input, args.out_dir, args.dtype, log=lambda msg: print(msg, file=sys.stderr, flush=True))


if __name__ == "__main__":
    main()
