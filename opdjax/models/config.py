"""Model configuration: one frozen dataclass for Qwen3 and Qwen2/2.5 decoders.

Read from / written to a Hugging Face `config.json` as transformers 5 writes it (`dtype`, and
RoPE under `rope_parameters`); older files (`torch_dtype`, top-level `rope_theta` /
`rope_scaling`) are read too. Everything we cannot compute exactly is refused here, by field
name, before any array is touched.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from opdjax.errors import ConfigError  # the one config error; importable from here too

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn", "llama3")
ATTENTION_KERNELS = ("xla", "splash", "cudnn")

@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 1_000_000.0
    rope_type: str = "default"  # default | linear | yarn | llama3
    factor: float = 1.0
    # yarn
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str  # "qwen3" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qk_norm: bool = True  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    qkv_bias: bool = False  # Qwen2: bias on q/k/v projections
    o_bias: bool = False  # Qwen3 `attention_bias=True` also puts a bias on o_proj
    dtype: str = "float32"  # dtype the checkpoint stores (and params default to)
    # Tokens the HF config names; kept so export round-trips them.
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # How full-sequence forwards attend (opdjax.models.attention): xla | splash | cudnn, set from
    # config.model.attention by attention.resolve. A run setting, never in config.json.
    attention: str = "xla"
    attention_interpret: bool = False  # splash / cudnn emulated on CPU (Pallas interpret, XLA): tests

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type={self.model_type!r} is not supported; opdjax implements "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (dense decoders)."
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer.")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads} (grouped-query attention needs it)."
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings.")
        if self.rope.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope_parameters.rope_type={self.rope.rope_type!r} is not supported; use one of "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}."
            )
        if self.attention not in ATTENTION_KERNELS:
            raise ConfigError(f"attention={self.attention!r}: choose one of {', '.join(ATTENTION_KERNELS)} "
                              "(config.model.attention also takes 'auto').")

    @property
    def num_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        d, f, h, k, hd, v = (self.hidden_size, self.intermediate_size, self.num_heads,
                             self.num_kv_heads, self.head_dim, self.vocab_size)
        attn = d * h * hd * 2 + d * k * hd * 2
        attn += (h + 2 * k) * hd if self.qkv_bias else 0
        attn += d if self.o_bias else 0
        attn += 2 * hd if self.qk_norm else 0
        layer = attn + 3 * d * f + 2 * d
        return v * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + d

    def flops_per_token(self, context_len: int) -> float:
        """Forward FLOPs per token: 2 per multiply-add in the matmuls, plus attention scores
        and values over `context_len` keys (the standard 6N-style count, forward only)."""
        d, f, h, k, hd, v = (self.hidden_size, self.intermediate_size, self.num_heads,
                             self.num_kv_heads, self.head_dim, self.vocab_size)
        per_layer = 2 * (d * h * hd * 2 + d * k * hd * 2 + 3 * d * f) + 2 * 2 * h * hd * context_len
        return self.num_layers * per_layer + 2 * d * v

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        def need(key):
            if key not in d:
                raise ConfigError(f"{source}: required field {key!r} is missing.")
            return d[key]

        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type={model_type!r} is not supported; opdjax implements "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (dense Qwen decoders). MoE and other "
                "architectures need their own model module."
            )
        if d.get("use_sliding_window") or any(t != "full_attention" for t in d.get("layer_types") or []):
            raise ConfigError(
                f"{source}: sliding-window attention (use_sliding_window / layer_types) is not "
                "implemented; set use_sliding_window=false (Qwen ships it disabled)."
            )
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act={d['hidden_act']!r}; only 'silu' (SwiGLU) is implemented.")
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(f"{source}: partial_rotary_factor != 1 is not implemented.")

        num_heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        head_dim = d.get("head_dim") or hidden // num_heads
        rope = _rope_from_hf(d, source)
        attention_bias = bool(d.get("attention_bias", False))
        dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
        return cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope=rope,
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", model_type == "qwen2")),
            qk_norm=model_type == "qwen3",
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=attention_bias if model_type == "qwen3" else False,
            dtype=str(dtype),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
        )

    @classmethod
    def from_pretrained(cls, ckpt_dir: str) -> "ModelConfig":
        path = os.path.join(ckpt_dir, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: a Hugging Face checkpoint directory needs config.json "
                "(save one with opdjax.models.hf_io.save_pretrained or transformers' save_pretrained)."
            )
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e}).") from None
        return cls.from_hf_dict(d, source=path)

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json as transformers 5 writes it for this architecture."""
        r = self.rope
        rope_parameters: dict[str, Any] = {"rope_type": r.rope_type, "rope_theta": r.theta}
        if r.rope_type != "default":
            rope_parameters["factor"] = r.factor
        if r.rope_type == "yarn":
            rope_parameters.update(beta_fast=r.beta_fast, beta_slow=r.beta_slow, truncate=r.truncate)
            for k in ("original_max_position_embeddings", "mscale", "mscale_all_dim", "attention_factor"):
                if getattr(r, k) is not None:
                    rope_parameters[k] = getattr(r, k)
        if r.rope_type == "llama3":
            rope_parameters.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor,
                                   original_max_position_embeddings=r.original_max_position_embeddings)
        arch = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        d = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope_parameters,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
            "dtype": self.dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "qwen3":
            d["attention_bias"] = self.o_bias or self.qkv_bias
        return d


def _rope_from_hf(d: dict[str, Any], source: str) -> RopeConfig:
    # transformers 5 nests theta and scaling in `rope_parameters`; 4.x had `rope_theta` and
    # `rope_scaling` at top level. Accept both, prefer the new one.
    p = dict(d.get("rope_parameters") or {})
    legacy = d.get("rope_scaling") or {}
    for k, v in legacy.items():
        p.setdefault(k, v)
    theta = p.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = p.get("rope_type", p.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope_parameters.rope_type={rope_type!r} is not supported; opdjax implements "
            f"{', '.join(SUPPORTED_ROPE_TYPES)} ('dynamic' rescales with the batch's length at run "
            "time, which a fixed-size KV cache cannot reproduce exactly)."
        )
    kw: dict[str, Any] = dict(theta=float(theta), rope_type=rope_type)
    if rope_type != "default":
        if p.get("factor") is None and rope_type == "yarn":
            # yarn without a factor means max_position_embeddings / original (transformers' rule)
            omp = p.get("original_max_position_embeddings") or d.get("original_max_position_embeddings")
            if omp:
                p["factor"] = d.get("max_position_embeddings", 32768) / omp
        if p.get("factor") is None:
            raise ConfigError(f"{source}: rope_parameters.factor is required for rope_type={rope_type!r}.")
        kw["factor"] = float(p["factor"])
    for k in ("beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor"):
        if p.get(k) is not None:
            kw[k] = float(p[k])
    for k in ("mscale", "mscale_all_dim", "attention_factor"):
        if p.get(k) is not None:
            kw[k] = float(p[k])
    if "truncate" in p:
        kw["truncate"] = bool(p["truncate"])
    if rope_type in ("yarn", "llama3"):
        # transformers falls back to max_position_embeddings; so do we (explicitly, here).
        omp = p.get("original_max_position_embeddings", d.get("original_max_position_embeddings"))
        omp = omp if omp is not None else d.get("max_position_embeddings", 32768)
        kw["original_max_position_embeddings"] = int(omp)
    return RopeConfig(**kw)
