"""Greedy decoding with the KV cache equals an argmax loop over full forwards."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opdjax.models import qwen
from opdjax.models.config import ModelConfig
from opdjax.rollout.decode import last_real_index
from opdjax.rollout.greedy import greedy_generate

CFG = ModelConfig("qwen3", vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8)


@jax.jit
def _next_token(params, seq, length):
    """argmax after the first `length` tokens of `seq`, by a full forward (no cache)."""
    mask = jnp.arange(seq.shape[0]) < length
    logits, _ = qwen.forward(params, seq[None], CFG, mask=mask[None])
    return jnp.argmax(logits[0, length - 1])


def argmax_loop(params, prompt, n, eos):
    """Reference: re-run the whole sequence every step, no cache (fixed buffer: one compile)."""
    seq = np.zeros(len(prompt) + n, np.int32)
    seq[:len(prompt)] = prompt
    out = []
    for i in range(n):
        t = int(_next_token(params, jnp.asarray(seq), len(prompt) + i))
        out.append(t)
        seq[len(prompt) + i] = t
        if t == eos:
            break
    return out


@pytest.mark.parametrize("left", [True, False], ids=["left_padded", "right_padded"])
def test_greedy_equals_argmax_loop(left):
    params = qwen.init_params(CFG, jax.random.key(1), std=0.6)
    rs = np.random.RandomState(0)
    prompts = [rs.randint(2, 40, n) for n in (4, 7, 2)]
    P = 7
    toks = np.zeros((3, P), np.int32)
    mask = np.zeros((3, P), bool)
    for i, p in enumerate(prompts):
        sl = slice(P - len(p), P) if left else slice(0, len(p))
        toks[i, sl], mask[i, sl] = p, True
    # pick as EOS a token that row 0's reference emits early, so stopping is exercised
    eos = argmax_loop(params, prompts[0], 10, eos=-1)[3]
    out, real = greedy_generate(params, jnp.asarray(toks), jnp.asarray(mask), CFG, max_new_tokens=10,
                                eos_id=eos, pad_id=0)
    out, real = np.asarray(out), np.asarray(real)
    stopped = 0
    for i, p in enumerate(prompts):
        ref = argmax_loop(params, p, 10, eos)
        assert out[i][real[i]].tolist() == ref
        assert real[i].tolist() == [True] * len(ref) + [False] * (10 - len(ref))  # EOS kept, then padding
        assert (out[i][~real[i]] == 0).all()
        stopped += len(ref) < 10
    assert stopped >= 1


def test_last_real_index():
    m = jnp.asarray([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 1]], bool)
    assert last_real_index(m).tolist() == [2, 3, 3]
