"""The jitted train step: sharded on 8 simulated devices equals one device; gradient
accumulation equals one big batch (both compared on the gradient, through one SGD step, within a
float32 bound derived below); a non-finite update is skipped and counted; the pg gradient equals
the closed-form one and the optimizer is clip + optax AdamW."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from opdjax import losses, sharding
from opdjax.models import qwen
from opdjax.models.config import ModelConfig
from opdjax.train.loop import init_state, learning_rate_schedule, make_optimizer
from opdjax.train.step import StepSettings, TrainBatch, jit_train_step

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


# ------------------------------------------------------------------ float32 tolerances, derived
# Comparing params after an AdamW step is fragile: Adam divides each entry by its own magnitude,
# so a gradient entry that is ~0 turns a last-bit difference into a step of up to 2*lr. What two
# equivalent computations must agree on is the gradient, so the comparisons below take ONE step
# with SGD at lr = 1 (params' = params - grad, no clipping, no moments) and bound the difference
# by float32 arithmetic:
#   * each evaluation of a gradient entry g = sum of terms t_i is off by at most gamma_n * S,
#     gamma_n = n*u/(1 - n*u) <= n*eps (u = eps/2 = 2^-24), S = sum_i |t_i| (Higham, sums and dot
#     products in any order); two evaluations in different orders (microbatches, shards) differ
#     by <= 2*n*eps*S. n = B*(P+R) = 96: every weight gradient sums over all positions;
#   * S is estimated from the values: the gradient of each kept token alone (one step per
#     one-hot coeff), S = max over the leaf of sum_tokens |grad_token| (the leaf max covers an
#     entry whose terms cancel inside one token's gradient);
#   * params' = fl(params - g) rounds once more: + eps * |params'|.
# One CPU measured at most ~15 eps*S for every loss and layout against the bound of 192 eps*S.
EPS = float(np.finfo(np.float32).eps)
N_TERMS = B * (P + R)


def _sgd_step(loss, microbatches=1, plan=None):
    """A function batch -> (float64 param leaves after ONE SGD step at lr 1, metrics)."""
    tx = optax.sgd(1.0)
    s = StepSettings(loss=loss, prompt_len=P, microbatches=microbatches, chunk_tokens=8)
    fn = jit_train_step(tx, S_CFG, T_CFG, s, plan)

    def call(batch):
        params = qwen.init_params(S_CFG, jax.random.key(0), std=0.3)
        teacher = qwen.init_params(T_CFG, jax.random.key(1), std=0.3)
        if plan is not None:
            params = jax.device_put(params, qwen.param_shardings(S_CFG, plan))
            teacher = jax.device_put(teacher, qwen.param_shardings(T_CFG, plan))
        state, m = fn(init_state(params, tx), jax.tree.map(jnp.asarray, batch), teacher)
        return [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.device_get(state["params"]))], jax.device_get(m)
    return call


def _init_leaves():
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.device_get(
        qwen.init_params(S_CFG, jax.random.key(0), std=0.3)))]


def _token_scales(step, batch):
    """(per leaf: max over entries of sum_tokens |grad of that token's term|, sum_tokens |loss term|)."""
    p0, grads, losses_abs = _init_leaves(), None, 0.0
    for b, t in np.argwhere(np.asarray(batch.coeff) != 0):
        one = np.zeros_like(batch.coeff)
        one[b, t] = batch.coeff[b, t]
        p1, m = step(batch._replace(coeff=one))
        g = [np.abs(x - y) for x, y in zip(p0, p1)]
        grads = g if grads is None else [a + c for a, c in zip(grads, g)]
        losses_abs += abs(float(m["loss/total"]))
    return [float(a.max()) for a in grads], losses_abs


def _assert_same_sgd_step(pa, ma, pb, mb, scales, loss_scale):
    """The two one-step results agree within the float32 bound derived above."""
    tol = [2 * N_TERMS * EPS * s + EPS * np.maximum(np.abs(x), np.abs(y)) for x, y, s in zip(pa, pb, scales)]
    for x, y, t in zip(pa, pb, tol):
        assert np.all(np.abs(x - y) <= t), float(np.max(np.abs(x - y) / t))
    # the loss is a sum of the same per-token terms: the same bound with S = sum |coeff * loss|
    assert loss_scale is None or abs(float(ma["loss/total"]) - float(mb["loss/total"])) <= 2 * N_TERMS * EPS * loss_scale
    # | |a| - |b| | <= |a - b| <= |tol|, and each float32 norm of N squares is off by <= N*eps*|g|
    n = sum(x.size for x in pa)
    tol_norm = np.sqrt(sum(np.sum(t ** 2) for t in tol)) + 2 * n * EPS * float(ma["loss/grad_norm"])
    assert abs(float(ma["loss/grad_norm"]) - float(mb["loss/grad_norm"])) <= tol_norm


@pytest.mark.parametrize("loss", ["pg", "reverse_kl_topk", "jsd"])
def test_sharded_step_equals_single_device(loss):
    batch = _batch()
    plan = sharding.ShardingPlan(sharding.make_mesh((2, 2, 2)))
    single = _sgd_step(loss)
    pa, ma = single(batch)
    pb, mb = _sgd_step(loss, plan=plan)(batch)
    scales, loss_scale = _token_scales(single, batch)
    _assert_same_sgd_step(pa, ma, pb, mb, scales, loss_scale)
    # AdamW with sharded moments over 2 steps: the step-1 loss is computed on the same params;
    # afterwards only Adam's own bound holds for every entry: with b1=0.9, b2=0.999 the
    # bias-corrected |m|/sqrt(v) <= 1.0014 at step <= 2 (Cauchy-Schwarz), so each run moves an
    # entry by <= lr*(1.0014 + wd*|p|) per step, and the two runs differ by at most twice that.
    ref_params, ref_m, _ = _run(loss, None)
    params, m, _ = _run(loss, plan)
    assert abs(float(m[0]["loss/total"]) - float(ref_m[0]["loss/total"])) <= 2 * N_TERMS * EPS * loss_scale
    lr, wd = 1e-2, 0.01
    for x, y in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert np.all(np.isfinite(y))
        assert np.all(np.abs(x - y) <= 2 * len(m) * lr * (1.0014 + wd * (np.maximum(np.abs(x), np.abs(y)) + 1)))


@pytest.mark.parametrize("loss", ["pg", "reverse_kl_topk", "jsd"])
@pytest.mark.parametrize("normalize", ["kept_tokens", "per_sequence"])
def test_gradient_accumulation_equals_one_batch(normalize, loss):
    """Accumulating 4 microbatches gives the one-batch gradient: one SGD step (lr 1) from the same
    params lands on the same params within the float32 bound of a reordered sum (see above)."""
    batch = _batch(1, normalize)
    one = _sgd_step(loss, 1)
    pa, ma = one(batch)
    pb, mb = _sgd_step(loss, 4)(batch)
    _assert_same_sgd_step(pa, ma, pb, mb, *_token_scales(one, batch))


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
    of the log-likelihood; one SGD step (lr 1) of the train step must land on params - that
    gradient within the float32 bound above, and make_optimizer must be clip + optax AdamW."""
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
    hand = [x - np.asarray(y, np.float64) for x, y in zip(_init_leaves(), jax.tree.leaves(g))]
    step = _sgd_step("pg")
    got, m = step(batch)
    # (the surrogate's value is not the pg loss, only its gradient is: no loss comparison)
    _assert_same_sgd_step(got, m, hand, {"loss/grad_norm": optax.global_norm(g)}, _token_scales(step, batch)[0], None)
    # The optimizer: the same gradient through make_optimizer and through optax's clip + AdamW.
    # Same operations on the same inputs; allow a few roundings of each result (4 eps * |x|).
    ours, theirs = make_optimizer(_opt(), 10), optax.chain(optax.clip_by_global_norm(1.0),
                                                           optax.adamw(1e-2, weight_decay=0.01))
    for tx in (ours, theirs):
        p, st = params, tx.init(params)
        for _ in range(2):
            upd, st = tx.update(g, st, p)
            p = optax.apply_updates(p, upd)
        if tx is ours:
            expect = p
    for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(expect)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert np.all(np.abs(x - y) <= 4 * EPS * np.maximum(np.abs(x), np.abs(y)) + 4 * EPS * 1e-2)


def test_schedules():
    c = _opt(warmup_steps=4, schedule="cosine", learning_rate=1.0)
    lr = learning_rate_schedule(c, 14)
    np.testing.assert_allclose([float(lr(s)) for s in (0, 2, 4, 9, 14)],
                               [0.0, 0.5, 1.0, 0.5 * (1 + np.cos(np.pi * 5 / 10)), 0.0], atol=1e-6)
    assert float(learning_rate_schedule(_opt(), 10)(7)) == pytest.approx(1e-2)
