"""Budgeted generation with a forced final answer, on the shipped toy student.

The toy student answers "We start with N. ..." greedily; with "." as an extra stop token and a
budget of 6 tokens, a one-digit start ("We", " start", " with", " ", "7", ".") ends within the
budget and a two-digit one ("... 1", "1", ".") runs out of it: both cases in one batch. The
references are greedy decoding (opdjax.rollout.greedy) of the same contexts: phase 1, then the
forced context built by hand from the rule (opdjax.eval.budget's docstring, the authors' eval.py).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opdjax.toy import arithmetic
from opdjax.data.prompts import left_pad
from opdjax.data.tokenizer import load_tokenizer
from opdjax.eval.budget import DEFAULT_FORCED_ANSWER, generate_with_budget
from opdjax.models import hf_io
from opdjax.toy import opd_pair
from opdjax.rollout.greedy import greedy_generate
from opdjax.rollout.sampler import SamplingSettings, sample

FORCED = DEFAULT_FORCED_ANSWER
ROWS = 8


@pytest.fixture(scope="module")
def toy():
    _, student = opd_pair.load_toy_pair()
    tok = load_tokenizer(student)
    params, cfg = hf_io.load_pretrained(student)
    problems = arithmetic.make_problems(ROWS, seed=0, split="eval")
    prompts = [opd_pair.encode_prompt(tok, p["prompt"]) for p in problems]
    return params, cfg, tok, problems, prompts


def _period(tok):
    (period,) = tok.encode(".", add_special_tokens=False)
    return period


def test_greedy_budget_forces_only_rows_that_ran_out_and_matches_the_greedy_path(toy):
    params, cfg, tok, problems, prompts = toy
    stops = (tok.eos_token_id, _period(tok))
    settings = SamplingSettings(1, temperature=0.0, candidates=1, stop_ids=stops)
    res = generate_with_budget(params, cfg, tok, prompts, budget=6, forced_answer=FORCED, answer_tokens=6,
                               settings=settings, key=jax.random.key(0), rows_per_call=ROWS)
    two_digit = np.array([p["start"] >= 10 for p in problems])
    assert two_digit.any() and (~two_digit).any()
    np.testing.assert_array_equal(res.forced, two_digit)
    np.testing.assert_array_equal(res.thinking_tokens, 6)
    for p, text, forced in zip(problems, res.texts, res.forced):
        if forced:
            head, _ = text.split(FORCED)  # the forced text appears once, verbatim
            assert head == f"We start with {p['start']}"
        else:
            assert text == f"We start with {p['start']}." and FORCED not in text

    # The same tokens as greedy decoding: up to the budget, then from prompt + generated + forced
    # (one greedy compile for both: 6 new tokens after rows left-padded to 96 columns).
    def greedy(rows):
        rows = rows + [rows[-1]] * (ROWS - len(rows))
        toks, mask = left_pad(rows, tok.pad_token_id, length=96)
        g, real = greedy_generate(params, jnp.asarray(toks), jnp.asarray(mask), cfg, max_new_tokens=6,
                                  eos_id=jnp.asarray(stops), pad_id=tok.pad_token_id)
        return [row[m].tolist() for row, m in zip(np.asarray(g), np.asarray(real))]

    gen = greedy(prompts)
    for i in range(ROWS):
        assert res.token_ids[i][:len(gen[i])] == gen[i]
    forced_ids = tok.encode(FORCED, add_special_tokens=False)
    rows = np.flatnonzero(res.forced)
    cont = greedy([prompts[i] + gen[i] + forced_ids for i in rows])
    for j, i in enumerate(rows):
        assert res.token_ids[i] == gen[i] + forced_ids + cont[j]
        assert res.texts[i] == tok.decode(gen[i]) + FORCED + tok.decode(cont[j], skip_special_tokens=True)


def test_budget_of_one_forces_every_row_and_is_deterministic(toy):
    params, cfg, tok, problems, prompts = toy
    settings = SamplingSettings(1, temperature=0.8, top_p=0.95, candidates=1, stop_ids=(tok.eos_token_id,))
    run = lambda key: generate_with_budget(params, cfg, tok, prompts[:6], budget=1, forced_answer=FORCED,
                                           answer_tokens=4, settings=settings, key=key, rows_per_call=ROWS)
    a, b, other = run(jax.random.key(3)), run(jax.random.key(3)), run(jax.random.key(4))
    assert a.forced.all() and len(a.texts) == 6
    np.testing.assert_array_equal(a.thinking_tokens, 1)
    forced_ids = tok.encode(FORCED, add_special_tokens=False)
    for text, ids in zip(a.texts, a.token_ids):
        assert FORCED in text
        assert ids[1:1 + len(forced_ids)] == forced_ids and 1 + len(forced_ids) < len(ids) <= 1 + len(forced_ids) + 4
    assert a.texts == b.texts and a.token_ids == b.token_ids
    assert a.token_ids != other.token_ids  # 6 rows x 5 sampled tokens: a new key draws differently


def test_empty_and_bad_arguments(toy):
    params, cfg, tok, _, prompts = toy
    settings = SamplingSettings(1, temperature=0.0, candidates=1, stop_ids=(tok.eos_token_id,))
    empty = generate_with_budget(params, cfg, tok, [], budget=4, answer_tokens=2, settings=settings,
                                 key=jax.random.key(0))
    assert empty.texts == [] and empty.forced.shape == (0,)
    with pytest.raises(ValueError, match="budget"):
        generate_with_budget(params, cfg, tok, prompts, budget=0, answer_tokens=2, settings=settings,
                             key=jax.random.key(0))
    with pytest.raises(ValueError, match="answer_tokens"):
        generate_with_budget(params, cfg, tok, prompts, budget=4, answer_tokens=0, settings=settings,
                             key=jax.random.key(0))


def _greedy_rows(params, cfg, tok, rows, stops, n=6, width=96):
    """Greedy continuations (an argmax loop of its own, rollout.greedy) of each row: the reference."""
    rows = rows + [rows[-1]] * (ROWS - len(rows))
    toks, mask = left_pad(rows, tok.pad_token_id, length=width)
    g, real = greedy_generate(params, jnp.asarray(toks), jnp.asarray(mask), cfg, max_new_tokens=n,
                              eos_id=jnp.asarray(stops), pad_id=tok.pad_token_id)
    return [row[m].tolist() for row, m in zip(np.asarray(g), np.asarray(real))]


def test_thinking_mode_forces_every_row_after_the_thinking_part(toy):
    """The authors' rule for a thinking model: phase 1 stops at the end-of-thinking token (here "."
    plays </think>: the toy student closes "We start with 7." within 6 tokens, a two-digit start
    does not), and EVERY row gets the forced answer, the model's own closing token dropped."""
    params, cfg, tok, problems, prompts = toy
    period = _period(tok)
    settings = SamplingSettings(1, temperature=0.0, candidates=1, stop_ids=(tok.eos_token_id,))
    res = generate_with_budget(params, cfg, tok, prompts, budget=6, forced_answer=FORCED, answer_tokens=6,
                               settings=settings, key=jax.random.key(0), rows_per_call=ROWS, thinking=True,
                               thinking_end=".")
    two_digit = np.array([p["start"] >= 10 for p in problems])
    assert two_digit.any() and (~two_digit).any()
    assert res.forced.all()
    np.testing.assert_array_equal(res.exhausted, two_digit)
    np.testing.assert_array_equal(res.thinking_tokens, 6)  # "We start with 7." = 6 tokens, "." counted
    gen = _greedy_rows(params, cfg, tok, prompts, (tok.eos_token_id, period))
    forced_ids = tok.encode(FORCED, add_special_tokens=False)
    kept = [g[:-1] if g[-1] == period else g for g in gen]
    cont = _greedy_rows(params, cfg, tok, [p + k + forced_ids for p, k in zip(prompts, kept)], (tok.eos_token_id,))
    for i, p in enumerate(problems):
        assert res.token_ids[i] == kept[i] + forced_ids + cont[i]
        assert res.texts[i] == f"We start with {p['start']}" + FORCED + tok.decode(cont[i], skip_special_tokens=True)


def test_non_thinking_forces_the_rows_without_an_answer(toy):
    """Without thinking the authors force the samples whose text holds no answer ("\\boxed{"
    missing), whether they ran out of budget or stopped: a stopped row's stop token is dropped."""
    params, cfg, tok, problems, prompts = toy
    period = _period(tok)
    stops = (tok.eos_token_id, period)
    settings = SamplingSettings(1, temperature=0.0, candidates=1, stop_ids=stops)
    seen = {}

    def has_answer(i, text):
        seen[i] = text
        return i % 2 == 0

    res = generate_with_budget(params, cfg, tok, prompts, budget=6, forced_answer=FORCED, answer_tokens=6,
                               settings=settings, key=jax.random.key(0), rows_per_call=ROWS, has_answer=has_answer)
    gen = _greedy_rows(params, cfg, tok, prompts, stops)
    assert seen == {i: tok.decode(g, skip_special_tokens=True) for i, g in enumerate(gen)}
    np.testing.assert_array_equal(res.forced, np.arange(ROWS) % 2 == 1)
    np.testing.assert_array_equal(res.exhausted, [g[-1] not in stops for g in gen])
    assert (res.forced & ~res.exhausted).any()  # a forced row that had stopped on its own
    forced_ids = tok.encode(FORCED, add_special_tokens=False)
    rows = np.flatnonzero(res.forced)
    kept = {i: gen[i][:-1] if gen[i][-1] in stops else gen[i] for i in rows}
    cont = _greedy_rows(params, cfg, tok, [prompts[i] + kept[i] + forced_ids for i in rows], stops)
    for j, i in enumerate(rows):
        assert res.token_ids[i] == kept[i] + forced_ids + cont[j]
    for i in np.flatnonzero(~res.forced):
        assert res.token_ids[i] == gen[i] and res.texts[i] == tok.decode(gen[i], skip_special_tokens=True)


def test_presence_penalty_restarts_in_the_forced_call(toy):
    """The penalty reaches both calls, and the forced call is a new request (vLLM: its generated
    set starts empty): with the same keys, its tokens equal a fresh penalised sampler call on the
    forced contexts (chunk 0 of call k draws with fold_in(fold_in(key, k), 0))."""
    params, cfg, tok, problems, prompts = toy
    settings = SamplingSettings(1, temperature=1.0, candidates=1, stop_ids=(tok.eos_token_id,), presence_penalty=2.0)
    key = jax.random.key(5)
    res = generate_with_budget(params, cfg, tok, prompts, budget=6, forced_answer=FORCED, answer_tokens=6,
                               settings=settings, key=key, rows_per_call=ROWS)
    forced_ids = tok.encode(FORCED, add_special_tokens=False)
    P = -(-max(map(len, prompts)) // 32) * 32
    L = -(-(P + 6 + len(forced_ids)) // 32) * 32

    def fresh(rows, width, call):
        toks, mask = left_pad(rows, tok.pad_token_id, length=width)
        r = sample(params, jnp.asarray(toks), jnp.asarray(mask), jax.random.fold_in(jax.random.fold_in(key, call), 0),
                   cfg, dataclasses.replace(settings, max_new_tokens=6), pad_id=tok.pad_token_id)
        return [row[m].tolist() for row, m in zip(np.asarray(r.tokens), np.asarray(r.mask))]

    gen = fresh(prompts, P, 0)
    assert res.forced.all() and all(len(g) == 6 for g in gen)  # nothing ends within 6 tokens here
    cont = fresh([p + g + forced_ids for p, g in zip(prompts, gen)], L, 1)
    for i in range(ROWS):
        assert res.token_ids[i] == gen[i] + forced_ids + cont[i]
    # (the toy student's margins exceed 2 nats, so here the penalty does not change its draws; that it
    # does change them, against a NumPy sampler, is tests/test_sampler.py's presence-penalty tests)


def test_thinking_end_must_be_one_token(toy):
    params, cfg, tok, _, prompts = toy
    settings = SamplingSettings(1, temperature=0.0, candidates=1, stop_ids=(tok.eos_token_id,))
    with pytest.raises(ValueError, match="eval.thinking_end='</nothink>' is not one token"):
        generate_with_budget(params, cfg, tok, prompts, budget=4, answer_tokens=2, settings=settings,
                             key=jax.random.key(0), thinking=True, thinking_end="</nothink>")
    with pytest.raises(ValueError, match="also a stop token"):
        generate_with_budget(params, cfg, tok, prompts, budget=4, answer_tokens=2, settings=settings,
                             key=jax.random.key(0), thinking=True, thinking_end=tok.eos_token)
