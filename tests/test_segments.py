"""Sentence segments (release rule Step 2): Punkt from the installed package, exact character
offsets of sampled token ids, and the token -> sentence rule, checked against a slow oracle."""
import json
import re
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from opdjax.data.tokenizer import TOY_CORPUS, build_toy_tokenizer
from opdjax.teachability import segments
from opdjax.teachability.segments import (PUNKT_INSTALL, PunktModelMissingError, load_punkt,
                                          segment_batch, sentence_spans, token_char_offsets,
                                          token_sentence_ids)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FRAGMENTS = [
    "First, compute 3.5 x 2 = 7.", " Then we get x = 7.", " So the answer is 7.", "It costs $4.50.",
    " We buy 6.25 kg.", " The answer is \\boxed{5}.", "$\\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}$",
    "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; ++i) { s += a[i]; }", "```python\nprint('hi')\n```", "x = np.arange(12)",
    "\n\n", "\n", " ", "  ", "\t", "\n \n", "\r\n\r\n", "\u00a0", "\u3000", ". ", "? ", "! ", "e.g. ",
    " Dr. Smith", "🙂", "👍🏽", "数学很有趣。", "café", " Ωμέγα", "Straße", "<think>", "</think>\n\n",
]
texts = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), max_size=20).map("".join)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return build_toy_tokenizer(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def metaspace():
    """SentencePiece-style: Metaspace, BPE with byte fallback (<0x..> tokens for CJK/emoji)."""
    ascii_corpus = TOY_CORPUS.encode("ascii", "ignore").decode().splitlines()
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trained.train_from_iterator(ascii_corpus, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    tok = Tokenizer(models.BPE(vocab, [tuple(m) for m in model["merges"]], byte_fallback=True))
    tok.pre_tokenizer = trained.pre_tokenizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken("</s>", special=True)])
    return tok


@pytest.fixture(scope="module")
def wordpiece():
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(TOY_CORPUS.splitlines(), trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[UNK]", "[SEP]"], show_progress=False))
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return tok


def backend_decode(tok, ids):
    return getattr(tok, "backend_tokenizer", tok).decode([int(i) for i in ids], skip_special_tokens=True)


def encode(tok, text):
    if hasattr(tok, "backend_tokenizer"):
        return tok.encode(text, add_special_tokens=False)
    return tok.encode(text, add_special_tokens=False).ids


# ---------------------------------------------------------------- Punkt

def test_punkt_is_nltk_with_english_parameters():
    from nltk.tokenize.punkt import PunktSentenceTokenizer
    tokenizer = load_punkt()
    assert type(tokenizer) is PunktSentenceTokenizer
    assert {"dr", "mr", "mrs", "inc"} <= tokenizer._params.abbrev_types
    assert load_punkt() is tokenizer  # cached


def split(text, **kw):
    return [text[s:e] for s, e in sentence_spans(text, **kw)]


def test_punkt_examples():
    assert split("First, compute 3.5 x 2 = 7. Then we get x = 7. So the answer is 7.") == [
        "First, compute 3.5 x 2 = 7.", "Then we get x = 7.", "So the answer is 7."]
    assert split("It costs $4.50 each. We buy 6.25 kg. The answer is \\boxed{5}. Done.") == [
        "It costs $4.50 each.", "We buy 6.25 kg.", "The answer is \\boxed{5}.", "Done."]
    assert split("Dr. Smith went home. He was tired.") == ["Dr. Smith went home.", "He was tired."]


@pytest.mark.parametrize("text", [
    "First, compute 3.5 x 2 = 7. Then we get x = 7. So the answer is 7.",
    "Mr. Jones paid $4.50 at 9:30 a.m. on Monday. The U.S. economy grew. See e.g. the table. Yes!",
    "Is it 6.25? No. It is 6.5... Really. (Yes.) \"Quoted.\" Next one.",
])
def test_punkt_agrees_with_the_packages_own_splitter(text):
    import punkt
    assert split(text, split_blank_lines=False) == punkt.sent_tokenize(text)


def test_punkt_model_does_not_grow_while_reading():
    params = load_punkt()._params
    before = len(params.ortho_context)
    split("We met Dr. Zorblax and J. Quuxifier at 5 p.m. Flimflam came. It is 3. Zorbla is 4.")
    assert len(params.ortho_context) == before


def test_missing_punkt_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "punkt", None)  # `import punkt` now raises ImportError
    load_punkt.cache_clear()
    try:
        with pytest.raises(PunktModelMissingError, match=re.escape(PUNKT_INSTALL)):
            load_punkt()
        with pytest.raises(ImportError, match=re.escape(PUNKT_INSTALL)):
            sentence_spans("One. Two.")
    finally:
        load_punkt.cache_clear()


def test_blank_line_splitting_on_and_off():
    text = "Step 1: add 2 and 3\n\nStep 2: multiply by 4\n \t\r\nStep 3: done\nstill step 3"
    assert split(text) == ["Step 1: add 2 and 3", "Step 2: multiply by 4", "Step 3: done\nstill step 3"]
    assert split(text, split_blank_lines=False) == [text]
    assert split("  \n\n \n") == [] and split("") == []


@SETTINGS
@given(text=texts, blank=st.booleans())
def test_spans_are_sorted_trimmed_and_cover_every_visible_character(text, blank):
    spans = sentence_spans(text, split_blank_lines=blank)
    covered = np.zeros(len(text), bool)
    for (s, e), nxt in zip(spans, spans[1:] + [(len(text), len(text))]):
        assert s < e <= nxt[0]
        assert not text[s].isspace() and not text[e - 1].isspace()
        covered[s:e] = True
    assert all(covered[i] for i, c in enumerate(text) if not c.isspace())


def test_whitespace_table_is_str_isspace():
    every = [c for c in range(0x110000) if chr(c).isspace()]
    assert every == segments._WHITESPACE.tolist()


# ---------------------------------------------------------------- token offsets

def check_offsets(tok, ids, text, offsets, exact_prefixes, max_pending=1):
    assert text == backend_decode(tok, ids)
    assert offsets.shape == (len(ids), 2)
    if len(ids):
        assert offsets[0, 0] == 0 and offsets[-1, 1] == len(text)
        assert np.array_equal(offsets[1:, 0], offsets[:-1, 1]) and (offsets[:, 1] >= offsets[:, 0]).all()
    assert "".join(text[s:e] for s, e in offsets) == text
    # A prefix decodes to the characters completed so far, plus U+FFFD for a pending partial
    # character (one for byte-level's lossy UTF-8; ByteFallback writes one per byte token).
    for i in exact_prefixes:
        prefix = backend_decode(tok, ids[:i])
        done = text[:offsets[i - 1, 1]]
        pending = prefix[len(done):]
        assert prefix.startswith(done), (i, prefix, done)
        assert set(pending) <= {"\ufffd"} and len(pending) <= max_pending, (i, prefix, done)


def sample_prefixes(data, n):
    return data.draw(st.lists(st.integers(1, n), max_size=6)) if n else []


@SETTINGS
@given(text=texts, data=st.data())
def test_byte_level_offsets_exact_on_text(toy, text, data):
    ids = encode(toy, text)
    specials = [toy.eos_token_id, toy.pad_token_id, toy.convert_tokens_to_ids("<|im_start|>")]
    for _ in range(data.draw(st.integers(0, 2))):  # specials anywhere, as a student may sample them
        ids.insert(data.draw(st.integers(0, len(ids))), data.draw(st.sampled_from(specials)))
    ids.append(toy.eos_token_id)
    out, offsets = token_char_offsets(toy, ids)
    check_offsets(toy, ids, out, offsets, sample_prefixes(data, len(ids)))
    assert out == toy.decode(ids, skip_special_tokens=True)
    assert out == text.replace("<|im_end|>", "").replace("<|endoftext|>", "").replace("<|im_start|>", "")
    # The streaming and the O(n^2) generic paths agree exactly on valid UTF-8, except around a
    # literal U+FFFD, which from decoded text alone looks like a pending partial character.
    for method in ("incremental", "prefix") if "\ufffd" not in text else ():
        other_text, other = token_char_offsets(toy, ids, method)
        assert other_text == out and np.array_equal(other, offsets)


@SETTINGS
@given(ids=st.lists(st.integers(0, 520), max_size=30), data=st.data())
def test_byte_level_offsets_exact_on_random_ids(toy, ids, data):
    """Random ids: invalid UTF-8 (lone continuation bytes, truncated characters) and unknown ids."""
    text, offsets = token_char_offsets(toy, ids)
    check_offsets(toy, ids, text, offsets, sample_prefixes(data, len(ids)))
    alphabet = segments._byte_level_alphabet()
    added = {toy.convert_tokens_to_ids(t) for t in ("<think>", "</think>", "<|im_start|>")}
    raw = b"".join(bytes(alphabet[c] for c in toy.backend_tokenizer.id_to_token(i))
                   for i in ids if i < len(toy) and i not in toy.all_special_ids and i not in added)
    assert text.replace("<think>", "").replace("</think>", "") == raw.decode("utf-8", "replace")


def test_multibyte_character_belongs_to_the_token_that_completes_it(toy):
    ids = encode(toy, "a🙂")
    assert len(ids) > 2  # the emoji is split into byte tokens by the small vocab
    text, offsets = token_char_offsets(toy, ids)
    assert text == "a🙂" and offsets.tolist() == [[0, 1]] + [[1, 1]] * (len(ids) - 2) + [[1, 2]]


def test_specials_contribute_nothing_and_added_tokens_their_text(toy):
    ids = encode(toy, "<think>Hi.</think> Yes.") + [toy.eos_token_id, toy.pad_token_id]
    text, offsets = token_char_offsets(toy, ids)
    assert text == "<think>Hi.</think> Yes."
    assert offsets[-2:].tolist() == [[len(text)] * 2] * 2


def test_table_follows_a_tokenizer_that_grows(tmp_path):
    tok = build_toy_tokenizer(tmp_path)
    token_char_offsets(tok, [40])
    tok.add_tokens(["<step>"])
    text, _ = token_char_offsets(tok, [tok.convert_tokens_to_ids("<step>")])
    assert text == "<step>"


def test_byte_level_alphabet_matches_tokenizers():
    alphabet = segments._byte_level_alphabet()
    assert sorted(alphabet) == sorted(pre_tokenizers.ByteLevel.alphabet())
    assert sorted(alphabet.values()) == list(range(256))
    text = "Aa ~\n\t\u00a0é数🙂\x00\x7f"
    (mapped, _), = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    assert bytes(alphabet[c] for c in mapped) == text.encode()


@SETTINGS
@given(text=texts)
def test_generic_offsets_exact_for_metaspace_byte_fallback(metaspace, text):
    ids = encode(metaspace, text) + [metaspace.token_to_id("</s>")]
    out, offsets = token_char_offsets(metaspace, ids)
    # ByteFallback turns a whole run of byte tokens into U+FFFDs while any of it is incomplete, so a
    # prefix decode can take back completed characters: "prefix" offsets are the running maximum of
    # the agreement between prefix decodes and the full text; the stream must match it exactly.
    check_offsets(metaspace, ids, out, offsets, [])
    if "\ufffd" not in text:  # (a literal U+FFFD looks pending to both: see above)
        assert np.array_equal(offsets, token_char_offsets(metaspace, ids, "prefix")[1])


@pytest.mark.parametrize("text", ["I don't know. It's 3.5 here, isn't it? Yes.", "A (b), c; d: e! f?\n\nG."])
def test_generic_offsets_exact_for_wordpiece(wordpiece, text):
    ids = encode(wordpiece, text)
    out, offsets = token_char_offsets(wordpiece, ids)
    check_offsets(wordpiece, ids, out, offsets, range(1, len(ids) + 1))
    assert np.array_equal(offsets, token_char_offsets(wordpiece, ids, "prefix")[1])


def test_generic_falls_back_to_prefixes_when_the_stream_disagrees(metaspace, monkeypatch):
    class WrongStream:
        def __init__(self, **kw):
            pass

        def step(self, tokenizer, token_id):
            return "x"

    ids = encode(metaspace, "Hello world. Then 数学 ok.")
    expected = token_char_offsets(metaspace, ids, "prefix")
    monkeypatch.setattr(decoders, "DecodeStream", WrongStream)
    text, offsets = token_char_offsets(metaspace, ids)
    assert text == expected[0] and np.array_equal(offsets, expected[1])
    with pytest.raises(ValueError, match="ByteLevel"):
        token_char_offsets(metaspace, ids, "bytes")


# ---------------------------------------------------------------- tokens to sentences

def oracle_sentence_ids(text, offsets, spans):
    """The rule, one character at a time: the sentence holding the token's first non-space
    character, else the one holding the last non-space character before it, else the first;
    then sentences no token starts in merge into the one before (renumbering)."""
    def holder(c):
        return next(j for j, (s, e) in enumerate(spans) if s <= c < e)

    raw = []
    for s, e in offsets:
        first = next((c for c in range(s, e) if not text[c].isspace()), None)
        before = next((c for c in range(s - 1, -1, -1) if not text[c].isspace()), None)
        raw.append(holder(first) if first is not None else holder(before) if before is not None else 0)
    order = {}
    return [order.setdefault(r, len(order)) for r in raw]


def check_segments(tok, rows, seg, blank):
    for b, (ids, left) in enumerate(rows):
        sent = seg.sent_ids[b]
        real = np.zeros(len(sent), bool)
        real[left:left + len(ids)] = True
        assert (sent[~real] == -1).all()
        got = sent[real]
        n = seg.num_sentences[b]
        assert n == (got.max() + 1 if len(ids) else 0)
        if len(ids):
            assert got[0] == 0 and set(np.diff(got).tolist()) <= {0, 1}  # monotone, none empty
        text, offsets = seg.texts[b], seg.offsets[b]
        assert text == backend_decode(tok, ids)
        assert got.tolist() == oracle_sentence_ids(text, offsets.tolist(), sentence_spans(text, blank))
        assert len(seg.spans[b]) == n and "".join(text[s:e] for s, e in seg.spans[b]) == text
        if len(ids) and backend_decode(tok, ids).strip() == "":
            assert n == 1
        for i in range(1, len(ids)):  # whitespace and specials join the sentence before them
            if text[offsets[i, 0]:offsets[i, 1]].strip() == "" and text[:offsets[i, 0]].strip():
                assert got[i] == got[i - 1] or text[offsets[i - 1, 0]:offsets[i - 1, 1]].strip()
        if len(ids) and ids[-1] == getattr(tok, "eos_token_id", None):
            assert got[-1] == n - 1


@SETTINGS
@given(batch=st.lists(st.tuples(texts, st.booleans(), st.integers(0, 2)), min_size=1, max_size=3),
       blank=st.booleans())
def test_segment_batch_properties(toy, batch, blank):
    rows = [(encode(toy, text) + ([toy.eos_token_id] if eos else []), left) for text, eos, left in batch]
    width = max(len(ids) + left for ids, left in rows) + 2
    response_ids = np.full((len(rows), width), toy.pad_token_id)
    mask = np.zeros((len(rows), width), bool)
    for b, (ids, left) in enumerate(rows):
        response_ids[b, left:left + len(ids)] = ids
        mask[b, left:left + len(ids)] = True
    seg = segment_batch(toy, response_ids, mask, split_blank_lines=blank)
    assert seg.sent_ids.dtype == np.int32 and seg.num_sentences.dtype == np.int32
    check_segments(toy, rows, seg, blank)


@SETTINGS
@given(text=texts)
def test_segment_batch_generic_tokenizer(metaspace, text):
    ids = encode(metaspace, text) + [metaspace.token_to_id("</s>")]
    seg = segment_batch(metaspace, np.array([ids]), np.ones((1, len(ids)), bool))
    check_segments(metaspace, [(ids, 0)], seg, True)


def test_edge_responses(toy):
    eos, pad = toy.eos_token_id, toy.pad_token_id
    space = encode(toy, "  \n ")
    rows = [[], [eos], space + [eos], space + encode(toy, "Hi. Yo.") + [eos]]
    width = max(map(len, rows))
    ids = np.array([r + [pad] * (width - len(r)) for r in rows])
    mask = np.array([[i < len(r) for i in range(width)] for r in rows])
    seg = segment_batch(toy, ids, mask)
    assert seg.num_sentences.tolist() == [0, 1, 1, 2]
    assert seg.texts[0] == "" and seg.spans[0] == [] and (seg.sent_ids[0] == -1).all()
    assert seg.sent_ids[1, :1].tolist() == [0]
    assert seg.sent_ids[2, :len(rows[2])].tolist() == [0] * len(rows[2])
    last = seg.sent_ids[3, :len(rows[3])]
    assert last[:len(space)].tolist() == [0] * len(space) and last[-1] == 1  # leading ws: first; EOS: last
    with pytest.raises(ValueError, match=r"\[B, R\]"):
        segment_batch(toy, ids[0], mask[0])


def test_token_straddling_a_boundary_goes_where_its_first_visible_character_is():
    def ids_for(pieces):
        text = "".join(pieces)
        ends = np.cumsum([len(p) for p in pieces])
        return token_sentence_ids(text, np.stack([ends - [len(p) for p in pieces], ends], 1)).tolist()

    assert ids_for(["It", " is", " 7", ". Then", " we", " stop", "."]) == [0, 0, 0, 0, 1, 1, 1]
    assert ids_for(["It", " is", " 7", ".", " Then", " we", "."]) == [0, 0, 0, 0, 1, 1, 1]
    assert ids_for(["Hi", ". Yo.", " Ok."]) == [0, 0, 1]  # "Yo." holds no token start: merged
    assert ids_for(["A", " b", ".\n\nC", " ", "d."]) == [0, 0, 0, 1, 1]  # " " follows "C"
    assert ids_for(["  ", "Hi.", " ", " Yo.", "\n\n", ""]) == [0, 0, 0, 1, 1, 1]
    assert ids_for(["Hi.", " ", "", "Yo."]) == [0, 0, 0, 1]  # zero-width (EOS) right before "Yo."
    assert ids_for([]) == []
