"""Fused attention kernels for full-sequence forwards (no KV cache), chosen by `model.attention`.

    xla     qwen._attend: einsum + float32 softmax (everywhere; the only path with a KV cache)
    splash  Pallas TPU flash attention (jax.experimental.pallas.ops.tpu.splash_attention)
    cudnn   jax.nn.dot_product_attention(implementation="cudnn"), cuDNN flash attention on GPU

`resolve` turns the config's choice ("auto" included) into `ModelConfig.attention` once, at
config validation, and logs it. Both kernels take q [B, T, H, hd] and k, v [B, T, K, hd] with
H = K * G (query head h reads KV head h // G, the reference's layout), scale by 1/sqrt(hd) and
keep the softmax in float32. Padding (mask False, left or right) is segment 0 and real tokens
segment 1, so a real query sees exactly the real keys at or before it; a padding query sees
padding only (finite, never NaN; its output is unused). Rows need no positions: RoPE has them.

On CPU (`attention_interpret`) the same code runs splash in Pallas interpret mode and cudnn's
plumbing (mask, GQA layout, scale) with the XLA implementation: that is what the tests check.
The cuDNN implementation itself is untested here (no GPU on this machine).
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import PartitionSpec as P

from opdjax.errors import ConfigError
from opdjax.models.config import ATTENTION_KERNELS, ModelConfig

log = logging.getLogger(__name__)

CHOICES = ("auto", *ATTENTION_KERNELS)
LANES = 128  # the kernel's sequence blocks are multiples of this
# head_dims whose forward + backward the TPU compiler lowered for v5p, v5e and v6e (AOT); others
# lowered too on v5p but auto keeps them on XLA until they are checked.
SPLASH_HEAD_DIMS = (64, 128, 192, 256)
DESCRIPTIONS = {
    "xla": "xla (einsum + float32 softmax) for every forward",
    "splash": "splash (Pallas TPU kernel) for full-sequence forwards; XLA for decode",
    "cudnn": "cudnn (jax.nn.dot_product_attention, cuDNN flash) for full-sequence forwards; XLA for decode",
}


class AttentionConfigError(ConfigError):
    """model.attention names something this backend or model cannot run; says what to set."""


# ------------------------------------------------------------------------------ choice
def splash_unsupported(cfg: ModelConfig) -> str:
    """Why the splash kernel cannot run this model ("" when it can). Any T works (padded)."""
    if cfg.head_dim not in SPLASH_HEAD_DIMS:
        return f"head_dim={cfg.head_dim} is not one the kernel supports ({', '.join(map(str, SPLASH_HEAD_DIMS))})"
    return ""


def check_choice(requested, field: str = "config.model.attention") -> None:
    if requested not in CHOICES:
        raise AttentionConfigError(f"{field}={requested!r} is not an attention implementation; choose one of "
                                   f"{', '.join(CHOICES)}.")


def resolve(cfg: ModelConfig, requested: str, param_dtype: str, *, name: str,
            field: str = "config.model.attention", backend: str | None = None) -> ModelConfig:
    """`cfg` with `attention` (and `attention_interpret`) set from the config's `requested`
    choice for this backend; logs the choice. Raises AttentionConfigError naming `field`."""
    check_choice(requested, field)
    backend = backend or jax.default_backend()
    half = jnp.dtype(param_dtype or cfg.dtype) in (jnp.bfloat16, jnp.float16)
    interpret, note = False, ""
    if requested == "auto":
        choice = "xla"
        if backend == "tpu":
            why = splash_unsupported(cfg)
            choice, note = ("xla", f"auto: not splash, {why}") if why else ("splash", "auto on tpu")
        elif backend == "gpu":
            choice, note = (("cudnn", "auto on gpu") if half else
                            ("xla", f"auto: not cudnn, cuDNN flash attention needs bfloat16/float16 params, "
                                    f"these are {param_dtype}"))
        else:
            note = f"auto on {backend}"
    else:
        choice = requested
        native = {"splash": "tpu", "cudnn": "gpu"}.get(choice)
        if native and backend not in (native, "cpu"):
            raise AttentionConfigError(f"{field}={choice!r} runs on {native} (or on cpu, emulated, for tests), "
                                       f"not on {backend}; use 'auto' or 'xla'.")
        if choice == "splash" and splash_unsupported(cfg):
            raise AttentionConfigError(f"{field}='splash' for {name}: {splash_unsupported(cfg)}; use 'auto' or 'xla'.")
        if choice == "cudnn" and backend == "gpu" and not half:
            raise AttentionConfigError(f"{field}='cudnn' for {name}: cuDNN flash attention needs bfloat16/float16 "
                                       f"params, these are {param_dtype}; set the dtype or use 'auto'/'xla'.")
        if native and backend == "cpu":
            interpret = True
            note = ("on cpu: Pallas interpret mode, slow, for testing" if choice == "splash" else
                    "on cpu: the XLA implementation of jax.nn.dot_product_attention, for testing")
    _log_once(f"attention ({name}): {DESCRIPTIONS[choice]}" + (f" [{note}]" if note else ""))
    return dataclasses.replace(cfg, attention=choice, attention_interpret=interpret)


_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.info("%s", msg)


# ------------------------------------------------------------------------------ kernels
def attend_full(q, k, v, valid, cfg: ModelConfig, plan=None):
    """Causal attention of a whole sequence to itself: q [B, T, H, hd], k/v [B, T, K, hd],
    valid [B, T] bool (False = padding) -> [B, T, H, hd] in q's dtype."""
    scale = cfg.head_dim ** -0.5
    if cfg.attention == "splash":
        # The kernel takes scaled queries (the reference scales the float32 scores: the same up to
        # one rounding of q, in q's dtype).
        q = (q.astype(jnp.float32) * scale).astype(q.dtype)
        return splash(q, k, v, valid, plan, interpret=cfg.attention_interpret)
    if cfg.attention == "cudnn":
        return dot_product(q, k, v, valid, scale=scale, implementation="xla" if cfg.attention_interpret else "cudnn")
    raise ValueError(f"attend_full: attention={cfg.attention!r} has no fused kernel")


def dot_product(q, k, v, valid, *, scale: float, implementation: str):
    """jax.nn.dot_product_attention with native GQA (K heads), is_causal and the key padding as a
    [B, 1, T, T] mask (left padding cannot be expressed by sequence lengths; cuDNN adds it as a
    bias). Under a plan GSPMD partitions it (batch and heads; not the sequence)."""
    B, T = valid.shape
    mask = jnp.broadcast_to(valid[:, None, None, :], (B, 1, T, T))
    return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, is_causal=True,
                                        scale=scale, implementation=implementation)


def splash(q, k, v, valid, plan=None, *, interpret: bool = False):
    """The splash kernel over [B, T, heads, hd] arrays (q pre-scaled). T is padded to a multiple
    of the block (padding is segment 0) and cut back. Under a plan the kernel runs in shard_map
    (GSPMD cannot partition a Pallas call): batch over the batch axes and heads over tensor
    where they divide, as plan.spec gives, so q, k, v are never gathered."""
    B, T, H, hd = q.shape
    K = k.shape[2]
    pad = -T % LANES
    seg = jnp.pad(valid.astype(jnp.int32), ((0, 0), (0, pad)))
    q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3) for a in (q, k, v))
    local = functools.partial(_splash_local, interpret=interpret)
    if plan is not None:
        q_spec = plan.spec(("batch", "length", "act_heads", "head_dim"), (B, T, H, hd))
        kv_spec = plan.spec(("batch", "length", "act_kv_heads", "head_dim"), (B, T, K, hd))
        if q_spec[2] is not None and kv_spec[2] != q_spec[2]:
            # tensor divides the query heads but not the KV heads: give each query head its KV head
            # (local to every device, k and v are replicated over tensor) so they shard alike.
            k, v = jnp.repeat(k, H // K, axis=1), jnp.repeat(v, H // K, axis=1)
        heads = P(q_spec[0], q_spec[2])  # [B, heads, T, hd]; the kernel needs whole sequences
        local = jax.shard_map(local, mesh=plan.mesh, in_specs=(heads, heads, heads, P(q_spec[0])),
                              out_specs=heads, check_vma=False)
    return local(q, k, v, seg).transpose(0, 2, 1, 3)[:, :T]


def _splash_local(q, k, v, seg, *, interpret: bool):
    """[b, h, T, hd] x [b, k, T, hd] on one device: the kernel per row (its native GQA: query
    head i reads KV head i // (h // k)), made for these local shapes."""
    h, T = q.shape[1], q.shape[2]
    block = next(b for b in (512, 256, LANES) if T % b == 0)
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = sa.MultiHeadMask([sa.CausalMask((T, T))] * h)
    kernel = sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    run = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(s, s)))
    if q.dtype != jnp.float32:
        # Mosaic refuses a bfloat16 dot at precision HIGHEST ("Bad lhs type"), which the tests and
        # some runs set globally; bf16 products are exact in the kernel's float32 accumulators.
        run = _at_default_precision(run)
    return run(q, k, v, seg)


def _at_default_precision(fn):
    """fn traced with the default matmul precision, its backward too (the kernel's backward is
    traced when the VJP is transposed, outside any `with` around the call)."""
    @jax.custom_vjp
    def run(*args):
        with jax.default_matmul_precision("default"):
            return fn(*args)

    def fwd(*args):
        with jax.default_matmul_precision("default"):
            return jax.vjp(fn, *args)

    def bwd(vjp, cotangent):
        with jax.default_matmul_precision("default"):
            return vjp(cotangent)

    run.defvjp(fwd, bwd)
    return run
