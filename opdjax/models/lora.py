"""LoRA adapters for the Qwen decoders of opdjax.models.qwen (pure functions, stacked layers).

An adapter is a pytree with one entry per adapted projection ("target"):

    adapter = {target: {"a": [L, in, r], "b": [L, r, out]}}      scale = alpha / r (not in the tree)

and layer l's projection y = x @ W_l becomes y = x @ W_l + scale * (x @ a_l) @ b_l (the merged
weight W_l + scale * a_l @ b_l, reshaped to W_l's shape, is the same map). Our weights are stored
input-dims-first, [L, *in_dims, *out_dims] (y = x @ W), and `in` / `out` are those dims
flattened row-major:

    target   weight (qwen.LAYER_AXES)                in = (dims)          out = (dims)
    q        [L, D, H, hd]    embed, heads, head_dim  D    (embed)         H*hd (heads, head_dim)
    k, v     [L, D, K, hd]    embed, kv_heads, hd     D    (embed)         K*hd (kv_heads, head_dim)
    o        [L, H, hd, D]    heads, head_dim, embed  H*hd (heads, hd)     D    (embed)
    gate, up [L, D, F]        embed, mlp              D    (embed)         F    (mlp)
    down     [L, F, D]        mlp, embed              F    (mlp)           D    (embed)

`IN_DIMS` holds the number of leading "in" dims per target; every shape here is derived from
`qwen.param_shapes`, the one place the layout is defined.

Running: `qwen.apply(params, tokens, cfg, layer_transform=layer_transform(adapter, spec.scale))`
adds the adapter on the activations, as PEFT does (`adapter_delta`): at each adapted projection
scale * (x @ a) @ b, computed in float32 from the float32 adapter, goes into the projection's
float32 accumulator before its one rounding to the activation dtype. The weights are never
rewritten, so an update far below half an ulp of a bfloat16 W (which W + scale * a @ b rounded
to bfloat16 would drop) still moves the output, and the backward pass makes only the [in, r] and
[r, out] adapter gradients, no weight-shaped one (bench/bench_dail_lora.py measures both paths).
Without it `qwen.apply` is the base model itself: the frozen reference of DAIL is the same params
with the adapter switched off, no second copy. `merge` / `export_merged` fold the adapter into
the weights for export (`merge_layer`: one layer).

PEFT correspondence (peft's LoRA on transformers' nn.Linear, weight [out, in], y = x W^T):
    lora_A.weight [r, in],  lora_B.weight [out, r],  y += scaling * x A^T B^T,  scaling = alpha / r
so per layer  a_l = A^T  and  b_l = B^T, with HF's flattened in/out indices equal to ours
(HF q_proj row h*hd + j is our q[:, h, j]; o_proj column h*hd + j is our o[h, j, :]). peft's
default (autocast_adapter_dtype=True: float32 adapter weights, the input cast to float32 for the
adapter branch) is what `adapter_delta` computes.
`save_adapter` writes a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)
that `peft.PeftModel.from_pretrained(base_hf_model, path)` loads, and `load_adapter` reads one.

Initialisation follows PEFT's default (init_lora_weights=True): A ~ kaiming-uniform(a=sqrt(5))
over fan_in = in, i.e. U(-1/sqrt(in), 1/sqrt(in)), and B = 0, so the adapted model starts
exactly at the base.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from opdjax import multihost
from opdjax.errors import ConfigError
from opdjax.models import hf_io, qwen
from opdjax.models.config import ModelConfig
from opdjax.sharding import ShardingPlan

Adapter = dict[str, dict[str, Any]]

# Adaptable projections, in canonical order, with their transformers module names.
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
              "down": "mlp.down_proj"}
_TARGET_OF_HF = {m.split(".")[1]: t for t, m in HF_MODULES.items()}  # "q_proj" -> "q"
# Leading dims of each weight (after the layer dim) that are the projection's input.
IN_DIMS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


# ---------------------------------------------------------------------------------------- spec
@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Rank, alpha and adapted projections; hashable, so it can be a static jit argument.
    Targets are stored in canonical order (PROJECTIONS); HF names (q_proj, ...) are accepted."""
    rank: int
    alpha: float
    targets: tuple[str, ...] = PROJECTIONS

    def __post_init__(self):
        rank, alpha, targets = _check(self.rank, self.alpha, self.targets, "LoraSpec")
        object.__setattr__(self, "rank", rank)
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "targets", targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, section, field: str = "config.lora") -> "LoraSpec | None":
        """The spec a config's `lora` section (enabled, rank, alpha, targets) asks for, or None
        when `enabled` is False (full fine-tuning). Errors name the field and the fix."""
        for name in ("enabled", "rank", "alpha", "targets"):
            if name not in section:
                raise ConfigError(f"{field}.{name} is missing; the lora section needs enabled, rank, "
                                  "alpha and targets (see opdjax/dail/config.py).")
        if not isinstance(section["enabled"], (bool, np.bool_)):
            raise ConfigError(f"{field}.enabled={section['enabled']!r}: give True (LoRA) or False "
                              "(full fine-tuning).")
        if not section["enabled"]:
            return None
        rank, alpha, targets = _check(section["rank"], section["alpha"], section["targets"], field)
        return cls(rank, alpha, targets)


def _check(rank, alpha, targets, field: str) -> tuple[int, float, tuple[str, ...]]:
    if isinstance(rank, (bool, np.bool_)) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ConfigError(f"{field}.rank={rank!r}: the LoRA rank must be an integer >= 1 (e.g. 32).")
    if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, (int, float, np.integer, np.floating)) \
            or not np.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"{field}.alpha={alpha!r}: the LoRA alpha must be a number > 0 "
                          "(scale = alpha / rank; alpha = rank gives scale 1).")
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    try:
        targets = list(targets)
    except TypeError:
        raise ConfigError(f"{field}.targets={targets!r}: give a tuple of projections from "
                          f"{', '.join(PROJECTIONS)}.") from None
    if not targets:
        raise ConfigError(f"{field}.targets is empty; give at least one projection from "
                          f"{', '.join(PROJECTIONS)} (or disable LoRA).")
    names = []
    for t in targets:
        name = _TARGET_OF_HF.get(t, t) if isinstance(t, str) else t
        if name not in PROJECTIONS:
            raise ConfigError(f"{field}.targets: {t!r} is not a projection; choose from "
                              f"{', '.join(PROJECTIONS)} (or their transformers names "
                              f"{', '.join(_TARGET_OF_HF)}).")
        if name in names:
            raise ConfigError(f"{field}.targets names {name!r} twice; list each projection once.")
        names.append(name)
    return int(rank), float(alpha), tuple(t for t in PROJECTIONS if t in names)


# ---------------------------------------------------------------------------------------- layout
def _split_dims(cfg: ModelConfig, target: str) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    shape = qwen.param_shapes(cfg)["layers"][target]
    n = IN_DIMS[target]
    return shape[0], shape[1:1 + n], shape[1 + n:]


def lora_shapes(cfg: ModelConfig, spec: LoraSpec) -> Adapter:
    """{target: {"a": (L, in, r), "b": (L, r, out)}} as tuples."""
    out = {}
    for t in spec.targets:
        L, ins, outs = _split_dims(cfg, t)
        out[t] = {"a": (L, int(np.prod(ins)), spec.rank), "b": (L, spec.rank, int(np.prod(outs)))}
    return out


def lora_axes(cfg: ModelConfig, spec: LoraSpec) -> Adapter:
    """Logical axis names (opdjax.sharding rules) of every adapter leaf.

    A flattened group of dims takes the name of its leading dim: (heads, head_dim) flattened
    row-major and cut into n contiguous pieces is exactly a cut of the heads, so "heads" is the
    right name for H*hd. The rank dim is never sharded."""
    layer_axes = qwen.LAYER_AXES
    out = {}
    for t in spec.targets:
        names = layer_axes[t]
        n = IN_DIMS[t]
        out[t] = {"a": ("layers", names[1], None), "b": ("layers", None, names[1 + n])}
    return out


def lora_shardings(cfg: ModelConfig, spec: LoraSpec, plan: ShardingPlan) -> Adapter:
    shapes = lora_shapes(cfg, spec)
    return jax.tree.map(lambda names, s: plan.sharding(names, s), lora_axes(cfg, spec), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def abstract_lora(cfg: ModelConfig, spec: LoraSpec, dtype=jnp.float32) -> Adapter:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.dtype(dtype)), lora_shapes(cfg, spec),
                        is_leaf=lambda x: isinstance(x, tuple))


def num_lora_params(cfg: ModelConfig, spec: LoraSpec) -> int:
    return sum(int(np.prod(s)) for s in jax.tree.leaves(lora_shapes(cfg, spec), is_leaf=lambda x: isinstance(x, tuple)))


def init_lora(cfg: ModelConfig, spec: LoraSpec, key: jax.Array, dtype=jnp.float32) -> Adapter:
    """PEFT's default: a ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a=sqrt(5)), b = 0.
    Each target's draw depends only on (key, target), not on which other targets are adapted."""
    return _init_lora(cfg, spec, key, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "dtype"))
def _init_lora(cfg: ModelConfig, spec: LoraSpec, key: jax.Array, dtype) -> Adapter:
    # One jitted program rather than a dispatch (and a compilation) per op and shape.
    out = {}
    for t, shapes in lora_shapes(cfg, spec).items():
        bound = 1.0 / np.sqrt(shapes["a"][1])  # fan_in = in
        k = jax.random.fold_in(key, PROJECTIONS.index(t))
        a = jax.random.uniform(k, shapes["a"], jnp.float32, -bound, bound).astype(dtype)
        out[t] = {"a": a, "b": jnp.zeros(shapes["b"], dtype)}
    return out


def check_adapter(adapter: Adapter, cfg: ModelConfig, spec: LoraSpec) -> None:
    """The adapter has exactly the spec's targets with the shapes cfg and spec imply."""
    shapes = lora_shapes(cfg, spec)
    if set(adapter) != set(shapes):
        raise ValueError(f"adapter targets {sorted(adapter)} differ from the spec's {list(spec.targets)}.")
    for t, s in shapes.items():
        for part in ("a", "b"):
            got = tuple(adapter[t][part].shape)
            if got != s[part]:
                raise ValueError(f"adapter {t}.{part} has shape {list(got)}, but the model config and "
                                 f"rank {spec.rank} imply {list(s[part])}.")


# ---------------------------------------------------------------------------------------- running
def adapter_delta(target: str, x: jax.Array, layer_adapter: Adapter, scale,
                  plan: ShardingPlan | None = None) -> jax.Array | None:
    """scale * (x @ a) @ b for projection `target` of one layer (None when it is not adapted):
    float32 [..., out], x [..., *in_dims] in the activation dtype, a [in, r], b [r, out].

    In float32 throughout, as peft computes its LoRA branch by default (autocast_adapter_dtype:
    float32 adapter, input cast to float32): the term keeps its own magnitude however small it
    is next to x @ W, and `qwen` adds it to the projection's float32 accumulator before the one
    rounding to the activation dtype. Costs 2 r (in + out) flops per row against 2 in * out for
    x @ W (r = 32 on Qwen3-8B's q: 1.6%). The scale goes on x @ a ([.., r], the smaller side)."""
    if target not in layer_adapter:
        return None
    a, b = layer_adapter[target]["a"], layer_adapter[target]["b"]
    n_in = IN_DIMS[target]
    lead = x.shape[:x.ndim - n_in]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] or int(np.prod(x.shape[len(lead):])) != a.shape[0]:
        raise ValueError(f"adapter {target}: a {list(a.shape)} @ b {list(b.shape)} does not fit an input "
                         f"{list(x.shape)} (per layer: a [in, r], b [r, out], in = the input dims flattened).")
    h = jnp.einsum("...i,ir->...r", x.reshape(*lead, a.shape[0]).astype(jnp.float32), a.astype(jnp.float32),
                   preferred_element_type=jnp.float32)
    if plan is not None and h.ndim == 3:
        h = plan.constrain(h, ("batch", "length", None))
    return jnp.einsum("...r,ro->...o", h * scale, b.astype(jnp.float32), preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class _AdapterDelta:
    # A hashable hook (equal for equal plans): a jit argument carrying it compiles once.
    plan: ShardingPlan | None

    def __call__(self, target: str, x: jax.Array, layer_adapter: Adapter, scale):
        return adapter_delta(target, x, layer_adapter, scale, self.plan)


def layer_transform(adapter: Adapter, scale, plan: ShardingPlan | None = None) -> qwen.LayerTransform:
    """The `qwen.apply(..., layer_transform=)` that runs the model with the adapter on: every
    adapted projection of layer l computes x @ W_l + scale * (x @ a_l) @ b_l (`adapter_delta`,
    the activation path; the weights are not rewritten)."""
    return qwen.LayerTransform(None, adapter, scale, delta=_AdapterDelta(plan))


# ---------------------------------------------------------------------------------------- merging
def merge_layer(lp: dict, layer_adapter: Adapter, scale, plan: ShardingPlan | None = None) -> dict:
    """One layer's params (no layer dim) with each adapted weight W -> W + scale * a @ b.

    The delta is accumulated in float32 and added to W in float32, rounded once to W's dtype
    (in bfloat16 an update below half an ulp of W is lost here; `layer_transform` keeps it).
    For export (`merge`) and for comparing the two paths (bench/bench_dail_lora.py); training
    runs `layer_transform`."""
    lp = dict(lp)
    for t, ab in layer_adapter.items():
        lp[t] = _merged_weight(t, lp[t], ab["a"], ab["b"], scale, plan)
    return lp


def _merged_weight(t: str, w, a, b, scale, plan: ShardingPlan | None):
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] * b.shape[1] != w.size or a.shape[1] != b.shape[0]:
        raise ValueError(f"adapter {t}: a {list(a.shape)} @ b {list(b.shape)} does not make a "
                         f"{list(w.shape)} weight (per layer: a [in, r], b [r, out]).")
    delta = jnp.einsum("ir,ro->io", a, b, preferred_element_type=jnp.float32).reshape(w.shape)
    if plan is not None:
        delta = plan.constrain(delta, qwen.LAYER_AXES[t][1:])
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


@functools.partial(jax.jit, static_argnames=("t",))
def _merge_stacked(w, a, b, scale, t: str):
    # One layer at a time: the float32 delta of one layer, never of the whole stack.
    return jax.lax.map(lambda x: _merged_weight(t, x[0], x[1], x[2], scale, None), (w, a, b))


def merge(params: qwen.Params, adapter: Adapter, spec: LoraSpec) -> qwen.Params:
    """Params with the adapter folded into the weights (plain `qwen.apply` then equals apply with
    the adapter). The base params are not modified; the adapted weights are new arrays."""
    layers = dict(params["layers"])
    for t in spec.targets:
        if t not in adapter:
            raise ValueError(f"adapter has no {t!r}, which the spec adapts; it holds {sorted(adapter)}.")
        w = layers[t]
        merged = _merge_stacked(w, adapter[t]["a"], adapter[t]["b"], jnp.float32(spec.scale), t)
        if isinstance(w, jax.Array) and merged.sharding != w.sharding:
            merged = jax.device_put(merged, w.sharding)
        layers[t] = merged
    return {**params, "layers": layers}


def export_merged(params: qwen.Params, adapter: Adapter, spec: LoraSpec, cfg: ModelConfig, out_dir: str,
                  tokenizer_dir=None, *, dtype=None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Merge and write a Hugging Face checkpoint (config.json, safetensors, tokenizer files from
    `tokenizer_dir` if given) that transformers and `hf_io.load_pretrained` load as a plain model.
    Under multi-host every process must call it (see hf_io.save_pretrained)."""
    check_adapter(adapter, cfg, spec)
    hf_io.save_pretrained(merge(params, adapter, spec), cfg, out_dir, tokenizer=tokenizer_dir, dtype=dtype,
                          max_shard_bytes=max_shard_bytes)


# ---------------------------------------------------------------------------------------- PEFT I/O
def _peft_name(target: str, layer: int, part: str) -> str:
    return f"{_PEFT_PREFIX}model.layers.{layer}.{HF_MODULES[target]}.lora_{part.upper()}.weight"


_PEFT_NAME_RE = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\."
                           r"(\w+_proj)\.lora_([AB])(?:\.\w+)?\.weight$")


def to_peft_tensors(adapter: Adapter) -> dict[str, np.ndarray]:
    """PEFT-named host arrays: lora_A.weight = a_l^T [r, in], lora_B.weight = b_l^T [out, r]."""
    out = {}
    for t, ab in adapter.items():
        for part in ("a", "b"):
            stacked = multihost.to_host(ab[part])
            for i in range(stacked.shape[0]):
                out[_peft_name(t, i, part)] = np.ascontiguousarray(stacked[i].T)
    return out


def from_peft_tensors(tensors: dict[str, Any], description: str = "<tensors>") -> Adapter:
    """Our adapter (numpy leaves) from PEFT-named tensors (inverse of `to_peft_tensors`)."""
    parts: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, value in tensors.items():
        m = _PEFT_NAME_RE.match(name)
        if m is None or m.group(3) not in _TARGET_OF_HF or HF_MODULES[_TARGET_OF_HF[m.group(3)]] != \
                f"{m.group(2)}.{m.group(3)}":
            raise ValueError(f"{description}: tensor {name!r} is not a LoRA A/B weight of a Qwen "
                             f"projection ({', '.join(HF_MODULES.values())}); DoRA magnitudes, LoRA "
                             "biases and other modules are not supported.")
        key = (_TARGET_OF_HF[m.group(3)], m.group(4).lower())
        parts.setdefault(key, {})[int(m.group(1))] = np.asarray(value)
    if not parts:
        raise ValueError(f"{description}: holds no LoRA tensors.")
    layer_sets = {k: sorted(v) for k, v in parts.items()}
    num_layers = max(max(v) for v in layer_sets.values()) + 1
    adapter: Adapter = {}
    for (t, part), by_layer in parts.items():
        if layer_sets[(t, part)] != list(range(num_layers)):
            missing = sorted(set(range(num_layers)) - set(by_layer))
            raise ValueError(f"{description}: {HF_MODULES[t]}.lora_{part.upper()} is missing for layer(s) "
                             f"{missing[:5]}; only adapters on every layer are supported.")
        adapter.setdefault(t, {})[part] = np.stack([by_layer[i].T for i in range(num_layers)])
    for t, ab in adapter.items():
        if set(ab) != {"a", "b"}:
            raise ValueError(f"{description}: {HF_MODULES[t]} has lora_{'A' if 'a' in ab else 'B'} but "
                             f"not lora_{'B' if 'a' in ab else 'A'}.")
        if ab["a"].shape[2] != ab["b"].shape[1]:
            raise ValueError(f"{description}: {HF_MODULES[t]} lora_A has rank {ab['a'].shape[2]} but "
                             f"lora_B has rank {ab['b'].shape[1]}.")
    return adapter


def save_adapter(adapter: Adapter, spec: LoraSpec, path: str, *, base_model_name_or_path: str | None = None,
                 dtype=None) -> None:
    """Write a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors),
    small and shippable without the base; `peft.PeftModel.from_pretrained(base, path)` and
    `load_adapter` read it. Under multi-host every process must call it; process 0 writes."""
    if set(adapter) != set(spec.targets):
        raise ValueError(f"adapter targets {sorted(adapter)} differ from the spec's {list(spec.targets)}.")
    tensors = to_peft_tensors(adapter)  # gathers (collective under multi-host)
    if dtype is not None:
        tensors = {k: v.astype(np.dtype(jnp.dtype(dtype))) for k, v in tensors.items()}
    if jax.process_index() != 0:
        return
    os.makedirs(path, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": [HF_MODULES[t].split(".")[1] for t in spec.targets],
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
        "layers_to_transform": None,
    }
    tmp = os.path.join(path, ADAPTER_WEIGHTS + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, ADAPTER_WEIGHTS))
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def load_adapter(path: str, cfg: ModelConfig | None = None, dtype=None) -> tuple[Adapter, LoraSpec]:
    """(adapter, spec) from a PEFT LoRA directory (ours or peft's `save_pretrained`); leaves are
    jax arrays in the file's dtype (or `dtype`). With `cfg`, shapes are checked against it."""
    cfg_path, weights_path = os.path.join(path, ADAPTER_CONFIG), os.path.join(path, ADAPTER_WEIGHTS)
    for p in (cfg_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{path} is not a LoRA adapter directory: {os.path.basename(p)} is missing.")
    with open(cfg_path) as f:
        conf = json.load(f)
    if conf.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type={conf.get('peft_type')!r}; only LORA adapters are supported.")
    unsupported = [k for k in ("use_rslora", "use_dora", "fan_in_fan_out") if conf.get(k)]
    unsupported += [k for k in ("rank_pattern", "alpha_pattern") if conf.get(k)]
    unsupported += [k for k in ("lora_bias", "layer_replication", "trainable_token_indices") if conf.get(k)]
    unsupported += [k for k in ("layers_to_transform", "modules_to_save", "target_parameters")
                    if conf.get(k) is not None]
    if conf.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise ValueError(f"{cfg_path}: {', '.join(unsupported)} set; only plain LoRA (scale = alpha / r on "
                         "every layer of the target projections) is supported.")
    modules = conf.get("target_modules")
    if isinstance(modules, str) or not modules:
        raise ValueError(f"{cfg_path}: target_modules={modules!r}; give a list of projection names.")
    spec = LoraSpec(int(conf["r"]), float(conf["lora_alpha"]), tuple(modules))
    adapter = from_peft_tensors(load_file(weights_path), weights_path)
    if set(adapter) != set(spec.targets):
        raise ValueError(f"{path}: the weights adapt {sorted(adapter)} but target_modules names "
                         f"{list(spec.targets)}.")
    if cfg is not None:
        check_adapter(adapter, cfg, spec)
    elif any(ab["a"].shape[2] != spec.rank for ab in adapter.values()):
        raise ValueError(f"{path}: the weights' rank differs from r={spec.rank} in {ADAPTER_CONFIG}.")
    adapter = jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype), adapter)
    return adapter, spec
