"""The trainer skeleton (opdjax/train/loop.py) on a job small enough to reason about exactly:
gradient accumulation against a float64 closed form, the guarded update, and the schedule
(metrics, evaluation, checkpoints, SIGTERM, restore) with a real pipeline and checkpointer."""
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from opdjax import sharding
from opdjax.data.pipeline import DataPipeline
from opdjax.train import loop
from opdjax.train.metrics import read_metrics, writer_for


def _regression(n=12, d=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.normal(size=(n,)).astype(np.float32)
    c = rng.uniform(0.5, 1.5, size=(n,)).astype(np.float32)
    c /= c.sum()  # global coefficients: microbatch sums add up to the batch loss
    w = rng.normal(size=(d,)).astype(np.float32)
    return w, (x, y, c)


def _grad_fn():
    def loss(w, batch):
        x, y, c = batch
        r = x @ w - y
        return jnp.sum(c * r * r), {"rows": jnp.sum(c)}
    return jax.value_and_grad(loss, has_aux=True)


@pytest.mark.parametrize("microbatches", [1, 2, 3, 4])
def test_accumulated_gradient_equals_the_batch_gradient(microbatches):
    w, batch = _regression()
    (l, aux), g = jax.jit(lambda w, b: loop.accumulate_gradients(_grad_fn(), w, b, microbatches))(w, batch)
    x, y, c = (a.astype(np.float64) for a in batch)
    r = x @ w.astype(np.float64) - y
    terms = (2 * c * r)[:, None] * x  # [n, d]: the per-row gradient terms
    want = terms.sum(0)
    # float32 sums of n terms in any order: |error| <= n * eps32 * sum|terms| (plus the residual's
    # own rounding, d products: bounded by the same form with d); a generous factor 4 on top.
    eps = np.finfo(np.float32).eps
    n, d = x.shape
    bound = 4 * (n + d) * eps * np.abs(terms).sum(0) + 1e-30
    assert np.all(np.abs(np.asarray(g, np.float64) - want) <= bound)
    assert abs(float(l) - np.sum(c * r * r)) <= 4 * (n + d) * eps * np.sum(np.abs(c * r * r))
    assert abs(float(aux["rows"]) - 1.0) <= 4 * n * eps


def test_guarded_update_skips_a_non_finite_step():
    tx = optax.sgd(0.1)
    state = loop.init_state(jnp.ones(3), tx)
    new, m = loop.guarded_update(state, jnp.float32(jnp.nan), jnp.ones(3), tx)
    assert np.array_equal(new["params"], state["params"]) and int(new["skipped"]) == 1 and int(new["step"]) == 1
    assert float(m["loss/update_finite"]) == 0.0
    new, m = loop.guarded_update(new, jnp.float32(1.0), jnp.ones(3), tx)
    np.testing.assert_allclose(new["params"], 0.9 * np.ones(3), rtol=1e-6)
    assert int(new["skipped"]) == 1 and int(new["step"]) == 2


class _Job:
    """A job whose step adds the mean of its batch's record indices to a scalar parameter."""

    def __init__(self, pipeline, sigterm_at=None):
        self.pipeline, self.sigterm_at, self.evals = pipeline, sigterm_at, []

    def step(self, step, state):
        idx = next(self.pipeline).indices
        state = dict(state, params=state["params"] + float(np.mean(idx)), step=state["step"] + 1)
        if step == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)  # as a preempted VM would
        return loop.StepResult(state, {"loss/total": float(np.mean(idx))}, len(idx), {})

    def evaluate(self, step, params):
        self.evals.append(step)
        return {}

    def checkpoint_items(self):
        return {}, {"note": "job meta"}


def _config(tmp_path):
    c = ml_collections.ConfigDict({"workdir": str(tmp_path), "metrics": {"progress": False},
                                   "checkpoint": {"every": 3, "directory": "", "keep": 5, "async_save": False}})
    return c


def _run(tmp_path, steps, sigterm_at=None):
    config = _config(tmp_path)
    plan = sharding.ShardingPlan(sharding.make_mesh((1, -1, 1)))
    rep = plan.sharding(())
    pipeline = DataPipeline(range(10), 4, seed=0, shuffle=True, epoch_end="straddle", name="records")
    job = _Job(pipeline, sigterm_at)
    abstract = {"train": {k: jax.ShapeDtypeStruct((), d, sharding=rep) for k, d in
                          (("params", jnp.float32), ("step", jnp.int32))}}
    ckpt = loop.checkpointer(config)
    start = loop.restore_or_init(ckpt, abstract, pipeline, lambda: {"train": {
        "params": jax.device_put(jnp.float32(0), rep), "step": jax.device_put(jnp.int32(0), rep)}})
    writer = writer_for(str(tmp_path), tensorboard=False, resume_step=start.step)
    done = loop.train(job, config, state=start.tree["train"], start=start.step, steps=steps, pipeline=pipeline,
                      ckpt=ckpt, writer=writer, eval_every=2)
    writer.close()
    ckpt.close()
    return start, done, job


def test_schedule_checkpoints_preemption_and_resume(tmp_path):
    full_dir = tmp_path / "full"
    _, full, job = _run(full_dir, steps=7)
    assert not full.preempted and full.final_step == 7 and job.evals == [2, 4, 6]  # never at the last step
    assert sorted(int(p) for p in os.listdir(full_dir / "checkpoints") if p.isdigit()) == [3, 6, 7]
    assert [r["step"] for r in read_metrics(str(full_dir / "metrics.jsonl"))] == list(range(1, 8))

    run_dir = tmp_path / "preempted"
    start, stopped, _ = _run(run_dir, steps=7, sigterm_at=3)  # SIGTERM during step index 3 (step 4)
    assert start.step == 0 and stopped.preempted and stopped.final_step == 4
    start, resumed, _ = _run(run_dir, steps=7)
    assert start.step == 4 and start.meta["note"] == "job meta" and resumed.final_step == 7
    # the resumed run saw exactly the batches of the uninterrupted one
    assert float(resumed.state["params"]) == float(full.state["params"])
    losses = [r["loss/total"] for r in read_metrics(str(run_dir / "metrics.jsonl"))]
    assert losses == [r["loss/total"] for r in read_metrics(str(full_dir / "metrics.jsonl"))]
