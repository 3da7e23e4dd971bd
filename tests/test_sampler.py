"""The sampler: greedy equals an argmax loop over full forwards; every recorded log-prob and
candidate equals what a full forward over the sampled sequence gives; top-k / top-p filters
equal a NumPy reference; draws follow the sampling distribution."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opdjax.models import qwen
from opdjax.models.config import ModelConfig
from opdjax.rollout.greedy import greedy_generate
from opdjax.rollout.sampler import SamplingSettings, sample, sampling_logits

CFG = ModelConfig("qwen3", vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8)
PARAMS = qwen.init_params(CFG, jax.random.key(1), std=0.6)


def _prompts(left=True):
    rs = np.random.RandomState(0)
    rows = [rs.randint(2, 40, n) for n in (4, 7, 2, 5)]
    P = 7
    toks = np.zeros((len(rows), P), np.int32)
    mask = np.zeros((len(rows), P), bool)
    for i, p in enumerate(rows):
        sl = slice(P - len(p), P) if left else slice(0, len(p))
        toks[i, sl], mask[i, sl] = p, True
    return toks, mask


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("left", [True, False], ids=["left_padded", "right_padded"])
def test_greedy_matches_greedy_generate(left):
    toks, mask = _prompts(left)
    s = SamplingSettings(max_new_tokens=12, temperature=0.0, candidates=3, stop_ids=(7,))
    r = sample(PARAMS, jnp.asarray(toks), jnp.asarray(mask), jax.random.key(0), CFG, s)
    ref, real = greedy_generate(PARAMS, jnp.asarray(toks), jnp.asarray(mask), CFG, max_new_tokens=12, eos_id=7)
    np.testing.assert_array_equal(np.asarray(r.tokens), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(r.mask), np.asarray(real))
    assert np.all(np.asarray(r.logp_sampled) == 0.0)  # a point mass


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8)])
def test_records_equal_full_forward(temperature, top_k, top_p):
    """Re-score the sampled sequences with one full forward: the sampler's recorded log-probs,
    candidates and their log-probs must be exactly those of the positions it sampled at."""
    toks, mask = _prompts()
    s = SamplingSettings(max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p,
                         candidates=4, stop_ids=(7,))
    r = sample(PARAMS, jnp.asarray(toks), jnp.asarray(mask), jax.random.key(3), CFG, s)
    full = np.concatenate([toks, np.asarray(r.tokens)], 1)
    fmask = np.concatenate([mask, np.asarray(r.mask)], 1)
    logits, _ = qwen.forward(PARAMS, jnp.asarray(full), CFG, mask=jnp.asarray(fmask))
    logits = np.asarray(logits, np.float64)[:, toks.shape[1] - 1:-1]  # predicts each new token
    model_logp = _np_log_softmax(logits)
    samp_logp = np.asarray(jax.nn.log_softmax(sampling_logits(jnp.asarray(logits, jnp.float32), s)))
    real = np.asarray(r.mask)
    assert real.sum() > 10
    tok = np.asarray(r.tokens)
    pick = lambda a: np.take_along_axis(a, tok[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(r.logp_model)[real], pick(model_logp)[real], atol=2e-5)
    np.testing.assert_allclose(np.asarray(r.logp_sampled)[real], pick(samp_logp)[real], atol=2e-5)
    assert np.isfinite(np.asarray(r.logp_sampled)[real]).all()  # never samples an excluded token
    ids = np.asarray(r.topk_ids)
    ref_ids = np.argsort(-logits, -1, kind="stable")[..., :4]
    np.testing.assert_array_equal(np.sort(ids[real], -1), np.sort(ref_ids[real], -1))
    np.testing.assert_allclose(np.asarray(r.topk_logp_model)[real],
                               np.take_along_axis(model_logp, ids, -1)[real], atol=2e-5)
    np.testing.assert_allclose(np.asarray(r.topk_logp_sampled)[real],
                               np.take_along_axis(samp_logp, ids, -1)[real], atol=2e-5)
    assert (np.asarray(r.logp_model)[~real] == 0).all() and (np.asarray(r.tokens)[~real] == 0).all()


def _np_filter(x, temperature, top_k, top_p):
    x = x / temperature
    if top_k:
        kth = np.sort(x, -1)[..., -top_k][..., None]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1:
        out = np.full_like(x, -np.inf)
        for b in range(x.shape[0]):
            order = np.argsort(-x[b], kind="stable")
            p = np.exp(_np_log_softmax(x[b][order]))
            mass = 0.0
            for j, v in enumerate(order):
                if mass >= top_p:
                    break
                out[b, v] = x[b, v]
                mass += p[j]
        x = out
    return x


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 3, 1.0), (0.5, 0, 0.5), (2.0, 6, 0.9), (1.0, 0, 0.3)])
def test_filters_equal_numpy(temperature, top_k, top_p):
    x = np.random.RandomState(1).randn(5, 30).astype(np.float32) * 2
    s = SamplingSettings(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=(0,))
    ours = np.asarray(sampling_logits(jnp.asarray(x), s))
    ref = _np_filter(x.astype(np.float64), temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], rtol=1e-6)


def test_draws_follow_the_sampling_distribution():
    """One prompt repeated 4,000 times: the first token's frequencies match exp(logp_sampled)."""
    toks, mask = _prompts()
    B = 4000
    s = SamplingSettings(max_new_tokens=1, temperature=1.5, top_p=0.9, candidates=2, stop_ids=(0,))
    r = sample(PARAMS, jnp.asarray(np.repeat(toks[:1], B, 0)), jnp.asarray(np.repeat(mask[:1], B, 0)),
               jax.random.key(11), CFG, s)
    tok, lp = np.asarray(r.tokens[:, 0]), np.asarray(r.logp_sampled[:, 0])
    probs = {t: np.exp(lp[tok == t][0]) for t in np.unique(tok)}
    assert abs(sum(probs.values()) - 1) < 1e-3 or len(probs) < 40  # unseen rare tokens allowed
    for t, p in probs.items():
        freq = (tok == t).mean()
        assert abs(freq - p) < 4 * np.sqrt(p * (1 - p) / B) + 1e-3, (t, freq, p)


def test_stop_tokens_and_keys():
    toks, mask = _prompts()
    s = SamplingSettings(max_new_tokens=16, temperature=1.0, candidates=2, stop_ids=(3, 5, 9))
    a = sample(PARAMS, jnp.asarray(toks), jnp.asarray(mask), jax.random.key(5), CFG, s)
    b = sample(PARAMS, jnp.asarray(toks), jnp.asarray(mask), jax.random.key(5), CFG, s)
    c = sample(PARAMS, jnp.asarray(toks), jnp.asarray(mask), jax.random.key(6), CFG, s)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))  # same key, same draw
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
    tok, real = np.asarray(a.tokens), np.asarray(a.mask)
    for row, m in zip(tok, real):
        n = m.sum()
        assert m[:n].all() and not m[n:].any()
        stops = np.isin(row[:n], (3, 5, 9))
        assert stops.sum() <= 1 and (stops.sum() == 0 or stops[n - 1])  # stops only at the end


def test_settings_errors_name_the_field():
    with pytest.raises(ValueError, match="rollout.top_p"):
        SamplingSettings(4, top_p=0.0, stop_ids=(1,)).check(40)
    with pytest.raises(ValueError, match="release.top_k"):
        SamplingSettings(4, candidates=41, stop_ids=(1,)).check(40)
    with pytest.raises(ValueError, match="rollout.stop_tokens"):
        SamplingSettings(4, stop_ids=(40,)).check(40)


def test_bfloat16_cache_of_a_float32_model():
    """cache_dtype=bfloat16 halves the cache; the records stay float32 and close to the f32 cache's."""
    toks, mask = _prompts()
    base = dict(max_new_tokens=8, temperature=0.0, candidates=3, stop_ids=(7,))
    a = sample(PARAMS, jnp.asarray(toks), jnp.asarray(mask), jax.random.key(0), CFG, SamplingSettings(**base))
    b = sample(PARAMS, jnp.asarray(toks), jnp.asarray(mask), jax.random.key(0), CFG,
               SamplingSettings(**base, cache_dtype="bfloat16"))
    assert b.topk_logp_model.dtype == jnp.float32
    first = np.asarray(a.mask[:, 0])
    np.testing.assert_array_equal(np.asarray(a.tokens[:, 0]), np.asarray(b.tokens[:, 0]))  # from the prefill
    same = np.asarray(a.tokens) == np.asarray(b.tokens)
    assert same.mean() > 0.7 and first.all()
    with pytest.raises(ValueError, match="rollout.cache_dtype"):
        SamplingSettings(4, stop_ids=(1,), cache_dtype="int8").check(40)


def test_early_exit_keeps_the_fixed_shape():
    """Every row stops at its first token (all ids are stop ids): the loop ends after one column
    and the rest is padding, exactly as if it had run all N steps."""
    toks, mask = _prompts()
    s = SamplingSettings(max_new_tokens=6, temperature=1.0, candidates=2, stop_ids=tuple(range(40)))
    r = sample(PARAMS, jnp.asarray(toks), jnp.asarray(mask), jax.random.key(2), CFG, s, pad_id=0)
    assert r.tokens.shape == (4, 6) and r.topk_ids.shape == (4, 6, 2)
    real = np.asarray(r.mask)
    assert real[:, 0].all() and not real[:, 1:].any()
    assert (np.asarray(r.tokens)[:, 1:] == 0).all() and (np.asarray(r.logp_model)[:, 1:] == 0).all()
    assert np.isneginf(np.asarray(r.topk_logp_model)[:, 1:]).all()
    assert np.isfinite(np.asarray(r.logp_model)[:, 0]).all()
