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
from typing import NamedTuple

import jax
import jax.numpy as jnp

from opdjax import losses
from opdjax.models import qwen
from opdjax.models.config import ModelConfig
from opdjax.rollout.sampler import tempered_truncated
from opdjax.sharding import ShardingPlan
from opdjax.train.loop import accumulate_gradients, guarded_update, state_shardings_for


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
    # The policy the loss trains, pi_theta: the student's logits through the same temperature /
    # top-k / top-p as the sampler's (rollout.old_logp="sampled"), so that pi_old, A_t and pi_theta
    # are one distribution and rho = 1 on-policy. (1.0, 0, 1.0) = the plain softmax
    # (rollout.old_logp="model", or an untempered rollout).
    policy_temperature: float = 1.0
    policy_top_k: int = 0
    policy_top_p: float = 1.0

    @property
    def policy_is_softmax(self) -> bool:
        return self.policy_temperature == 1.0 and not self.policy_top_k and self.policy_top_p >= 1.0


def step_settings_from_config(c, prompt_len: int) -> StepSettings:
    """The OPD config's loss / batch / rollout sections as the step's settings. With
    rollout.old_logp="sampled" (the default) pi_old is the sampling distribution, so pi_theta gets
    the sampler's transform too; with "model" both are the plain softmax."""
    r = c.rollout
    policy = {}
    if r.old_logp == "sampled":
        policy = dict(policy_temperature=float(r.temperature), policy_top_k=int(r.top_k),
                      policy_top_p=float(r.top_p))
    return StepSettings(loss=c.loss.name, prompt_len=prompt_len, microbatches=c.batch.microbatches,
                        chunk_tokens=c.loss.chunk_tokens, clip_eps=float(c.loss.clip_eps),
                        jsd_beta=float(c.loss.jsd_beta), **policy)


# Excluded tokens' logit in the step's truncated policy: finite, so that p * log p terms at p = 0 stay 0
# in the losses; exp(POLICY_FILL - max) is exactly 0 in float32, as -inf is in the sampler.
POLICY_FILL = -1e9


def policy_logits(logits, s: StepSettings):
    """The float32 logits of pi_theta (StepSettings.policy_*); the identity for the plain softmax."""
    if s.policy_is_softmax:
        return logits
    return tempered_truncated(logits, s.policy_temperature, s.policy_top_k, s.policy_top_p, fill=POLICY_FILL)


def state_shardings(tx, student_cfg: ModelConfig, plan: ShardingPlan, param_dtype) -> dict:
    """Shardings of the student's train state: optimizer moments follow their params."""
    return state_shardings_for(tx, qwen.abstract_params(student_cfg, param_dtype),
                               qwen.param_shardings(student_cfg, plan), plan)


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
        s.loss, student_hidden=pred, student_logits_fn=lambda h: policy_logits(qwen.logits_from_hidden(params, h, plan), s),
        inputs=batch.inputs, coeff=batch.coeff, teacher_hidden=t_pred, teacher_logits_fn=t_logits_fn,
        chunk_tokens=s.chunk_tokens, clip_eps=s.clip_eps, jsd_beta=s.jsd_beta)


def train_step(state, batch: TrainBatch, teacher_params, *, tx, student_cfg, teacher_cfg,
               s: StepSettings, plan: ShardingPlan | None):
    """(state, batch, teacher params) -> (new state, metrics). Pure; jit it with `jit_train_step`."""
    grad_fn = jax.value_and_grad(
        lambda p, b: loss_on_batch(p, teacher_params, b, student_cfg, teacher_cfg, s, plan), has_aux=True)
    (loss, aux), grads = accumulate_gradients(grad_fn, state["params"], batch, s.microbatches)

    # The losses zero non-finite inputs so padding cannot poison a sum; a non-finite advantage
    # or old log-prob at a token that is actually trained on is a real fault: skip and count it.
    used = batch.coeff > 0
    bad_inputs = sum(jnp.sum(used & ~jnp.isfinite(x)) for x in (batch.inputs.advantage, batch.inputs.old_logp)
                     if x is not None)
    new_state, metrics = guarded_update(state, loss, grads, tx, ok=bad_inputs == 0)
    metrics["loss/nonfinite_inputs"] = bad_inputs
    metrics.update({f"loss/{k}": v for k, v in aux.items()})
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
