"""Every jitted phase of an OPD run as the run calls it: the same functions, static arguments,
shardings and donation, on abstract arguments (`jax.ShapeDtypeStruct` with a NamedSharding), so
`fn.lower(*args, **static).compile()` is the program a TPU would run.

Shapes are the largest a run can feed (a prompt of data.max_prompt_tokens, responses of
rollout.max_new_tokens, release.max_sentences sentences); the loop in `opd.run` feeds these
functions exactly these argument structures.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from opdjax import losses
from opdjax.models import qwen
from opdjax.models.config import ModelConfig
from opdjax.rollout.sampler import SamplingSettings, sample
from opdjax.rollout.stops import stop_ids
from opdjax.sharding import ShardingPlan
from opdjax.teachability import margins, rule
from opdjax.teachability.scoring import teacher_logprobs
from opdjax.train.loop import init_state, make_optimizer
from opdjax.train.step import TrainBatch, jit_train_step, state_shardings, step_settings_from_config


@dataclasses.dataclass
class Phase:
    name: str
    fn: Callable  # a jitted function (has .lower)
    args: tuple  # abstract positional arguments
    static: dict  # keyword arguments passed as is (static / hashable)
    what: str  # one line: the shapes it runs on
    # the run's long-lived arrays (train state, teacher) that sit in HBM during this phase without
    # being arguments of it: bytes per chip, added to the program's own peak
    resident_outside: int = 0
    calls_per_step: float = 1.0  # how many times one training step runs it (eval: per evaluation)
    per_step: bool = True  # part of a training step (eval phases are not)


def sds(plan: ShardingPlan, shape, dtype, names) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=plan.sharding(names, tuple(shape)))


def abstract_tree(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def abstract_key(plan: ShardingPlan) -> jax.ShapeDtypeStruct:
    dtype = jax.eval_shape(lambda: jax.random.key(0)).dtype
    return jax.ShapeDtypeStruct((), dtype, sharding=plan.sharding(()))


def per_chip_bytes(tree) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs with shardings (the largest shard)."""
    total = 0
    for a in jax.tree.leaves(tree):
        shard = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
        n = 1
        for d in shard:
            n *= d
        total += n * _itemsize(a.dtype)
    return total


def _itemsize(dtype) -> int:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):  # a typed key: its uint32 key data
        return 4 * jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape[-1]
    return jnp.dtype(dtype).itemsize


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def lowering_stop_ids(cfgs, extra=()) -> tuple[int, ...]:
    """The stop ids without a tokenizer (config.json's); any id when there is none, as which one
    does not change the lowered program."""
    return stop_ids(cfgs=cfgs, extra=extra) or (0,)


def opd_phases(config, student_cfg: ModelConfig, teacher_cfg: ModelConfig, release: rule.ReleaseSettings,
               plan: ShardingPlan) -> list[Phase]:
    """sample, score, margins, release decision, train step, eval sampling (as `opd.run`)."""
    c = config
    B = c.batch.prompts_per_step * c.rollout.samples_per_prompt
    P, N, K = c.data.max_prompt_tokens, c.rollout.max_new_tokens, release.top_k
    T = P + N
    pad_id = student_cfg.pad_token_id or 0
    s_dtype, t_dtype = _dtype(c.student.dtype), _dtype(c.teacher.dtype)
    stops = lowering_stop_ids((student_cfg,), c.rollout.stop_tokens)

    tx = make_optimizer(c.optimizer, c.train.steps)
    st_sh = state_shardings(tx, student_cfg, plan, s_dtype)
    state = abstract_tree(jax.eval_shape(lambda p: init_state(p, tx), qwen.abstract_params(student_cfg, s_dtype)),
                          st_sh)
    teacher = abstract_tree(qwen.abstract_params(teacher_cfg, t_dtype), qwen.param_shardings(teacher_cfg, plan))
    state_bytes, teacher_bytes = per_chip_bytes(state), per_chip_bytes(teacher)
    params_bytes = per_chip_bytes(state["params"])
    key = abstract_key(plan)
    row = ("batch", "length")
    i32, f32 = jnp.int32, jnp.float32

    sampling = SamplingSettings(N, float(c.rollout.temperature), float(c.rollout.top_p), int(c.rollout.top_k), K,
                                stops, c.rollout.cache_dtype).check(student_cfg.vocab_size)
    phases = [Phase("sample", sample, (state["params"], sds(plan, (B, P), i32, row), sds(plan, (B, P), bool, row), key),
                    dict(cfg=student_cfg, settings=sampling, pad_id=pad_id, plan=plan),
                    f"{B} rows: prefill {P} + decode {N} tokens, top-{K} recorded",
                    resident_outside=state_bytes - params_bytes + teacher_bytes)]

    phases.append(Phase(
        "teacher scoring", teacher_logprobs,
        (teacher, sds(plan, (B, T), i32, row), sds(plan, (B, T), bool, row), sds(plan, (B, N, K), i32, row + (None,))),
        dict(cfg=teacher_cfg, prompt_len=P, chunk_tokens=c.loss.chunk_tokens, plan=plan,
             microbatches=c.batch.microbatches),
        f"{B} rows x {T} tokens in {c.batch.microbatches} microbatch(es), {K + 1} log-probs per response token",
        resident_outside=state_bytes))

    resp = lambda dt: sds(plan, (B, N), dt, row)  # noqa: E731
    cand = lambda dt: sds(plan, (B, N, K), dt, row + (None,))  # noqa: E731
    phases.append(Phase(
        "release margins", margins.margin,
        (release.margin, resp(f32), resp(f32), cand(f32), cand(f32), cand(i32), resp(i32), resp(bool)), {},
        f"{B} x {N} tokens, {K} candidates", resident_outside=state_bytes + teacher_bytes))
    width = rule.scan_width(release.max_sentences, release)
    phases.append(Phase(
        "release decision", rule._decide,
        (release, width, resp(f32), resp(bool), resp(f32), resp(i32), resp(bool), key), {},
        f"{B} rows x {width} sentences (release.max_sentences), {release.calibration}",
        resident_outside=state_bytes + teacher_bytes))

    step_settings = step_settings_from_config(c, P)
    step = jit_train_step(tx, student_cfg, teacher_cfg, step_settings, plan, s_dtype)
    batch = TrainBatch(sds(plan, (B, T), i32, row), sds(plan, (B, T), bool, row),
                       losses.LossInputs(resp(i32), resp(f32), resp(f32), cand(i32), cand(f32)), resp(f32))
    phases.append(Phase("train step", step, (state, batch, teacher), {},
                        f"{B} rows x {T} tokens in {c.batch.microbatches} microbatch(es), loss {c.loss.name}"))

    if c.eval.num_problems:
        shards = plan.batch_shards
        rows = max(shards, -(-min(64, c.eval.num_problems) // shards) * shards)  # harness.generate_texts
        prompts = (sds(plan, (rows, P), i32, row), sds(plan, (rows, P), bool, row))
        outside = state_bytes - params_bytes + teacher_bytes
        calls = -(-c.eval.num_problems * c.eval.samples // rows)
        phases.append(Phase(
            "eval sampling", sample, (state["params"], *prompts, key),
            dict(cfg=student_cfg, settings=SamplingSettings(c.eval.max_new_tokens, float(c.eval.temperature),
                                                            candidates=1, stop_ids=stops),
                 pad_id=pad_id, plan=plan),
            f"{rows} rows x {c.eval.max_new_tokens} tokens, {calls} calls per evaluation",
            resident_outside=outside, calls_per_step=calls, per_step=False))
        if c.eval.greedy:
            gcalls = -(-c.eval.num_problems // rows)
            phases.append(Phase(
                "eval greedy", sample, (state["params"], *prompts, key),
                dict(cfg=student_cfg, settings=SamplingSettings(c.eval.max_new_tokens, 0.0, candidates=1,
                                                                stop_ids=stops), pad_id=pad_id, plan=plan),
                f"{rows} rows x {c.eval.max_new_tokens} tokens, {gcalls} calls per evaluation",
                resident_outside=outside, calls_per_step=gcalls, per_step=False))
    return phases


def argument_shards(phase: Phase) -> list[tuple[int, ...]]:
    """Per-device shape of each array argument, in the order the program takes them, from the
    shapes and shardings alone (a typed PRNG key is its uint32 key data)."""
    key_words = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape  # threefry: (2,)
    out = []
    for a in jax.tree.leaves(phase.args):
        if not isinstance(a, jax.ShapeDtypeStruct):
            continue  # static arguments (settings, widths) are not arrays
        shard = tuple(a.sharding.shard_shape(a.shape)) if a.sharding is not None else tuple(a.shape)
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            shard = shard + key_words
        out.append(shard)
    return out
