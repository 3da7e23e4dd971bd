"""Per-chip memory estimate of an OPD run, before any weight is loaded or program compiled.

    est = estimate_memory(config, student_cfg, teacher_cfg, num_devices=32, chip="v5p")
    print(format_table(est))
    check_fits(est)        # raises DoesNotFitError (a ConfigError) with the table and fixes

Model configs come from the checkpoints' config.json, or from `opdjax.models.presets` when
there are no weights yet. Every number is bytes *per chip*: each array is divided over the
mesh exactly as `opdjax.sharding.DEFAULT_RULES` would divide it (the same `ShardingPlan.spec`
code, on an abstract mesh of the configured shape), including its rule that a dimension its
mesh axes do not divide is replicated. In short:

* student params, gradients, AdamW state and teacher params: `embed` over fsdp, `vocab`,
  `heads`, `kv_heads`, `mlp` over tensor; data replicates them.
* activations, KV cache, logits: rows (`batch`) over data x fsdp; heads, MLP and vocabulary
  columns over tensor; the hidden dimension is not divided.

What is counted (T = data.max_prompt_tokens + rollout.max_new_tokens, R = rollout.max_new_tokens):

resident (the whole run)
  student params            param dtype (student.dtype, or the checkpoint's)
  AdamW mu and nu           2 x params, in the param dtype: optax.adamw's default
                            (mu_dtype=None keeps the params' dtype; nu always does)
  teacher params            frozen; teacher.dtype
rollout phase (rows = batch.prompts_per_step * rollout.samples_per_prompt, all at once)
  sampler KV cache          k and v [L, rows, T, kv_heads, head_dim] in the param dtype + valid mask
  prefill working set       one layer's forward over the prompt (below), keys = T cache slots
  sampling logits           [rows, V] float32 x 6 (logits, log-softmax, top-p sort, cumsum, ...)
  decode loop: second cache max(0, cache - prefill layer): the TPU compiler holds two caches while
                            decoding (measured with job=compile), the prefill's working set is gone
  gathered unembedding      [V, D] / tensor: each decode step's logits gather it (job=compile)
teacher scoring phase (rows = rollout rows / batch.microbatches)
  teacher hidden states     [rows, T, D_teacher] in the teacher dtype
  teacher layer             one layer's forward working set (below)
  gathered unembedding      [V, D_teacher] / tensor: the scoring head gathers it once (job=compile)
  teacher logits chunk      [rows, c, V] float32 x 2 (logits, exp), c = min(R, max(1, 512 // rows))
                            (`teachability.scoring`'s chunks; candidates' log-probs are tiny)
train-step phase (rows = rollout rows / batch.microbatches)
  gradients                 = params (x 2 with microbatches > 1: accumulator + this microbatch)
  saved layer inputs        (L + 1) x [rows, T, D]: per-layer rematerialisation saves only
                            each layer's input (and the final hidden state)
  backward stack            L x [rows, T, D]: the cotangent stack beside the saved one (job=compile)
  layer fwd + bwd           2 x one layer's working set (recomputed forward and its cotangents)
  loss chunk                [rows, min(loss.chunk_tokens, R), V] float32 x (2 if the loss needs
                            teacher logits: reverse_kl_full | forward_kl_full | jsd) x 2 (backward)
  teacher hidden states     only for losses that need teacher logits (kept from scoring)

One layer's working set (the layer being run; params' dtype unless said):
  4 x [rows, T, D] (norms, residual, projections) + 2 x [rows, T, H, hd] (q, attention output)
  + 2 x [rows, T, K, hd] (k, v) + 3 x [rows, T, F] (gate, up, product)
  + [rows, H, block, keys] attention scores in float32 plus probabilities in the param dtype,
  block = the query block `qwen.apply` uses for T (128 rows up to T = 2048, up to 512 beyond).
  This assumes attention is not saved for all blocks at once during the backward pass (a
  block-wise recomputation or a flash/splash kernel); saving every block would add
  [rows, H, T, T/2].

The peak is the resident memory plus the largest phase (a phase's buffers are freed before the
next starts: the sampler returns tokens, not its cache; gradients live inside the train step),
plus OVERHEAD_FRACTION of that and XLA_SCRATCH_BYTES for compiler temporaries and fragmentation.
It is an estimate to reject hopeless configs before they compile, not a replacement for XLA's
own memory analysis: `job=compile` (opdjax.aot) gives the TPU compiler's per-phase numbers, and
the terms marked "job=compile" above were added where it disagreed (README, "Compile for TPU");
they apply to TPU chips (and "cpu"), not to GPUs, whose compiler was not measured here.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

from jax.sharding import AbstractMesh

from opdjax import sharding
from opdjax.models import qwen
from opdjax.errors import ConfigError, DoesNotFitError
from opdjax.models.config import ModelConfig
from opdjax import losses

GiB = 1024 ** 3
MiB = 1024 ** 2

# HBM per chip (bytes): the vendors' published capacities (cloud.google.com/tpu/docs/v4, v5e,
# v5p, v6e: 32, 16, 95, 32 GB; NVIDIA H100 SXM 80 GB, H200 141 GB). "cpu" = no check.
CHIPS: dict[str, int | None] = {
    "v4": 32 * GiB,
    "v5e": 16 * GiB,
    "v5p": 95 * GiB,
    "v6e": 32 * GiB,
    "h100": 80 * GiB,
    "h200": 141 * GiB,
    "cpu": None,
}
GPU_CHIPS = ("h100", "h200")
# JAX on a GPU preallocates and then uses only this fraction of the memory unless
# XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise (JAX's documented default).
GPU_DEFAULT_MEM_FRACTION = 0.75

OVERHEAD_FRACTION = 0.10
XLA_SCRATCH_BYTES = 512 * MiB
SCORING_CHUNK_TOKENS = 512  # opdjax.teachability.scoring.DEFAULT_CHUNK_TOKENS
LOSSES_WITH_TEACHER_LOGITS = ("reverse_kl_full", "forward_kl_full", "jsd")  # fallback; losses.LOSSES decides
PHASES = ("resident", "rollout", "teacher scoring", "train step")

_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class Term:
    name: str
    phase: str  # one of PHASES
    bytes: int  # per chip
    what: str  # the global array(s), e.g. "2 x [36, 512, 5120, 8, 128] bf16"
    divided: str  # how the mesh divides it, e.g. "batch/32"


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    chip: str
    hbm_bytes: int | None
    usable_bytes: int | None  # what the runtime lets us use (GPU: mem fraction)
    num_devices: int
    mesh: dict[str, int]
    terms: tuple[Term, ...]
    overhead_fraction: float = OVERHEAD_FRACTION
    scratch_bytes: int = XLA_SCRATCH_BYTES

    def phase_bytes(self, phase: str) -> int:
        return sum(t.bytes for t in self.terms if t.phase == phase)

    @property
    def resident_bytes(self) -> int:
        return self.phase_bytes("resident")

    @property
    def peak_phase(self) -> str:
        return max(PHASES[1:], key=self.phase_bytes)

    @property
    def subtotal_bytes(self) -> int:
        return self.resident_bytes + self.phase_bytes(self.peak_phase)

    @property
    def overhead_bytes(self) -> int:
        return int(round(self.overhead_fraction * self.subtotal_bytes)) + self.scratch_bytes

    @property
    def total_bytes(self) -> int:
        return self.subtotal_bytes + self.overhead_bytes

    @property
    def biggest_term(self) -> Term:
        return max(self.terms, key=lambda t: t.bytes)

    @property
    def fits(self) -> bool:
        return self.usable_bytes is None or self.total_bytes <= self.usable_bytes

    def term(self, name: str) -> Term:
        for t in self.terms:
            if t.name == name:
                return t
        raise KeyError(name)


# ------------------------------------------------------------------------------------ helpers
def _dtype(field: str, model_cfg: ModelConfig) -> str:
    name = str(field or model_cfg.dtype)
    if name not in _ITEMSIZE:
        raise ConfigError(f"dtype {name!r} is not one of {', '.join(_ITEMSIZE)}.")
    return name


_SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "bool": "bool"}


class _Shard:
    """Per-chip sizes under the project's sharding rules on an abstract (device-less) mesh."""

    def __init__(self, mesh_shape: Sequence[int], rules=()):
        self.mesh_shape = tuple(mesh_shape)
        self.plan = sharding.ShardingPlan(AbstractMesh(self.mesh_shape, sharding.MESH_AXES),
                                          sharding.rules_from_config(rules))
        self.sizes = dict(zip(sharding.MESH_AXES, self.mesh_shape))

    def divisor(self, shape, names) -> int:
        spec = self.plan.spec(tuple(names), tuple(shape))
        return math.prod(self.sizes[a] for entry in spec if entry is not None
                         for a in ((entry,) if isinstance(entry, str) else entry))

    def elements(self, shape, names) -> int:
        n = math.prod(shape)
        return n // self.divisor(shape, names)

    def describe(self, shape, names) -> str:
        spec = self.plan.spec(tuple(names), tuple(shape))
        parts = []
        for name, entry in zip(names, spec):
            if entry is None:
                continue
            axes = (entry,) if isinstance(entry, str) else tuple(entry)
            parts.append(f"{name}/{math.prod(self.sizes[a] for a in axes)}")
        if not parts:
            return "whole (1 chip)" if math.prod(self.mesh_shape) == 1 else "replicated"
        return " ".join(parts)


def _params_per_chip(cfg: ModelConfig, sh: _Shard) -> tuple[int, str]:
    """Parameter elements per chip, and a short description of how they are divided."""
    shapes, axes = qwen.param_shapes(cfg), qwen.param_axes(cfg)
    leaves_s = _leaves(shapes)
    leaves_a = _leaves(axes)
    total = sum(sh.elements(s, a) for s, a in zip(leaves_s, leaves_a))
    full = sum(math.prod(s) for s in leaves_s)
    ratio = full / total if total else 1.0
    return total, f"{full / 1e9:.3g}B params, ~1/{ratio:.3g} per chip (embed/fsdp; vocab, heads, mlp/tensor)"


def _leaves(tree) -> list[tuple]:
    out = []

    def walk(t):
        if isinstance(t, dict):
            for k in sorted(t):
                walk(t[k])
        else:
            out.append(t)
    walk(tree)
    return out


def attention_block(T: int) -> int:
    """Query rows per attention block that `qwen.apply` uses for a no-cache forward over T tokens."""
    block = min(qwen.ATTN_CHUNK, max(qwen.ATTN_BLOCK, -(-T // qwen.ATTN_MAX_BLOCKS)))
    if T <= block:
        return T
    if T > block * qwen.ATTN_MAX_BLOCKS:
        return qwen.ATTN_CHUNK
    return block


def _layer_working_set(cfg: ModelConfig, rows: int, T: int, keys: int, block: int, itemsize: int,
                       sh: _Shard) -> int:
    """Bytes per chip of one decoder layer's forward intermediates (see the module docstring)."""
    D, F, H, K, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    e = 4 * sh.elements((rows, T, D), ("batch", "length", "act_embed"))
    e += 2 * sh.elements((rows, T, H, hd), ("batch", "length", "act_heads", "head_dim"))
    e += 2 * sh.elements((rows, T, K, hd), ("batch", "length", "act_kv_heads", "head_dim"))
    e += 3 * sh.elements((rows, T, F), ("batch", "length", "act_mlp"))
    scores = sh.elements((rows, H, block, keys), ("batch", "act_heads", "length", None))
    return e * itemsize + scores * (4 + itemsize)


def _fmt_shape(shape, dtype: str, times: int = 1) -> str:
    s = f"[{', '.join(str(int(x)) for x in shape)}] {_SHORT.get(dtype, dtype)}"
    return f"{times} x {s}" if times != 1 else s


def _usable(chip: str, hbm: int | None, usable_fraction: float | None) -> int | None:
    if hbm is None:
        return None
    if usable_fraction is None:
        usable_fraction = 1.0
        if chip in GPU_CHIPS:
            usable_fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_DEFAULT_MEM_FRACTION))
    return int(hbm * usable_fraction)


# ----------------------------------------------------------------------------------- estimate
def estimate_memory(config, student_cfg: ModelConfig, teacher_cfg: ModelConfig, *, num_devices: int,
                    chip: str | None = None, usable_fraction: float | None = None) -> MemoryEstimate:
    """Peak bytes per chip of an OPD run of `config` (an `opd_config()` ConfigDict) on
    `num_devices` chips of kind `chip` (a key of CHIPS; default `config.chip`, else "cpu").

    usable_fraction: share of HBM the runtime may use; default 1 on TPU, and on GPU
    $XLA_PYTHON_CLIENT_MEM_FRACTION or JAX's default 0.75.
    """
    chip = chip or config.get("chip", None) or "cpu"
    if chip not in CHIPS:
        raise ConfigError(f"chip={chip!r} is unknown; known: {', '.join(CHIPS)}.")
    mesh_shape = sharding.mesh_shape_from_config(config.mesh.shape, num_devices)
    sh = _Shard(mesh_shape, config.mesh.get("sharding_rules", ()))

    s_dtype = _dtype(config.student.dtype, student_cfg)
    t_dtype = _dtype(config.teacher.dtype, teacher_cfg)
    sb, tb = _ITEMSIZE[s_dtype], _ITEMSIZE[t_dtype]
    P, R = int(config.data.max_prompt_tokens), int(config.rollout.max_new_tokens)
    T = P + R
    rollout_rows = int(config.batch.prompts_per_step) * int(config.rollout.samples_per_prompt)
    microbatches = int(config.batch.microbatches)
    if microbatches < 1 or rollout_rows % microbatches:
        raise ConfigError(f"batch.microbatches={microbatches} must divide the rollout rows "
                          f"batch.prompts_per_step * rollout.samples_per_prompt = {rollout_rows}.")
    rows = rollout_rows // microbatches
    S, Tc = student_cfg, teacher_cfg
    V = S.vocab_size
    terms: list[Term] = []

    def add(name, phase, nbytes, what, divided):
        terms.append(Term(name, phase, int(nbytes), what, divided))

    # resident ------------------------------------------------------------------------------
    sp, sp_how = _params_per_chip(S, sh)
    tp, tp_how = _params_per_chip(Tc, sh)
    add("student params", "resident", sp * sb, f"{S.num_params() / 1e9:.3g}B x {_SHORT[s_dtype]}", sp_how)
    add("AdamW mu, nu", "resident", 2 * sp * sb, f"2 x params, {_SHORT[s_dtype]} (optax default)",
        "as params")
    add("teacher params", "resident", tp * tb, f"{Tc.num_params() / 1e9:.3g}B x {_SHORT[t_dtype]} (frozen)",
        tp_how)

    # rollout ---------------------------------------------------------------------------------
    cache_shape = qwen.cache_shape(S, rollout_rows, T)
    c_dtype = config.rollout.get("cache_dtype", "") or s_dtype
    cache = 2 * sh.elements(cache_shape, qwen.CACHE_AXES) * _ITEMSIZE[c_dtype]
    cache += sh.elements((rollout_rows, T), ("batch", "cache_length"))  # valid mask, bool
    add("sampler KV cache", "rollout", cache, _fmt_shape(cache_shape, c_dtype, 2),
        sh.describe(cache_shape, qwen.CACHE_AXES))
    prefill_block = min(P, qwen.ATTN_CHUNK)
    add("prefill layer", "rollout",
        _layer_working_set(S, rollout_rows, P, T, prefill_block, sb, sh)
        + sh.elements((rollout_rows, P, S.hidden_size), ("batch", "length", "act_embed")) * sb,
        f"1 layer fwd, {rollout_rows} rows x {P} prompt tokens", sh.describe((rollout_rows,), ("batch",)))
    add("sampling logits", "rollout", 6 * sh.elements((rollout_rows, V), ("batch", "act_vocab")) * 4,
        _fmt_shape((rollout_rows, V), "float32", 6), sh.describe((rollout_rows, V), ("batch", "act_vocab")))
    # The TPU compiler keeps a second cache beside the one the decode loop carries (job=compile:
    # temporaries ~2.2 x the cache). The prefill's working set is gone by then, so the phase peaks
    # at the larger of the two: this term is what the decode loop adds beyond the prefill.
    # (These compiler-measured terms are TPU's; GPU's XLA was not measured here.)
    tpu = chip not in GPU_CHIPS
    if tpu:
        prefill = next(t.bytes for t in terms if t.name == "prefill layer")
        add("decode loop: second cache", "rollout", max(0, cache - prefill),
            "max(0, KV cache - prefill layer): 2 caches while decoding", "batch/fsdp (as the cache)")
        add("gathered unembedding", "rollout", sh.elements((V, S.hidden_size), ("vocab", None)) * sb,
            _fmt_shape((V, S.hidden_size), s_dtype), sh.describe((V,), ("vocab",)))

    # teacher scoring -------------------------------------------------------------------------
    hid_names = ("batch", "length", "act_embed")
    t_hidden = sh.elements((rows, T, Tc.hidden_size), hid_names) * tb
    add("teacher hidden states", "teacher scoring", t_hidden, _fmt_shape((rows, T, Tc.hidden_size), t_dtype),
        sh.describe((rows, T, Tc.hidden_size), hid_names))
    block = attention_block(T)
    add("teacher layer fwd", "teacher scoring", _layer_working_set(Tc, rows, T, T, block, tb, sh),
        f"1 layer, {rows} rows x {T}, attn block {block}", sh.describe((rows,), ("batch",)))
    # The scoring head gathers the embed (fsdp) dimension of the unembedding once, outside its
    # chunk loop (the compiler shows the whole [V, D] table per chip when tensor = 1).
    if tpu:
        add("gathered unembedding", "teacher scoring",
            sh.elements((Tc.vocab_size, Tc.hidden_size), ("vocab", None)) * tb,
            _fmt_shape((Tc.vocab_size, Tc.hidden_size), t_dtype), sh.describe((Tc.vocab_size,), ("vocab",)))
    c = min(R, max(1, SCORING_CHUNK_TOKENS // rows))
    chunk_shape = (rows, c, Tc.vocab_size)
    logit_names = ("batch", "length", "act_vocab")
    add("teacher logits chunk", "teacher scoring", 2 * sh.elements(chunk_shape, logit_names) * 4,
        _fmt_shape(chunk_shape, "float32", 2), sh.describe(chunk_shape, logit_names))

    # train step ------------------------------------------------------------------------------
    grad_copies = 2 if microbatches > 1 else 1
    add("gradients" + (" (+ accumulator)" if grad_copies > 1 else ""), "train step", grad_copies * sp * sb,
        f"{grad_copies} x params, {_SHORT[s_dtype]}", "as params")
    saved_shape = (rows, T, S.hidden_size)
    add("saved layer inputs", "train step", (S.num_layers + 1) * sh.elements(saved_shape, hid_names) * sb,
        _fmt_shape(saved_shape, s_dtype, S.num_layers + 1), sh.describe(saved_shape, hid_names))
    # The backward scan reads the saved stack while writing its own [L, rows, T, D] cotangent
    # stack: the compiler holds two such stacks at the backward's start (job=compile).
    if tpu:
        add("backward stack", "train step", S.num_layers * sh.elements(saved_shape, hid_names) * sb,
            _fmt_shape(saved_shape, s_dtype, S.num_layers), sh.describe(saved_shape, hid_names))
    add("layer fwd + bwd", "train step", 2 * _layer_working_set(S, rows, T, T, block, sb, sh),
        f"2 x 1 layer, {rows} rows x {T}, attn block {block}", sh.describe((rows,), ("batch",)))
    needs_teacher_logits = _needs_teacher_logits(str(config.loss.name))
    n_logits = 2 if needs_teacher_logits else 1
    loss_shape = (rows, min(int(config.loss.chunk_tokens), R), V)
    add("loss chunk", "train step", 2 * n_logits * sh.elements(loss_shape, logit_names) * 4,
        _fmt_shape(loss_shape, "float32", 2 * n_logits), sh.describe(loss_shape, logit_names))
    if needs_teacher_logits:
        add("teacher hidden (loss)", "train step", t_hidden, _fmt_shape((rows, T, Tc.hidden_size), t_dtype),
            sh.describe((rows, T, Tc.hidden_size), hid_names))

    hbm = CHIPS[chip]
    return MemoryEstimate(chip=chip, hbm_bytes=hbm, usable_bytes=_usable(chip, hbm, usable_fraction),
                          num_devices=int(num_devices), mesh=dict(sh.sizes), terms=tuple(terms))


def _needs_teacher_logits(loss_name: str) -> bool:
    """The loss registry's declaration (opdjax.losses.LOSSES); the fixed list if it is unavailable."""
    try:
        spec = losses.LOSSES.get(loss_name)
        if spec is not None:
            return bool(spec.needs_teacher_logits)
    except ImportError:  # pragma: no cover
        pass
    return loss_name in LOSSES_WITH_TEACHER_LOGITS


# ------------------------------------------------------------------------------------ reports
def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def format_table(est: MemoryEstimate) -> str:
    """A Markdown table of the estimate (GiB per chip), for logs and error messages."""
    lines = [f"memory per chip: {est.chip} x {est.num_devices}, mesh (data, fsdp, tensor) = "
             f"({', '.join(str(v) for v in est.mesh.values())})",
             "",
             "| term | phase | GiB/chip | global arrays | divided by |",
             "|---|---|---:|---|---|"]
    for t in est.terms:
        mark = "" if t.phase in ("resident", est.peak_phase) else " (not at peak)"
        lines.append(f"| {t.name} | {t.phase}{mark} | {_gib(t.bytes)} | {t.what} | {t.divided} |")
    for phase in PHASES:
        lines.append(f"| *{phase} total* | | {_gib(est.phase_bytes(phase))} | | |")
    lines.append(f"| *overhead* | {est.overhead_fraction:.0%} + XLA scratch | {_gib(est.overhead_bytes)} | | |")
    lines.append(f"| **peak** | resident + {est.peak_phase} + overhead | **{_gib(est.total_bytes)}** | | |")
    if est.hbm_bytes is None:
        lines.append(f"| HBM | {est.chip}: not checked | - | | |")
    else:
        usable = "" if est.usable_bytes == est.hbm_bytes else f" (usable {_gib(est.usable_bytes)})"
        verdict = "fits" if est.fits else "DOES NOT FIT"
        lines.append(f"| HBM | {est.chip}{usable} | {_gib(est.hbm_bytes)} | {verdict} | |")
    return "\n".join(lines)


def check_fits(est: MemoryEstimate, config=None, student_cfg: ModelConfig | None = None,
               teacher_cfg: ModelConfig | None = None) -> MemoryEstimate:
    """Return `est` if it fits the chip (or the chip is "cpu"); else raise DoesNotFitError with the
    table, the total against the HBM, the biggest term and fixes. With the config and the two
    model configs, each fix is re-estimated and its peak is given."""
    if est.fits:
        return est
    big = est.biggest_term
    head = (f"the config does not fit on {est.chip}: estimated peak {_gib(est.total_bytes)} GiB per chip > "
            f"{_gib(est.usable_bytes)} GiB usable of {_gib(est.hbm_bytes)} GiB HBM "
            f"({est.chip} x {est.num_devices}, mesh {tuple(est.mesh.values())}). Biggest term: {big.name} "
            f"({_gib(big.bytes)} GiB, {big.phase}).")
    fixes = suggestions(est, config, student_cfg, teacher_cfg)
    body = "\n".join(f"  - {f}" for f in fixes)
    raise DoesNotFitError(f"{head}\n\n{format_table(est)}\n\nTry:\n{body}")


def suggestions(est: MemoryEstimate, config=None, student_cfg=None, teacher_cfg=None) -> list[str]:
    """Concrete changes that lower the peak. With the configs, each is re-estimated (only changes
    that help are listed, with their peak), then all of them together, then the fewest chips."""
    if config is None or student_cfg is None or teacher_cfg is None:
        return ["more fsdp: --config.mesh.shape='(1, -1, 1)' (params, gradients, AdamW state)",
                "--config.batch.microbatches=<more> (train-step activations)",
                "--config.student.dtype=bfloat16 / --config.teacher.dtype=bfloat16",
                "--config.rollout.samples_per_prompt=<fewer> (KV cache and activations)",
                "more chips"]
    tensor = est.mesh["tensor"]

    def run(edits, num_devices=None):
        c = _unlocked(config)
        for edit in edits:
            edit(c)
        try:
            return estimate_memory(c, student_cfg, teacher_cfg, num_devices=num_devices or est.num_devices,
                                   chip=est.chip, usable_fraction=_fraction(est))
        except (ConfigError, ValueError):
            return None

    cands: list[tuple[str, object]] = []
    if est.mesh["fsdp"] * tensor < est.num_devices:
        cands.append((f"more fsdp: --config.mesh.shape='(1, -1, {tensor})' (params, gradients and AdamW "
                      f"state {est.num_devices}-way instead of {est.mesh['fsdp'] * tensor}-way)",
                      lambda c: setattr(c.mesh, "shape", (1, -1, tensor))))
    mb = int(config.batch.microbatches)
    rollout_rows = int(config.batch.prompts_per_step) * int(config.rollout.samples_per_prompt)
    for m in (mb * 8, mb * 4, mb * 2):
        if m <= rollout_rows and rollout_rows % m == 0:
            cands.append((f"more microbatches: --config.batch.microbatches={m} (train-step and scoring "
                          f"activations / {m // mb})", lambda c, m=m: setattr(c.batch, "microbatches", m)))
            break
    for who, mcfg in (("student", student_cfg), ("teacher", teacher_cfg)):
        if _dtype(getattr(config, who).dtype, mcfg) == "float32":
            what = "params, AdamW state, gradients and KV cache" if who == "student" else "params"
            cands.append((f"bf16 {who}: --config.{who}.dtype=bfloat16 (halves its {what})",
                          lambda c, who=who: setattr(getattr(c, who), "dtype", "bfloat16")))
    spp = int(config.rollout.samples_per_prompt)
    if spp > 1:
        cands.append((f"fewer samples: --config.rollout.samples_per_prompt={spp // 2} (rollout rows / 2)",
                      lambda c: setattr(c.rollout, "samples_per_prompt", spp // 2)))
    pps = int(config.batch.prompts_per_step)
    if pps > 1:
        cands.append((f"fewer prompts: --config.batch.prompts_per_step={pps // 2} (rollout rows / 2)",
                      lambda c: setattr(c.batch, "prompts_per_step", pps // 2)))

    out, helping = [], []
    for label, edit in cands:
        e = run([edit])
        if e is not None and e.total_bytes < est.total_bytes:
            helping.append(edit)
            out.append(f"{label}: peak {_gib(e.total_bytes)} GiB ({'fits' if e.fits else 'not enough alone'})")
    if len(helping) > 1:
        e = run(helping)
        if e is not None:
            out.append(f"all of the above together: peak {_gib(e.total_bytes)} GiB "
                       f"({'fits' if e.fits else 'still too big'})")
    fill = lambda c: setattr(c.mesh, "shape", (1, -1, tensor))
    for k in range(1, 11):
        n = est.num_devices * 2 ** k
        e = run([fill], num_devices=n)
        if e is not None and e.fits:
            out.append(f"more chips: {n} {est.chip} chips with --config.mesh.shape='(1, -1, {tensor})': "
                       f"peak {_gib(e.total_bytes)} GiB (fits)")
            break
    else:
        out.append(f"more chips alone does not help up to {est.num_devices * 2 ** 10} {est.chip} chips")
    return out


def _fraction(est: MemoryEstimate) -> float | None:
    if est.hbm_bytes is None or est.usable_bytes is None:
        return None
    return est.usable_bytes / est.hbm_bytes


def _unlocked(c):
    try:
        import ml_collections
        if isinstance(c, ml_collections.ConfigDict):
            c = ml_collections.ConfigDict(c.to_dict())  # an unlocked, independent copy
    except ImportError:  # pragma: no cover
        pass
    return c


def summary_gib(est: MemoryEstimate) -> dict[str, float]:
    """{term name: GiB per chip} plus "peak", for tests and logs."""
    out = {t.name: round(t.bytes / GiB, 3) for t in est.terms}
    out["peak"] = round(est.total_bytes / GiB, 3)
    return out


__all__ = ["CHIPS", "DoesNotFitError", "MemoryEstimate", "Term", "attention_block", "check_fits",
           "estimate_memory", "format_table", "suggestions", "summary_gib"]
