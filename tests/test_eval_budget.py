"""Budgeted generation with a forced final answer, on the shipped toy student.

The toy student answers "We start with N. ..." greedily; with "." as an extra stop token and a
budget of 6 tokens, a one-digit start ("We", " start", " with", " ", "7", ".") ends within the
budget and a two-digit one ("... 1", "1", ".") runs out of it: both cases in one batch.
"""
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
from opdjax.rollout.sampler import SamplingSettings

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
