"""Throughput of sentence segmentation (opdjax.teachability.segments) on 2k-token responses.

Synthetic multi-sentence maths/code responses (LaTeX, numbers, code blocks, blank lines, a little
non-ASCII), each cut to exactly --tokens tokens ending in EOS, for two vocabularies:
  - toy: the 512-token Qwen-style byte-level BPE of opdjax.data.tokenizer;
  - real: Qwen2.5's 151,936-token vocabulary read from a GGUF (--gguf, default: the student of the
    real pair if it is on disk; ~20 s to convert) or a saved HF tokenizer dir (--tokenizer-dir);
    without either, a 32k byte-level BPE trained here on Python stdlib sources plus the synthetic
    text (--no-real skips it).
Paths, side by side: "bytes" (vectorised byte-level table) and "incremental" (generic DecodeStream);
"prefix" (exact O(n^2) fallback) on a couple of responses only. Rows: offsets alone, Punkt alone,
and the full segment_batch (offsets + Punkt + token->sentence ids).

    .venv/bin/python bench/bench_segments.py [--batch 32] [--tokens 2048]
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from opdjax.data.tokenizer import build_toy_tokenizer  # noqa: E402
from opdjax.teachability import segments  # noqa: E402

DEFAULT_GGUF = "/work/realpair/student/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


def synthetic_response(rng: np.random.Generator, min_chars: int) -> str:
    """Reasoning-style text: maths sentences, LaTeX, code blocks, blank-line paragraphs."""
    parts = []
    while sum(map(len, parts)) < min_chars:
        a, b, c, k = (int(x) for x in rng.integers(2, 999, 4))
        sentences = [
            f"First, we compute {a} x {b} = {a * b}.",
            f"Then we get $x = {c}$, so $\\frac{{{a}}}{{{b}}} \\approx {a / b:.3f}$.",
            f"Since $a^2 + b^2 = c^2$ with a = {a} and b = {b}, we get c = {np.hypot(a, b):.2f}.",
            f"The total cost is ${a * 1.25:.2f}, i.e. {k} items at ${a * 1.25 / k:.2f} each.",
            f"Let's check: {a} + {b} = {a + b}, which matches the earlier result.",
            f"Step {k % 9 + 1}: subtract {a} from both sides, giving {c - a} on the right.",
            f"The area is $\\pi r^2 \\approx {3.14159 * c:.1f}$ for r = {c}, about 数学 π ≈ 3.14.",
            f"Therefore, the answer is $\\boxed{{{a + b}}}$. 🙂",
        ]
        parts.append(" ".join(rng.choice(sentences, size=int(rng.integers(2, 6)))))
        if rng.random() < 0.3:
            parts.append(f"```python\ndef f_{k}(x):\n    return x ** {a % 5} + {b}\n\n"
                         f"print([f_{k}(i) for i in range({c % 20})])  # check\n```")
        parts.append("\n\n")
    return "".join(parts)


def make_batch(tok, batch: int, tokens: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        text = synthetic_response(rng, min_chars=tokens * 6)
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) >= tokens, "synthetic text too short for the token budget"
        rows.append(ids[:tokens - 1] + [tok.eos_token_id])
    return np.array(rows)


def real_tokenizer(args, tmp):
    if args.tokenizer_dir:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(args.tokenizer_dir, local_files_only=True)
        return tok, f"HF tokenizer from {args.tokenizer_dir}"
    if args.gguf and os.path.exists(args.gguf):
        from opdjax.models.gguf_io import load_gguf_tokenizer
        t0 = time.perf_counter()
        tok = load_gguf_tokenizer(args.gguf)
        took = time.perf_counter() - t0
        return tok, f"Qwen2.5 vocabulary from {os.path.basename(args.gguf)} (converted in {took:.0f} s)"
    # Offline stand-in: a 32k byte-level BPE trained on real Python source plus the synthetic text.
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:150]
    corpus = [open(f, encoding="utf-8", errors="ignore").read() for f in files]
    rng = np.random.default_rng(1)
    corpus += [synthetic_response(rng, 4000) for _ in range(200)]
    lines = [line + "\n" for doc in corpus for line in doc.splitlines()]
    t0 = time.perf_counter()
    tok = build_toy_tokenizer(os.path.join(tmp, "bpe32k"), corpus=lines, vocab_size=32768)
    return tok, (f"32k byte-level BPE trained here on {len(files)} stdlib modules + synthetic text "
                 f"({time.perf_counter() - t0:.0f} s)")


def rate(fn, n_rows: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_rows / best


def bench(name: str, tok, args) -> None:
    ids = make_batch(tok, args.batch, args.tokens)
    mask = np.ones_like(ids, dtype=bool)
    t0 = time.perf_counter()
    segments.token_char_offsets(tok, ids[0], "bytes")  # builds the per-id byte table once
    table_s = time.perf_counter() - t0
    texts = [segments.token_char_offsets(tok, row, "bytes")[0] for row in ids]
    chars = np.mean([len(t) for t in texts])
    segments.sentence_spans(texts[0])  # loads Punkt
    sentences = np.mean([len(segments.sentence_spans(t)) for t in texts])

    def offsets(method):
        return lambda: [segments.token_char_offsets(tok, row, method) for row in ids]

    rows = {
        "offsets only": {m: rate(offsets(m), len(ids), args.repeats) for m in ("bytes", "incremental")},
        "full segment_batch": {m: rate(lambda m=m: segments.segment_batch(tok, ids, mask, method=m),
                                       len(ids), args.repeats) for m in ("bytes", "incremental")},
    }
    punkt_rate = rate(lambda: [segments.sentence_spans(t) for t in texts], len(ids), args.repeats)
    n_prefix = min(2, len(ids))
    prefix_rate = rate(lambda: [segments.token_char_offsets(tok, row, "prefix") for row in ids[:n_prefix]],
                       n_prefix, 1)
    print(f"\n== {name}: vocab {len(tok):,}; {args.batch} responses x {args.tokens} tokens "
          f"(~{chars:,.0f} chars, ~{sentences:.0f} sentences each); byte table built in {table_s * 1e3:.0f} ms")
    print(f"{'responses/s':24s}{'bytes (vectorised)':>20s}{'incremental (generic)':>24s}")
    for label, by_method in rows.items():
        print(f"{label:24s}{by_method['bytes']:20.1f}{by_method['incremental']:24.1f}")
    print(f"{'Punkt alone':24s}{punkt_rate:20.1f}")
    print(f"{'prefix (exact, O(n^2))':24s}{'':20s}{prefix_rate:24.2f}")
    full = rows["full segment_batch"]["bytes"]
    print(f"-> a batch of 64 such responses costs {64 / full:.2f} s of one host core per training step")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gguf", default=DEFAULT_GGUF)
    parser.add_argument("--tokenizer-dir", default=None)
    parser.add_argument("--no-real", action="store_true")
    args = parser.parse_args(argv)
    print(f"host: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} "
          "(shared machine: numbers are noisy; best of --repeats)")
    with tempfile.TemporaryDirectory() as tmp:
        bench("toy", build_toy_tokenizer(os.path.join(tmp, "toy")), args)
        if not args.no_real:
            tok, what = real_tokenizer(args, tmp)
            bench(f"real-ish: {what}", tok, args)


if __name__ == "__main__":
    main()
