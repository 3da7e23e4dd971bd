"""The OPD train step: student forward + backward on prompt+response, the masked loss, one optax
update. Jitted once with explicit shardings; the state is donated.

The release weights reach this step already folded into `coeff` (losses.token_coefficients over
the whole global batch), so full-trajectory OPD, prefix truncation, random release and the BIC
rule all run this one compiled function. Gradient accumulation splits the rollout batch into
`microbatches` that each stay spread over every batch shard, and sums their gradients.
An update whose loss or gradient norm is not finite is skipped (params and optimizer state
unchanged) and counted in `state["skipped"]`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from opdjax import losses
from opdjax.models import qwen
from opdjax.models.config import ModelConfig
from opdjax.sharding import ShardingPlan


class TrainBatch(NamedTuple):
    tokens: jax.Array  # [B, P+R] int32: prompt left-padded to P columns, response right-padded
    mask: jax.Array  # [B, P+R] bool
    inputs: losses.LossInputs  # response-aligned [B, R] / [B, R, K]
    coeff: jax.Array  # [B, R] float32: release weight x normalisation (constants)


@dataclasses.dataclass(frozen=True)
class StepSettings:
    loss: str
    prompt_len: int
    microbatches: int = 1
    chunk_tokens: int = 256
    clip_eps: float = 0.2
    jsd_beta: float = 0.5
    remat: bool = True


def learning_rate_schedule(c, total_steps: int):
    """Linear warmup over `c.warmup_steps`, then constant, or cosine / linear decay to 0 at `total_steps`."""
    warmup = int(c.warmup_steps)
    if c.schedule == "constant":
        after = optax.constant_schedule(c.learning_rate)
    elif c.schedule == "cosine":
        after = optax.cosine_decay_schedule(c.learning_rate, max(1, total_steps - warmup))
    elif c.schedule == "linear":
        after = optax.linear_schedule(c.learning_rate, 0.0, max(1, total_steps - warmup))
    else:
        raise ValueError(f"optimizer.schedule={c.schedule!r}: choose constant, cosine or linear.")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, c.learning_rate, warmup), after], [warmup])


def make_optimizer(c, total_steps: int) -> optax.GradientTransformation:
    """AdamW after global-norm clipping (`c` is the config's `optimizer` section)."""
    parts = [optax.clip_by_global_norm(c.grad_clip)] if c.grad_clip > 0 else []
    parts.append(optax.adamw(learning_rate_schedule(c, total_steps), b1=c.b1, b2=c.b2, eps=c.eps,
                             weight_decay=c.weight_decay))
    return optax.chain(*parts)


def state_shardings(tx, student_cfg: ModelConfig, plan: ShardingPlan, param_dtype) -> dict:
    """Shardings of {params, opt_state, step, skipped}: optimizer moments follow their params."""
    return state_shardings_for(tx, qwen.abstract_params(student_cfg, param_dtype),
                               qwen.param_shardings(student_cfg, plan), plan)


def state_shardings_for(tx, abstract_params, param_shardings, plan: ShardingPlan) -> dict:
    """The same for any trainable pytree (e.g. a LoRA adapter) given its shardings."""
    opt_abstract = jax.eval_shape(tx.init, abstract_params)
    replicated = plan.sharding(())
    opt = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, param_shardings,
                                transform_non_params=lambda _: replicated)
    return {"params": param_shardings, "opt_state": opt, "step": replicated, "skipped": replicated}


def init_state(params, tx) -> dict[str, Any]:
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "skipped": jnp.zeros((), jnp.int32)}


def _split_microbatches(tree, m: int):
    """[B, ...] -> [m, B/m, ...] with microbatch i = rows i, i+m, i+2m, ...: each microbatch keeps
    rows from every batch shard, so no device idles while another computes."""
    def split(x):
        B = x.shape[0]
        return x.reshape(B // m, m, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, tree)


def loss_on_batch(params, teacher_params, batch: TrainBatch, student_cfg: ModelConfig,
                  teacher_cfg: ModelConfig | None, s: StepSettings, plan: ShardingPlan | None):
    """Σ coeff·loss over one (micro)batch, and coeff-weighted aux sums."""
    P = s.prompt_len
    R = batch.tokens.shape[1] - P
    hidden, _ = qwen.apply(params, batch.tokens, student_cfg, mask=batch.mask, plan=plan, remat=s.remat)
    pred = jax.lax.slice_in_dim(hidden, P - 1, P - 1 + R, axis=1)  # position P-1+t predicts token P+t
    t_pred, t_logits_fn = None, None
    if losses.get_loss(s.loss).needs_teacher_logits:
        t_hidden, _ = qwen.apply(teacher_params, batch.tokens, teacher_cfg, mask=batch.mask, plan=plan)
        t_pred = jax.lax.stop_gradient(jax.lax.slice_in_dim(t_hidden, P - 1, P - 1 + R, axis=1))
        t_logits_fn = lambda h: qwen.logits_from_hidden(teacher_params, h, plan)
    return losses.chunked_loss(
        s.loss, student_hidden=pred, student_logits_fn=lambda h: qwen.logits_from_hidden(params, h, plan),
        inputs=batch.inputs, coeff=batch.coeff, teacher_hidden=t_pred, teacher_logits_fn=t_logits_fn,
        chunk_tokens=s.chunk_tokens, clip_eps=s.clip_eps, jsd_beta=s.jsd_beta)


def train_step(state, batch: TrainBatch, teacher_params, *, tx, student_cfg, teacher_cfg,
               s: StepSettings, plan: ShardingPlan | None):
    """(state, batch, teacher params) -> (new state, metrics). Pure; jit it with `jit_train_step`."""
    grad_fn = jax.value_and_grad(loss_on_batch, has_aux=True)
    args = (teacher_params,)
    if s.microbatches == 1:
        (loss, aux), grads = grad_fn(state["params"], *args, batch, student_cfg, teacher_cfg, s, plan)
    else:
        micro = _split_microbatches(batch, s.microbatches)

        def accumulate(carry, mb):
            (l, a), g = grad_fn(state["params"], *args, mb, student_cfg, teacher_cfg, s, plan)
            return jax.tree.map(jnp.add, carry, (l, a, g)), None

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
            lambda: grad_fn(state["params"], *args, jax.tree.map(lambda x: x[0], micro), student_cfg,
                            teacher_cfg, s, plan)))
        (loss, aux, grads), _ = jax.lax.scan(accumulate, (zeros[0][0], zeros[0][1], zeros[1]), micro)

    # The losses zero non-finite inputs so padding cannot poison a sum; a non-finite advantage
    # or old log-prob at a token that is actually trained on is a real fault: skip and count it.
    used = batch.coeff > 0
    bad_inputs = sum(jnp.sum(used & ~jnp.isfinite(x)) for x in (batch.inputs.advantage, batch.inputs.old_logp)
                     if x is not None)
    new_state, metrics = guarded_update(state, loss, grads, tx, ok=bad_inputs == 0)
    metrics["loss/nonfinite_inputs"] = bad_inputs
    metrics.update({f"loss/{k}": v for k, v in aux.items()})
    return new_state, metrics


def guarded_update(state, loss, grads, tx, ok=True):
    """AdamW update of state["params"] unless the loss, the gradient norm or `ok` says the step is
    bad: then the old params and moments are kept and `skipped` counts it. Returns (state, metrics)."""
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & ok
    # Zeroed grads go through tx so both branches trace once; the select discards the result.
    safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
    updates, new_opt = tx.update(safe_grads, state["opt_state"], state["params"])
    new_params = optax.apply_updates(state["params"], updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = dict(state, params=keep(new_params, state["params"]), opt_state=keep(new_opt, state["opt_state"]),
                     step=state["step"] + 1, skipped=state["skipped"] + (~finite).astype(jnp.int32))
    metrics = {"loss/total": loss, "loss/grad_norm": grad_norm, "loss/skipped_updates": new_state["skipped"],
               "loss/update_finite": finite.astype(jnp.float32),
               "loss/param_norm": optax.global_norm(new_state["params"])}
    return new_state, metrics


def jit_train_step(tx, student_cfg: ModelConfig, teacher_cfg: ModelConfig | None, s: StepSettings,
                   plan: ShardingPlan | None, param_dtype=None):
    """The jitted step: state donated; with a plan, state/batch/teacher shardings are explicit."""
    def fn(state, batch, teacher_params):
        return train_step(state, batch, teacher_params, tx=tx, student_cfg=student_cfg,
                          teacher_cfg=teacher_cfg, s=s, plan=plan)
    if plan is None:
        return jax.jit(fn, donate_argnums=0)
    st = state_shardings(tx, student_cfg, plan, param_dtype)
    row = plan.sharding(("batch", "length"))
    row3 = plan.sharding(("batch", "length", None))
    batch_sh = TrainBatch(row, row, losses.LossInputs(row, row, row, row3, row3), row)
    teacher_sh = None if teacher_cfg is None else qwen.param_shardings(teacher_cfg, plan)
    return jax.jit(fn, in_shardings=(st, batch_sh, teacher_sh), out_shardings=(st, plan.sharding(())),
                   donate_argnums=0)
