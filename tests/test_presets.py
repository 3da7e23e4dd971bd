"""Qwen3 presets: the published config.json values and the published parameter counts."""
import pytest

from opdjax.models import presets
from opdjax.models.config import ConfigError

# (preset, published total, published non-embedding) from the Qwen3 model cards, in billions.
PUBLISHED = [("Qwen3-0.6B", 0.6, 0.44), ("Qwen3-1.7B", 1.7, 1.4), ("Qwen3-4B", 4.0, 3.6), ("Qwen3-8B", 8.2, 6.95),
             ("Qwen2.5-7B-Instruct", 7.61, 6.53)]
QWEN3 = [n for n in presets.PRESETS if n.startswith("Qwen3-")]


@pytest.mark.parametrize("name,total,non_embedding", PUBLISHED)
def test_num_params_match_the_model_cards(name, total, non_embedding):
    cfg = presets.preset_config(name)
    n = cfg.num_params()
    embed = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    # The cards round to 2-3 significant digits; 0.6B is 0.596B exactly.
    assert n == pytest.approx(total * 1e9, rel=0.03), n
    assert n - embed == pytest.approx(non_embedding * 1e9, rel=0.01), n - embed


def test_exact_counts():
    got = {name: presets.preset_config(name).num_params() for name in presets.PRESETS}
    assert got == {"Qwen3-0.6B": 596_049_920, "Qwen3-1.7B": 1_720_574_976,
                   "Qwen3-4B": 4_022_468_096, "Qwen3-8B": 8_190_735_360, "Qwen2.5-7B-Instruct": 7_615_616_512,
                   # 2 x 32768 x 768 untied tables + L x 6,293,120 per layer + the final norm
                   "opdjax-100m": 2 * 32768 * 768 + 8 * 6_293_120 + 768,
                   "opdjax-200m": 2 * 32768 * 768 + 24 * 6_293_120 + 768}


def test_architecture_fields():
    shape = {n: (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads)
             for n, c in ((n, presets.preset_config(n)) for n in QWEN3)}
    assert shape == {"Qwen3-0.6B": (1024, 3072, 28, 16, 8), "Qwen3-1.7B": (2048, 6144, 28, 16, 8),
                     "Qwen3-4B": (2560, 9728, 36, 32, 8), "Qwen3-8B": (4096, 12288, 36, 32, 8)}
    for name in QWEN3:
        c = presets.preset_config(name)
        assert (c.model_type, c.head_dim, c.vocab_size, c.rope.theta, c.max_position_embeddings,
                c.rms_norm_eps, c.qk_norm, c.qkv_bias, c.dtype) == \
            ("qwen3", 128, 151936, 1e6, 40960, 1e-6, True, False, "bfloat16")
        assert c.tie_word_embeddings == (name != "Qwen3-8B")


def test_qwen2p5_7b_instruct():
    c = presets.preset_config("Qwen/Qwen2.5-7B-Instruct")
    assert (c.model_type, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads,
            c.head_dim, c.vocab_size, c.qkv_bias, c.qk_norm, c.tie_word_embeddings) == \
        ("qwen2", 3584, 18944, 28, 28, 4, 128, 152064, True, False, False)


def test_names_and_round_trip():
    assert presets.preset_config("8b") == presets.preset_config("Qwen/Qwen3-8B") == presets.preset_config("qwen3-8b")
    d = presets.preset_dict("0.6b")
    d["hidden_size"] = 1  # a copy: the preset itself is unchanged
    assert presets.QWEN3_0P6B["hidden_size"] == 1024
    cfg = presets.preset_config("1.7B")
    assert type(cfg).from_hf_dict(cfg.to_hf_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown model preset 'Qwen3-14B'"):
        presets.preset_config("Qwen3-14B")
