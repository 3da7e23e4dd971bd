"""The policy the OPD step trains is the policy the sampler sampled from (issue 16, item 1).

With rollout.old_logp="sampled", pi_old and A_t are log-probs of the sampling distribution
(temperature, top-k, top-p). The step must score pi_theta through the same transform
(`step.policy_logits`), or a tempered rollout is off-policy by construction: at temperature 0.7 a
token at p = 0.1 in a (0.9, 0.1) split has pi_0.7 = 0.042, rho = 2.4, and the PPO clip zeroes its
gradient. On the real toy student, one step right after sampling must see rho = 1 up to float32
recomputation and no clipping, at temperature 1 and 0.7 and with top-k/top-p truncation.

Tolerance, derived: the sampler's log-probs come from a KV-cached decode and the step's from one
full forward in another summation order; in float32 each logit moves by a few ulps of the largest
partial sums (|logits| < 30 here: ~30 * 2^-23 * depth ~ 1e-5), so |log rho| stays below 1e-4 and
rho's batch mean within 1e-4 of 1. The bug this guards against moves the mean by > 0.05 and clips
more than 1% of the tokens (asserted below on the unfixed combination).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from opdjax import losses
from opdjax.data.prompts import left_pad
from opdjax.data.tokenizer import load_tokenizer
from opdjax.models import hf_io
from opdjax.rollout.sampler import SamplingSettings, sample
from opdjax.rollout.stops import stop_ids
from opdjax.toy import arithmetic, opd_pair
from opdjax.train.loop import init_state
from opdjax.train.step import POLICY_FILL, StepSettings, TrainBatch, jit_train_step, policy_logits

LOG_RATIO_TOL = 1e-4


@pytest.fixture(scope="module")
def toy():
    teacher_dir, student_dir = opd_pair.load_toy_pair()
    tok = load_tokenizer(student_dir)
    params, cfg = hf_io.load_pretrained(student_dir)
    t_params, t_cfg = hf_io.load_pretrained(teacher_dir)
    prompts = [opd_pair.encode_prompt(tok, p["prompt"]) for p in arithmetic.make_problems(8, seed=3)]
    tokens, mask = left_pad(prompts, tok.pad_token_id)
    return dict(tok=tok, params=params, cfg=cfg, t_params=t_params, t_cfg=t_cfg, prompt=jnp.asarray(tokens),
                prompt_mask=jnp.asarray(mask))


_ROLLOUTS = {}


def _rollout(toy, temperature, top_k=0, top_p=1.0, cache_dtype=""):
    """8 rollouts of 48 tokens under these sampling settings (sampled once per module)."""
    key = (temperature, top_k, top_p, cache_dtype)
    if key not in _ROLLOUTS:
        s = SamplingSettings(48, temperature, top_p, top_k, candidates=8,
                             stop_ids=stop_ids(toy["tok"], (toy["cfg"],)), cache_dtype=cache_dtype)
        _ROLLOUTS[key] = sample(toy["params"], toy["prompt"], toy["prompt_mask"], jax.random.key(7), toy["cfg"], s,
                                pad_id=toy["tok"].pad_token_id)
    return _ROLLOUTS[key]


def one_step(toy, temperature, top_k=0, top_p=1.0, *, policy=True, loss="pg", cache_dtype=""):
    """One train step right after sampling: (the step's metrics, the new state, response tokens)."""
    roll = _rollout(toy, temperature, top_k, top_p, cache_dtype)
    P = toy["prompt"].shape[1]
    resp = roll.mask
    # advantages of both signs, so that both sides of the clip are exercised
    adv = jnp.where(resp, jnp.where(jnp.arange(resp.shape[1]) % 2 == 0, 1.0, -1.0)[None, :], 0.0)
    t_cand = jax.nn.log_softmax(jnp.linspace(0.0, -3.0, 8))[None, None, :] * jnp.ones(roll.topk_ids.shape)
    inputs = losses.LossInputs(roll.tokens, roll.logp_sampled, adv, roll.topk_ids, t_cand)
    batch = TrainBatch(jnp.concatenate([toy["prompt"], roll.tokens], 1),
                       jnp.concatenate([toy["prompt_mask"], resp], 1), inputs,
                       losses.token_coefficients(resp.astype(jnp.float32), resp))
    kw = dict(policy_temperature=temperature, policy_top_k=top_k, policy_top_p=top_p) if policy else {}
    step = jit_train_step(optax.sgd(1e-3), toy["cfg"], toy["t_cfg"],
                          StepSettings(loss=loss, prompt_len=P, chunk_tokens=16, **kw), None)
    state, m = step(init_state(jax.tree.map(jnp.copy, toy["params"]), optax.sgd(1e-3)), batch, toy["t_params"])
    return jax.device_get(m), jax.device_get(state), int(resp.sum())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_one_step_after_sampling_is_on_policy(toy, temperature):
    m, _, n = one_step(toy, temperature)
    assert n > 100  # enough sampled tokens for the means to mean something
    assert abs(m["loss/pg/ratio_mean"] - 1.0) < LOG_RATIO_TOL
    assert m["loss/pg/clip_frac"] == 0.0
    assert m["loss/pg/approx_kl"] < LOG_RATIO_TOL ** 2


def test_tempered_rollouts_scored_by_the_plain_softmax_are_off_policy(toy):
    """The combination the step used to run (pi_old tempered, pi_theta the plain softmax) on the
    same rollouts: tokens are clipped and KL(pi_old || pi_theta) is far above recomputation noise.
    (The peaked toy student moves little at 0.7: measured clip_frac 0.8%, approx_kl 3e-3.)"""
    m, _, _ = one_step(toy, 0.7, policy=False)
    assert m["loss/pg/clip_frac"] > 0.0
    assert m["loss/pg/approx_kl"] > 1e4 * LOG_RATIO_TOL ** 2  # 1e4 x the on-policy bound


def test_truncated_policy_is_on_policy(toy):
    """top-k and top-p as well: the step truncates pi_theta exactly as the sampler did."""
    m, state, _ = one_step(toy, 0.7, top_k=20, top_p=0.9)
    assert np.isfinite(m["loss/total"]) and int(state["skipped"]) == 0
    assert abs(m["loss/pg/ratio_mean"] - 1.0) < LOG_RATIO_TOL
    assert m["loss/pg/clip_frac"] == 0.0


@pytest.mark.parametrize("loss", ["pg", "reverse_kl_topk", "reverse_kl_full", "jsd"])
def test_losses_are_finite_on_a_truncated_policy(loss):
    """The truncated policy gives excluded tokens probability 0 through the finite POLICY_FILL:
    every loss the validator allows with truncation has a finite value and gradient, and the
    gradient at excluded logits is exactly 0 (they are constants of the policy)."""
    rs = np.random.RandomState(0)
    B, c, V, K = 2, 5, 64, 4
    z = jnp.asarray(rs.randn(B, c, V) * 3, jnp.float32)
    s = StepSettings(loss=loss, prompt_len=1, policy_temperature=0.7, policy_top_k=12, policy_top_p=0.8)
    ids = jnp.asarray(jnp.argsort(-z, axis=-1)[..., :K], jnp.int32)
    # half the sampled ids are excluded by the truncation (rank 30 > top_k): log pi = fill, rho clamped
    sampled = jnp.where(jnp.asarray(rs.rand(B, c) < 0.5), ids[..., 0], jnp.argsort(-z, axis=-1)[..., 30])
    inputs = losses.LossInputs(sampled.astype(jnp.int32), jnp.full((B, c), -1.0, jnp.float32),
                               jnp.asarray(rs.randn(B, c), jnp.float32), ids,
                               jnp.asarray(np.log(rs.dirichlet(np.ones(K + 1), (B, c))[..., :K]), jnp.float32))
    teacher = jnp.asarray(rs.randn(B, c, V), jnp.float32)

    def total(z):
        per_token, _ = losses.per_token_loss(loss, policy_logits(z, s), inputs, teacher_logits=teacher)
        return jnp.sum(per_token)
    value, grad = jax.jit(jax.value_and_grad(total))(z)
    kept = np.asarray(policy_logits(z, s)) > POLICY_FILL / 2
    assert 0 < kept.sum(-1).min() and kept.sum(-1).max() <= 12
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_array_equal(np.asarray(grad)[~kept], 0.0)
