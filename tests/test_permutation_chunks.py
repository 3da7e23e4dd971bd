"""The permutation calibration gives the same answer whether its reorderings are scanned all at
once or in lax.map chunks (large batches)."""
import jax
import jax.numpy as jnp
import numpy as np

from opdjax.teachability import changepoint


def test_chunked_scan_equals_vectorised(monkeypatch):
    rng = np.random.default_rng(0)
    M = rng.normal(size=(6, 10)).astype(np.float32)
    M[:2, 6:] -= 2
    valid = np.ones_like(M, bool)
    valid[3, 7:] = False
    orders = changepoint.permutation_orders(jax.random.key(1), jnp.asarray(valid), 60)
    whole = changepoint.permutation_test(jnp.asarray(M), jnp.asarray(valid), orders, alpha=0.1)
    assert changepoint._permutations_per_step(6, 60, 10, 32) == 60
    monkeypatch.setattr(changepoint, "VECTORISED_ELEMENTS", 0)
    assert changepoint._permutations_per_step(6, 60, 10, 32) == 30  # the largest divisor of 60 <= 32
    assert changepoint._permutations_per_step(6, 59, 10, 32) == 1
    # chunk=31 (not the default 32) so that jit traces again, under the patched threshold: steps of 30
    chunked = changepoint.permutation_test(jnp.asarray(M), jnp.asarray(valid), orders, alpha=0.1, chunk=31)
    for field in changepoint.PermutationTest._fields:
        np.testing.assert_array_equal(np.asarray(getattr(whole, field)), np.asarray(getattr(chunked, field)), field)
