"""DAIL's mixed rollout: tau = 0 and tau = 1 are the plain student / expert samplers with the
same keys; the acceptance rule matches its closed form on a hand-built pair of distributions;
banned ids never appear."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opdjax.rollout.mixed import MixedSettings, choose_mixed, expert_top_probs, mixed_rollout
from opdjax.models import qwen
from opdjax.models.config import ModelConfig
from opdjax.rollout.sampler import sample

CFG = ModelConfig("qwen3", vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8)
PARAMS = qwen.init_params(CFG, jax.random.key(1), std=0.6)
STOP = (7,)


def _left_padded(lengths, P, seed):
    rs = np.random.RandomState(seed)
    toks = np.zeros((len(lengths), P), np.int32)
    mask = np.zeros((len(lengths), P), bool)
    for i, n in enumerate(lengths):
        toks[i, P - n:], mask[i, P - n:] = rs.randint(8, 40, n), True
    return jnp.asarray(toks), jnp.asarray(mask)


STUDENT = _left_padded((3, 6, 2, 5), 6, 0)
EXPERT = _left_padded((9, 4, 11, 7), 11, 1)  # a longer context, as the expert's is


@pytest.mark.parametrize("tau,context", [(0.0, STUDENT), (1.0, EXPERT)], ids=["tau0_student", "tau1_expert"])
def test_extremes_are_the_plain_samplers(tau, context):
    s = MixedSettings(max_new_tokens=14, accept_threshold=tau, top_n=6, stop_ids=STOP).check(CFG.vocab_size)
    key = jax.random.key(3)
    mixed = mixed_rollout(PARAMS, *STUDENT, *EXPERT, key, CFG, s)
    plain = sample(PARAMS, *context, key, CFG, s.top_n_sampling)
    np.testing.assert_array_equal(np.asarray(mixed.tokens), np.asarray(plain.tokens))
    np.testing.assert_array_equal(np.asarray(mixed.mask), np.asarray(plain.mask))
    assert np.asarray(mixed.from_expert).sum() == (np.asarray(mixed.mask).sum() if tau == 1.0 else 0)
    assert np.asarray(mixed.mask).sum() > 20  # the comparison covered real tokens


def test_prefill_once_per_prompt_equals_repeated_rows():
    s = MixedSettings(max_new_tokens=10, accept_threshold=0.4, top_n=12, stop_ids=STOP).check(CFG.vocab_size)
    key = jax.random.key(8)
    rep = lambda x: jnp.repeat(x, 3, axis=0)  # noqa: E731
    once = mixed_rollout(PARAMS, *STUDENT, *EXPERT, key, CFG, s, samples=3)
    repeated = mixed_rollout(PARAMS, *map(rep, STUDENT), *map(rep, EXPERT), key, CFG, s)
    for a, b in zip(once, repeated):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(once.tokens).shape == (12, 10)


def _closed_form(p_logits, v_logits, n, tau, retries):
    """Token distribution and fallback probability of the mixed rule, from its definition."""
    def top_n_dist(x):
        keep = x >= np.sort(x)[-n]
        e = np.where(keep, np.exp(x - x.max()), 0.0)
        return e / e.sum(), keep
    P, _ = top_n_dist(p_logits)
    full = np.exp(v_logits - v_logits.max())
    full /= full.sum()
    Vn, keep_v = top_n_dist(v_logits)
    V = np.where(keep_v, full, 0.0)  # not renormalised
    ok = V >= tau
    a = float((P * ok).sum())  # one draw from P passes
    fail = (1.0 - a) ** retries
    dist = (P * ok / a * (1.0 - fail) if a > 0 else 0.0) + fail * Vn
    return dist, fail, V


@pytest.mark.parametrize("tau,retries", [(0.15, 5), (0.15, 1), (0.3, 3)])
def test_acceptance_matches_closed_form(tau, retries):
    # Vocabulary of 8: the student likes tokens 0-2, the expert 2-4; top-5 of each.
    p_logits = np.log(np.array([0.30, 0.25, 0.15, 0.10, 0.08, 0.05, 0.04, 0.03]))
    v_logits = np.log(np.array([0.02, 0.03, 0.35, 0.25, 0.20, 0.08, 0.04, 0.03]))
    n, B = 5, 60000
    s = MixedSettings(max_new_tokens=1, accept_threshold=tau, top_n=n, retries=retries, stop_ids=(7,))
    tok, fb = jax.jit(choose_mixed, static_argnums=3)(
        jnp.tile(jnp.asarray(p_logits, jnp.float32), (B, 1)), jnp.tile(jnp.asarray(v_logits, jnp.float32), (B, 1)),
        jax.random.key(11), s)
    dist, fail, V = _closed_form(p_logits, v_logits, n, tau, retries)
    np.testing.assert_allclose(np.asarray(expert_top_probs(jnp.asarray(v_logits[None], jnp.float32), n))[0], V,
                               rtol=1e-5, atol=1e-7)
    freq = np.bincount(np.asarray(tok), minlength=8) / B
    se = np.sqrt(dist * (1 - dist) / B) + 1e-12
    assert np.all(np.abs(freq - dist) <= 5 * se + 1e-9), (freq, dist)
    fb = np.asarray(fb)
    assert abs(fb.mean() - fail) <= 5 * np.sqrt(fail * (1 - fail) / B) + 1e-9, (fb.mean(), fail)
    # An accepted token always passes the threshold; a fallback is drawn from V's top-n.
    assert np.all(V[np.asarray(tok)[~fb]] >= tau)
    assert np.all(V[np.asarray(tok)[fb]] > 0)


def test_banned_ids_never_generated_and_a_real_mixture():
    key = jax.random.key(5)
    s0 = MixedSettings(max_new_tokens=10, accept_threshold=0.0, top_n=40, stop_ids=STOP)
    free = mixed_rollout(PARAMS, *STUDENT, *EXPERT, key, CFG, s0)
    common = int(np.bincount(np.asarray(free.tokens)[np.asarray(free.mask)], minlength=40)[8:].argmax()) + 8
    s = MixedSettings(max_new_tokens=10, accept_threshold=0.4, top_n=20, stop_ids=STOP, banned_ids=(common,))
    r = mixed_rollout(PARAMS, *STUDENT, *EXPERT, key, CFG, s.check(40))
    toks, mask = np.asarray(r.tokens), np.asarray(r.mask)
    assert common not in toks[mask]
    assert 0 < np.asarray(r.from_expert).sum() < mask.sum()  # a real mixture at tau = 0.4


def test_settings_errors_name_the_field():
    with pytest.raises(ValueError, match="accept_threshold"):
        MixedSettings(4, 1.5, stop_ids=STOP).check(40)
    with pytest.raises(ValueError, match="top_n"):
        MixedSettings(4, 0.5, top_n=41, stop_ids=STOP).check(40)
    with pytest.raises(ValueError, match="retries"):
        MixedSettings(4, 0.5, retries=0, stop_ids=STOP).check(40)
    with pytest.raises(ValueError, match="ban_tokens"):
        MixedSettings(4, 0.5, stop_ids=STOP, banned_ids=STOP).check(40)
    with pytest.raises(ValueError, match="stop token"):
        MixedSettings(4, 0.5).check(40)
