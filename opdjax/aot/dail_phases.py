"""DAIL's jitted phases as its jobs call them: the mixed rollout (synthesis), the contrastive
train step (full fine-tuning or LoRA), and budgeted evaluation sampling. Shapes are the largest
the config allows (contexts of data.max_prompt_tokens, traces of rollout.max_new_tokens or
train.max_response_tokens, lengths rounded up as `contrastive.align` rounds them)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from opdjax.aot.phases import Phase, abstract_key, abstract_tree, lowering_stop_ids, sds
from opdjax.dail import config as dail_config_lib
from opdjax.dail import contrastive
from opdjax.dail.distill import make_step
from opdjax.models import lora, qwen
from opdjax.models.config import ModelConfig
from opdjax.rollout import mixed
from opdjax.rollout.sampler import SamplingSettings, sample
from opdjax.sharding import ShardingPlan
from opdjax.train.loop import init_state, make_optimizer, state_shardings_for

ALIGN_MULTIPLE = 16  # contrastive.align's default length_multiple
EVAL_MULTIPLE = 32  # eval.budget's default length_multiple


def _round(n: int, m: int) -> int:
    return -(-int(n) // m) * m


def dail_phases(config, cfg: ModelConfig, plan: ShardingPlan) -> list[Phase]:
    c = config
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[c.model.dtype]
    params = abstract_tree(qwen.abstract_params(cfg, dtype), qwen.param_shardings(cfg, plan))
    key = abstract_key(plan)
    row = ("batch", "length")
    i32 = jnp.int32
    P = int(c.data.max_prompt_tokens)
    stops = lowering_stop_ids((cfg,))
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else stops[0]
    phases = []

    # synthesis: one prompt row per problem, num_samples rows each
    s = c.synthesis
    ppb, n = int(s.problems_per_batch), int(s.num_samples)
    settings = mixed.MixedSettings(max_new_tokens=int(c.rollout.max_new_tokens), accept_threshold=dail_config_lib.accept_threshold_for(c),
                                   top_n=int(s.top_n), retries=int(s.retries), stop_ids=stops, banned_ids=(),
                                   cache_dtype=c.rollout.cache_dtype).check(cfg.vocab_size)
    prompt = lambda dt: sds(plan, (ppb, P), dt, row)  # noqa: E731
    phases.append(Phase("mixed rollout", mixed.mixed_rollout, (params, prompt(i32), prompt(bool), prompt(i32),
                                                                prompt(bool), key),
                        dict(cfg=cfg, settings=settings, pad_id=pad_id, plan=plan, samples=n),
                        f"{ppb} problems x {n} samples: student and expert contexts of {P}, {c.rollout.max_new_tokens} new "
                        "tokens", calls_per_step=1, per_step=False))

    # the contrastive step
    t = c.train
    B = int(c.batch.sequences_per_step)
    R = _round(int(t.max_response_tokens) or int(c.rollout.max_new_tokens), ALIGN_MULTIPLE)
    T = _round(P + R, ALIGN_MULTIPLE)
    spec = lora.LoraSpec.from_config(c.lora) if c.lora.enabled else None
    steps = max(1, int(t.epochs))
    tx = make_optimizer(c.optimizer, steps)
    if spec is None:
        trainable, trainable_sh = qwen.abstract_params(cfg, dtype), qwen.param_shardings(cfg, plan)
    else:
        trainable, trainable_sh = lora.abstract_lora(cfg, spec, jnp.float32), lora.lora_shardings(cfg, spec, plan)
    state_sh = state_shardings_for(tx, trainable, trainable_sh, plan)
    state = abstract_tree(jax.eval_shape(lambda p: init_state(p, tx), trainable), state_sh)
    step = make_step(cfg, tx, config, spec, plan, state_sh)
    ctx = [sds(plan, (B, T), i32, row), sds(plan, (B, T), bool, row), sds(plan, (B, R), i32, row)]
    batch = contrastive.AlignedBatch(*ctx, *ctx, *ctx, sds(plan, (B, R), i32, row), sds(plan, (B, R), bool, row))
    phases.append(Phase("contrastive step", step, (state, params, batch, sds(plan, (B, R), jnp.float32, row)), {},
                        f"{B} traces x 3 contexts of {T} tokens ({R} response), {c.batch.microbatches} microbatch(es), "
                        f"{'LoRA r=' + str(spec.rank) if spec else 'full fine-tuning'}"))

    # evaluation: budgeted sampling, rows_per_call rows, the largest budget
    e = c.eval
    shards = plan.batch_shards  # dail_eval: whenever eval.problems is given
    rows = max(shards, _round(int(e.rows_per_call), shards))
    L = _round(P, EVAL_MULTIPLE)
    prompts = (sds(plan, (rows, L), i32, row), sds(plan, (rows, L), bool, row))
    es = SamplingSettings(max(e.budgets), float(e.temperature), float(e.top_p), candidates=1, stop_ids=stops,
                          presence_penalty=float(e.presence_penalty))  # its [B, V] mask is part of the footprint
    phases.append(Phase("eval sampling", sample, (params, *prompts, key), dict(cfg=cfg, settings=es, pad_id=pad_id,
                                                                           plan=plan),
                        f"{rows} rows x {max(e.budgets)} tokens (largest budget)", per_step=False))
    return phases
