"""Release index, loss weights, the baselines they are compared with, and their statistics.

Step 4 of ../shared/design/RELEASE_RULE.md. Every function here is a pure, jitted function of
[B, R] response-aligned arrays (R = max response length; `response_mask` marks each row's real
tokens, a prefix since responses are right-padded) and returns float32 weights [B, R] that are
zero on padding. The train step takes the weights as an input, so plain OPD, the fixed-fraction
prefix, the random release point and the BIC rule all share one compiled step.

Definitions (t is the 0-indexed token position, T_b the row's response length, r_b its release
index; tokens t < r are supervised with weight 1 under every fade):
  hard    w_t = 0                                   for t >= r      (the paper's "truncate")
  linear  w_t = max(0, 1 - (t - r + 1) / fade_tokens) for t >= r     (ours)
          i.e. a straight line from 1 at t = r-1 to 0 at t = r-1+fade_tokens; fade_tokens=1 is hard.
  exp     w_t = 0.5 ** ((t - r + 1) / half_life)     for t >= r      (ours)
          i.e. the weight halves every `half_life` tokens, counted from 1 at t = r-1.
r_b = T_b means "no release": the whole trajectory is supervised (plain OPD on that row).

The weights depend only on the rollout and the frozen teacher, never on the parameters being
updated; every weight function ends in `jax.lax.stop_gradient` so that holds even if a caller
builds them inside a differentiated function.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

FADES = ("hard", "linear", "exp")
N_POSITION_BINS = 10  # margin by position decile


def validate_fade(fade: str, fade_tokens: int, half_life: float) -> None:
    """Raises ValueError naming the offending `release.*` config field."""
    if fade not in FADES:
        raise ValueError(f"release.fade must be one of {FADES}, got {fade!r}")
    if fade == "linear" and not (isinstance(fade_tokens, int) and fade_tokens >= 1):
        raise ValueError(f"release.fade_tokens must be an int >= 1 for fade='linear', got {fade_tokens!r}")
    if fade == "exp" and not (isinstance(half_life, (int, float)) and half_life > 0):
        raise ValueError(f"release.half_life must be a number > 0 for fade='exp', got {half_life!r}")


def response_lengths(response_mask: jax.Array) -> jax.Array:
    """T_b: the number of real response tokens per row, int32 [B]."""
    return jnp.sum(response_mask, axis=1, dtype=jnp.int32)


@jax.jit
def release_index(split: jax.Array, detected: jax.Array, sent_ids: jax.Array,
                  response_mask: jax.Array) -> jax.Array:
    """r [B] int32: the first token of 0-indexed sentence `split` (= tau*, the number of sentences
    left of the change point) where `detected`, else the response length T_b (no release).

    Sentence ids are monotone along the row, so that first token's index is simply the number of
    real tokens whose sentence id is below `split`; a split past the last sentence gives T_b.
    """
    before = response_mask & (sent_ids < split[:, None])
    r = jnp.sum(before, axis=1, dtype=jnp.int32)
    return jnp.where(detected, r, response_lengths(response_mask))


@functools.partial(jax.jit, static_argnames=("fade", "fade_tokens", "half_life"))
def release_weights(r: jax.Array, response_mask: jax.Array, fade: str = "hard",
                    fade_tokens: int = 32, half_life: float = 16.0) -> jax.Array:
    """Loss weights [B, R] float32 for release indices r [B] (definitions in the module doc).

    The fade settings are static: a bad value raises at trace time, before any compute.
    """
    validate_fade(fade, fade_tokens, half_life)
    t = jnp.arange(response_mask.shape[1], dtype=jnp.int32)[None, :]
    after = (t - r[:, None] + 1).astype(jnp.float32)  # 1 at t = r, 2 at t = r+1, ...
    tail = _fade_tail(after, fade, fade_tokens, half_life)
    w = jnp.where(t < r[:, None], 1.0, tail) * response_mask
    return jax.lax.stop_gradient(w.astype(jnp.float32))


def _fade_tail(after: jax.Array, fade: str, fade_tokens: int, half_life: float) -> jax.Array:
    """The weight `after` tokens into the fade (float32; after = 1 at t = r): f(after - 1)."""
    if fade == "hard":
        return jnp.zeros_like(after)
    if fade == "linear":
        return jnp.maximum(0.0, 1.0 - after / fade_tokens)
    return jnp.exp2(-after / half_life)


# ----------------------------------------------------------------------------- baselines

@jax.jit
def full_weights(response_mask: jax.Array) -> jax.Array:
    """Plain OPD: every real response token has weight 1."""
    return jax.lax.stop_gradient(response_mask.astype(jnp.float32))


@jax.jit
def prefix_fraction_index(response_mask: jax.Array, fraction: jax.Array | float) -> jax.Array:
    """r_b = floor(fraction * T_b + 1/2) (round half up, in float32): keep that many leading tokens."""
    fraction = jnp.clip(jnp.asarray(fraction, jnp.float32), 0.0, 1.0)
    T = response_lengths(response_mask)
    r = jnp.floor(fraction * T.astype(jnp.float32) + 0.5).astype(jnp.int32)
    return jnp.minimum(r, T)


@functools.partial(jax.jit, static_argnames=("fade", "fade_tokens", "half_life"))
def prefix_fraction_weights(response_mask: jax.Array, fraction: jax.Array | float, fade: str = "hard",
                            fade_tokens: int = 32, half_life: float = 16.0) -> jax.Array:
    """Fixed-fraction prefix truncation: release every row at round(fraction * T_b)."""
    return release_weights(prefix_fraction_index(response_mask, fraction), response_mask,
                           fade, fade_tokens, half_life)


@jax.jit
def random_release_index(key: jax.Array, response_mask: jax.Array,
                         kept_ratio: jax.Array | float) -> jax.Array:
    """A random release point per row whose batch total is exactly K = floor(kept_ratio * sum T + 1/2).

    Definition: draw u_b ~ Uniform(0, 1] per row. Row b's release fraction is min(1, s * u_b) for
    one common scale s (so fractions are uniform up to that scale, and rows with large u_b are
    not released when the ratio is high). In integers: token t of row b is kept once
    s >= (t + 1) / (u_b * T_b); this threshold grows along the row, so keeping the K real tokens
    with the smallest thresholds over the whole batch keeps a prefix of every row, and exactly K
    tokens in total (ties broken by a stable sort in row-major order). Deterministic given `key`.
    Pass the rule's kept share of the same batch (`release_stats(...)["pre_release_share"]`).
    This matches a token count, which is the weight mass only under `hard`; to match the rule's
    sum w under any fade use `random_matched_weights` (the `random_matched` mode does).
    """
    B, R = response_mask.shape
    T = response_lengths(response_mask)
    ratio = jnp.clip(jnp.asarray(kept_ratio, jnp.float32), 0.0, 1.0)
    n_keep = jnp.floor(ratio * jnp.sum(T).astype(jnp.float32) + 0.5).astype(jnp.int32)
    n_keep = jnp.minimum(n_keep, jnp.sum(T))
    order = _random_token_order(key, response_mask)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
    kept = (rank < n_keep).reshape(B, R)
    return jnp.sum(kept, axis=1, dtype=jnp.int32)


def _random_token_order(key: jax.Array, response_mask: jax.Array) -> jax.Array:
    """The flat (row-major) indices of the [B, R] tokens by increasing random threshold
    (t + 1) / (u_b T_b) (random_release_index's definition), padding last."""
    B, R = response_mask.shape
    T = response_lengths(response_mask)
    u = 1.0 - jax.random.uniform(key, (B,), jnp.float32)  # (0, 1]: no row is never kept
    t = jnp.arange(R, dtype=jnp.float32)[None, :]
    threshold = (t + 1.0) / (u[:, None] * jnp.maximum(T, 1)[:, None].astype(jnp.float32))
    threshold = jnp.where(response_mask, threshold, jnp.inf).ravel()
    return jnp.argsort(threshold, stable=True)


@functools.partial(jax.jit, static_argnames=("fade", "fade_tokens", "half_life"))
def random_release_weights(key: jax.Array, response_mask: jax.Array, kept_ratio: jax.Array | float,
                           fade: str = "hard", fade_tokens: int = 32, half_life: float = 16.0) -> jax.Array:
    """Random release point per row, matching the batch's kept-token ratio (see random_release_index)."""
    return release_weights(random_release_index(key, response_mask, kept_ratio), response_mask,
                           fade, fade_tokens, half_life)


@functools.partial(jax.jit, static_argnames=("fade", "fade_tokens", "half_life"))
def random_matched_weights(key: jax.Array, response_mask: jax.Array, target_mass: jax.Array | float,
                           fade: str = "hard", fade_tokens: int = 32,
                           half_life: float = 16.0) -> tuple[jax.Array, jax.Array]:
    """Random release points whose weights carry exactly `target_mass` = sum w (the rule's, fades
    included). Returns (r [B] int32, w [B, R] float32).

    With f(i) the fade's weight at t = r + i (hard: 0), a row released at r carries
    S(r) = r + F(T - r), F(n) = sum_{i<n} f(i); moving its release from t to t + 1 adds
    1 - f(T - t - 1) >= 0. Start from every row released at 0 (mass sum_b F(T_b), at most any
    rule's, S being nondecreasing) and add tokens in random_release_index's random order (same
    key, same order) while the mass stays <= target_mass. The next token's row then gets the
    fractional remainder theta = remaining / its increment: its weights are
    (1 - theta) w(r) + theta w(r + 1), still in [0, 1] and non-increasing; r is its integer point.
    theta is taken against the summed weights of the integer points, so sum w = target_mass up to
    float32 summation error. Under `hard` every increment is 1: for an integer target K this is
    random_release_index with K tokens, bit for bit (theta = 0). A target above sum T keeps
    every token; one below the start mass releases every row at 0.
    """
    validate_fade(fade, fade_tokens, half_life)
    B, R = response_mask.shape
    m = response_mask.astype(bool)
    T = response_lengths(m)
    target = jnp.asarray(target_mass, jnp.float32)
    order = _random_token_order(key, m)
    # increment of moving row b's release from t to t + 1; +inf on padding (never added)
    t = jnp.arange(R, dtype=jnp.int32)[None, :]
    inc = 1.0 - _fade_tail((T[:, None] - t).astype(jnp.float32), fade, fade_tokens, half_life)
    inc = jnp.where(m, inc, jnp.inf).ravel()[order]
    start = jnp.sum(release_weights(jnp.zeros((B,), jnp.int32), m, fade, fade_tokens, half_life))
    n = jnp.sum(jnp.cumsum(inc) <= target - start, dtype=jnp.int32)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
    r = jnp.sum((rank < n).reshape(B, R), axis=1, dtype=jnp.int32)
    w = release_weights(r, m, fade, fade_tokens, half_life)
    # the row of the next token, if any, moves theta of the way to r + 1
    has_next = n < jnp.sum(T)
    row = order[jnp.minimum(n, order.size - 1)] // R
    step = jnp.where(has_next, jnp.arange(B) == row, False)
    w_next = release_weights(r + step.astype(jnp.int32), m, fade, fade_tokens, half_life)
    d = jnp.sum(w_next - w)
    theta = jnp.where(has_next & (d > 0), jnp.clip((target - jnp.sum(w)) / jnp.where(d > 0, d, 1.0), 0.0, 1.0),
                      0.0)
    mixed = jnp.clip(w + theta * (w_next - w), 0.0, 1.0)
    mixed = jax.lax.cummin(mixed, axis=1)  # non-increasing exactly, whatever the rounding
    w = jnp.where(step[:, None], mixed, w)
    return r, jax.lax.stop_gradient(w)


# ----------------------------------------------------------------------------- diagnostics

def _masked_mean(x: jax.Array, m: jax.Array, axis=None) -> jax.Array:
    """Mean of x where m; NaN where nothing is selected (an undefined mean must not read as 0)."""
    n = jnp.sum(m, axis=axis)
    s = jnp.sum(jnp.where(m, x, 0.0), axis=axis)
    return jnp.where(n > 0, s / jnp.maximum(n, 1), jnp.nan)


@jax.jit
def release_stats(r: jax.Array, response_mask: jax.Array, weights: jax.Array,
                  margin: jax.Array, advantage: jax.Array) -> dict[str, jax.Array]:
    """Per-batch diagnostics of a release decision (float32 scalars, and [10] for the deciles).

    kept_share          sum w / sum T (the loss's weight mass; = pre_release_share for hard)
    pre_release_share   sum min(r, T) / sum T (tokens before the release point)
    release_rate        share of non-empty rows with r < T
    mean_release_frac   mean r/T over released rows
    margin_before/after mean margin over tokens t < r / t >= r, pooled over the batch's tokens
    abs_adv_before/after the same for |A_t|, over every response token
    margin_by_decile    [10] mean margin over tokens with floor(10 t / T) = k, pooled
    `margin` is NaN where it is undefined (the rule's g_t: fewer than two candidates present);
    the margin means leave every non-finite margin out, as the sentence scores do, rather than
    count it as 0 (which would manufacture low late scores). Undefined means (no released row,
    an empty bin, no defined margin in it) are NaN.
    """
    m = response_mask.astype(bool)
    T = response_lengths(m)
    t = jnp.arange(m.shape[1], dtype=jnp.int32)[None, :]
    r = jnp.minimum(r, T)
    before = m & (t < r[:, None])
    after = m & (t >= r[:, None])
    total = jnp.maximum(jnp.sum(T), 1).astype(jnp.float32)
    nonempty = T > 0
    released = nonempty & (r < T)
    frac = r.astype(jnp.float32) / jnp.maximum(T, 1).astype(jnp.float32)
    # Integer binning: exact, so a token at t/T = 0.3 falls in bin 3 without float doubt.
    bin_of = (N_POSITION_BINS * t) // jnp.maximum(T, 1)[:, None]
    in_bin = m[None] & (bin_of[None] == jnp.arange(N_POSITION_BINS)[:, None, None])
    margin = margin.astype(jnp.float32)
    defined = jnp.isfinite(margin)
    abs_adv = jnp.abs(advantage.astype(jnp.float32))
    return {
        "kept_share": jnp.sum(weights * m) / total,
        "pre_release_share": jnp.sum(r).astype(jnp.float32) / total,
        "release_rate": _masked_mean(released.astype(jnp.float32), nonempty),
        "mean_release_frac": _masked_mean(frac, released),
        "margin_before": _masked_mean(margin, before & defined),
        "margin_after": _masked_mean(margin, after & defined),
        "abs_adv_before": _masked_mean(abs_adv, before),
        "abs_adv_after": _masked_mean(abs_adv, after),
        "margin_by_decile": _masked_mean(margin[None], in_bin & defined[None], axis=(1, 2)),
    }
