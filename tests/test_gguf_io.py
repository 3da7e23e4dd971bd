"""GGUF loading: tiny GGUF files written here from random transformers models (with F32, F16 and
Q8_0 tensors and a real BPE tokenizer), read by us and, independently, by transformers' own GGUF
loader, which is the oracle for names, layouts, config and tokenizer."""
import json
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_oracle import hf_logits, make_hf_model
from opdjax import sharding
from opdjax.data.tokenizer import build_toy_tokenizer, render_chat
from opdjax.models import gguf_io, hf_io, qwen
from opdjax.models.config import ConfigError

forward = jax.jit(qwen.forward, static_argnames=("cfg", "plan"))
Q = gguf.GGMLQuantizationType
VOCAB = 512  # the toy tokenizer's size, so the GGUF's token list matches the embedding
CASES = {
    # Qwen2: q/k/v biases, tied embeddings (no output.weight), theta 1e6.
    "qwen2": dict(model_type="qwen2", tied=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    # Qwen3: untied, q/k norms, head_dim 32 != hidden/heads = 16 (read from attention.key_length).
    "qwen3": dict(model_type="qwen3", tied=False, head_dim=32,
                  rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
}
TEXTS = ["Solve 3x + 7 = 22. The answer is \\boxed{5}.", "café 🙂 <think>\nx = 2\n</think> done<|im_end|>"]
CHAT = [{"role": "user", "content": "What is 2+2?"}]


def tokens(shape=(2, 12), seed=0):
    return np.random.RandomState(seed).randint(0, VOCAB, shape)


def storage_type(gguf_name: str, array: np.ndarray) -> Q:
    """A mix like a real quantized file: 1-D tensors F32 (as llama.cpp stores them), layer 0 and
    the embedding Q8_0, layer 1 F16 except one F32 matrix, the output head F16."""
    if array.ndim == 1 or gguf_name == "blk.1.ffn_down.weight":
        return Q.F32
    if gguf_name.startswith("blk.0.") or gguf_name == "token_embd.weight":
        return Q.Q8_0
    return Q.F16


def gguf_tokenizer_metadata(tok):
    """llama.cpp's 'gpt2' (byte-level BPE) tokenizer keys from a transformers fast tokenizer."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))
    added = {t.content: t.special for t in tok.added_tokens_decoder.values()}
    # token types: 1 normal, 3 control (special), 4 user-defined (added, not special: <think>)
    types = [(3 if added[t] else 4) if t in added else 1 for t, _ in vocab]
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    return [t for t, _ in vocab], types, [" ".join(m) if isinstance(m, list) else m for m in merges]


def write_gguf(path, model, tok, *, arch=None, drop_keys=(), extra_tensors=(), metadata=None):
    """A GGUF file of `model` as llama.cpp's converter lays it out (no q/k permutation for qwen)."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads  # Qwen2Config has none
    w = gguf.GGUFWriter(str(path), arch or c.model_type)
    w.add_name("tiny-test-model")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    if head_dim != c.hidden_size // c.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    for key, value in (metadata or {}).items():  # extra keys, or overrides of the ones above
        add = w.add_string if isinstance(value, str) else w.add_float32 if isinstance(value, float) else w.add_uint32
        add(key, value)
    token_list, types, merges = gguf_tokenizer_metadata(tok)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(token_list)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_bos_token_id(tok.pad_token_id)  # as Qwen's GGUFs do (with add_bos_token false)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)
    for kv in w.kv_data:  # to test missing-key errors
        for key in drop_keys:
            kv.pop(key, None)

    to_gguf = {hf: g for g, hf in gguf_io.GLOBAL_NAMES.items()}
    to_gguf_layer = {hf: g for g, hf in gguf_io.LAYER_NAMES.items()}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # state_dict lists the tied copy; llama.cpp writes no output.weight then
        array = tensor.detach().float().numpy()
        if name in to_gguf:
            gguf_name = to_gguf[name]
        else:  # model.layers.{i}.<module>.<weight|bias>
            _, _, i, *module, kind = name.split(".")
            gguf_name = f"blk.{i}.{to_gguf_layer['.'.join(module)]}.{kind}"
        qtype = storage_type(gguf_name, array)
        w.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    for name, array in extra_tensors:
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def transformers_from_gguf(path, cfg):
    """transformers' model from the same GGUF file: its own metadata parsing, name mapping and
    dequantization (it needs `accelerate`, a test pin). One workaround, not touching the
    weights: its qwen3 metadata map has no `attention.key_length`, so head_dim falls back to
    Qwen3Config's default 128 (right for every released Qwen3, wrong for a tiny one); pass it."""
    folder, name = os.path.split(path)
    extra = {"head_dim": cfg.head_dim} if cfg.model_type == "qwen3" else {}
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True, **extra).eval()


@pytest.fixture(scope="module")
def toy_tok(tmp_path_factory):
    return build_toy_tokenizer(tmp_path_factory.mktemp("toy_tok"), vocab_size=VOCAB)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory, toy_tok):
    """(original torch model, path of its GGUF file)."""
    model = make_hf_model(vocab=VOCAB, **CASES[request.param])
    path = write_gguf(tmp_path_factory.mktemp(request.param) / "model-Q8_0.gguf", model, toy_tok)
    return model, path


def test_logits_match_transformers_reading_the_same_gguf(case):
    model, path = case
    params, cfg = gguf_io.load_gguf(path)
    source = gguf_io.GGUFSource(path)
    assert {source.gguf_type(n) for n in source.names()} == {"F32", "F16", "Q8_0"}
    theirs = transformers_from_gguf(path, cfg)
    # Same dequantized weights under the same names (transformers maps names on its own).
    theirs_sd = theirs.state_dict()
    for name in source.names():
        np.testing.assert_array_equal(source.get(name), theirs_sd[name].numpy(), err_msg=name)

    t = tokens()
    ours = np.asarray(forward(params, jnp.asarray(t), cfg)[0])
    assert np.abs(ours - hf_logits(theirs, t)).max() <= 1e-4
    # Against the unquantized model: Q8_0 rounds each weight by up to half a step of 1/127 of its
    # block's max (~0.4% relative), F16 by ~0.05%; through two layers the logits (max ~0.7) move by
    # about 1e-2. A wrong layout or a dropped bias/norm moves them by ~the logits' own size.
    original = hf_logits(model, t)
    error = np.abs(ours - original).max()
    assert 1e-5 < error <= 0.03 * np.abs(original).max(), error


def test_config_from_metadata(case):
    model, path = case
    c = model.config
    cfg = gguf_io.config_from_gguf(path)
    assert cfg.model_type == c.model_type and cfg.vocab_size == VOCAB
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (
        c.hidden_size, c.intermediate_size, c.num_hidden_layers)
    head_dim = CASES[c.model_type].get("head_dim", c.hidden_size // c.num_attention_heads)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (c.num_attention_heads, c.num_key_value_heads, head_dim)
    assert cfg.rope.theta == c.rope_parameters["rope_theta"] and cfg.rope.rope_type == "default"
    assert cfg.rms_norm_eps == pytest.approx(c.rms_norm_eps, rel=1e-6)  # stored as float32
    assert cfg.max_position_embeddings == c.max_position_embeddings
    assert cfg.tie_word_embeddings == c.tie_word_embeddings
    assert (cfg.qkv_bias, cfg.qk_norm) == ((True, False) if c.model_type == "qwen2" else (False, True))
    assert (cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id) == (509, 507, 507)  # <|im_end|>, <|endoftext|>
    assert gguf_io.config_from_gguf(gguf.GGUFReader(path)) == cfg  # a reader works as well as a path


def test_rope_scaling_metadata(tmp_path, toy_tok):
    model = make_hf_model("qwen3", vocab=VOCAB)
    yarn = write_gguf(tmp_path / "yarn.gguf", model, toy_tok, metadata={
        "qwen3.rope.scaling.type": "yarn", "qwen3.rope.scaling.factor": 4.0,
        "qwen3.rope.scaling.original_context_length": 128})
    rope = gguf_io.config_from_gguf(yarn).rope
    assert (rope.rope_type, rope.factor, rope.original_max_position_embeddings) == ("yarn", 4.0, 128)
    linear = write_gguf(tmp_path / "linear.gguf", model, toy_tok, metadata={
        "qwen3.rope.scaling.type": "linear", "qwen3.rope.scaling.factor": 2.0})
    assert gguf_io.config_from_gguf(linear).rope.rope_type == "linear"
    odd = write_gguf(tmp_path / "longrope.gguf", model, toy_tok, metadata={"qwen3.rope.scaling.type": "longrope"})
    with pytest.raises(ConfigError, match="qwen3.rope.scaling.type='longrope'"):
        gguf_io.config_from_gguf(odd)


def test_tokenizer_from_gguf(case, toy_tok):
    _, path = case
    tok = gguf_io.load_gguf_tokenizer(path)
    assert len(tok) == len(toy_tok) and tok.chat_template == toy_tok.chat_template
    assert (tok.eos_token_id, tok.pad_token_id) == (toy_tok.eos_token_id, toy_tok.pad_token_id)
    for text in TEXTS:
        assert tok.encode(text) == toy_tok.encode(text), text
    assert render_chat(tok, CHAT) == render_chat(toy_tok, CHAT)
    assert tok.name_or_path == path


def test_tokenizer_comes_from_the_gguf_not_its_neighbours(case, tmp_path):
    """transformers would take a tokenizer.json beside the file over the file's own vocabulary."""
    _, path = case
    build_toy_tokenizer(tmp_path, vocab_size=300)
    os.symlink(path, tmp_path / "model.gguf")
    assert len(gguf_io.load_gguf_tokenizer(tmp_path / "model.gguf")) == VOCAB


def test_sharded_load_dequantizes_each_tensor_once(case, monkeypatch):
    _, path = case
    calls = []
    dequantize = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda data, qtype: calls.append(1) or dequantize(data, qtype))
    plan = sharding.ShardingPlan(sharding.make_mesh((2, 2, 2)))
    reader = gguf.GGUFReader(path)
    params = hf_io.load_params(gguf_io.GGUFSource(reader), gguf_io.config_from_gguf(reader), plan)
    assert len(calls) == len(reader.tensors)  # 8 devices, every tensor dequantized once
    single, cfg = gguf_io.load_gguf(path)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, single)
    assert params["layers"]["gate"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_convert_gguf_to_hf(case, tmp_path, toy_tok, capsys):
    model, path = case
    params, cfg = gguf_io.load_gguf(path)
    out = tmp_path / "hf"
    gguf_io.convert_gguf_to_hf(path, out, dtype="float32")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    theirs = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    t = tokens()
    ours = np.asarray(forward(params, jnp.asarray(t), cfg)[0])
    assert np.abs(ours - hf_logits(theirs, t)).max() <= 1e-4
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert [tok.encode(x) for x in TEXTS] == [toy_tok.encode(x) for x in TEXTS]
    assert render_chat(tok, CHAT) == render_chat(toy_tok, CHAT)

    # The CLI, with its default bfloat16.
    gguf_io.main([path, str(tmp_path / "bf16")])
    assert "wrote" in capsys.readouterr().err
    again, cfg16 = hf_io.load_pretrained(str(tmp_path / "bf16"))
    assert cfg16.dtype == "bfloat16" and again["embed"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(again["embed"], np.float32), np.asarray(params["embed"]), rtol=1e-2)


# ------------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def qwen3_model():
    return make_hf_model("qwen3", vocab=VOCAB)


def test_llama_architecture_is_refused(tmp_path, qwen3_model, toy_tok):
    path = write_gguf(tmp_path / "llama.gguf", qwen3_model, toy_tok, arch="llama")
    for load in (gguf_io.config_from_gguf, gguf_io.GGUFSource, gguf_io.load_gguf):
        with pytest.raises(ConfigError, match="general.architecture='llama'") as info:
            load(path)
        assert path in str(info.value)


def test_unknown_tensor_is_named(tmp_path, qwen3_model, toy_tok):
    path = write_gguf(tmp_path / "extra.gguf", qwen3_model, toy_tok,
                      extra_tensors=[("rope_freqs.weight", np.ones(8, np.float32))])
    for load in (gguf_io.GGUFSource, gguf_io.load_gguf):
        with pytest.raises(hf_io.CheckpointError, match="'rope_freqs.weight'") as info:
            load(path)
        assert path in str(info.value)


def test_missing_metadata_key_is_named(tmp_path, qwen3_model, toy_tok):
    path = write_gguf(tmp_path / "nokey.gguf", qwen3_model, toy_tok, drop_keys=["qwen3.attention.head_count_kv"])
    with pytest.raises(ConfigError, match="'qwen3.attention.head_count_kv' is missing") as info:
        gguf_io.load_gguf(path)
    assert path in str(info.value)
    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        gguf_io.config_from_gguf(tmp_path / "nowhere.gguf")


def test_metadata_that_contradicts_the_tensors_names_both(tmp_path, qwen3_model, toy_tok):
    path = write_gguf(tmp_path / "wide.gguf", qwen3_model, toy_tok, metadata={"qwen3.feed_forward_length": 128})
    with pytest.raises(hf_io.CheckpointError, match="blk.0.ffn_gate.weight") as info:
        gguf_io.load_gguf(path)
    assert path in str(info.value) and "intermediate_size=128" in str(info.value)
