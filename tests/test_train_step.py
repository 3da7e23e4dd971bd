"""The jitted train step: sharded on 8 simulated devices equals one device; gradient
accumulation equals one big batch; a non-finite update is skipped and counted; the pg update
equals a hand-computed AdamW step from the closed-form gradient."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from opdjax import losses, sharding
from opdjax.models import qwen
from opdjax.models.config import ModelConfig
from opdjax.train.step import (StepSettings, TrainBatch, init_state, jit_train_step, learning_rate_schedule,
                               make_optimizer)

S_CFG = ModelConfig("qwen3", vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8)
T_CFG = ModelConfig("qwen3", vocab_size=48, hidden_size=64, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16)
P, R, B, K = 5, 7, 8, 3


def _opt(**kw):
    c = ml_collections.ConfigDict(dict(learning_rate=1e-2, schedule="constant", warmup_steps=0, b1=0.9, b2=0.999,
                                       eps=1e-8, weight_decay=0.01, grad_clip=1.0))
    c.update(kw)
    return c


def _batch(seed=0, normalize="kept_tokens"):
    rs = np.random.RandomState(seed)
    tokens = rs.randint(1, 48, (B, P + R)).astype(np.int32)
    mask = np.ones((B, P + R), bool)
    for b in range(B):
        mask[b, :rs.randint(0, 3)] = False  # left-padded prompts
        mask[b, P + rs.randint(2, R + 1):] = False  # right-padded responses
    resp = mask[:, P:]
    w = (resp & (np.arange(R) < rs.randint(1, R + 1, (B, 1)))).astype(np.float32)  # release prefixes
    inputs = losses.LossInputs(
        sampled_ids=tokens[:, P:], old_logp=np.where(resp, -rs.rand(B, R) * 3, 0).astype(np.float32),
        advantage=np.where(resp, rs.randn(B, R), 0).astype(np.float32),
        cand_ids=np.stack([rs.permutation(48)[:K] for _ in range(B * R)]).reshape(B, R, K).astype(np.int32),
        teacher_cand_logp=-rs.rand(B, R, K).astype(np.float32) * 4)
    coeff = np.asarray(losses.token_coefficients(jnp.asarray(w), jnp.asarray(resp), normalize))
    return TrainBatch(tokens, mask, inputs, coeff)


def _run(loss, plan, microbatches=1, batch=None, steps=2):
    tx = make_optimizer(_opt(), 10)
    params = qwen.init_params(S_CFG, jax.random.key(0), std=0.3)
    teacher = qwen.init_params(T_CFG, jax.random.key(1), std=0.3)
    s = StepSettings(loss=loss, prompt_len=P, microbatches=microbatches, chunk_tokens=8)
    fn = jit_train_step(tx, S_CFG, T_CFG, s, plan)
    if plan is not None:
        params = jax.device_put(params, qwen.param_shardings(S_CFG, plan))
        teacher = jax.device_put(teacher, qwen.param_shardings(T_CFG, plan))
    state = init_state(params, tx)
    batch = batch or _batch()
    out = []
    for _ in range(steps):
        state, m = fn(state, jax.tree.map(jnp.asarray, batch), teacher)
        out.append(jax.device_get(m))  # block each step (CPU collectives)
    return jax.device_get(state["params"]), out, state


@pytest.mark.parametrize("loss", ["pg", "reverse_kl_topk", "jsd"])
def test_sharded_step_equals_single_device(loss):
    ref_params, ref_m, _ = _run(loss, None)
    plan = sharding.ShardingPlan(sharding.make_mesh((2, 2, 2)))
    params, m, _ = _run(loss, plan)
    for a, b in zip(ref_m, m):
        np.testing.assert_allclose(b["loss/total"], a["loss/total"], rtol=1e-5, atol=1e-6)
    # Adam divides by sqrt(v): a gradient entry near 0 whose float sum order differs between the
    # layouts moves by up to ~lr. 1e-4 is 1% of lr=1e-2; everything else agrees to ~1e-7.
    diffs = [np.abs(np.asarray(y) - np.asarray(x)) for x, y in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params))]
    assert max(d.max() for d in diffs) < 1e-4
    assert np.mean(np.concatenate([d.ravel() for d in diffs]) < 1e-6) > 0.99


@pytest.mark.parametrize("normalize", ["kept_tokens", "per_sequence"])
def test_gradient_accumulation_equals_one_batch(normalize):
    batch = _batch(1, normalize)
    ref_params, ref_m, _ = _run("pg", None, 1, batch)
    params, m, _ = _run("pg", None, 4, batch)
    for a, b in zip(ref_m, m):
        np.testing.assert_allclose(b["loss/total"], a["loss/total"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b["loss/grad_norm"], a["loss/grad_norm"], rtol=1e-4)
    # Microbatches add the gradient in another order. Adam normalises each entry by its own
    # magnitude, so an entry whose gradient is near 0 turns a last-bit difference into a step
    # difference of up to 2 * lr (a flipped sign) per step: that is the bound for every entry;
    # all but a handful agree to ~1e-7 (measured: one of 4096 entries past 1e-6, by 9e-6).
    diffs = np.concatenate([np.abs(np.asarray(y) - np.asarray(x)).ravel()
                            for x, y in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params))])
    assert diffs.max() <= 2 * 1e-2 * len(m)
    assert np.mean(diffs < 1e-6) > 0.99


def test_non_finite_update_is_skipped_and_counted():
    batch = _batch(2)
    bad = batch._replace(inputs=batch.inputs._replace(advantage=np.where(batch.coeff > 0, np.nan, 0).astype(np.float32)))
    params0 = jax.device_get(qwen.init_params(S_CFG, jax.random.key(0), std=0.3))
    params, m, state = _run("pg", None, 1, bad, steps=2)
    assert [x["loss/update_finite"] for x in m] == [0.0, 0.0]
    assert int(state["skipped"]) == 2 and int(state["step"]) == 2
    for x, y in zip(jax.tree.leaves(params0), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_pg_step_equals_closed_form_adamw():
    """At rho = 1 the pg gradient is -sum coeff A grad log pi(y): build that by hand with jax.grad
    of the log-likelihood and apply optax's AdamW to it; the step must land on the same params."""
    batch = _batch(3)
    # pi_old = the current policy: rho = 1 exactly
    params = qwen.init_params(S_CFG, jax.random.key(0), std=0.3)
    logits, _ = qwen.forward(params, jnp.asarray(batch.tokens), S_CFG, mask=jnp.asarray(batch.mask))
    logp = jax.nn.log_softmax(logits[:, P - 1:P - 1 + R], -1)
    old = jnp.take_along_axis(logp, jnp.asarray(batch.tokens[:, P:])[..., None], -1)[..., 0]
    batch = batch._replace(inputs=batch.inputs._replace(old_logp=np.asarray(old)))

    def surrogate(p):
        lg, _ = qwen.forward(p, jnp.asarray(batch.tokens), S_CFG, mask=jnp.asarray(batch.mask))
        lp = jax.nn.log_softmax(lg[:, P - 1:P - 1 + R], -1)
        lp = jnp.take_along_axis(lp, jnp.asarray(batch.tokens[:, P:])[..., None], -1)[..., 0]
        return -jnp.sum(batch.coeff * batch.inputs.advantage * lp)

    g = jax.grad(surrogate)(params)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.01))
    upd, _ = tx.update(g, tx.init(params), params)
    expected = optax.apply_updates(params, upd)
    got, m, _ = _run("pg", None, 1, batch, steps=1)
    np.testing.assert_allclose(m[0]["loss/grad_norm"], float(optax.global_norm(g)), rtol=1e-4)
    for x, y in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)


def test_schedules():
    c = _opt(warmup_steps=4, schedule="cosine", learning_rate=1.0)
    lr = learning_rate_schedule(c, 14)
    np.testing.assert_allclose([float(lr(s)) for s in (0, 2, 4, 9, 14)],
                               [0.0, 0.5, 1.0, 0.5 * (1 + np.cos(np.pi * 5 / 10)), 0.0], atol=1e-6)
    assert float(learning_rate_schedule(_opt(), 10)(7)) == pytest.approx(1e-2)
