"""rollout.draw.categorical (the samplers' token draw, issue 17) against the softmax it samples:
frequencies, excluded tokens, the block edges of its two-level cumulative sum, and a float64
inverse-CDF oracle fed the same uniform numbers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opdjax.rollout import draw


def _softmax64(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("V", [37, 700])  # one block; several blocks with a padded last one
def test_frequencies_match_the_softmax(V):
    """N draws of one row: every token's count is within 5 binomial standard deviations of N p
    (plus 1 for the float32 interval error, ~1e-7 N); excluded (-inf) tokens are never drawn."""
    rng = np.random.default_rng(V)
    logits = rng.normal(size=V) * 2
    excluded = rng.choice(V, V // 5, replace=False)
    logits[excluded] = -np.inf
    N = 200_000
    toks = jax.jit(draw.categorical)(jax.random.key(1), jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (N, V)))
    counts = np.bincount(np.asarray(toks), minlength=V)
    p = _softmax64(logits)
    assert counts[excluded].sum() == 0
    assert np.all(np.abs(counts - N * p) <= 5 * np.sqrt(N * p * (1 - p)) + 1)


def test_same_uniforms_as_a_float64_inverse_cdf():
    """Row b's token is the first whose float64 cumulative probability exceeds u_b (the uniform
    of jax.random.uniform(key, (B,))); rows whose u_b lies within 1e-5 of a boundary (float32 sums
    over V entries may put it on either side) are skipped, and they are a small minority."""
    B, V = 512, 3000
    logits = jax.random.normal(jax.random.key(3), (B, V)) * 3
    key = jax.random.key(4)
    toks = np.asarray(draw.categorical(key, logits))
    u = np.asarray(jax.random.uniform(key, (B,), jnp.float32), np.float64)
    cdf = np.cumsum(_softmax64(np.asarray(logits)), -1)
    ref = np.argmax(cdf > u[:, None], -1)
    clear = np.min(np.abs(cdf - u[:, None]), -1) > 1e-5
    assert clear.sum() >= 0.9 * B
    np.testing.assert_array_equal(toks[clear], ref[clear])


def test_edges_of_the_blocks_and_the_vocabulary():
    """Mass on one token, wherever it is (first, a block edge, the last of a padded vocabulary),
    is drawn every time; so is a token whose only rival is 200 nats below (exp underflows to 0)."""
    V = 2 * draw.BLOCK + 45
    for hot in (0, draw.BLOCK - 1, draw.BLOCK, V - 1):
        logits = jnp.full((64, V), -jnp.inf).at[:, hot].set(0.0)
        assert set(np.asarray(draw.categorical(jax.random.key(hot), logits)).tolist()) == {hot}
    logits = jnp.full((64, V), -200.0).at[:, 7].set(0.0)
    assert set(np.asarray(draw.categorical(jax.random.key(9), logits)).tolist()) == {7}


def test_rows_are_independent_and_the_key_decides():
    """Same key, same tokens; another key, other tokens; rows with equal logits draw differently."""
    logits = jnp.zeros((256, 50))
    a = np.asarray(draw.categorical(jax.random.key(0), logits))
    np.testing.assert_array_equal(a, np.asarray(draw.categorical(jax.random.key(0), logits)))
    assert not np.array_equal(a, np.asarray(draw.categorical(jax.random.key(1), logits)))
    assert len(set(a.tolist())) > 30
