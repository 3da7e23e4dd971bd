"""Per-chip memory estimate of DAIL's two phases, before any weight is loaded (the OPD estimate's
sharding arithmetic and layer model, opdjax.train.memory, applied to DAIL's arrays).

    est = estimate_dail_memory(config, model_cfg, num_devices=8, chip="h100")
    print(format_table(est)); check_fits(est)

Lengths: Pc = data.max_prompt_tokens (every context is at most this long, checked per record),
N = rollout.max_new_tokens (a trace is at most this long; training's response length).

resident (the whole run)
  M params                    model.dtype; synthesis, reference and (LoRA) base in one copy
  LoRA: adapter + AdamW       float32 adapter, 2 x adapter moments (optax default dtype)
  full FT: trainable + AdamW  a second copy of M (trained) + 2 x its moments; M stays frozen
synthesis ("rollout"; rows = synthesis.problems_per_batch * synthesis.num_samples)
  two KV caches               [L, rows, Pc + N, kv_heads, head_dim] x 2 (k, v) x 2 contexts
  prefill layer               one layer over the longer (expert) context, once per problem (its
                              samples then copy the cache)
  choice logits               [rows, V] float32 x 10 (two contexts: logits, softmax, top-n masks,
                              the retries' draws)
train step (rows = batch.sequences_per_step / batch.microbatches; T = Pc + N per context)
  gradients                   = trainable (x 2 with microbatches: accumulator + this one)
  saved layer inputs          (L + 1) x [rows, T, D]: only the student forward is differentiated
  layer fwd + bwd             2 x one layer's working set over T
  LoRA branch (float32)       2 x [rows, T, widest adapted in/out dim] float32: the adapter's term
                              s (x @ a) @ b beside its projection's accumulator (LoRA runs on the
                              activations: no merged weight, no weight-shaped gradient)
  reference hidden states     2 x [rows, N, D]: expert and hint contexts at the response positions
  reference layer             one layer's forward working set (no gradient, freed per layer)
  loss chunk                  [rows, c, V] float32 x 3 (student, positive, negative) x 2 (backward),
                              c = loss.chunk_tokens
"""
from __future__ import annotations

from opdjax import sharding
from opdjax.models import lora, qwen
from opdjax.models.config import ModelConfig
from opdjax.train.memory import (_ITEMSIZE, _SHORT, CHIPS, GPU_CHIPS, MemoryEstimate, Term, _dtype, _fmt_shape, _layer_working_set,
                                 _params_per_chip, _Shard, _usable, attention_block, check_fits, format_table)
from opdjax.errors import ConfigError

__all__ = ["estimate_dail_memory", "check_fits", "format_table"]

# The (input, output) of each adaptable projection, by the activation they are (their logical axes).
_ACT_DIMS = {"q": ("embed", "heads"), "k": ("embed", "kv_heads"), "v": ("embed", "kv_heads"),
             "o": ("heads", "embed"), "gate": ("embed", "mlp"), "up": ("embed", "mlp"), "down": ("mlp", "embed")}
_ACT_NAME = {"embed": "act_embed", "heads": "act_heads", "kv_heads": "act_kv_heads", "mlp": "act_mlp"}


def _flat_width(cfg: ModelConfig, target: str, side: int) -> int:
    """The flattened input (side 0) or output (side 1) width of a projection, as lora flattens it."""
    dims = {"embed": cfg.hidden_size, "heads": cfg.num_heads * cfg.head_dim,
            "kv_heads": cfg.num_kv_heads * cfg.head_dim, "mlp": cfg.intermediate_size}
    return dims[_ACT_DIMS[target][side]]


def estimate_dail_memory(config, cfg: ModelConfig, *, num_devices: int, chip: str | None = None,
                         usable_fraction: float | None = None, job: str | None = None) -> MemoryEstimate:
    """Peak bytes per chip of `config` (a `dail_config()`) with model `cfg` on `num_devices` chips
    of kind `chip`: the synthesis phase for job dail_synthesize, training for dail_train, the
    larger of the two otherwise (dail_demo runs both in one process; dail_eval is bounded by
    synthesis: one context, one cache)."""
    job = job or config.job
    synthesis = job != "dail_train"
    training = job not in ("dail_synthesize", "dail_eval")
    chip = chip or config.get("chip", None) or "cpu"
    if chip not in CHIPS:
        raise ConfigError(f"chip={chip!r} is unknown; known: {', '.join(CHIPS)}.")
    sh = _Shard(sharding.mesh_shape_from_config(config.mesh.shape, num_devices), config.mesh.get("sharding_rules", ()))
    dt = _dtype(config.model.dtype, cfg)
    b = _ITEMSIZE[dt]
    Pc, N = int(config.data.max_prompt_tokens), int(config.rollout.max_new_tokens)
    T = Pc + N
    V, D = cfg.vocab_size, cfg.hidden_size
    terms: list[Term] = []

    def add(name, phase, nbytes, what, divided):
        terms.append(Term(name, phase, int(nbytes), what, divided))

    # resident ------------------------------------------------------------------------------
    p, p_how = _params_per_chip(cfg, sh)
    add("M params", "resident", p * b, f"{cfg.num_params() / 1e9:.3g}B x {_SHORT[dt]}", p_how)
    trainable = 0
    if training and config.lora.enabled:
        spec = lora.LoraSpec.from_config(config.lora)
        shapes, axes = lora.lora_shapes(cfg, spec), lora.lora_axes(cfg, spec)
        n = sum(sh.elements(shapes[t][k], axes[t][k]) for t in shapes for k in shapes[t])
        add("LoRA adapter + AdamW", "resident", 3 * n * 4,
            f"3 x {lora.num_lora_params(cfg, spec) / 1e6:.3g}M f32 (r={spec.rank})", "as the adapted weights")
        trainable = n * 4
    elif training:
        add("trainable copy + AdamW", "resident", 3 * p * b, f"3 x {cfg.num_params() / 1e9:.3g}B x {_SHORT[dt]}",
            "as params")
        trainable = p * b

    # synthesis -------------------------------------------------------------------------------
    if synthesis:
        rows = int(config.synthesis.problems_per_batch) * int(config.synthesis.num_samples)
        cache_shape = qwen.cache_shape(cfg, rows, T)
        c_dtype = config.rollout.cache_dtype or dt
        cache = 2 * 2 * sh.elements(cache_shape, qwen.CACHE_AXES) * _ITEMSIZE[c_dtype]
        add("two KV caches", "rollout", cache, _fmt_shape(cache_shape, c_dtype, 4), sh.describe(cache_shape, qwen.CACHE_AXES))
        prompts = int(config.synthesis.problems_per_batch)  # each context is prefilled once per problem
        add("prefill layer", "rollout",
            _layer_working_set(cfg, prompts, Pc, T, min(Pc, qwen.ATTN_CHUNK), b, sh)
            + sh.elements((prompts, Pc, D), ("batch", "length", "act_embed")) * b,
            f"1 layer fwd, {prompts} prompt rows x {Pc} context tokens", sh.describe((prompts,), ("batch",)))
        add("choice logits", "rollout", 10 * sh.elements((rows, V), ("batch", "act_vocab")) * 4,
            _fmt_shape((rows, V), "float32", 10), sh.describe((rows, V), ("batch", "act_vocab")))
        # What the TPU compiler showed (job=compile): a second copy of the caches while decoding
        # (the prefill's working set is gone by then) and the unembedding gathered for the logits.
        # (TPU only: GPU's XLA was not measured here.)
        if chip not in GPU_CHIPS:
            prefill = terms[-2].bytes
            add("decode loop: second caches", "rollout", max(0, cache - prefill),
                "max(0, KV caches - prefill layer)", sh.describe(cache_shape, qwen.CACHE_AXES))
            add("gathered unembedding", "rollout", sh.elements((V, D), ("vocab", None)) * b,
                _fmt_shape((V, D), dt), sh.describe((V,), ("vocab",)))

    # train step ------------------------------------------------------------------------------
    if training:
        m = int(config.batch.microbatches)
        if int(config.batch.sequences_per_step) % m:
            raise ConfigError(f"batch.microbatches={m} must divide batch.sequences_per_step={config.batch.sequences_per_step}.")
        r = int(config.batch.sequences_per_step) // m
        hid = ("batch", "length", "act_embed")
        copies = 2 if m > 1 else 1
        add("gradients" + (" (+ accumulator)" if copies > 1 else ""), "train step", copies * trainable,
            f"{copies} x trainable", "as the trainable weights")
        add("saved layer inputs", "train step", (cfg.num_layers + 1) * sh.elements((r, T, D), hid) * b,
            _fmt_shape((r, T, D), dt, cfg.num_layers + 1), sh.describe((r, T, D), hid))
        block = attention_block(T)
        add("layer fwd + bwd", "train step", 3 * _layer_working_set(cfg, r, T, T, block, b, sh),
            f"2 x 1 student layer + 1 reference layer, {r} rows x {T}", sh.describe((r,), ("batch",)))
        if config.lora.enabled:
            # lora.adapter_delta: each adapted projection's float32 term [rows, T, out] (and, for a
            # bfloat16 model, the float32 copy of its input) lives beside the projection's float32
            # accumulator until they are added. Ours, measured: XLA:CPU's compiled step
            # (bench/bench_dail_lora.py, setup 8b: Qwen3-8B float32, r=32, 1 row x 2,304 tokens) has
            # 242 MiB more scratch than the former merge path, ~2 x [1, 2304, 12288] float32 (216
            # MiB); GPU and TPU, which can fuse the add into the matmul, were not measured.
            width, act = max((_flat_width(cfg, t, side), _ACT_NAME[name])
                               for t in lora.LoraSpec.from_config(config.lora).targets
                               for side, name in zip((0, 1), _ACT_DIMS[t]))
            shape = (r, T, width)
            add("LoRA branch (float32)", "train step", 2 * sh.elements(shape, ("batch", "length", act)) * 4,
                _fmt_shape(shape, "float32", 2), sh.describe(shape, ("batch", "length", act)))
        add("reference hidden states", "train step", 2 * sh.elements((r, N, D), hid) * b, _fmt_shape((r, N, D), dt, 2),
            sh.describe((r, N, D), hid))
        c = min(int(config.loss.chunk_tokens), N)
        chunk = (r, c, V)
        names = ("batch", "length", "act_vocab")
        add("loss chunk", "train step", 6 * sh.elements(chunk, names) * 4, _fmt_shape(chunk, "float32", 6),
            sh.describe(chunk, names))

    hbm = CHIPS[chip]
    return MemoryEstimate(chip=chip, hbm_bytes=hbm, usable_bytes=_usable(chip, hbm, usable_fraction),
                          num_devices=int(num_devices), mesh=dict(sh.sizes), terms=tuple(terms))
