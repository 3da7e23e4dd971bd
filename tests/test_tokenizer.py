"""Tests for opdjax.data.tokenizer: the toy Qwen-style tokenizer, offline loading, chat rendering,
and the teacher/student tokenizer equality check."""
import json
import re
import shutil

import pytest

from opdjax.data.tokenizer import (
    TOY_CORPUS, TokenizerMismatchError, build_toy_tokenizer, check_same_tokenizer, encode_chat,
    load_tokenizer, render_chat, tokenizer_fingerprint,
)

SAMPLES = [
    "Solve 3x + 7 = 22. The answer is \\boxed{5}.",
    "$\\frac{a}{b} + \\sqrt{x^2}$ and \\begin{align} y &= 2 \\end{align}",
    "def f(x):\n\treturn x ** 2  # square\n\n\n  trailing spaces   ",
    "Unicode: café, Straße, Ωμέγα, 数学, 🙂🚀, e\u0301 (not NFC), \u200b zero width",
    "<think>\nreasoning\n</think>\n\nanswer <|im_end|>",
    "",
]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy")
    build_toy_tokenizer(path)
    return path


@pytest.fixture
def toy(toy_dir):
    return load_tokenizer(toy_dir)


def copy_and_edit(src, dst, filename, edit):
    """Copy a saved tokenizer and apply `edit` to one of its JSON files."""
    shutil.copytree(src, dst)
    data = json.loads((dst / filename).read_text())
    edit(data)
    (dst / filename).write_text(json.dumps(data, ensure_ascii=False, indent=2))
    return dst


def swap_added_tokens(tokenizer_json, first, second):
    """Swap two added tokens' ids. `tokenizers` ignores the "id" of an added token that is not in
    the model vocab and numbers them in list order, so the list order must be swapped too."""
    added = tokenizer_json["added_tokens"]
    i, j = (next(k for k, t in enumerate(added) if t["content"] == c) for c in (first, second))
    added[i], added[j] = added[j], added[i]
    added[i]["id"], added[j]["id"] = added[j]["id"], added[i]["id"]


def mismatch_message(a, b):
    with pytest.raises(TokenizerMismatchError) as info:
        check_same_tokenizer(a, b)
    return str(info.value)


def test_saved_files_and_qwen_layout(toy_dir, toy):
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in toy_dir.iterdir()}
    assert "chat_template" in json.loads((toy_dir / "tokenizer_config.json").read_text())
    assert len(toy) == 512
    # Specials come after the BPE vocab, as in Qwen; eos is the end-of-turn token.
    assert [toy.convert_tokens_to_ids(t) for t in
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]] == list(range(507, 512))
    assert (toy.eos_token, toy.pad_token, toy.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert toy.convert_ids_to_tokens(toy.encode("2024")) == ["2", "0", "2", "4"]  # Qwen splits digits
    # As in Qwen3, the think tags are not special: skipping specials keeps the reasoning markup.
    ids = toy.encode("<|im_start|>assistant\n<think>\nhm\n</think>\n\n4<|im_end|>")
    assert toy.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nhm\n</think>\n\n4"


def test_two_builds_are_equal_and_deterministic(tmp_path, toy_dir):
    returned = build_toy_tokenizer(tmp_path / "a")
    build_toy_tokenizer(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (toy_dir / "tokenizer.json").read_bytes()
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == (toy_dir / "tokenizer.json").read_bytes()
    assert check_same_tokenizer(tmp_path / "a", tmp_path / "b") is None
    assert check_same_tokenizer(returned, str(toy_dir)) is None  # object vs directory
    assert tokenizer_fingerprint(returned) == tokenizer_fingerprint(load_tokenizer(toy_dir))


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(toy, text):
    ids = toy.encode(text, add_special_tokens=False)
    assert toy.decode(ids) == text
    if "<think>" in text:  # added tokens are matched whole, not split into bytes
        assert toy.convert_tokens_to_ids("<think>") in ids and toy.eos_token_id in ids


def test_offsets_cover_the_text(toy):
    text = "Let x = 42; then \\boxed{x + 1} = 43.\n<think>ok</think>"
    enc = toy(text, return_offsets_mapping=True, add_special_tokens=False)
    offsets = enc["offset_mapping"]
    assert len(offsets) == len(enc["input_ids"])
    # ASCII text: one char per byte, so the token spans tile the string exactly.
    assert "".join(text[s:e] for s, e in offsets) == text
    for (s, e), tok_id in zip(offsets, enc["input_ids"]):
        assert toy.decode([tok_id]) == text[s:e]


def test_chat_template(toy):
    prompt = render_chat(toy, CHAT)
    head = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    assert prompt == head + "<|im_start|>assistant\n"
    assert render_chat(toy, CHAT, add_generation_prompt=False) == head
    assert render_chat(toy, CHAT, enable_thinking=False) == head + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert render_chat(toy, CHAT, enable_thinking=True) == prompt
    full = CHAT + [{"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}]
    assert render_chat(toy, full, add_generation_prompt=False).endswith(
        "<|im_start|>assistant\n<think>\nadd\n</think>\n\n4<|im_end|>\n")

    ids = encode_chat(toy, CHAT, enable_thinking=False)
    assert toy.decode(ids) == render_chat(toy, CHAT, enable_thinking=False)
    assert ids.count(toy.convert_tokens_to_ids("<|im_start|>")) == 3
    assert ids[-6:-4] == [toy.convert_tokens_to_ids("<think>"), toy.encode("\n\n")[0]]
    with pytest.raises(Exception, match="Unsupported chat role: tool"):
        render_chat(toy, [{"role": "tool", "content": "x"}])


def test_missing_chat_template_is_a_clear_error(toy):
    toy.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        encode_chat(toy, CHAT)


def test_load_never_uses_the_network(toy_dir, monkeypatch):
    import opdjax.data.tokenizer as module
    seen = {}
    monkeypatch.setattr(module.AutoTokenizer, "from_pretrained", lambda path, **kw: seen.update(kw, path=path))
    load_tokenizer(toy_dir, local_files_only=False, padding_side="left")
    assert seen == {"path": str(toy_dir), "local_files_only": True, "padding_side": "left"}


def test_load_without_tokenizer_files(tmp_path, toy_dir):
    with pytest.raises(FileNotFoundError) as info:
        load_tokenizer(tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg and "tokenizer.json" in msg and "tokenizer_config.json" in msg
    assert "build_toy_tokenizer" in msg  # says what to do

    (tmp_path / "half").mkdir()
    shutil.copy(toy_dir / "tokenizer.json", tmp_path / "half")
    with pytest.raises(FileNotFoundError, match=r"half: missing tokenizer_config\.json\."):
        load_tokenizer(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")  # not mistaken for a hub repo id


def test_mismatch_different_vocab(tmp_path, toy_dir):
    other = tmp_path / "other"
    build_toy_tokenizer(other, corpus=TOY_CORPUS.upper())
    msg = mismatch_message(toy_dir, other)
    # Same size and special ids, so the first difference is in the mapping, reported by lowest id.
    teacher, student = load_tokenizer(toy_dir).get_vocab(), load_tokenizer(other).get_vocab()
    token = min((t for t in teacher if student.get(t) != teacher[t]), key=teacher.get)
    student_side = f"id {student[token]} in" if token in student else "is absent from"
    expected = f"in vocab: token {token!r} has id {teacher[token]} in teacher ({toy_dir}) but {student_side} student ({other})."
    assert expected in msg, msg
    assert "exact token ids" in msg


def test_mismatch_vocab_size(tmp_path, toy_dir):
    build_toy_tokenizer(tmp_path / "small", vocab_size=400)
    msg = mismatch_message(toy_dir, tmp_path / "small")
    assert "in vocab_size: 512 in teacher" in msg and "but 400 in student" in msg


def test_mismatch_special_token_id(tmp_path, toy_dir):
    # Swap the ids of <|im_start|> and <|im_end|>: same strings, but eos now has another id.
    student = copy_and_edit(toy_dir, tmp_path / "swapped", "tokenizer.json",
                            lambda data: swap_added_tokens(data, "<|im_start|>", "<|im_end|>"))
    msg = mismatch_message(toy_dir, student)
    assert "in special_tokens: eos_token is '<|im_end|>' (id 509) in teacher" in msg
    assert "but '<|im_end|>' (id 508) in student" in msg


def test_mismatch_added_token_id(tmp_path, toy_dir):
    student = copy_and_edit(toy_dir, tmp_path / "swapped", "tokenizer.json",
                            lambda data: swap_added_tokens(data, "<think>", "</think>"))
    msg = mismatch_message(toy_dir, student)
    assert "in added_tokens: added token '<think>' has id 510 (special=False) in teacher" in msg
    assert "but id 511 (special=False) in student" in msg


def test_mismatch_eos(tmp_path, toy_dir):
    # Base vs instruct Qwen checkpoints really differ like this.
    student = copy_and_edit(toy_dir, tmp_path / "base", "tokenizer_config.json",
                            lambda cfg: cfg.update(eos_token="<|endoftext|>"))
    msg = mismatch_message(toy_dir, student)
    assert f"eos_token is '<|im_end|>' (id 509) in teacher ({toy_dir})" in msg
    assert f"but '<|endoftext|>' (id 507) in student ({student})" in msg


def test_mismatch_merges(tmp_path, toy_dir):
    # Same vocab, two merges reordered: identical ids for tokens, different splits of text.
    def swap(data):
        merges = data["model"]["merges"]
        merges[10], merges[11] = merges[11], merges[10]
    student = copy_and_edit(toy_dir, tmp_path / "merges", "tokenizer.json", swap)
    msg = mismatch_message(toy_dir, student)
    merges = json.loads((toy_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert f"in merges: merge #10 is {tuple(merges[10])} in teacher" in msg
    assert f"but {tuple(merges[11])} in student" in msg


def test_mismatch_chat_template(tmp_path, toy_dir):
    template = json.loads((toy_dir / "tokenizer_config.json").read_text())["chat_template"]
    at = template.index("<|im_start|>assistant")
    edited = template[:at] + "<|im_start|>assistant\\nSure. " + template[at + len("<|im_start|>assistant\\n"):]
    student = copy_and_edit(toy_dir, tmp_path / "tmpl", "tokenizer_config.json",
                            lambda cfg: cfg.update(chat_template=edited))
    msg = mismatch_message(toy_dir, student)
    first = next(i for i, (x, y) in enumerate(zip(template, edited)) if x != y)
    assert f"in chat_template: differs at character {first}: teacher ({toy_dir}) " in msg
    assert "Sure. " in msg  # the context window shows the actual difference


def test_small_vocab_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        build_toy_tokenizer(tmp_path, vocab_size=200)
