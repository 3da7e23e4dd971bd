"""DAIL step 2 (DAIL.md): contrastive distillation of M on its own synthesised traces.

    python launch/tpu_run.py --config configs/dail_train_<...>.py

For every kept trace r the three contexts are rendered again from the trace record (student
context, expert context with the reference, hint context with the landmarks) and r's token ids
are appended to each, unchanged (opdjax.dail.contrastive.align), so the three sequences predict
exactly the same response tokens. The loss per response token is
    KL(pi_theta(.|student, r_<t) || pi_ref(.|expert, r_<t)) - gamma * KL(pi_theta(.|student, r_<t) || pi_ref(.|hint, r_<t))
(reverse by default, forward as a switch; full vocabulary in chunks), averaged as config.loss.normalize
says: per_sequence (default, the authors') = the mean over each trace's response tokens, then over
the step's traces; kept_tokens = one mean over all the step's response tokens. pi_ref is M frozen:
with LoRA it is the base weights with the adapter switched off (no second copy of the weights); with
full fine-tuning it is a frozen copy.

Data order: the trace pipeline (opdjax.data.pipeline) shuffles the traces globally from the seed,
reshuffling each epoch; the batch of step s is a function of s alone, so a resumed run continues
exactly. The last batch of an epoch is topped up with zero-weight rows (nothing dropped or repeated).

DAILJob supplies the batch and the loss; the trainer skeleton (opdjax.train.loop) runs the rest:
restore-or-init, metrics, checkpoints every `checkpoint.every` steps and at the last, SIGTERM
preemption (save at a step every process agrees on, return without the export), the export.
"""
from __future__ import annotations

import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from opdjax import losses, multihost, sharding
from opdjax.aot import job as aot_job
from opdjax.dail import contrastive
from opdjax.dail.config import traces_path
from opdjax.dail.prompts import check_context_settings, render_contexts, rendered_context_settings
from opdjax.data.pipeline import DataPipeline
from opdjax.data.sources import PromptDataError, open_source
from opdjax.models import lora, qwen
from opdjax.train import metrics as metrics_lib
from opdjax.models.load import load_section
from opdjax.train import loop
from opdjax.train.loop import (accumulate_gradients, guarded_update, init_state, learning_rate_schedule,
                               make_optimizer, state_shardings_for)
from opdjax.train.validate import load_tokenizer_for, validate_dail_train

log = logging.getLogger(__name__)

TRACE_FIELDS = ("id", "problem", "solutions", "hint", "trace_ids")


# ------------------------------------------------------------------------------------- set-up
def validate(config):
    """Config checks that need no weights (opdjax.train.validate); returns the model config."""
    return validate_dail_train(config)


def load_traces(path: str, data_dir: str = "", split: str = "") -> list[tuple[str, dict]]:
    """(record name, record) of every kept trace, from the synthesis's traces.jsonl or any source of
    the data layer (e.g. a TFDS dataset prepare_data made of it); records without a trace (skipped
    problems) are left out. A record missing a field is an error naming it (file and line, or
    dataset, split and record)."""
    try:
        src = open_source(path, split=split, data_dir=data_dir, default_split="train", setting="train.traces",
                          split_setting="train.traces_split")
    except PromptDataError as e:
        raise ValueError(str(e)) from None
    out = []
    for i in range(len(src)):
        where = src.where(i)
        try:
            r = src[i]
        except PromptDataError as e:
            torn = " A synthesis killed mid-write leaves a torn last line: re-run the synthesis to finish it." \
                if i == len(src) - 1 and "invalid JSON" in str(e) else ""
            raise ValueError(f"{e}{torn}") from None
        if r.get("trace_ids") is None and "trace_ids" in r:
            continue  # a problem none of whose traces matched (synthesis.on_no_match=skip)
        missing = [k for k in TRACE_FIELDS if k not in r]
        if missing:
            raise ValueError(f"{where}: trace record lacks field(s) {missing}; it has {sorted(r)}.")
        if isinstance(r["trace_ids"], int):  # a one-token trace read from a tf.train.Example
            r["trace_ids"] = [r["trace_ids"]]
        if isinstance(r["solutions"], str):
            r["solutions"] = [r["solutions"]]
        if not r["trace_ids"]:
            raise ValueError(f"{where} (id {r['id']}): empty trace.")
        out.append((f"{where} (id {r['id']})", r))
    if not out:
        raise ValueError(f"{path}: no usable trace (every problem was skipped?); nothing to train on.")
    return out


def encode_traces(traces, tokenizer, prompts, stop_id: int, *, pad_id: int, max_prompt_tokens: int,
                  max_response_tokens: int = 0):
    """The aligned three-context batch of every trace (host NumPy), checked: the three contexts'
    positions predict exactly the trace's response tokens (contrastive.AlignmentError names the trace)."""
    s, e, h, resp, names = [], [], [], [], []
    for name, r in traces:
        ctx = render_contexts(tokenizer, prompts, r["problem"], r["solutions"], r["hint"],
                              max_prompt_tokens=max_prompt_tokens, record=name)
        s.append(ctx.student)
        e.append(ctx.expert)
        h.append(ctx.hint)
        # A trace that ended emitted the stop token: training on it teaches M where to stop.
        resp.append(list(r["trace_ids"]) + ([r.get("stop_id", stop_id)] if r.get("ended") else []))
        names.append(name)
    batch = contrastive.align(s, e, h, resp, pad_id=pad_id, max_response_tokens=max_response_tokens, records=names)
    contrastive.check_aligned(batch, names)  # once, on every trace: the three contexts predict the same tokens
    return batch


def trace_pipeline(config, num_traces: int) -> DataPipeline:
    """The Grain pipeline of the trace rows: batch.sequences_per_step rows per step, one global order
    reshuffled each epoch from the run's seed; epochs are cut apart ("pad": the last step of an epoch
    is filled with zero-weight rows, index -1), so train.epochs means whole passes over the traces."""
    return DataPipeline(range(num_traces), int(config.batch.sequences_per_step), seed=config.seed, shuffle=True,
                        epoch_end="pad", name="traces")


def take_rows(batch, rows: np.ndarray, normalize: str = "per_sequence"):
    """The step's rows of the aligned batch and its per-token coefficients (config.loss.normalize),
    computed once over the whole step, so that the microbatches' Σ coeff · loss add up to the step's:
      per_sequence  1 / (the row's response tokens · the step's real rows): the mean over each trace's
                    tokens, then over the step's traces (the authors: a loss per sequence, averaged);
      kept_tokens / all_response_tokens  1 / (the step's response tokens): one mean over all of them
                    (the same in DAIL: no token is dropped).
    Rows of index -1 (an epoch's top-up) weigh 0 and do not count as traces."""
    picked = jax.tree.map(lambda x: np.asarray(x)[np.maximum(rows, 0)], batch)
    real = np.asarray(picked.response_mask) & (rows >= 0)[:, None]
    picked = picked._replace(response_mask=real)
    coeff = np.asarray(losses.token_coefficients(np.ones(real.shape, np.float32), real, normalize))
    return picked, coeff.astype(np.float32)


# ---------------------------------------------------------------------------------- the step
def make_step(cfg, tx, config, spec: "lora.LoraSpec | None", plan, state_sh=None):
    """The jitted, donated step (state, frozen M, batch, coeff) -> (state, metrics); with a plan,
    every input and output has its explicit sharding (`state_sh`: `trainable_shardings`)."""
    t = config.train
    kw = dict(gamma=float(t.gamma), divergence=t.divergence, negative_clip=float(t.negative_clip),
              chunk_tokens=int(config.loss.chunk_tokens), remat=bool(t.remat), plan=plan)
    m = int(config.batch.microbatches)

    def loss_fn(trainable, frozen, batch, coeff):
        if spec is None:  # full fine-tuning: trainable = the student, frozen = the copy of M
            return contrastive.contrastive_loss(trainable, frozen, batch, cfg, coeff=coeff, **kw)
        # LoRA: one set of weights; the student is the base with the adapter on, the reference
        # the same base with it off.
        student_apply = lambda p, tokens, mask: qwen.apply(p, tokens, cfg, mask=mask, plan=plan, remat=t.remat,
                                                           layer_transform=lora.layer_transform(trainable, spec.scale,
                                                                                                plan))[0]
        return contrastive.contrastive_loss(frozen, frozen, batch, cfg, coeff=coeff, student_apply=student_apply, **kw)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, frozen, batch, coeff):
        # coeff is global (take_rows: computed over the whole step), so loss and aux terms add up over microbatches
        (loss, aux), grads = accumulate_gradients(lambda p, b: grad_fn(p, frozen, *b), state["params"],
                                                  (batch, coeff), m)
        new_state, metrics = guarded_update(state, loss, grads, tx)
        metrics.update({f"loss/{k}": v for k, v in aux.items()})
        return new_state, metrics

    if plan is None:
        return jax.jit(step, donate_argnums=0)
    row = plan.sharding(("batch", "length"))
    batch_sh = contrastive.AlignedBatch(*([row] * len(contrastive.AlignedBatch._fields)))
    return jax.jit(step, in_shardings=(state_sh, qwen.param_shardings(cfg, plan), batch_sh, row),
                   out_shardings=(state_sh, plan.sharding(())), donate_argnums=0)


# ---------------------------------------------------------------------------------- the loop
def _key_data_global(plan, seed: int) -> jax.Array:
    """The key of `seed` as a replicated global array (a jitted init on a pod takes global inputs)."""
    return multihost.to_global(plan, multihost.to_host(jax.random.key_data(jax.random.key(seed))), (None,))


def _device_batch(plan, batch, coeff):
    """The step's host batch (every process holds all of it) as global arrays, rows over the batch
    shards (the step's in_shardings)."""
    put = lambda x: multihost.to_global(plan, x, ("batch", "length"))  # noqa: E731
    return jax.tree.map(put, batch), put(coeff)


class DAILJob:
    """DAIL's part of the trainer (opdjax.train.loop): the set-up, a step's rows of the aligned trace
    batch and the contrastive loss."""

    def __init__(self, config):
        self.config = config
        self.t_start = time.perf_counter()
        self.cfg = cfg = validate(config)
        if multihost.is_writer():
            os.makedirs(config.workdir, exist_ok=True)
        tok = load_tokenizer_for(config.model, "model")
        path = traces_path(config)
        traces = multihost.run_everywhere(lambda: load_traces(path, config.data.data_dir, config.train.traces_split),
                                          f"reading the traces {path}")
        multihost.agree((len(traces), multihost.fingerprint([r for _, r in traces])), f"traces in {path}")
        # the contexts rendered here must be those synthesis rendered (prompts.*, the tokenizer)
        check_context_settings(path, rendered_context_settings(config, tok),
                               require=bool(config.train.require_context_settings))
        self.data = encode_traces(traces, tok, config.prompts, tok.eos_token_id, pad_id=cfg.pad_token_id or 0,
                                  max_prompt_tokens=config.data.max_prompt_tokens,
                                  max_response_tokens=config.train.max_response_tokens)
        self.num_traces = n = len(traces)
        self.pipeline = trace_pipeline(config, n)
        self.steps = steps = int(config.train.epochs * self.pipeline.steps_per_epoch)
        self.spec = spec = lora.LoraSpec.from_config(config.lora) if config.lora.enabled else None
        self.plan = sharding.plan_from_config(config.mesh)
        mesh = self.plan.mesh
        log.info("DAIL training: %d traces, %d steps (%d epochs of %d sequences/step), %s; mesh %s", n, steps,
                 config.train.epochs, config.batch.sequences_per_step,
                 f"LoRA r={spec.rank} alpha={spec.alpha}" if spec else "full fine-tuning", dict(mesh.shape))
        self.tx = make_optimizer(config.optimizer, steps)
        self.lr_at = learning_rate_schedule(config.optimizer, steps)
        self.alarms = 0  # steps whose mean negative KL passed train.negative_alarm (kept across a resume)

    def start(self) -> loop.Start:
        """Load M (the frozen reference and the LoRA base), restore the latest checkpoint or
        initialise the trainable weights; opens the metrics."""
        config, cfg, plan, spec, tx = self.config, self.cfg, self.plan, self.spec, self.tx
        aot_job.check_at_start(config, plan, "dail_train")  # TPU: does the step fit? (before any weight)
        self.base = base = load_section(config.model, plan)[0]
        if spec is None:  # full fine-tuning: the trainable copy starts as M and follows M's shardings
            abstract_trainable = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base)
            trainable_sh = qwen.param_shardings(cfg, plan)
        else:  # float32 adapter whatever M's dtype: its updates are small
            abstract_trainable = lora.abstract_lora(cfg, spec, jnp.float32)
            trainable_sh = lora.lora_shardings(cfg, spec, plan)
        state_sh = state_shardings_for(tx, abstract_trainable, trainable_sh, plan)
        self.ckpt = loop.checkpointer(config)

        def init():
            # Every leaf of the state (counters included) is a global array: a pod checkpoints only those.
            if spec is None:
                state = jax.jit(lambda m: init_state(jax.tree.map(jnp.copy, m), tx), out_shardings=state_sh)(base)
            else:
                state = jax.jit(lambda kd: init_state(lora.init_lora(cfg, spec, jax.random.wrap_key_data(kd),
                                                                     dtype=jnp.float32), tx),
                                out_shardings=state_sh)(_key_data_global(plan, config.seed))
            return {"train": state}

        start = loop.restore_or_init(self.ckpt, {"train": loop.abstract_state(tx, abstract_trainable, state_sh)},
                                     self.pipeline, init)
        self.alarms = int(start.meta.get("negative_alarms", 0))
        self.step_fn = make_step(cfg, tx, config, spec, plan, state_sh)
        self.writer = metrics_lib.writer_for(config.workdir, tensorboard=config.metrics.tensorboard,
                                             resume_step=start.step)
        return start

    def step(self, step: int, state) -> loop.StepResult:
        # every process holds the (small) aligned trace batch; the step's rows come from the pipeline
        batch, coeff = take_rows(self.data, next(self.pipeline).indices, self.config.loss.normalize)
        t = time.perf_counter()
        state, out = self.step_fn(state, self.base, *_device_batch(self.plan, batch, coeff))
        # CPU: one step in flight (simulated-device collectives); the metrics are replicated scalars
        out = multihost.to_host(multihost.block_on_cpu(out))
        dt = time.perf_counter() - t
        m = {k: float(v) for k, v in out.items()}
        tokens = int(np.asarray(batch.response_mask).sum())  # host: the step's NumPy batch
        m.update({"optimizer/learning_rate": float(self.lr_at(step)), "perf/response_tokens_per_s": tokens / dt,
                  "timing/step_s": dt})
        alarm = self.config.train.negative_alarm
        if alarm and m["loss/kl_negative"] > alarm:
            self.alarms += 1
            log.warning("step %d: mean negative KL %.3f > train.negative_alarm=%.3f (the student is moving "
                        "away from the hint context fast; lower train.gamma or the learning rate if this "
                        "persists)", step + 1, m["loss/kl_negative"], alarm)
        m["loss/negative_alarms"] = self.alarms
        return loop.StepResult(state, m, tokens, {"loss": m["loss/total"], "kl+": m["loss/kl_positive"],
                                                  "kl-": m["loss/kl_negative"]})

    def evaluate(self, step: int, params) -> dict:
        return {}  # DAIL's evaluation is its own job (dail_eval)

    def checkpoint_items(self):
        return {}, {"negative_alarms": self.alarms}


def run(config) -> dict:
    """Train; returns a summary (also written to workdir/train_summary.json).

    On a pod every process reads the traces and builds the whole (small) host batch of each step;
    the step's inputs are global arrays; process 0 writes metrics, curves, the summary and the
    export (a collective all processes join). SIGTERM (a preempted VM) saves a checkpoint at the
    step every process agrees on, skips the export and returns normally (exit 0); a re-run resumes."""
    job = DAILJob(config)
    start = job.start()
    done = loop.train(job, config, state=start.tree["train"], start=start.step, steps=job.steps,
                      pipeline=job.pipeline, ckpt=job.ckpt, writer=job.writer)
    state, spec = done.state, job.spec
    job.writer.close()
    job.ckpt.close()

    counters = multihost.to_host({"step": state["step"], "skipped": state["skipped"]})
    summary = {"workdir": config.workdir, "traces": job.num_traces, "steps": job.steps, "start_step": start.step,
               "final_step": done.final_step, "preempted": done.preempted,
               "lora": None if spec is None else {"rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets)},
               "skipped_updates": int(counters["skipped"]), "negative_alarms": job.alarms}
    # process 0 holds the metrics file; every process returns the same summary
    ends = None
    if multihost.is_writer():
        records = [r for r in metrics_lib.read_metrics(os.path.join(config.workdir, "metrics.jsonl"))
                   if "loss/total" in r]
        if records:
            ends = {e: {k: records[i][k] for k in ("loss/kl_positive", "loss/kl_negative")}
                    for e, i in (("first", 0), ("last", -1))}
            metrics_lib.plot_curves({"DAIL": records}, ["loss/total", "loss/kl_positive", "loss/kl_negative"],
                                    os.path.join(config.workdir, "curves.png"), title="DAIL contrastive training")
    summary.update(multihost.broadcast_object(ends) or {})
    if config.checkpoint.export_hf and not done.preempted:
        # collectives (the params are gathered): every process calls them, process 0 writes
        summary["exported"] = loop.export_student(config.workdir, state["params"], job.cfg,
                                                  config.model.path or None, lora_base=job.base, lora_spec=spec)
    summary["wall_s"] = round(time.perf_counter() - job.t_start, 1)
    loop.write_summary(config.workdir, "train_summary.json", summary, "training summary")
    # the export and the summary are on disk before any process goes on (the demo's evaluation reads them)
    multihost.sync("dail_train_done")
    summary["final_params"] = state["params"]
    return summary
