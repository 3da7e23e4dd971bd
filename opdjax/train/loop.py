"""The trainer skeleton OPD and DAIL share.

A job (opdjax.train.opd.OPDJob, opdjax.dail.distill.DAILJob) supplies how one step's batch is made
and what its jitted step computes; this module owns everything around that:
  * the train state {params, opt_state, step, skipped}, the optimizer and its schedule;
  * microbatch gradient accumulation and the guarded update (a non-finite step is skipped);
  * restore-or-init from the latest orbax checkpoint, the data pipeline's state included;
  * the schedule of one run: metrics, progress, evaluation, checkpoints, SIGTERM preemption;
  * the Hugging Face / PEFT export of the trained student.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import optax

from opdjax import multihost
from opdjax.models import hf_io, lora
from opdjax.train import checkpoint as ckpt_lib
from opdjax.train import metrics as metrics_lib

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ optimizer and train state
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


def init_state(params, tx) -> dict[str, Any]:
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "skipped": jnp.zeros((), jnp.int32)}


def state_shardings_for(tx, abstract_params, param_shardings, plan) -> dict:
    """Shardings of {params, opt_state, step, skipped}: optimizer moments follow their params."""
    opt_abstract = jax.eval_shape(tx.init, abstract_params)
    replicated = plan.sharding(())
    opt = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, param_shardings,
                                transform_non_params=lambda _: replicated)
    return {"params": param_shardings, "opt_state": opt, "step": replicated, "skipped": replicated}


def abstract_state(tx, abstract_params, state_sh) -> dict:
    """The train state's shapes, dtypes and shardings (what a checkpoint restores into)."""
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        jax.eval_shape(lambda p: init_state(p, tx), abstract_params), state_sh)


# ------------------------------------------------------------------------- the jitted update
def split_microbatches(tree, m: int):
    """[B, ...] -> [m, B/m, ...] with microbatch i = rows i, i+m, i+2m, ...: each microbatch keeps
    rows from every batch shard, so no device idles while another computes."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1), tree)


def accumulate_gradients(grad_fn: Callable, params, batch, microbatches: int):
    """((loss, aux), grads) of `grad_fn(params, batch)` summed over `microbatches` row-strided
    microbatches of `batch` (a pytree of [B, ...] arrays). The losses carry global per-token
    coefficients, so the sum over microbatches is the loss of the whole batch."""
    if microbatches == 1:
        return grad_fn(params, batch)
    micro = split_microbatches(batch, microbatches)

    def add(carry, mb):
        return jax.tree.map(jnp.add, carry, grad_fn(params, mb)), None

    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, first)))
    return jax.lax.scan(add, zeros, micro)[0]


def guarded_update(state, loss, grads, tx, ok=True):
    """Optimizer update of state["params"] unless the loss, the gradient norm or `ok` says the step
    is bad: then the old params and moments are kept and `skipped` counts it. Returns (state, metrics)."""
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & ok
    # Zeroed grads go through tx so both branches trace once; the select discards the result.
    safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
    updates, new_opt = tx.update(safe_grads, state["opt_state"], state["params"])
    new_params = optax.apply_updates(state["params"], updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new_state = dict(state, params=keep(new_params, state["params"]), opt_state=keep(new_opt, state["opt_state"]),
                     step=state["step"] + 1, skipped=state["skipped"] + (~finite).astype(jnp.int32))
    metrics = {"loss/total": loss, "loss/grad_norm": grad_norm, "loss/skipped_updates": new_state["skipped"],
               "loss/update_finite": finite.astype(jnp.float32),
               "loss/param_norm": optax.global_norm(new_state["params"])}
    return new_state, metrics


# ----------------------------------------------------------------------- restore or initialise
def checkpointer(config) -> ckpt_lib.Checkpointer:
    """The run's checkpointer: checkpoint.directory, or workdir/checkpoints."""
    c = config.checkpoint
    return ckpt_lib.Checkpointer(c.directory or os.path.join(config.workdir, "checkpoints"), keep=c.keep,
                                 async_save=c.async_save)


@dataclasses.dataclass
class Start:
    step: int  # the first step to run (0 = fresh)
    tree: dict  # {"train": state, ...the job's extra items}
    meta: dict  # the checkpoint's meta ({} when fresh)


def restore_or_init(ckpt: ckpt_lib.Checkpointer, abstract: dict, pipeline, init: Callable[[], dict]) -> Start:
    """The latest checkpoint restored into `abstract` (the data pipeline's iterator restored in
    place and checked against its signature), or `init()` when there is none. `init` runs only
    for a fresh run, so a resumed run never loads the initial weights."""
    restored = ckpt.restore_latest(abstract, data=pipeline.iterator)
    if restored is None:
        return Start(0, init(), {})
    step, tree, meta = restored
    pipeline.check_signature(meta.get("data"))
    if pipeline.next_step != step:  # the iterator's own state, restored by Grain's handler
        raise ckpt_lib.CheckpointError(f"checkpoint step {step} in {ckpt.directory} holds the {pipeline.name} "
                                       f"pipeline at step {pipeline.next_step}; it is not a checkpoint this "
                                       "trainer wrote.")
    log.info("resumed from %s at step %d (%s pipeline at epoch %.2f)", ckpt.directory, step, pipeline.name,
             pipeline.epochs_done(step))
    return Start(step, tree, meta)


# ------------------------------------------------------------------------------ the schedule
@dataclasses.dataclass
class StepResult:
    state: dict
    metrics: dict  # host scalars, written as step + 1
    tokens: int  # tokens this step processed (the progress line's tokens/s)
    shown: dict  # a few of the metrics for the progress line


class Job(Protocol):
    """What a training job supplies to `train`."""

    def step(self, step: int, state: dict) -> StepResult:
        """Makes step `step`'s batch (from the pipeline) and runs the jitted step."""

    def evaluate(self, step: int, params) -> dict:
        """Evaluation at `step` (config.eval.every); {} when the job has none."""

    def checkpoint_items(self) -> tuple[dict, dict]:
        """(extra checkpoint items beside "train", extra meta)."""


@dataclasses.dataclass
class Finished:
    state: dict
    final_step: int  # the last step run (== steps unless preempted)
    preempted: bool
    records: list  # every step's metrics


def train(job: Job, config, *, state: dict, start: int, steps: int, pipeline, ckpt: ckpt_lib.Checkpointer,
          writer, eval_every: int = 0) -> Finished:
    """Steps start..steps-1 of `job`, with metrics, progress, evaluation every `eval_every` steps
    (not at the last: the job evaluates the final params itself), a checkpoint every
    checkpoint.every steps and at the last, and SIGTERM handling: a preempted run saves at a step
    every process agrees on and returns with preempted=True; a re-run resumes there."""
    progress = metrics_lib.Progress(steps, start, enabled=config.metrics.progress)
    every = config.checkpoint.every
    records, preempted, last = [], False, start
    with ckpt_lib.PreemptionGuard() as guard:
        for step in range(start, steps):
            out = job.step(step, state)
            state, done = out.state, step + 1
            out.metrics["data/epoch"] = pipeline.epochs_done(done)
            writer.write(done, out.metrics)
            records.append(out.metrics)
            progress.update(done, tokens=out.tokens, extra=out.shown)
            if eval_every and done % eval_every == 0 and done < steps:
                job.evaluate(done, state["params"])
            last = done
            preempted = guard.should_stop(done)  # the same answer on every process
            if (every and done % every == 0) or done == steps or preempted:
                # A step's metrics reach disk before its checkpoint can complete: a run killed after
                # the save resumes there and must not lose that record.
                writer.flush()
                items, meta = job.checkpoint_items()
                ckpt.save(done, {"train": state, **items}, {"data": pipeline.signature(), "step": done, **meta},
                          force=True, data=pipeline.iterator)
            if preempted:
                log.warning("%s: saved the checkpoint at step %d; exiting cleanly", guard.signal_name or "SIGTERM",
                            done)
                break
    progress.close()
    ckpt.wait()
    return Finished(state, last, preempted, records)


# ---------------------------------------------------------------------------------- the export
def export_student(workdir: str, params, cfg, tokenizer, *, lora_base=None, lora_spec=None) -> str:
    """The trained student as a Hugging Face checkpoint in workdir/student_hf (collective: every
    process calls it, process 0 writes). With a LoRA adapter, the merged model and the PEFT
    adapter (workdir/adapter)."""
    out = os.path.join(workdir, "student_hf")
    if lora_spec is None:
        hf_io.save_pretrained(params, cfg, out, tokenizer=tokenizer)
        return out
    lora.export_merged(lora_base, params, lora_spec, cfg, out, tokenizer)
    adapter_dir = os.path.join(workdir, "adapter")
    lora.save_adapter(params, lora_spec, adapter_dir)
    if multihost.is_writer():
        log.info("wrote the LoRA adapter %s", adapter_dir)
    return out


def write_summary(workdir: str, name: str, summary: dict, what: str = "run summary") -> None:
    """Process 0 writes workdir/<name> (JSON)."""
    if multihost.is_writer():
        path = os.path.join(workdir, name)
        with open(path, "w") as f:
            json.dump(summary, f, indent=2)
        log.info("wrote the %s %s", what, path)
