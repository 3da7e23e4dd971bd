"""DAIL step 2 (opdjax.dail.contrastive): the alignment of the three tokenisations (hypothesis
property test, chat-templated prompts, errors naming the record) and the contrastive loss against
an independent NumPy float64 reference built from the model's full logits: values, the gradient
w.r.t. the student params (closed-form logit gradient, itself checked by finite differences,
pulled back through the model's own VJP), no gradient into the reference, and the chunking."""
import functools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jax
import jax.numpy as jnp

from opdjax import losses
from opdjax.dail import contrastive as C
from opdjax.data.tokenizer import build_toy_tokenizer, encode_chat, load_tokenizer
from opdjax.models import qwen
from opdjax.models.config import ModelConfig

pytestmark = pytest.mark.timeout(120)

CFG = ModelConfig(model_type="qwen3", vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8)
PAD = 0


# ----------------------------------------------------------------------------- alignment

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy_tok")
    build_toy_tokenizer(d, vocab_size=400)
    return load_tokenizer(d)


def _check_batch(batch, prompts, responses, multiple):
    """Every context holds prompt + the same response ids, and its positions select exactly them."""
    C.check_aligned(batch)
    B, R = batch.response.shape
    assert R % multiple == 0 and R >= max(map(len, responses))
    selected = []
    for ctx, ps in zip(C.CONTEXTS, prompts):
        tokens, mask, positions = batch.context(ctx)
        assert tokens.dtype == np.int32 and positions.dtype == np.int32 and mask.dtype == bool
        assert tokens.shape[1] % multiple == 0
        for b, (p, r) in enumerate(zip(ps, responses)):
            n = len(p) + len(r)
            assert tokens[b, :n].tolist() == list(p) + list(r)
            assert (tokens[b, n:] == PAD).all() and mask[b].sum() == n and mask[b, :n].all()
            assert positions[b, :len(r)].tolist() == list(range(len(p) - 1, n - 1))
        real = batch.response_mask
        selected.append(np.where(real, np.take_along_axis(tokens, positions + 1, axis=1), -1))
    for b, r in enumerate(responses):
        assert batch.response[b, :len(r)].tolist() == list(r) and batch.response_mask[b].sum() == len(r)
    assert (selected[0] == selected[1]).all() and (selected[0] == selected[2]).all()


texts = st.text(alphabet=st.sampled_from(list("abc xyz 0123456789+-=\\{}()\né∑")), max_size=40)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), B=st.integers(1, 4), multiple=st.sampled_from([1, 3, 16]))
def test_align_property_chat_prompts(tok, data, B, multiple):
    # Prompts rendered by the chat template (which adds role/turn tokens) from different user
    # texts per context, so the three prompt lengths differ row by row; responses are raw ids.
    prompts = [[], [], []]
    for _ in range(B):
        problem = data.draw(texts)
        for k, extra in enumerate(("", data.draw(texts), data.draw(texts))):
            text = problem + ("\n\n" + extra if k else "")
            if data.draw(st.booleans()):
                prompts[k].append(encode_chat(tok, [{"role": "user", "content": text}]))
            else:  # a raw id prompt too: alignment must not care where prompts come from
                prompts[k].append(data.draw(st.lists(st.integers(0, len(tok) - 1), min_size=1, max_size=30)))
    responses = [data.draw(st.lists(st.integers(0, len(tok) - 1), min_size=1, max_size=40)) for _ in range(B)]
    batch = C.align(*prompts, responses, pad_id=PAD, length_multiple=multiple)
    _check_batch(batch, prompts, responses, multiple)


def test_align_shared_response_tokens_across_templates(tok):
    # The response is a decoded-looking text whose first bytes could merge with the prompt's end if
    # re-tokenised; align takes the ids once, so every context predicts the same ids.
    response = tok.encode("so 2+2=4, hence \\boxed{4}", add_special_tokens=False)
    prompts = [[encode_chat(tok, [{"role": "user", "content": t}])] for t in
               ("What is 2+2?", "What is 2+2?\n\nReference: 4 = 2+2 (expert).", "What is 2+2?\n\nHint: 4.")]
    batch = C.align(*prompts, [response], pad_id=tok.pad_token_id, records=["q1"])
    assert len({len(p[0]) for p in prompts}) == 3  # three different prompt lengths
    C.check_aligned(batch)
    for ctx in C.CONTEXTS:
        tokens, _, positions = batch.context(ctx)
        assert tokens[0, positions[0, :len(response)] + 1].tolist() == response


def test_align_errors_name_the_record():
    p = [[1, 2], [3]]
    with pytest.raises(ValueError, match=r"record q7: empty response"):
        C.align(p, p, p, [[5], []], pad_id=PAD, records=["q3", "q7"])
    with pytest.raises(ValueError, match=r"record #1: response has 3 tokens, more than max_response_tokens=2"):
        C.align(p, p, p, [[5], [6, 7, 8]], pad_id=PAD, max_response_tokens=2)
    with pytest.raises(ValueError, match=r"record b: empty hint prompt"):
        C.align(p, p, [[1], []], [[5], [6]], pad_id=PAD, records=["a", "b"])
    with pytest.raises(ValueError, match=r"expert_prompts has 1 entries but responses has 2"):
        C.align(p, p[:1], p, [[5], [6]], pad_id=PAD)
    with pytest.raises(ValueError, match=r"record a: response has token ids outside"):
        C.align(p, p, p, [[-1], [6]], pad_id=PAD, records=["a", "b"])
    C.align(p, p, p, [[5], [6, 7]], pad_id=PAD, max_response_tokens=2)  # at the limit: fine


def test_check_aligned_catches_a_shift():
    batch = C.align([[1, 2, 3]], [[4, 5]], [[6]], [[7, 8, 9]], pad_id=PAD)
    C.check_aligned(batch)
    bad = batch._replace(positions_expert=batch.positions_expert + 1 * batch.response_mask)
    with pytest.raises(C.AlignmentError, match="trace q9: the expert context does not predict response token 0"):
        C.check_aligned(bad, ["q9"])
    # a response id changed in one context only (as a re-tokenised response would)
    tokens = batch.tokens_hint.copy()
    tokens[0, 1 + 2] = 99  # hint prompt [6], response [7, 8, 9]: response index 2
    with pytest.raises(C.AlignmentError, match=r"trace row 0: the hint context .* token 2 \(id 9\).*another token"):
        C.check_aligned(batch._replace(tokens_hint=tokens))
    short = batch._replace(mask_student=np.zeros_like(batch.mask_student))
    with pytest.raises(C.AlignmentError, match="student context .* lands on padding"):
        C.check_aligned(short)


# ----------------------------------------------------------------------------- loss: references

def log_softmax_np(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def kl_np(z, zr, divergence):
    """Per-token divergence [..] and its closed-form gradient w.r.t. the student logits z [.., V]."""
    s, t = log_softmax_np(z), log_softmax_np(zr)
    p, q = np.exp(s), np.exp(t)
    if divergence == "reverse":
        kl = (p * (s - t)).sum(-1)
        return kl, p * ((s - t) - kl[..., None])
    return (q * (t - s)).sum(-1), p - q


forward = jax.jit(lambda p, tokens, mask: qwen.forward(p, tokens, CFG, mask=mask)[0])


def response_logits(student_params, ref_params, batch):
    """float64 logits [B, R, V] of the three contexts at their response positions, from the
    model's full [B, T, V] logits."""
    def logits(params, ctx):
        tokens, mask, positions = batch.context(ctx)
        full = np.asarray(forward(params, jnp.asarray(tokens), jnp.asarray(mask)), np.float64)
        return np.take_along_axis(full, positions[..., None], axis=1)
    return logits(student_params, "student"), logits(ref_params, "expert"), logits(ref_params, "hint")


def reference(logits, batch, *, gamma, divergence, clip):
    """NumPy float64 loss, aux and dL/d(student logits [B, T_student, V]) from the full logits."""
    z, zp, zn = logits
    kp, gp = kl_np(z, zp, divergence)
    kn, gn = kl_np(z, zn, divergence)
    over = (kn > clip) if clip > 0 else np.zeros_like(kn, bool)
    w = batch.response_mask / batch.response_mask.sum()
    loss = (w * (kp - gamma * np.where(over, clip, kn))).sum()
    dz = w[..., None] * (gp - gamma * np.where(over, 0.0, 1.0)[..., None] * gn)
    full_dz = np.zeros(batch.tokens_student.shape + (CFG.vocab_size,))
    for b, r in zip(*np.nonzero(batch.response_mask)):
        full_dz[b, batch.positions_student[b, r]] += dz[b, r]
    aux = {"kl_positive": (w * kp).sum(), "kl_negative": (w * kn).sum(),
           "kl_negative_clipped_share": (w * over).sum(), "tokens": batch.response_mask.sum()}
    return loss, aux, full_dz, kn[batch.response_mask]


@pytest.mark.parametrize("divergence", ["reverse", "forward"])
def test_closed_form_logit_gradient_matches_finite_differences(divergence):
    rng = np.random.default_rng(0)
    z, zr = rng.normal(size=(2, 7)) * 2, rng.normal(size=(2, 7)) * 2
    _, g = kl_np(z, zr, divergence)
    h = 1e-6
    for i in range(7):
        e = np.zeros(7)
        e[i] = h
        fd = (kl_np(z + e, zr, divergence)[0] - kl_np(z - e, zr, divergence)[0]) / (2 * h)
        np.testing.assert_allclose(g[:, i], fd, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- loss: the model

@functools.lru_cache(maxsize=None)
def params(seed, std=0.3):
    return qwen.init_params(CFG, jax.random.PRNGKey(seed), std=std)


def make_batch(seed, response_lengths=(16, 9, 4), length_multiple=16):
    """Random prompts (1..11 ids, different per context and row) and responses. The defaults give
    every test the same shapes (B = 3, R = 16, T_c = 32), so compiled programs are shared."""
    rng = np.random.default_rng(seed)
    prompts = [[rng.integers(1, CFG.vocab_size, rng.integers(1, 12)).tolist() for _ in response_lengths]
               for _ in C.CONTEXTS]
    responses = [rng.integers(1, CFG.vocab_size, n).tolist() for n in response_lengths]
    batch = C.align(*prompts, responses, pad_id=PAD, length_multiple=length_multiple)
    C.check_aligned(batch)
    return batch


def to_jnp(batch):
    return jax.tree.map(jnp.asarray, batch)


@functools.lru_cache(maxsize=None)
def loss_and_grad(divergence, chunk_tokens, remat=True):
    """jitted value_and_grad w.r.t. (student, ref) params; gamma and the clip are traced."""
    def f(sp, rp, batch, gamma, clip):
        return C.contrastive_loss(sp, rp, batch, CFG, gamma=gamma, divergence=divergence,
                                  negative_clip=clip, chunk_tokens=chunk_tokens, remat=remat)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


@functools.lru_cache(maxsize=None)
def loss_only(chunk_tokens, divergence="reverse"):
    def f(sp, rp, batch, gamma, clip, coeff=None):
        return C.contrastive_loss(sp, rp, batch, CFG, gamma=gamma, divergence=divergence,
                                  negative_clip=clip, chunk_tokens=chunk_tokens, coeff=coeff)
    return jax.jit(f)


@jax.jit
def student_vjp(sp, tokens, mask, dz):
    """The model's own VJP from a logit cotangent [B, T, V] to the params."""
    return jax.vjp(lambda p: forward(p, tokens, mask), sp)[1](dz)[0]


def clip_between(batch, logits, divergence):
    """A clip halfway between two neighbouring per-token KL_neg values: about half the tokens
    are clipped and none sits close enough to the clip for float32 rounding to flip it."""
    kn = np.sort(reference(logits, batch, gamma=0.0, divergence=divergence, clip=0.0)[3])
    mid = len(kn) // 2
    return float((kn[mid - 1] + kn[mid]) / 2)


def assert_matches_reference(loss, aux, logits, batch, **kw):
    ref_loss, ref_aux, dz, _ = reference(logits, batch, **kw)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-5, atol=1e-6, err_msg=str(kw))
    for k, v in ref_aux.items():
        np.testing.assert_allclose(float(aux[k]), v, rtol=2e-5, atol=1e-6, err_msg=f"{k} {kw}")
    return dz


@pytest.mark.parametrize("divergence,chunk,remat", [
    ("reverse", 5, True),  # 5 does not divide R = 16: the last chunk is padding
    ("forward", 8, False),  # 8 divides R = 16
])
def test_loss_and_student_gradient_match_numpy(divergence, chunk, remat):
    sp, rp = params(0), params(1)
    batch = make_batch(chunk)
    jb = to_jnp(batch)
    logits = response_logits(sp, rp, batch)
    clip_active = clip_between(batch, logits, divergence)
    fn = loss_and_grad(divergence, chunk, remat)
    for gamma, clip in [(0.0, 0.0), (0.1, 0.0), (0.1, clip_active), (0.1, 1e6)]:
        kw = dict(gamma=gamma, divergence=divergence, clip=clip)
        (loss, aux), (grads, ref_grads) = fn(sp, rp, jb, gamma, clip)
        dz = assert_matches_reference(loss, aux, logits, batch, **kw)
        if clip == clip_active:
            assert 0.3 < float(aux["kl_negative_clipped_share"]) < 0.7
        # The model's own VJP pulls the reference logit gradient back to the params (the model is
        # not under test here; the loss, its chunking, gather, guard and custom VJP are).
        expected = student_vjp(sp, jb.tokens_student, jb.mask_student, jnp.asarray(dz, jnp.float32))
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            r = functools.reduce(lambda t, k: t[k.key], path, expected)
            g, r = np.asarray(g), np.asarray(r)
            np.testing.assert_allclose(g, r, rtol=0, atol=2e-4 * (np.abs(r).max() + 1e-12),
                                       err_msg=f"{jax.tree_util.keystr(path)} {kw}")
        assert np.abs(np.asarray(grads["embed"])).max() > 0
        # the positive and negative terms are constants: nothing flows into the reference
        assert all(not np.asarray(x).any() for x in jax.tree.leaves(ref_grads))


@pytest.mark.parametrize("chunk", [3, 16, 64])  # last chunk padded / one exact chunk / chunk > R
def test_loss_value_does_not_depend_on_the_chunk(chunk):
    sp, rp = params(0), params(1)
    batch = make_batch(1)
    logits = response_logits(sp, rp, batch)
    clip = clip_between(batch, logits, "reverse")
    loss, aux = loss_only(chunk)(sp, rp, to_jnp(batch), 0.1, clip)
    assert_matches_reference(loss, aux, logits, batch, gamma=0.1, divergence="reverse", clip=clip)


def test_zero_positive_kl_when_student_is_the_reference_in_the_same_context():
    sp = params(0)
    batch = make_batch(2)
    same = batch._replace(tokens_expert=batch.tokens_student, mask_expert=batch.mask_student,
                          positions_expert=batch.positions_student)
    (loss, aux), (_, g_ref) = loss_and_grad("reverse", 5, True)(sp, sp, to_jnp(same), 0.1, 0.0)
    assert abs(float(aux["kl_positive"])) < 1e-6
    assert float(aux["kl_negative"]) > 1e-3  # the hint context differs
    np.testing.assert_allclose(float(loss), -0.1 * float(aux["kl_negative"]), rtol=1e-4, atol=1e-7)
    assert all(not np.asarray(x).any() for x in jax.tree.leaves(g_ref))


def test_injected_student_apply_is_what_the_student_term_uses():
    # How the trainer adds LoRA: a closure over qwen.apply. scale 1 = the default path; any other
    # scale changes the student's logits only, so kl_positive moves off zero.
    sp = params(0)
    batch = make_batch(2)
    jb = to_jnp(batch._replace(tokens_expert=batch.tokens_student, mask_expert=batch.mask_student,
                               positions_expert=batch.positions_student))

    @jax.jit
    def f(scale):
        apply = lambda p, t, m: scale * qwen.apply(p, t, CFG, mask=m)[0]  # noqa: E731
        return C.contrastive_loss(sp, sp, jb, CFG, gamma=0.1, chunk_tokens=5, student_apply=apply)

    (loss, aux), (loss3, aux3) = f(1.0), f(3.0)
    default_loss, _ = loss_only(5)(sp, sp, jb, 0.1, 10.0)
    np.testing.assert_allclose(float(loss), float(default_loss), rtol=1e-5, atol=1e-7)
    assert abs(float(aux["kl_positive"])) < 1e-6 and float(aux3["kl_positive"]) > 1e-3


def test_global_coefficients_make_microbatches_add_up():
    sp, rp = params(0), params(1)
    batch = make_batch(9, (5, 2, 7, 3, 16, 1))
    whole_loss, whole_aux = loss_only(5)(sp, rp, to_jnp(batch), 0.1, 0.05)
    coeff = losses.token_coefficients(jnp.ones(batch.response.shape), jnp.asarray(batch.response_mask))
    parts = [loss_only(5)(sp, rp, to_jnp(jax.tree.map(lambda a: a[rows], batch)), 0.1, 0.05, coeff[rows])
             for rows in (slice(0, 3), slice(3, 6))]
    np.testing.assert_allclose(sum(float(p[0]) for p in parts), float(whole_loss), rtol=1e-5)
    for k in whole_aux:
        np.testing.assert_allclose(sum(float(p[1][k]) for p in parts), float(whole_aux[k]), rtol=1e-5, err_msg=k)


def _avals(jaxpr):
    for eqn in jaxpr.eqns:
        yield from (v.aval for v in eqn.outvars)
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else (p,)):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _avals(sub)


def test_no_whole_sequence_logits_in_forward_or_backward():
    sp, rp = params(0), params(1)
    batch = to_jnp(make_batch(3, (64, 40), 16))
    chunk = 16
    f = lambda sp: C.contrastive_loss(sp, rp, batch, CFG, chunk_tokens=chunk)[0]  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.value_and_grad(f))(sp).jaxpr
    vocab_arrays = [a.shape for a in _avals(jaxpr) if getattr(a, "ndim", 0) >= 3 and a.shape[-1] == CFG.vocab_size]
    assert vocab_arrays and max(s[-2] for s in vocab_arrays) == chunk, vocab_arrays


def test_bad_arguments_are_named():
    sp = params(0)
    jb = to_jnp(make_batch(1, (3,), 1))
    with pytest.raises(ValueError, match=r"dail.train.divergence='jsd'.*reverse, forward"):
        C.contrastive_loss(sp, sp, jb, CFG, divergence="jsd")
    with pytest.raises(ValueError, match=r"coeff must be \[B, R\]"):
        C.contrastive_loss(sp, sp, jb, CFG, coeff=jnp.ones((1, 5)))
    with pytest.raises(ValueError, match=r"chunk_tokens=0"):
        C.contrastive_loss(sp, sp, jb, CFG, chunk_tokens=0)
