"""The sampler: greedy equals an argmax loop over full forwards; every recorded log-prob and
candidate equals what a full forward over the sampled sequence gives; top-k / top-p filters
equal a NumPy reference; draws follow the sampling distribution."""
import dataclasses

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


# ----------------------------------------------------------------------------- presence penalty

def test_presence_penalised_distribution_by_hand():
    """vLLM's presence penalty: subtract it once from the logit of every token already generated
    (however often), before temperature and top-p. Hand-computed for one row of 4 tokens."""
    from opdjax.rollout.sampler import presence_penalised
    logits = jnp.asarray([[2.0, 1.0, 0.0, 0.5]])
    appeared = jnp.asarray([[True, False, False, False]])
    pen = np.asarray(presence_penalised(logits, appeared, 1.5))
    np.testing.assert_array_equal(pen, [[0.5, 1.0, 0.0, 0.5]])
    # softmax of [0.5, 1, 0, 0.5]: e^.5 = 1.648721, e^1 = 2.718282, e^0 = 1; sum 7.015724
    s = SamplingSettings(max_new_tokens=1, temperature=1.0, stop_ids=(0,), presence_penalty=1.5)
    probs = np.exp(np.asarray(jax.nn.log_softmax(sampling_logits(jnp.asarray(pen), s))))
    np.testing.assert_allclose(probs, [[0.235003, 0.387455, 0.142538, 0.235003]], atol=2e-6)
    # temperature 0.5, then top-p 0.6: the logits become [1, 2, 0, 1] (sum of e^x = 13.8256), sorted
    # probs 0.5344 (token 1), 0.1966, 0.1966 (tokens 0 and 3), 0.0723 (token 2). The mass before
    # the second is 0.534 < 0.6: kept, and with it its tie (token 3, whose own mass-before is
    # 0.731); token 2 (mass before 0.927) is cut.
    s = SamplingSettings(max_new_tokens=1, temperature=0.5, top_p=0.6, stop_ids=(0,), presence_penalty=1.5)
    kept = np.asarray(sampling_logits(jnp.asarray(pen), s))
    np.testing.assert_array_equal(np.isfinite(kept), [[True, True, False, True]])
    probs = np.exp(np.asarray(jax.nn.log_softmax(jnp.asarray(kept))))
    e = np.exp([1.0, 2.0, 1.0])
    np.testing.assert_allclose(probs[0, [0, 1, 3]], e / e.sum(), rtol=1e-6)


def _np_sample_with_presence(toks, mask, key, s):
    """A NumPy sampler over full forwards (the model's logits recomputed from scratch at every
    step, in float64): penalise the tokens generated so far, filter (temperature, top-k, top-p),
    then draw with the same random number as rollout.draw.categorical(fold_in(key, i), x): one
    uniform u per row, the first token whose cumulative probability exceeds u."""
    B, P = toks.shape
    gen = np.zeros((B, 0), np.int32)
    appeared = np.zeros((B, CFG.vocab_size), bool)
    done = np.zeros(B, bool)
    out_tok, out_real, out_lp = [], [], []
    for i in range(s.max_new_tokens):
        full = np.concatenate([toks, gen], 1)
        fmask = np.concatenate([mask, np.ones_like(gen, bool)], 1)
        logits, _ = qwen.forward(PARAMS, jnp.asarray(full), CFG, mask=jnp.asarray(fmask))
        z = np.asarray(logits, np.float64)[:, -1] - s.presence_penalty * appeared
        x = _np_filter(z, s.temperature, s.top_k, s.top_p)
        u = np.asarray(jax.random.uniform(jax.random.fold_in(key, i), (B,), jnp.float32), np.float64)
        cdf = np.cumsum(np.exp(_np_log_softmax(x)), -1)
        token = np.argmax(cdf > u[:, None] * cdf[:, -1:], -1).astype(np.int32)
        out_tok.append(np.where(done, 0, token))
        out_real.append(~done)
        out_lp.append(np.take_along_axis(_np_log_softmax(x), token[:, None], -1)[:, 0])
        done = done | np.isin(token, s.stop_ids)
        appeared[np.arange(B), token] = True
        gen = np.concatenate([gen, token[:, None]], 1)
    return np.stack(out_tok, 1), np.stack(out_real, 1), np.stack(out_lp, 1)


@pytest.mark.parametrize("penalty,temperature,top_p", [(1.5, 0.6, 0.95), (-1.0, 0.8, 1.0)])  # authors' eval; a negative penalty
def test_presence_penalty_equals_a_numpy_sampler(penalty, temperature, top_p):
    """Same keys, same tokens: the jitted decode loop with its carried [B, V] mask draws exactly the
    tokens of the NumPy sampler, and records the log-prob of the penalised distribution."""
    toks, mask = _prompts()
    s = SamplingSettings(max_new_tokens=10, temperature=temperature, top_p=top_p, candidates=3, stop_ids=(7,),
                         presence_penalty=penalty)
    key = jax.random.key(21)
    r = sample(PARAMS, jnp.asarray(toks), jnp.asarray(mask), key, CFG, s)
    ref_tok, ref_real, ref_lp = _np_sample_with_presence(toks, mask, key, s)
    real = np.asarray(r.mask)
    np.testing.assert_array_equal(real, ref_real)
    np.testing.assert_array_equal(np.asarray(r.tokens), ref_tok)
    assert real.sum() >= 30
    np.testing.assert_allclose(np.asarray(r.logp_sampled)[real], ref_lp[real], atol=3e-5)
    # the penalty changed the draws: without it the same key gives other tokens
    plain = sample(PARAMS, jnp.asarray(toks), jnp.asarray(mask), key, CFG,
                   dataclasses.replace(s, presence_penalty=0.0))
    assert not np.array_equal(np.asarray(plain.tokens), ref_tok)
    # logp_model stays the model's own softmax (re-scored by one full forward)
    full = np.concatenate([toks, np.asarray(r.tokens)], 1)
    fmask = np.concatenate([mask, real], 1)
    logits, _ = qwen.forward(PARAMS, jnp.asarray(full), CFG, mask=jnp.asarray(fmask))
    model_logp = _np_log_softmax(np.asarray(logits, np.float64)[:, toks.shape[1] - 1:-1])
    pick = np.take_along_axis(model_logp, np.asarray(r.tokens)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(r.logp_model)[real], pick[real], atol=2e-5)


def test_presence_penalty_greedy_is_the_argmax_of_the_penalised_logits():
    """Greedy with the penalty (vLLM applies penalties before the argmax too): a NumPy loop of
    full forwards taking argmax(logits - 2 * appeared) gives the same tokens."""
    toks, mask = _prompts()
    s = SamplingSettings(max_new_tokens=12, temperature=0.0, candidates=2, stop_ids=(7,), presence_penalty=2.0)
    r = sample(PARAMS, jnp.asarray(toks), jnp.asarray(mask), jax.random.key(0), CFG, s)
    B = toks.shape[0]
    gen = np.zeros((B, 0), np.int32)
    appeared = np.zeros((B, CFG.vocab_size), bool)
    for _ in range(12):
        full = np.concatenate([toks, gen], 1)
        fmask = np.concatenate([mask, np.ones_like(gen, bool)], 1)
        logits, _ = qwen.forward(PARAMS, jnp.asarray(full), CFG, mask=jnp.asarray(fmask))
        token = np.argmax(np.asarray(logits, np.float64)[:, -1] - 2.0 * appeared, -1)
        appeared[np.arange(B), token] = True
        gen = np.concatenate([gen, token[:, None].astype(np.int32)], 1)
    real = np.asarray(r.mask)
    np.testing.assert_array_equal(np.asarray(r.tokens)[real], gen[real])
    assert np.all(np.asarray(r.logp_sampled) == 0.0)
    plain = sample(PARAMS, jnp.asarray(toks), jnp.asarray(mask), jax.random.key(0), CFG,
                   dataclasses.replace(s, presence_penalty=0.0))
    assert not np.array_equal(np.asarray(plain.tokens), np.asarray(r.tokens))  # the penalty mattered


def test_presence_penalty_zero_is_the_plain_sampler_and_range_is_checked():
    """0.0 is the default: the same (hashable) settings, hence the same compiled program."""
    base = SamplingSettings(max_new_tokens=4, temperature=0.7, stop_ids=(1,))
    assert dataclasses.replace(base, presence_penalty=0.0) == base and hash(
        dataclasses.replace(base, presence_penalty=0.0)) == hash(base)
    for bad in (2.5, -3.0, float("nan"), True, "1.5"):
        with pytest.raises(ValueError, match="eval.presence_penalty"):
            dataclasses.replace(base, presence_penalty=bad).check(40, section="eval")


@pytest.mark.parametrize("temperature,cache_dtype", [(0.0, ""), (1.0, ""), (0.8, "bfloat16")])
def test_decode_on_per_layer_weights_equals_the_layer_scan(monkeypatch, temperature, cache_dtype):
    """Issue 17 changed how the decode loop runs (per-layer weights on CPU, a kv-head-major cache):
    the tokens and every record equal those of the loop on the stacked weights' layer scan (the
    pre-change structure, still TPU's and GPU's), the log-probs to float32 rounding of the logits."""
    from opdjax.rollout import decode as decode_mod
    toks, mask = _prompts()
    s = SamplingSettings(max_new_tokens=12, temperature=temperature, candidates=4, stop_ids=(7,),
                         cache_dtype=cache_dtype)
    assert decode_mod.decode_on_per_layer_weights(None)  # this CPU takes the per-layer path
    run = lambda: sample(PARAMS, jnp.asarray(toks), jnp.asarray(mask), jax.random.key(5), CFG, s)  # noqa: E731
    new = run()
    monkeypatch.setattr(decode_mod, "decode_on_per_layer_weights", lambda plan: False)
    jax.clear_caches()  # the jitted sampler must retrace with the layer scan
    try:
        old = run()
    finally:
        monkeypatch.undo()
        jax.clear_caches()  # later tests must not get the layer-scan program from the cache
    real = np.asarray(new.mask)
    assert real.sum() > 20
    for name in ("tokens", "mask", "topk_ids"):
        np.testing.assert_array_equal(np.asarray(getattr(new, name)), np.asarray(getattr(old, name)), err_msg=name)
    for name in ("logp_sampled", "logp_model", "topk_logp_sampled", "topk_logp_model"):
        a, b = np.asarray(getattr(new, name)), np.asarray(getattr(old, name))
        np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b), err_msg=name)
        np.testing.assert_allclose(a[np.isfinite(a)], b[np.isfinite(b)], atol=2e-5, err_msg=name)
