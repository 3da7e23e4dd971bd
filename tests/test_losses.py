"""Losses against independent references: PyTorch autograd in float64 (values and gradients),
NumPy closed forms, a torch re-implementation of TRL's generalized_jsd_loss; normalisation against
NumPy loops; the chunked driver against the unchunked loss and against torch, and its compiled
memory against one [B, T, V] float32 array."""
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jax
import jax.numpy as jnp

from opdjax import losses as L

pytestmark = pytest.mark.timeout(240)
NAMES = ("pg", "reverse_kl_topk", "reverse_kl_full", "forward_kl_full", "jsd")
EPS = 0.2


# ----------------------------------------------------------------------------- problems
def log_softmax_np(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def take(x, ids):
    """x[..., ids] along the last axis: ids [...] -> [...], ids [..., K] -> [..., K]."""
    if ids.ndim == x.ndim - 1:
        return np.take_along_axis(x, ids[..., None], axis=-1)[..., 0]
    return np.take_along_axis(x, ids, axis=-1)


def make_case(seed, B, T, V, K, teacher_scale=1.0, absent=False):
    """float32 student/teacher logits and LossInputs as the sampler and the scorer would give them."""
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(B, T, V)) * 2).astype(np.float32)
    tz = (rng.normal(size=(B, T, V)) * 2 * teacher_scale).astype(np.float32)
    y = rng.integers(0, V, (B, T)).astype(np.int32)
    s_logp, t_logp = log_softmax_np(z), log_softmax_np(tz)
    old = (take(s_logp, y) + rng.normal(size=(B, T)) * 0.4).astype(np.float32)  # ratios on both sides of the clip
    adv = (take(t_logp, y) - old).astype(np.float32)
    cand = np.argsort(-(z + rng.gumbel(size=z.shape)), axis=-1)[..., :K].astype(np.int32)  # distinct ids
    tc = take(t_logp, cand).astype(np.float32)
    if absent and K > 1:  # -1 fillers scored -inf (a truncating sampler), on some positions
        sel = rng.random((B, T)) < 0.5
        cand[sel, -1] = -1
        tc[sel, -1] = -np.inf
    coeff = rng.random((B, T)).astype(np.float32)
    inputs = L.LossInputs(*(jnp.asarray(a) for a in (y, old, adv, cand, tc)))
    return dict(z=z, tz=tz, inputs=inputs, np_inputs=(y, old, adv, cand, tc), coeff=coeff)


# ----------------------------------------------------------------------------- torch references (float64)
def torch_pg(z, y, old, adv, eps=EPS):
    logp = torch.log_softmax(z, -1).gather(-1, y[..., None]).squeeze(-1)
    ratio = torch.exp(logp - old)
    return -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv)


def torch_topk(z, cand, tc):
    """Exact KL over present candidates + one tail bucket; tail masses 1 − Σ (float64), + floor."""
    p = torch.softmax(z, -1)
    present = (cand >= 0) & torch.isfinite(tc)
    p_c = p.gather(-1, cand.clamp(min=0)) * present
    q_c = torch.exp(torch.where(present, tc, torch.full_like(tc, -torch.inf)))
    s_c = torch.log(torch.where(present, p_c, torch.ones_like(p_c)))
    t_c = torch.where(present, tc, torch.zeros_like(tc))
    p_tail = torch.clamp(1 - p_c.sum(-1), min=0) + L.TAIL_FLOOR
    q_tail = torch.clamp(1 - q_c.sum(-1), min=0) + L.TAIL_FLOOR
    return (p_c * (s_c - t_c)).sum(-1) + p_tail * (torch.log(p_tail) - torch.log(q_tail))


def torch_reverse_full(z, tz):
    s, t = torch.log_softmax(z, -1), torch.log_softmax(tz, -1)
    return (s.exp() * (s - t)).sum(-1)


def torch_forward_full(z, tz):
    s, t = torch.log_softmax(z, -1), torch.log_softmax(tz, -1)
    return (t.exp() * (t - s)).sum(-1)


def trl_generalized_jsd(student_logits, teacher_logits, beta):
    """Per-token generalized JSD, re-implemented after TRL's GKDTrainer.generalized_jsd_loss
    (trl/experimental/gkd/gkd_trainer.py; temperature 1, reduction "none", summed over the vocab)."""
    s = F.log_softmax(student_logits, dim=-1)
    t = F.log_softmax(teacher_logits, dim=-1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)  # KL(teacher || student)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)  # KL(student || teacher)
    else:
        b = torch.tensor(beta, dtype=s.dtype)
        mix = torch.logsumexp(torch.stack([s + torch.log(1 - b), t + torch.log(b)]), dim=0)
        kl_teacher = F.kl_div(mix, t, reduction="none", log_target=True)  # KL(teacher || mix)
        kl_student = F.kl_div(mix, s, reduction="none", log_target=True)  # KL(student || mix)
        jsd = b * kl_teacher + (1 - b) * kl_student
    return jsd.sum(-1)


def torch_loss(name, z, tz, np_inputs, beta=0.5):
    y, old, adv, cand, tc = (torch.from_numpy(np.asarray(a)) for a in np_inputs)
    if name == "pg":
        return torch_pg(z, y.long(), old.double(), adv.double())
    if name == "reverse_kl_topk":
        return torch_topk(z, cand.long(), tc.double())
    if name == "reverse_kl_full":
        return torch_reverse_full(z, tz)
    if name == "forward_kl_full":
        return torch_forward_full(z, tz)
    return trl_generalized_jsd(z, tz, beta)


def torch_value_and_grad(name, case, beta=0.5):
    z = torch.tensor(case["z"], dtype=torch.float64, requires_grad=True)
    tz = torch.tensor(case["tz"], dtype=torch.float64)
    loss = torch_loss(name, z, tz, case["np_inputs"], beta)
    (loss * torch.from_numpy(case["coeff"]).double()).sum().backward()
    return loss.detach().numpy(), z.grad.numpy()


@functools.lru_cache(maxsize=None)
def _per_token_vg(name, beta, clip_eps):
    def f(z, tz, coeff, inputs):
        loss, aux = L.per_token_loss(name, z, inputs, teacher_logits=tz, clip_eps=clip_eps, jsd_beta=beta)
        return jnp.sum(coeff * loss), (loss, aux)
    return jax.jit(jax.value_and_grad(f, has_aux=True))


def jax_value_and_grad(name, case, beta=0.5, clip_eps=EPS):
    (_, (loss, aux)), g = _per_token_vg(name, beta, clip_eps)(
        jnp.asarray(case["z"]), jnp.asarray(case["tz"]), jnp.asarray(case["coeff"]), case["inputs"])
    return np.asarray(loss), np.asarray(g), {k: np.asarray(v) for k, v in aux.items()}


CASES = {
    "small": dict(B=2, T=5, V=7, K=3),
    "k1": dict(B=2, T=4, V=5, K=1),
    "v2": dict(B=1, T=6, V=2, K=1),
    "wide_neg_teacher": dict(B=2, T=4, V=50, K=6, teacher_scale=30.0),
    "absent_slots": dict(B=3, T=4, V=11, K=4, absent=True),
}


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("name", NAMES)
def test_loss_value_and_gradient_match_torch(name, case_name):
    case = make_case(list(CASES).index(case_name), **CASES[case_name])
    if case_name == "wide_neg_teacher":
        assert case["np_inputs"][4].min() < -100  # very negative teacher log-probs
    ref_loss, ref_grad = torch_value_and_grad(name, case)
    loss, grad, aux = jax_value_and_grad(name, case)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-5)
    for v in aux.values():
        assert np.all(np.isfinite(v))


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_matches_trl_formula(beta):
    case = make_case(7, B=2, T=5, V=13, K=2)
    ref_loss, ref_grad = torch_value_and_grad("jsd", case, beta)
    loss, grad, aux = jax_value_and_grad("jsd", case, beta)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["kl/jsd"], loss)


def test_jsd_beta_convention_is_trls():
    """TRL: beta=0 -> KL(teacher||student) (forward), beta=1 -> KL(student||teacher) (reverse);
    in between the limits JSD_b/b -> forward and JSD_b/(1-b) -> reverse."""
    case = make_case(3, B=2, T=6, V=9, K=2)
    case["z"], case["tz"] = case["z"] * 0.5, case["tz"] * 0.5  # tame ratios: the limits converge at O(beta * p/q)
    fwd, _, _ = jax_value_and_grad("forward_kl_full", case)
    rev, _, _ = jax_value_and_grad("reverse_kl_full", case)
    j0, g0, _ = jax_value_and_grad("jsd", case, 0.0)
    j1, g1, _ = jax_value_and_grad("jsd", case, 1.0)
    np.testing.assert_allclose(j0, fwd, rtol=1e-6)
    np.testing.assert_allclose(j1, rev, rtol=1e-6)
    assert not np.allclose(fwd, rev, rtol=1e-2)  # the directions do differ on this case
    b = 1e-3
    z = torch.tensor(case["z"], dtype=torch.float64)
    tz = torch.tensor(case["tz"], dtype=torch.float64)
    np.testing.assert_allclose(trl_generalized_jsd(z, tz, b).numpy() / b, fwd, rtol=2e-2)
    np.testing.assert_allclose(trl_generalized_jsd(z, tz, 1 - b).numpy() / b, rev, rtol=2e-2)
    jb, _, _ = jax_value_and_grad("jsd", case, b)
    np.testing.assert_allclose(jb / b, fwd, rtol=2e-2)
    jb, _, _ = jax_value_and_grad("jsd", case, 1 - b)
    np.testing.assert_allclose(jb / b, rev, rtol=2e-2)
    with pytest.raises(ValueError, match="loss.jsd_beta"):
        jax_value_and_grad("jsd", case, 1.5)


# ----------------------------------------------------------------------------- pg
def _pg_case(z, y, old, adv):
    B, T = y.shape
    inputs = L.LossInputs(jnp.asarray(y, jnp.int32), jnp.asarray(old, jnp.float32), jnp.asarray(adv, jnp.float32),
                          None, None)
    return dict(z=np.asarray(z, np.float32), tz=np.zeros_like(z, np.float32), inputs=inputs,
                coeff=np.ones((B, T), np.float32))


def test_pg_on_policy_gradient_is_minus_advantage_grad_logp():
    rng = np.random.default_rng(0)
    B, T, V = 3, 4, 10
    z = rng.normal(size=(B, T, V)).astype(np.float32)
    y = rng.integers(0, V, (B, T))
    logp = log_softmax_np(z)
    old = take(logp, y)  # rho = 1
    adv = rng.normal(size=(B, T)) * 3  # beyond the clip range in size: irrelevant at rho = 1
    case = _pg_case(z, y, old, adv)
    case["coeff"] = rng.random((B, T)).astype(np.float32)
    loss, grad, aux = jax_value_and_grad("pg", case)
    onehot = np.eye(V)[y]
    expected = -(case["coeff"] * adv)[..., None] * (onehot - np.exp(logp))  # -A ∇_z log π(y)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss, -adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["pg/ratio_mean"], 1.0, atol=1e-6)
    assert aux["pg/clip_frac"].sum() == 0
    np.testing.assert_allclose(aux["pg/approx_kl"], 0.0, atol=1e-6)


def test_pg_three_token_closed_form_and_clipping():
    """Vocab of 3, y = 0. rho in {1.5, 0.5} x A in {+1, -1}: the clip zeroes the gradient exactly
    when it binds (A > 0, rho > 1+eps; A < 0, rho < 1-eps); otherwise grad = -A rho (e_y - p)."""
    z = np.array([0.3, -1.2, 0.8])
    p = np.exp(log_softmax_np(z))
    logp_y = np.log(p[0])
    rows = [(1.5, 1.0), (1.5, -1.0), (0.5, 1.0), (0.5, -1.0)]
    zz = np.tile(z, (1, len(rows), 1))
    y = np.zeros((1, len(rows)), int)
    old = np.array([[logp_y - np.log(r) for r, _ in rows]])
    adv = np.array([[a for _, a in rows]])
    loss, grad, aux = jax_value_and_grad("pg", _pg_case(zz, y, old, adv))
    e_y = np.array([1.0, 0.0, 0.0])
    for j, (rho, a) in enumerate(rows):
        binds = (a > 0 and rho > 1 + EPS) or (a < 0 and rho < 1 - EPS)
        exp_loss = -min(rho * a, np.clip(rho, 1 - EPS, 1 + EPS) * a)
        exp_grad = np.zeros(3) if binds else -a * rho * (e_y - p)
        np.testing.assert_allclose(loss[0, j], exp_loss, rtol=1e-5)
        np.testing.assert_allclose(grad[0, j], exp_grad, rtol=1e-5, atol=1e-7)
        assert aux["pg/clip_frac"][0, j] == float(binds)
        np.testing.assert_allclose(aux["pg/ratio_mean"][0, j], rho, rtol=1e-5)
        np.testing.assert_allclose(aux["pg/approx_kl"][0, j], rho - 1 - np.log(rho), rtol=1e-4, atol=1e-7)
    # by hand for the first row: loss = -(1+eps) * 1
    np.testing.assert_allclose(loss[0, 0], -1.2, rtol=1e-6)


def test_pg_invalid_positions_are_zero_not_nan():
    z = np.random.default_rng(1).normal(size=(1, 4, 6)).astype(np.float32)
    y = np.array([[0, -1, 2, 9]])  # -1 and 9 are outside the vocabulary
    old = np.array([[-np.inf, -1.0, np.nan, -1.0]])
    adv = np.array([[1.0, 1.0, 1.0, 1.0]])
    loss, grad, _ = jax_value_and_grad("pg", _pg_case(z, y, old, adv))
    assert np.all(loss == 0) and np.all(grad == 0)


# ----------------------------------------------------------------------------- reverse_kl_topk
def test_topk_with_all_tokens_as_candidates_equals_full_reverse_kl():
    B, T, V = 2, 5, 9
    case = make_case(5, B, T, V, V)  # K = V: the candidates are a permutation of the vocabulary, tail empty
    assert all(sorted(row) == list(range(V)) for row in case["np_inputs"][3].reshape(-1, V))
    l_topk, g_topk, aux = jax_value_and_grad("reverse_kl_topk", case)
    l_full, g_full, _ = jax_value_and_grad("reverse_kl_full", case)
    np.testing.assert_allclose(l_topk, l_full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_topk, g_full, rtol=1e-5, atol=1e-6)
    assert np.all(aux["kl/student_tail_mass"] < 1e-6)


def test_topk_tail_bucket_against_numpy():
    case = make_case(11, B=3, T=4, V=20, K=3, absent=True)
    y, old, adv, cand, tc = case["np_inputs"]
    p = np.exp(log_softmax_np(case["z"]))
    loss, _, aux = jax_value_and_grad("reverse_kl_topk", case)
    f = L.TAIL_FLOOR
    for b in range(3):
        for t in range(4):
            ks = [k for k in range(3) if cand[b, t, k] >= 0 and np.isfinite(tc[b, t, k])]
            pk = np.array([p[b, t, cand[b, t, k]] for k in ks])
            qk = np.exp(np.array([tc[b, t, k] for k in ks], np.float64))
            p_tail, q_tail = 1 - pk.sum(), max(1 - qk.sum(), 0.0)
            kl = np.sum(pk * (np.log(pk) - np.log(qk))) + (p_tail + f) * (np.log(p_tail + f) - np.log(q_tail + f))
            np.testing.assert_allclose(loss[b, t], kl, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(aux["kl/student_tail_mass"][b, t], p_tail, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(aux["kl/teacher_tail_mass"][b, t], q_tail, rtol=1e-5, atol=1e-7)


def test_topk_absent_slots_equal_dropping_them():
    full = make_case(2, B=2, T=3, V=12, K=4)
    y, old, adv, cand, tc = (np.array(a) for a in full["np_inputs"])
    cand2, tc2 = cand.copy(), tc.copy()
    cand2[..., 3], tc2[..., 0] = -1, -np.inf  # slot 3 a filler id, slot 0 an unscored candidate
    holey = dict(full, inputs=L.LossInputs(*(jnp.asarray(a) for a in (y, old, adv, cand2, tc2))))
    dropped = dict(full, inputs=L.LossInputs(*(jnp.asarray(a) for a in (y, old, adv, cand[..., 1:3], tc[..., 1:3]))))
    l1, g1, _ = jax_value_and_grad("reverse_kl_topk", holey)
    l2, g2, _ = jax_value_and_grad("reverse_kl_topk", dropped)
    np.testing.assert_allclose(l1, l2, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(g1, g2, rtol=1e-6, atol=1e-7)
    # nothing present: one bucket holding all mass on both sides -> KL 0, gradient 0
    none = dict(full, inputs=L.LossInputs(*(jnp.asarray(a) for a in (y, old, adv, -np.ones_like(cand), tc))))
    l3, g3, _ = jax_value_and_grad("reverse_kl_topk", none)
    np.testing.assert_allclose(l3, 0.0, atol=1e-6)
    np.testing.assert_allclose(g3, 0.0, atol=1e-6)


# ----------------------------------------------------------------------------- normalisation
def coeff_reference(w, m, how):
    B, T = w.shape
    w = w * (m > 0)
    out = np.zeros((B, T))
    if how == "kept_tokens":
        tot = sum(w[b, t] for b in range(B) for t in range(T))
        return out if tot == 0 else w / tot
    if how == "all_response_tokens":
        n = sum(m[b, t] > 0 for b in range(B) for t in range(T))
        return out if n == 0 else w / n
    rows = [b for b in range(B) if w[b].sum() > 0]
    for b in rows:
        out[b] = w[b] / w[b].sum() / len(rows)
    return out


def weights_case(seed, B=5, T=9):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, T + 1, B)
    m = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    r = rng.integers(0, T + 1, B)
    w = np.where(np.arange(T)[None] < r[:, None], 1.0, rng.random((B, T)) * 0.5)  # fractional fade
    if B > 1:
        w[1] = 0.0  # a row that keeps nothing
    return w.astype(np.float32), m


@pytest.mark.parametrize("how", L.NORMALIZATIONS)
def test_token_coefficients_against_numpy(how):
    for seed in range(4):
        w, m = weights_case(seed)
        coeff = np.asarray(L.token_coefficients(jnp.asarray(w), jnp.asarray(m), how))
        np.testing.assert_allclose(coeff, coeff_reference(w, m, how), rtol=1e-6, atol=1e-8)
    zero = np.asarray(L.token_coefficients(jnp.zeros((3, 4)), jnp.ones((3, 4)), how))
    assert np.all(zero == 0)  # nothing kept: 0, not NaN
    zero = np.asarray(L.token_coefficients(jnp.zeros((3, 4)), jnp.zeros((3, 4)), how))
    assert np.all(zero == 0)


def test_token_coefficients_constant_and_default():
    w, m = weights_case(9)
    g = jax.grad(lambda w: jnp.sum(L.token_coefficients(w, jnp.asarray(m)) ** 2))(jnp.asarray(w))
    assert np.all(np.asarray(g) == 0)  # stop_gradient
    np.testing.assert_allclose(L.token_coefficients(jnp.asarray(w), jnp.asarray(m)),
                               coeff_reference(w, m, "kept_tokens"), rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match=r"loss.normalize='mean'.*kept_tokens.*all_response_tokens.*per_sequence"):
        L.token_coefficients(jnp.asarray(w), jnp.asarray(m), "mean")


# ----------------------------------------------------------------------------- chunked driver
D, DT = 6, 5


def linear_problem(seed, B, T, V, K):
    rng = np.random.default_rng(seed)
    case = make_case(seed, B, T, V, K)
    W = jnp.asarray(rng.normal(size=(V, D)) * 0.7, jnp.float32)
    Wt = jnp.asarray(rng.normal(size=(V, DT)) * 0.7, jnp.float32)
    h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    ht = jnp.asarray(rng.normal(size=(B, T, DT)), jnp.float32)
    w, _ = weights_case(seed, B, T)
    coeff = L.token_coefficients(jnp.asarray(w), jnp.ones((B, T)), "kept_tokens")
    return case, W, Wt, h, ht, coeff


@functools.lru_cache(maxsize=None)
def _chunked_vg(name, chunk, beta):
    def f(W, Wt, h, ht, coeff, inputs):
        return L.chunked_loss(name, student_hidden=h, student_logits_fn=lambda x: jnp.einsum("bcd,vd->bcv", x, W),
                              inputs=inputs, coeff=coeff, teacher_hidden=ht,
                              teacher_logits_fn=lambda x: jnp.einsum("bcd,vd->bcv", x, Wt),
                              chunk_tokens=chunk, clip_eps=EPS, jsd_beta=beta)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))


def run_chunked(name, case, W, Wt, h, ht, coeff, chunk, beta=0.5):
    (loss, aux), grads = _chunked_vg(name, chunk, beta)(W, Wt, h, ht, coeff, case["inputs"])
    return float(loss), {k: float(v) for k, v in aux.items()}, [np.asarray(g) for g in grads]


def unchunked(name, case, W, Wt, h, ht, coeff, beta=0.5):
    def f(W, h):
        z = jnp.einsum("btd,vd->btv", h, W)
        tz = jnp.einsum("btd,vd->btv", ht, Wt)
        loss, aux = L.per_token_loss(name, z, case["inputs"], teacher_logits=tz, clip_eps=EPS, jsd_beta=beta)
        return jnp.sum(coeff * loss), {k: jnp.sum(coeff * v) for k, v in aux.items()}
    (loss, aux), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(W, h)
    return float(loss), {k: float(v) for k, v in aux.items()}, [np.asarray(g) for g in grads]


@pytest.mark.parametrize("name", NAMES)
def test_chunked_equals_unchunked_and_torch(name):
    B, T, V, K = 2, 12, 17, 3
    case, W, Wt, h, ht, coeff = linear_problem(4, B, T, V, K)
    ref_loss, ref_aux, (ref_gW, ref_gh) = unchunked(name, case, W, Wt, h, ht, coeff)
    for chunk in (4, 5):  # 4 divides T=12, 5 does not (padding); chunk > T: the microbatch test
        loss, aux, (gW, gWt, gh) = run_chunked(name, case, W, Wt, h, ht, coeff, chunk)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
        assert aux.keys() == ref_aux.keys()
        for k in aux:
            np.testing.assert_allclose(aux[k], ref_aux[k], rtol=1e-5, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(gW, ref_gW, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(gh, ref_gh, rtol=1e-5, atol=1e-6)
        assert np.all(gWt == 0)  # the teacher gets no gradient
    # and against torch autograd through the same linear unembedding
    Wt_ = torch.tensor(np.asarray(W), dtype=torch.float64, requires_grad=True)
    z = torch.einsum("btd,vd->btv", torch.tensor(np.asarray(h), dtype=torch.float64), Wt_)
    tz = torch.einsum("btd,vd->btv", torch.tensor(np.asarray(ht), dtype=torch.float64),
                      torch.tensor(np.asarray(Wt), dtype=torch.float64))
    tl = (torch_loss(name, z, tz, case["np_inputs"]) * torch.tensor(np.asarray(coeff), dtype=torch.float64)).sum()
    tl.backward()
    np.testing.assert_allclose(loss, tl.item(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gW, Wt_.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,how", [("pg", "kept_tokens"), ("pg", "all_response_tokens"), ("pg", "per_sequence"),
                                      ("reverse_kl_topk", "per_sequence"), ("jsd", "kept_tokens")])
def test_microbatches_sum_to_whole_batch(name, how):
    B, T, V, K = 6, 7, 13, 3
    case, W, Wt, h, ht, _ = linear_problem(8, B, T, V, K)
    w, m = weights_case(8, B, T)
    coeff = L.token_coefficients(jnp.asarray(w), jnp.asarray(m), how)
    whole, whole_aux, (gW, _, _) = run_chunked(name, case, W, Wt, h, ht, coeff, 64)
    total, total_aux, total_gW = 0.0, {k: 0.0 for k in whole_aux}, 0.0
    for rows in (slice(0, 2), slice(2, 4), slice(4, 6)):  # 3 gradient-accumulation microbatches
        sub = dict(case, inputs=jax.tree.map(lambda a: a[rows], case["inputs"]))
        l, a, (g, _, _) = run_chunked(name, sub, W, Wt, h[rows], ht[rows], coeff[rows], 64)
        total += l
        total_gW = total_gW + g
        total_aux = {k: total_aux[k] + a[k] for k in a}
    np.testing.assert_allclose(total, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(total_gW, gW, rtol=1e-5, atol=1e-6)
    for k in whole_aux:
        np.testing.assert_allclose(total_aux[k], whole_aux[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # a batch that keeps nothing: loss 0, gradient 0, no NaN
    zero = L.token_coefficients(jnp.zeros((B, T)), jnp.asarray(m), how)
    l, a, (g, _, _) = run_chunked(name, case, W, Wt, h, ht, zero, 64)
    assert l == 0 and np.all(g == 0) and all(v == 0 for v in a.values())


def compiled_temp_bytes(name, B, T, V, chunk, K=8, Dm=64):
    W = jax.ShapeDtypeStruct((V, Dm), jnp.float32)
    h = jax.ShapeDtypeStruct((B, T, Dm), jnp.float32)
    inputs = L.LossInputs(jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B, T), jnp.float32),
                          jax.ShapeDtypeStruct((B, T), jnp.float32), jax.ShapeDtypeStruct((B, T, K), jnp.int32),
                          jax.ShapeDtypeStruct((B, T, K), jnp.float32))
    coeff = jax.ShapeDtypeStruct((B, T), jnp.float32)

    def f(W, Wt, h, ht, inputs, coeff):
        return L.chunked_loss(name, student_hidden=h, student_logits_fn=lambda x: jnp.einsum("bcd,vd->bcv", x, W),
                              inputs=inputs, coeff=coeff, teacher_hidden=ht,
                              teacher_logits_fn=lambda x: jnp.einsum("bcd,vd->bcv", x, Wt), chunk_tokens=chunk)
    compiled = jax.jit(jax.value_and_grad(f, has_aux=True)).lower(W, W, h, h, inputs, coeff).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("name", NAMES)
def test_compiled_memory_is_chunk_sized(name):
    B, T, V, chunk = 2, 1024, 32768, 128
    full = B * T * V * 4  # one [B, T, V] float32 array (256 MiB)
    temp = compiled_temp_bytes(name, B, T, V, chunk)
    ratio = temp / full
    print(f"{name}: temp {temp / 2**20:.1f} MiB = {ratio:.3f} x [B,T,V] f32 = {temp / (full * chunk / T):.2f} chunks")
    assert ratio < 0.45  # measured: 2-3 chunk-sized [B, c, V] buffers, c/T = 1/8
    if name == "jsd":  # and it does not grow with T
        assert compiled_temp_bytes(name, B, 2 * T, V, chunk) < 1.1 * temp


# ----------------------------------------------------------------------------- registry and errors
def test_registry_and_get_loss_error():
    assert set(L.LOSSES) == set(NAMES) and L.DEFAULT_LOSS == "pg"
    for n, spec in L.LOSSES.items():
        assert spec.name == n and L.get_loss(n) is spec and spec.description
        assert spec.needs_teacher_logits == (n in ("reverse_kl_full", "forward_kl_full", "jsd"))
        assert spec.uses_candidates == (n == "reverse_kl_topk")
    with pytest.raises(ValueError) as e:
        L.get_loss("nope")
    msg = str(e.value)
    assert "loss.name" in msg and "'nope'" in msg and all(n in msg for n in NAMES)


def test_chunked_loss_input_errors():
    case, W, Wt, h, ht, coeff = linear_problem(0, 1, 4, 7, 2)
    fn = lambda x: jnp.einsum("bcd,vd->bcv", x, W)
    with pytest.raises(ValueError, match="teacher"):
        L.chunked_loss("jsd", student_hidden=h, student_logits_fn=fn, inputs=case["inputs"], coeff=coeff)
    with pytest.raises(ValueError, match="cand_ids"):
        L.chunked_loss("reverse_kl_topk", student_hidden=h, student_logits_fn=fn,
                       inputs=case["inputs"]._replace(cand_ids=None), coeff=coeff)
    with pytest.raises(ValueError, match="loss.clip_eps"):
        L.chunked_loss("pg", student_hidden=h, student_logits_fn=fn, inputs=case["inputs"], coeff=coeff, clip_eps=-0.1)
    with pytest.raises(ValueError, match="loss.name"):
        L.chunked_loss("nope", student_hidden=h, student_logits_fn=fn, inputs=case["inputs"], coeff=coeff)
    # pg needs neither the teacher nor the candidates
    loss, aux = L.chunked_loss("pg", student_hidden=h, student_logits_fn=fn,
                               inputs=case["inputs"]._replace(cand_ids=None, teacher_cand_logp=None), coeff=coeff)
    assert np.isfinite(float(loss)) and {"pg/ratio_mean", "pg/clip_frac", "pg/approx_kl"} <= set(aux)
