"""Tokenizers for distillation: a toy Qwen-style tokenizer for tests, offline loading, chat
rendering, and a strict teacher/student tokenizer equality check.

On-policy distillation scores the student's sampled token ids with the teacher, so both models
must share one tokenizer exactly: the same token->id mapping, the same special-token ids, the same
BPE merges (otherwise the same text splits into different ids) and the same chat template
(otherwise the prompt the teacher conditions on is not the one the student saw).
`check_same_tokenizer` enforces that and names the first concrete difference.

`build_toy_tokenizer` makes a small byte-level BPE tokenizer laid out like Qwen's (ByteLevel
pre-tokenizer and decoder, Qwen's split regex, special tokens appended after the BPE vocab,
ChatML template with Qwen3's `enable_thinking` switch), trained in milliseconds and with no
downloads, so tests exercise the real `transformers` code paths.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # eos of a chat model: generation stops at the end of the assistant turn
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# Qwen2/Qwen3's pre-tokenizer split: single digits (\p{N}), so numbers never merge into opaque
# multi-digit tokens, and punctuation runs kept apart from words.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML as Qwen3 renders it. With enable_thinking=false the generation prompt carries an empty
# think block, which is how Qwen3 switches reasoning off. Unlike the real Qwen3 template, earlier
# assistant turns are rendered verbatim (Qwen3 strips their reasoning); the toy does not need it.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('Unsupported chat role: ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

TOY_CORPUS = """\
The quick brown fox jumps over the lazy dog.
Solve for x: 3x + 7 = 22, so 3x = 15 and x = 5. The answer is \\boxed{5}.
Natalia sold clips to 48 of her friends in April, and then half as many in May.
How many clips did she sell altogether in April and May? 48 + 24 = 72.
Let $f(x) = x^2 - 4x + 4$. Then $f(x) = (x - 2)^2$, which is zero at $x = 2$.
We compute $\\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}$, hence the answer is $\\boxed{\\frac{5}{6}}$.
The sum $\\sum_{k=1}^{n} k = \\frac{n(n+1)}{2}$ holds for every integer $n \\geq 1$.
If a train travels 120 km in 1.5 hours, its average speed is 80 km/h.
The area of a circle with radius $r$ is $\\pi r^2$; for r = 3 it is about 28.27.
<think>
First, find the total cost: 12 apples at $0.50 each cost $6.00.
Then subtract from $20.00 to get $14.00.
</think>
The change is $14.00, so the final answer is \\boxed{14}.
def fibonacci(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
print([fibonacci(i) for i in range(10)])  # [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]
import numpy as np
x = np.arange(12).reshape(3, 4)
assert x.sum() == 66, "unexpected sum"
for (int i = 0; i < n; ++i) { total += values[i]; }
Question: What is 17 times 23? Answer: 17 * 23 = 391.
Question: Is 97 a prime number? Answer: yes, 97 has no divisors other than 1 and itself.
She walked 2 miles on Monday, 3 miles on Tuesday, and twice as far on Wednesday.
Therefore the probability is $\\binom{5}{2} / 2^5 = 10/32 = 5/16$.
In 2023, the company's revenue grew by 12% to $4.5 million.
Let's think step by step. There are 60 minutes in an hour and 24 hours in a day.
So a day has 60 * 24 = 1440 minutes, and a week has 7 * 1440 = 10080 minutes.
The derivative of $\\sin(x)$ is $\\cos(x)$, and $\\int_0^{\\pi} \\sin(x)\\,dx = 2$.
Matrices $A = \\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}$ have $\\det(A) = -2$.
I'm sure they'll say it's fine, but we've checked and you'd better verify it too.
Unicode text: café, naïve, Straße, Ωμέγα, 数学, and an emoji 🙂 must survive.
{"question": "What is 2 + 2?", "answer": "4"}
SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;
The greatest common divisor of 84 and 36 is 12, and their least common multiple is 252.
Since $a^2 + b^2 = c^2$ with a = 6 and b = 8, we get c = 10.
The library opens at 9:30 a.m. and closes at 5:45 p.m. on weekdays.
Each of the 4 boxes holds 25 pencils, so there are 100 pencils in total.
Final answer: $\\boxed{-3}$, because $-3 \\cdot -3 = 9$ and $-3 < 0$.
"""


def build_toy_tokenizer(
    out_dir: str | os.PathLike, corpus: str | Iterable[str] | None = None, vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """Train a small Qwen-style byte-level BPE tokenizer and `save_pretrained` it to `out_dir`.

    `vocab_size` counts everything, the 5 special/added tokens included (the BPE vocab may come
    out smaller if the corpus runs out of merges). Same inputs give a byte-identical tokenizer.json.
    """
    special_tokens = [PAD_TOKEN, IM_START, IM_END]
    think_tokens = [THINK_OPEN, THINK_CLOSE]
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe_vocab_size = vocab_size - len(special_tokens) - len(think_tokens)
    if bpe_vocab_size < len(byte_alphabet):
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least "
                         f"{len(byte_alphabet) + len(special_tokens) + len(think_tokens)} ids")
    lines = corpus if corpus is not None else TOY_CORPUS
    if isinstance(lines, str):
        lines = lines.splitlines(keepends=True)

    backend = Tokenizer(models.BPE())
    # No NFC normalizer (Qwen has one): without it every string, even non-normalized unicode,
    # round-trips exactly through encode/decode, which the tests rely on.
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets cover every char
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab_size, initial_alphabet=byte_alphabet,
                                  special_tokens=[], show_progress=False)
    backend.train_from_iterator(list(lines), trainer)
    # Appended after the BPE vocab, as in Qwen. The think tags are plain added tokens (special=False,
    # as in Qwen3) so decode(skip_special_tokens=True) keeps the reasoning markup.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in think_tokens])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=IM_END, pad_token=PAD_TOKEN,
        chat_template=CHATML_TEMPLATE, model_max_length=32768,
    )
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json, as Qwen ships it.
    tokenizer.save_pretrained(os.fspath(out_dir), save_jinja_files=False)
    return tokenizer


def load_tokenizer(ckpt_dir: str | os.PathLike, **kwargs: Any) -> PreTrainedTokenizerBase:
    """Load the tokenizer saved in a local checkpoint directory; never touches the network.

    Checked up front because transformers treats a path that does not exist as a hub repo id, and
    loads a lone tokenizer.json while silently dropping eos/pad and the chat template.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"No tokenizer: checkpoint directory {ckpt_dir} does not exist.")
    missing = [f for f in ("tokenizer.json", "tokenizer_config.json") if not (ckpt_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"No tokenizer in {ckpt_dir}: missing {', '.join(missing)}. Copy the tokenizer files from "
            "the model's original checkpoint (tokenizer.save_pretrained(dir) writes both), or build "
            "a test tokenizer with opdjax.data.tokenizer.build_toy_tokenizer(dir).")
    return AutoTokenizer.from_pretrained(os.fspath(ckpt_dir), **{**kwargs, "local_files_only": True})


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]],
                add_generation_prompt: bool = True, enable_thinking: bool | None = None) -> str:
    """The prompt text the model sees for `messages`; `enable_thinking=None` leaves it unset, so the
    template's own default applies."""
    if not tokenizer.chat_template:
        raise ValueError(f"Tokenizer {tokenizer.name_or_path or type(tokenizer).__name__!r} has no "
                         "chat template (chat_template in tokenizer_config.json or chat_template.jinja).")
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **extra)


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]],
                add_generation_prompt: bool = True, enable_thinking: bool | None = None) -> list[int]:
    """Token ids of `render_chat`. add_special_tokens=False: the template already writes every
    special token, and a tokenizer with a BOS must not get a second one."""
    text = render_chat(tokenizer, messages, add_generation_prompt, enable_thinking)
    return tokenizer.encode(text, add_special_tokens=False)


class TokenizerMismatchError(ValueError):
    """Teacher and student tokenizers differ, so the teacher cannot score the student's tokens."""


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Everything that decides which ids a text becomes, in the order `check_same_tokenizer`
    compares it."""
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    # tokenizers >= 0.20 stores merges as [a, b] pairs, older files as "a b" strings.
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model.get("merges", [])]
    return {
        "vocab_size": len(tok),  # base vocab plus added tokens
        "special_tokens": {role: (getattr(tok, role), getattr(tok, role + "_id"))
                           for role in ("eos_token", "pad_token", "bos_token", "unk_token")},
        "added_tokens": {t.content: (i, t.special) for i, t in sorted(tok.added_tokens_decoder.items())},
        "vocab": tok.get_vocab(),
        "merges": merges if model.get("type") == "BPE" else None,
        "chat_template": tok.chat_template,
    }


def _first_difference(field: str, a: Any, b: Any, name_a: str, name_b: str) -> str | None:
    """A concrete description of the first place `a` and `b` differ, or None when equal."""
    if a == b:
        return None
    if field in ("vocab", "added_tokens"):
        what = "token" if field == "vocab" else "added token"
        has = (lambda v: f"id {v}") if field == "vocab" else (lambda v: f"id {v[0]} (special={v[1]})")
        for token, value in sorted(a.items(), key=lambda kv: kv[1]):  # lowest id first
            if token not in b:
                return f"{what} {token!r} has {has(value)} in {name_a} but is absent from {name_b}"
            if b[token] != value:
                return f"{what} {token!r} has {has(value)} in {name_a} but {has(b[token])} in {name_b}"
        token = min(set(b) - set(a), key=lambda t: b[t])
        return f"{what} {token!r} has {has(b[token])} in {name_b} but is absent from {name_a}"
    if field == "merges" and a is not None and b is not None:
        for i, (ma, mb) in enumerate(zip(a, b)):
            if ma != mb:
                return f"merge #{i} is {ma} in {name_a} but {mb} in {name_b}"
        return f"{name_a} has {len(a)} merges but {name_b} has {len(b)}"
    if field == "chat_template" and isinstance(a, str) and isinstance(b, str):
        i = next((i for i, (ca, cb) in enumerate(zip(a, b)) if ca != cb), min(len(a), len(b)))
        window = slice(max(0, i - 20), i + 30)
        return f"differs at character {i}: {name_a} {a[window]!r} vs {name_b} {b[window]!r}"
    if field == "special_tokens":
        role = next(r for r in a if a[r] != b[r])
        (tok_a, id_a), (tok_b, id_b) = a[role], b[role]
        return f"{role} is {tok_a!r} (id {id_a}) in {name_a} but {tok_b!r} (id {id_b}) in {name_b}"
    short = lambda v: repr(v) if len(repr(v)) <= 80 else repr(v)[:77] + "..."
    return f"{short(a)} in {name_a} but {short(b)} in {name_b}"


def check_same_tokenizer(a: str | os.PathLike | PreTrainedTokenizerBase,
                         b: str | os.PathLike | PreTrainedTokenizerBase,
                         name_a: str = "teacher", name_b: str = "student",
                         ignore: tuple[str, ...] = ()) -> None:
    """Raise TokenizerMismatchError naming the first difference between two tokenizers (given as
    checkpoint directories or loaded tokenizers); return None when they are identical.
    `ignore` skips fingerprint fields, e.g. ("chat_template",) when one side's template is used
    to render every prompt for both."""
    def load_and_label(x, name):
        if isinstance(x, (str, os.PathLike)):
            return load_tokenizer(x), f"{name} ({os.fspath(x)})"
        return x, (f"{name} ({x.name_or_path})" if x.name_or_path else name)

    tok_a, label_a = load_and_label(a, name_a)
    tok_b, label_b = load_and_label(b, name_b)
    fp_a, fp_b = tokenizer_fingerprint(tok_a), tokenizer_fingerprint(tok_b)
    # Dict order is the report order: size and special ids first (the usual cause: a different
    # model family or base vs instruct eos), then the full mappings, then the prompt format.
    for field in fp_a:
        if field in ignore:
            continue
        detail = _first_difference(field, fp_a[field], fp_b[field], label_a, label_b)
        if detail is not None:
            raise TokenizerMismatchError(
                f"Tokenizer mismatch in {field}: {detail}. "
                f"Teacher scoring must see the student's exact token ids (and the same chat prompt), "
                f"so both models need the identical tokenizer.")
