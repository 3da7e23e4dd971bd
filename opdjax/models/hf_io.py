"""Hugging Face checkpoint I/O for the Qwen decoders: a declarative name/layout map, a loader
that places every tensor straight into its sharding, and an exporter transformers can load.

Loading never materialises a whole checkpoint on the host: each device's shard is cut from a
memory-mapped safetensors file (or a dequantized GGUF tensor) inside
`jax.make_array_from_callback`, so on a pod each host reads only what its devices hold.
All names, shapes and the tensor set are checked against the config before any array exists.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from typing import Callable, Iterable, Protocol

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from opdjax import multihost
from opdjax.errors import CheckpointError  # the one checkpoint error; importable from here too
from opdjax.models import qwen
from opdjax.models.config import ModelConfig
from opdjax.models.safetensors_io import LazyTensor, SafetensorsCheckpoint, save_safetensors
from opdjax.sharding import ShardingPlan

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
# Tensors some checkpoints carry that hold nothing we need (recomputed buffers).
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)

@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One of our parameters and the HF tensor(s) it comes from.

    `per_layer`: our array is [L, ...], stacked from HF tensors named with `{i}`.
    `to_ours` / `to_hf` convert one (per-layer) tensor between layouts; they return numpy views
    where possible so slicing a memory-mapped file reads only what is needed.
    """
    path: tuple[str, ...]
    hf_name: str
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray] = lambda w: w
    to_hf: Callable[[np.ndarray], np.ndarray] = lambda w: w
    per_layer: bool = False

    def hf_names(self, num_layers: int) -> list[str]:
        return [self.hf_name.format(i=i) for i in range(num_layers)] if self.per_layer else [self.hf_name]


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """The whole HF <-> opdjax mapping for a config (MaxText-style declarative table)."""
    D, F, H, K, hd, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                         cfg.head_dim, cfg.vocab_size)
    attn = "model.layers.{i}.self_attn."
    mlp = "model.layers.{i}.mlp."

    def proj_in(heads):  # HF [heads*hd, D] (out, in) -> ours [D, heads, hd]
        return (lambda w: w.reshape(heads, hd, D).transpose(2, 0, 1),
                lambda w: w.transpose(1, 2, 0).reshape(heads * hd, D))

    def layer(name, hf, shape, conv=(lambda w: w, lambda w: w)):
        return TensorMap(("layers", name), hf, shape, conv[0], conv[1], per_layer=True)

    transpose = (lambda w: w.T, lambda w: w.T)
    maps = [
        TensorMap(("embed",), "model.embed_tokens.weight", (V, D)),
        TensorMap(("final_norm",), "model.norm.weight", (D,)),
        layer("attn_norm", "model.layers.{i}.input_layernorm.weight", (D,)),
        layer("mlp_norm", "model.layers.{i}.post_attention_layernorm.weight", (D,)),
        layer("q", attn + "q_proj.weight", (H * hd, D), proj_in(H)),
        layer("k", attn + "k_proj.weight", (K * hd, D), proj_in(K)),
        layer("v", attn + "v_proj.weight", (K * hd, D), proj_in(K)),
        # HF o_proj [D, H*hd] -> ours [H, hd, D]
        layer("o", attn + "o_proj.weight", (D, H * hd),
              (lambda w: w.reshape(D, H, hd).transpose(1, 2, 0), lambda w: w.transpose(2, 0, 1).reshape(D, H * hd))),
        layer("gate", mlp + "gate_proj.weight", (F, D), transpose),
        layer("up", mlp + "up_proj.weight", (F, D), transpose),
        layer("down", mlp + "down_proj.weight", (D, F), transpose),
    ]
    if not cfg.tie_word_embeddings:
        maps.append(TensorMap(("lm_head",), "lm_head.weight", (V, D)))
    if cfg.qkv_bias:
        for name, heads in (("q", H), ("k", K), ("v", K)):
            maps.append(layer(f"{name}_bias", attn + f"{name}_proj.bias", (heads * hd,),
                              (lambda w, h=heads: w.reshape(h, hd), lambda w: w.reshape(-1))))
    if cfg.o_bias:
        maps.append(layer("o_bias", attn + "o_proj.bias", (D,)))
    if cfg.qk_norm:
        maps.append(layer("q_norm", attn + "q_norm.weight", (hd,)))
        maps.append(layer("k_norm", attn + "k_norm.weight", (hd,)))
    return maps


class TensorSource(Protocol):
    """Anything that yields HF-named numpy tensors: safetensors files, a GGUF file, a dict."""
    description: str

    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get(self, name: str) -> np.ndarray: ...
    def location(self, name: str) -> str: ...


class SafetensorsSource:
    def __init__(self, ckpt_dir: str):
        self.ckpt = SafetensorsCheckpoint.open(ckpt_dir)
        self.description = ckpt_dir

    def names(self):
        return self.ckpt.names()

    def shape(self, name):
        return tuple(self.ckpt.shape(name))

    def get(self, name):
        return self.ckpt.get(name)

    def location(self, name):
        return self.ckpt.file_of(name)


class DictSource:
    """In-memory HF-named tensors (tests; conversions)."""

    def __init__(self, tensors: dict[str, np.ndarray], description: str = "<tensors>"):
        self.tensors, self.description = tensors, description

    def names(self):
        return sorted(self.tensors)

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def get(self, name):
        return self.tensors[name]

    def location(self, name):
        return self.description


def validate_source(source: TensorSource, cfg: ModelConfig) -> None:
    """Every tensor the config needs is there with the right shape, and nothing else is."""
    maps = tensor_maps(cfg)
    expected = {n: m.hf_shape for m in maps for n in m.hf_names(cfg.num_layers)}
    present = set(source.names())
    missing = sorted(set(expected) - present)
    if missing:
        raise CheckpointError(
            f"{source.description}: {len(missing)} tensor(s) the config needs are missing, first "
            f"{missing[0]!r}{' (and ' + ', '.join(missing[1:4]) + (', ...' if len(missing) > 4 else '') + ')' if len(missing) > 1 else ''}. "
            f"Check that config.json (num_hidden_layers={cfg.num_layers}, tie_word_embeddings="
            f"{cfg.tie_word_embeddings}, model_type={cfg.model_type!r}) describes these weights."
        )
    extra = sorted(present - set(expected))
    ignorable = [n for n in extra if n.endswith(IGNORABLE_SUFFIXES)]
    if cfg.tie_word_embeddings and "lm_head.weight" in extra:
        ignorable.append("lm_head.weight")  # some tied checkpoints also store the tied copy
    unexpected = [n for n in extra if n not in ignorable]
    if unexpected:
        raise CheckpointError(
            f"{source.description}: tensor {unexpected[0]!r} in {source.location(unexpected[0])} is not "
            f"part of a {cfg.model_type} model with this config ({len(unexpected)} unexpected in all"
            f"{': ' + ', '.join(unexpected[1:4]) if len(unexpected) > 1 else ''}). A config/weights "
            "mismatch (e.g. num_hidden_layers, tie_word_embeddings, attention_bias) or another architecture."
        )
    for name in ignorable:
        log.warning("%s: tensor %r is not used (tied or recomputed) and is ignored", source.description, name)
    for name, shape in expected.items():
        got = source.shape(name)
        if tuple(got) != tuple(shape):
            raise CheckpointError(
                f"{source.description}: tensor {name!r} in {source.location(name)} has shape "
                f"{list(got)}, but the config implies {list(shape)} (hidden_size={cfg.hidden_size}, "
                f"intermediate_size={cfg.intermediate_size}, heads={cfg.num_heads}/{cfg.num_kv_heads} "
                f"of head_dim={cfg.head_dim}, vocab_size={cfg.vocab_size})."
            )


def load_params(source: TensorSource, cfg: ModelConfig, plan: ShardingPlan | None = None,
                dtype=None) -> qwen.Params:
    """Params placed into their shardings (single device without a plan), cast to `dtype`."""
    validate_source(source, cfg)
    dtype = np.dtype(jnp.dtype(dtype or cfg.dtype))
    shapes, axes = qwen.param_shapes(cfg), qwen.param_axes(cfg)
    params: dict = {}
    maps = tensor_maps(cfg)
    start = time.perf_counter()
    for i, m in enumerate(maps, 1):
        shape = _get(shapes, m.path)
        sharding = (plan.sharding(_get(axes, m.path), shape) if plan is not None
                    else jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
        _set(params, m.path, jax.make_array_from_callback(shape, sharding, _slicer(source, m, cfg, dtype)))
        # A large checkpoint takes minutes: say where we are.
        log.info("loaded %d/%d %s %s from %s (%.1f s)", i, len(maps), "/".join(m.path), list(shape),
                 source.description, time.perf_counter() - start)
    return params


def _slicer(source: TensorSource, m: TensorMap, cfg: ModelConfig, dtype: np.dtype):
    memo: dict = {}  # replicated params ask for the same slice once per device

    def read(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in memo:
            if m.per_layer:
                names = m.hf_names(cfg.num_layers)[index[0]]
                block = np.stack([np.asarray(m.to_ours(source.get(n))[index[1:]]) for n in names])
            else:
                block = np.asarray(m.to_ours(source.get(m.hf_name))[index])
            memo[key] = block.astype(dtype, copy=False)
        return memo[key]

    return read


def load_pretrained(ckpt_dir: str, plan: ShardingPlan | None = None, dtype=None) -> tuple[qwen.Params, ModelConfig]:
    """Config + params from a HF checkpoint directory (single or index-sharded safetensors)."""
    cfg = ModelConfig.from_pretrained(ckpt_dir)
    return load_params(SafetensorsSource(ckpt_dir), cfg, plan, dtype), cfg


# ------------------------------------------------------------------------------------- export
def hf_tensors(params: qwen.Params, cfg: ModelConfig, dtype=None) -> dict[str, LazyTensor]:
    """HF-named tensors produced lazily, one layer at a time, from (possibly sharded) params.

    Sorted by name: the order save_safetensors writes in, which under multi-host is also the
    order of the collective gathers every process must run one for one."""
    out = {}
    for m in tensor_maps(cfg):
        leaf = _get(params, m.path)
        np_dtype = np.dtype(jnp.dtype(dtype or leaf.dtype))
        for i, name in enumerate(m.hf_names(cfg.num_layers)):
            def produce(leaf=leaf, i=i if m.per_layer else None, m=m, np_dtype=np_dtype):
                part = multihost.to_host(leaf if i is None else leaf[i])
                return np.ascontiguousarray(m.to_hf(part)).astype(np_dtype, copy=False)
            out[name] = LazyTensor(tuple(m.hf_shape), np_dtype, produce)
    return dict(sorted(out.items()))


def save_pretrained(params: qwen.Params, cfg: ModelConfig, out_dir: str, *, tokenizer=None,
                    dtype=None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json + safetensors (+ tokenizer) that `transformers` loads.

    `tokenizer`: a checkpoint directory to copy tokenizer files from, or a transformers
    tokenizer to `save_pretrained`. Under multi-host every process must call this (the gather is
    collective); only process 0 writes.
    """
    tensors = hf_tensors(params, cfg, dtype)
    leaf_dtype = jax.tree.leaves(params)[0].dtype
    hf_dtype = str(jnp.dtype(dtype or leaf_dtype))
    if jax.process_count() > 1 and jax.process_index() != 0:
        for name in sorted(tensors):  # take part in the gathers, in process 0's order; write nothing
            tensors[name].produce()
        return
    os.makedirs(out_dir, exist_ok=True)
    save_safetensors(tensors, out_dir, max_shard_bytes=max_shard_bytes)
    config = dataclasses.replace(cfg, dtype=hf_dtype).to_hf_dict()
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    if isinstance(tokenizer, (str, os.PathLike)):
        copy_tokenizer_files(str(tokenizer), out_dir)
    elif tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    log.info("wrote the Hugging Face checkpoint %s", out_dir)


def copy_tokenizer_files(src_dir: str, out_dir: str) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(os.path.join(out_dir, name)):
            shutil.copyfile(src, os.path.join(out_dir, name))
            copied.append(name)
    if not any(n in copied for n in ("tokenizer.json", "vocab.json")) and not os.path.isfile(
            os.path.join(out_dir, "tokenizer.json")):
        raise FileNotFoundError(f"{src_dir}: no tokenizer.json or vocab.json to copy into {out_dir}.")
    return copied


def _get(tree, path: Iterable[str]):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value
