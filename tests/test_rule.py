"""The release rule end to end: a planted collapse is found at the right sentence, every mode
produces the weights it promises, bad settings are refused by name, and it runs on the arrays
a real teacher/student pair produce."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from opdjax.data.tokenizer import build_toy_tokenizer
from opdjax.models import qwen
from opdjax.models.config import ModelConfig
from opdjax.teachability import rule, scoring

SENTENCES = ["First, compute 3 + 4 = 7.", "Then double it to get 14.", "Next we add 6, which gives 20.",
             "Now divide by 5 to get 4.", "So far the value is 4.", "Then we guess the rest.",
             "It may be 9 or 10.", "So the answer is \\boxed{9}."]
K = 4


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_toy_tokenizer(tmp_path_factory.mktemp("tok"))


def planted_batch(tok, collapse_at=5, rows=3, pad_to=None, seed=0):
    """Rows of the same 8-sentence response; the teacher's advantage gap is ~4 nats on
    sentences < collapse_at and ~0.2 after."""
    rs = np.random.RandomState(seed)
    ids = []
    sent_of_token = []
    for j, s in enumerate(SENTENCES):
        piece = tok.encode((" " if j else "") + s, add_special_tokens=False)
        ids += piece
        sent_of_token += [j] * len(piece)
    ids.append(tok.eos_token_id)
    sent_of_token.append(len(SENTENCES) - 1)
    T = len(ids)
    R = pad_to or T
    response_ids = np.zeros((rows, R), np.int32)
    response_mask = np.zeros((rows, R), bool)
    response_ids[:, :T], response_mask[:, :T] = ids, True
    student_cand = np.tile(np.log([0.4, 0.3, 0.2, 0.1]), (rows, R, 1)).astype(np.float32)
    cand_ids = np.tile(np.arange(K) + 10, (rows, R, 1)).astype(np.int32)
    high = np.array([-0.1, -6.0, -7.0, -8.0])
    low = np.log([0.4, 0.3, 0.2, 0.1]) + np.array([0.3, 0.1, 0.0, 0.0])
    teacher_cand = np.where((np.array(sent_of_token + [0] * (R - T)) < collapse_at)[None, :, None], high, low)
    teacher_cand = (teacher_cand + 0.05 * rs.randn(rows, R, K)).astype(np.float32)
    student_sampled = rs.uniform(-3, -0.5, (rows, R)).astype(np.float32)
    teacher_sampled = (student_sampled + rs.randn(rows, R)).astype(np.float32)
    first_token = {j: sent_of_token.index(j) for j in range(len(SENTENCES))}
    return dict(response_ids=response_ids, response_mask=response_mask, teacher_sampled_logp=teacher_sampled,
                teacher_cand_logp=teacher_cand, student_sampled_logp=student_sampled,
                student_cand_logp=student_cand, candidate_ids=cand_ids), first_token, T


def settings(**kw):
    c = ml_collections.ConfigDict(kw)
    return rule.settings_from_config(c)


def test_planted_collapse_is_released_at_its_sentence(tok):
    batch, first_token, T = planted_batch(tok, pad_to=None)
    d = rule.decide_release(settings(), tokenizer=tok, **batch)
    assert np.asarray(d.changepoint.detected).all()
    assert (np.asarray(d.changepoint.split) == 5).all()
    r = first_token[5]
    assert (np.asarray(d.release_index) == r).all()
    w = np.asarray(d.weights)
    assert (w[:, :r] == 1).all() and (w[:, r:] == 0).all()
    assert d.segments.num_sentences.tolist() == [8, 8, 8]
    s = rule.summary(d)
    assert s["release_rate"] == 1.0 and abs(s["kept_share"] - r / T) < 1e-6
    assert s["margin_before"] > 3 > 1 > s["margin_after"]


def test_no_collapse_supervises_everything(tok):
    batch, _, T = planted_batch(tok, collapse_at=99)
    d = rule.decide_release(settings(), tokenizer=tok, **batch)
    assert not np.asarray(d.changepoint.detected).any()
    assert (np.asarray(d.release_index) == T).all() and (np.asarray(d.weights) == 1).all()


def test_modes_share_one_weight_array(tok):
    batch, first_token, T = planted_batch(tok, rows=4, pad_to=140)
    mask = batch["response_mask"]
    full = rule.decide_release(settings(mode="full"), tokenizer=tok, **batch)
    assert (np.asarray(full.weights) == mask).all()
    assert (np.asarray(full.rule_release_index) == first_token[5]).all()  # the rule still reported
    prefix = rule.decide_release(settings(mode="prefix_fraction", prefix_fraction=0.25), tokenizer=tok, **batch)
    assert (np.asarray(prefix.release_index) == np.floor(0.25 * T + 0.5)).all()
    rnd = rule.decide_release(settings(mode="random_matched"), tokenizer=tok, key=jax.random.key(7), **batch)
    kept = np.asarray(rnd.weights).sum()
    assert abs(kept - first_token[5] * 4) <= 1  # same kept-token count as the rule, up to rounding
    assert len(set(np.asarray(rnd.release_index).tolist())) > 1  # random points, not the rule's
    linear = rule.decide_release(settings(fade="linear", fade_tokens=4), tokenizer=tok, **batch)
    r = first_token[5]
    np.testing.assert_allclose(np.asarray(linear.weights)[0, r - 1:r + 5], [1, .75, .5, .25, 0, 0])
    assert (np.asarray(linear.weights)[~mask] == 0).all()


@pytest.mark.parametrize("field,value,message", [
    ("mode", "oracle", "release.mode='oracle'"),
    ("margin", "kl", "release.margin='kl'"),
    ("variance", "pooled", "release.variance"),
    ("min_segment", 0, "release.min_segment"),
    ("fade", "cosine", "release.fade"),
    ("prefix_fraction", 1.5, "release.prefix_fraction"),
    ("top_k", 0, "release.top_k"),
    ("bic_penaltyy", 1.0, "release.bic_penaltyy is not a release-rule setting"),
])
def test_bad_settings_are_named(field, value, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        settings(**{field: value})


def test_too_many_sentences_is_an_error_not_a_cut(tok):
    batch, _, _ = planted_batch(tok)
    with pytest.raises(ValueError, match="8 sentences but release.max_sentences=4"):
        rule.decide_release(settings(max_sentences=4), tokenizer=tok, **batch)


def test_runs_on_a_real_teacher_and_student(tok):
    """Tiny random Qwen3 teacher and student: student top-K from its own forward, teacher scores
    from the chunked kernel, then the rule; finite outputs of the right shapes."""
    V = len(tok)
    teacher_cfg = ModelConfig("qwen3", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                              num_heads=4, num_kv_heads=2, head_dim=8)
    student_cfg = ModelConfig("qwen3", vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=1,
                              num_heads=2, num_kv_heads=1, head_dim=8)
    teacher = qwen.init_params(teacher_cfg, jax.random.key(0), std=0.3)
    student = qwen.init_params(student_cfg, jax.random.key(1), std=0.3)
    batch, _, T = planted_batch(tok, rows=2)
    prompt = np.array([tok.encode("Compute it.", add_special_tokens=False)] * 2, np.int32)
    P = prompt.shape[1]
    tokens = jnp.asarray(np.concatenate([prompt, batch["response_ids"]], 1))
    mask = jnp.asarray(np.concatenate([np.ones_like(prompt, bool), batch["response_mask"]], 1))
    logits, _ = qwen.forward(student, tokens, student_cfg, mask=mask)
    logp = jax.nn.log_softmax(logits[:, P - 1:-1], axis=-1)  # predicts each response token
    cand_logp, cand_ids = jax.lax.top_k(logp, K)
    sampled_logp = jnp.take_along_axis(logp, jnp.asarray(batch["response_ids"])[..., None], -1)[..., 0]
    scores = scoring.teacher_logprobs(teacher, tokens, mask, cand_ids, cfg=teacher_cfg, prompt_len=P,
                                      chunk_tokens=16)
    d = rule.decide_release(settings(), tokenizer=tok, response_ids=batch["response_ids"],
                            response_mask=batch["response_mask"], teacher_sampled_logp=scores.sampled_logp,
                            teacher_cand_logp=scores.candidate_logp, student_sampled_logp=sampled_logp,
                            student_cand_logp=cand_logp, candidate_ids=cand_ids)
    assert d.weights.shape == (2, T) and np.isfinite(np.asarray(d.weights)).all()
    assert np.isfinite(np.asarray(d.advantage)).all()
    assert all(np.isfinite(v).all() or k in ("margin_after", "abs_adv_after", "mean_release_frac")
               for k, v in rule.summary(d).items() if not isinstance(v, list))


def test_pictures_from_a_decision(tok, tmp_path):
    batch, first_token, T = planted_batch(tok, rows=2)
    d = rule.decide_release(settings(), tokenizer=tok, **batch)
    paths = rule.write_pictures(d, tmp_path, step=12, response_ids=batch["response_ids"],
                                response_mask=batch["response_mask"], tokenizer=tok)
    assert sorted(p.suffix for p in paths) == [".html", ".html", ".md", ".md", ".png", ".png"]
    html = next(p for p in paths if p.suffix == ".html").read_text()
    assert html.count('class="tok rel"') == T - first_token[5]  # the released suffix, greyed
    assert ">boxed<" in html and "&lt;|im_end|&gt;" in html  # every token shown, escaped


def test_random_matched_carries_the_rules_weight_mass_under_fades(tok):
    # The random arm must carry the rule's sum w, fades included (not the rule's mass as a token
    # count with the fade applied again on top).
    batch, first_token, T = planted_batch(tok, rows=4, pad_to=140)
    for fade in (dict(fade="linear", fade_tokens=4), dict(fade="exp", half_life=3.0)):
        rule_w = np.asarray(rule.decide_release(settings(**fade), tokenizer=tok, **batch).weights)
        rnd = rule.decide_release(settings(mode="random_matched", **fade), tokenizer=tok, key=jax.random.key(7),
                                  **batch)
        w = np.asarray(rnd.weights)
        bound = 4 * w.size * 2.0 ** -24 * rule_w.sum()  # float32 summation error of sum w, see test_weights
        assert abs(w.sum() - rule_w.sum()) <= bound, (fade, w.sum(), rule_w.sum())
        assert len(set(np.asarray(rnd.release_index).tolist())) > 1
        assert (w[~batch["response_mask"]] == 0).all() and (np.diff(w, axis=1) <= 0).all()
        s = rule.summary(rnd)
        assert abs(s["kept_share"] - s["rule_kept_share"]) <= bound / batch["response_mask"].sum()


def test_margin_statistics_leave_undefined_margins_out():
    # Late undefined margins (the last third of every row) must not count as 0 in margin_after
    # and the deciles; |A_t| statistics still cover every response token.
    lengths = np.array([60, 48, 54])
    R = 60
    t = np.arange(R)[None, :]
    mask = t < lengths[:, None]
    rs = np.random.RandomState(0)
    margin = (np.where(t < 20, 4.0, 1.0) + 0.1 * rs.randn(3, R)).astype(np.float32)
    defined = mask & (3 * t < 2 * lengths[:, None])
    adv = rs.randn(3, R).astype(np.float32)
    sent_ids = np.where(mask, t // 4, -1).astype(np.int32)
    out = rule.ReleaseDecision(*rule._decide(settings(), 16, jnp.asarray(margin), jnp.asarray(defined),
                                             jnp.asarray(adv), jnp.asarray(sent_ids), jnp.asarray(mask),
                                             jax.random.key(0)), None)
    r = np.asarray(out.release_index)
    assert (r == 20).all()  # the planted drop; tokens after it are defined up to 2T/3 only
    after = mask & (t >= r[:, None])
    s = rule.summary(out)
    np.testing.assert_allclose(s["margin_after"], margin[after & defined].mean(), rtol=1e-5)
    np.testing.assert_allclose(s["margin_before"], margin[~after & defined].mean(), rtol=1e-5)
    np.testing.assert_allclose(s["abs_adv_after"], np.abs(adv[after]).mean(), rtol=1e-5)
    bins = (10 * t) // lengths[:, None]
    want = [margin[defined & (bins == k)].mean() if (defined & (bins == k)).any() else np.nan for k in range(10)]
    np.testing.assert_allclose(s["margin_by_decile"], want, rtol=1e-5)
