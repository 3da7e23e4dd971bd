"""DAIL's mixed rollout: tau = 0 and tau = 1 are the plain student / expert samplers with the
same keys; the acceptance rule matches its closed form on a hand-built pair of distributions;
banned ids never appear, and are removed as the authors remove them (V not renormalised: a
hand-counted case where renormalising would flip every decision)."""
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


def _closed_form(p_logits, v_logits, n, tau, retries, banned=()):
    """Token distribution and fallback probability of the mixed rule, from its definition (the
    authors': top-n over the whole vocabulary, banned ids then dropped; V not renormalised)."""
    def top_n_dist(x):
        keep = x >= np.sort(x)[-n]
        keep[list(banned)] = False
        e = np.where(keep, np.exp(x - x.max()), 0.0)
        return e / e.sum(), keep
    P, _ = top_n_dist(p_logits)
    full = np.exp(v_logits - v_logits.max())
    full /= full.sum()  # the softmax with the banned ids' mass still in it
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


# A banned id (0, standing for </think>) holding half the expert's mass: the authors zero it in V
# without renormalising V. Expert probs 0.5 (banned), 0.3, 0.15, ...; student mostly token 1.
BAN_P = np.array([0.06, 0.80, 0.05, 0.04, 0.02, 0.02, 0.005, 0.005])
BAN_V = np.array([0.50, 0.30, 0.15, 0.02, 0.01, 0.01, 0.005, 0.005])


def _choose_many(p, v, settings, B, seed):
    tok, fb = jax.jit(choose_mixed, static_argnums=3)(
        jnp.tile(jnp.log(jnp.asarray(p, jnp.float32)), (B, 1)), jnp.tile(jnp.log(jnp.asarray(v, jnp.float32)), (B, 1)),
        jax.random.key(seed), settings)
    return np.asarray(tok), np.asarray(fb)


def test_banned_token_zeroed_in_v_without_renormalising():
    """Hand count, top-3, tau = 0.5. V's top-3 over the whole vocabulary is {0, 1, 2}; 0 is banned:
    V = (0, 0.30, 0.15, 0, ...) — no token reaches 0.5, so every proposal fails and every token is
    a fallback drawn from V renormalised: 1 with 0.30/0.45 = 2/3, 2 with 1/3. Renormalising V after
    the ban (V[1] = 0.30/0.50 = 0.6 >= 0.5) would instead accept the student's token 1 in all but
    (1 - 0.8/0.89)^5 ~ 1e-5 of the rows: the opposite decision."""
    s = MixedSettings(max_new_tokens=1, accept_threshold=0.5, top_n=3, retries=5, stop_ids=(7,),
                      banned_ids=(0,)).check(8)
    V = np.asarray(expert_top_probs(jnp.log(jnp.asarray(BAN_V[None], jnp.float32)), 3, (0,)))[0]
    np.testing.assert_allclose(V, [0, 0.30, 0.15, 0, 0, 0, 0, 0], rtol=1e-6, atol=1e-8)
    assert 0.30 / (1 - 0.50) >= 0.5  # what renormalising would have compared
    B = 30000
    tok, fb = _choose_many(BAN_P, BAN_V, s, B, 4)
    assert fb.all()  # every decision is the expert's
    assert set(np.unique(tok)) <= {1, 2}  # never the banned 0, never outside V's top-3
    freq1 = (tok == 1).mean()
    assert abs(freq1 - 2 / 3) <= 5 * np.sqrt(2 / 9 / B), freq1


@pytest.mark.parametrize("tau", [0.5, 0.25, 0.1])
def test_banned_acceptance_matches_closed_form(tau):
    """tau = 0.25: token 1 (V = 0.30) passes, token 2 (V = 0.15) does not — renormalised (0.30) it
    would. tau = 0.1: both pass. The closed form drops the banned id after the top-n."""
    s = MixedSettings(max_new_tokens=1, accept_threshold=tau, top_n=3, retries=5, stop_ids=(7,),
                      banned_ids=(0,)).check(8)
    B = 60000
    tok, fb = _choose_many(BAN_P, BAN_V, s, B, 12)
    dist, fail, V = _closed_form(np.log(BAN_P), np.log(BAN_V), 3, tau, 5, banned=(0,))
    assert dist[0] == 0 and V[0] == 0
    freq = np.bincount(tok, minlength=8) / B
    se = np.sqrt(dist * (1 - dist) / B) + 1e-12
    assert np.all(np.abs(freq - dist) <= 5 * se + 1e-9), (freq, dist)
    assert abs(fb.mean() - fail) <= 5 * np.sqrt(fail * (1 - fail) / B) + 1e-9, (fb.mean(), fail)
    if tau == 0.25:  # P over {1, 2} (0 dropped): 0.8/0.85 and 0.05/0.85; token 2 only by fallback
        assert fail == pytest.approx((0.05 / 0.85) ** 5, rel=1e-5)
        assert freq[2] <= 1e-4


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
    with pytest.raises(ValueError, match=r"top_n=2 must exceed the number of banned ids \(2"):
        MixedSettings(4, 0.5, top_n=2, stop_ids=STOP, banned_ids=(3, 4)).check(40)
