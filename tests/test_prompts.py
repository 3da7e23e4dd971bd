"""Prompt sets: loading (and every error's message), chat encoding, left padding, the stream."""
import builtins
import gzip
import json

import numpy as np
import pytest

from opdjax.data.prompts import (
    Problem, PromptDataError, encode_prompts, left_pad, load_problems, render_prompt,
)
from opdjax.data.pipeline import DataPipeline
from opdjax.data.records import PYARROW_PIN
from opdjax.data.tokenizer import CHATML_TEMPLATE, build_toy_tokenizer, encode_chat


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def error_of(path, **kwargs):
    with pytest.raises(PromptDataError) as info:
        load_problems(path, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------------------- loading

def test_load_jsonl(tmp_path):
    path = write(tmp_path / "train.jsonl", [
        json.dumps({"prompt": "What is 2+2?", "answer": "4", "level": 1}),
        "",
        "   ",
        json.dumps({"prompt": "Half of 9?", "answer": 4.5}),
        json.dumps({"prompt": "Name a prime.", "answer": None}),
        json.dumps({"prompt": "Count to 3.", "answer": 3}),
    ])
    problems = load_problems(path)
    assert [p.prompt for p in problems] == ["What is 2+2?", "Half of 9?", "Name a prime.", "Count to 3."]
    assert [p.answer for p in problems] == ["4", "4.5", None, "3"]
    assert [p.index for p in problems] == [0, 1, 2, 3]
    assert [p.source for p in problems] == [f"{path}:1", f"{path}:4", f"{path}:5", f"{path}:6"]
    assert problems[0].record == {"prompt": "What is 2+2?", "answer": "4", "level": 1}


def test_load_custom_fields_and_gzip(tmp_path):
    path = tmp_path / "gsm.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"question": "Q1", "final": "7"}) + "\n")
        f.write(json.dumps({"question": "Q2", "final": "8"}) + "\n")
    problems = load_problems(path, prompt_field="question", answer_field="final", required_answer=True)
    assert [(p.prompt, p.answer) for p in problems] == [("Q1", "7"), ("Q2", "8")]


def test_missing_file_and_directory(tmp_path):
    msg = error_of(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in msg and "does not exist" in msg
    msg = error_of(tmp_path)
    assert "is not a dataset saved" in msg and "TFDS" in msg  # a directory must be a dataset
    (tmp_path / "data.csv").write_text("prompt\nhi\n")
    msg = error_of(tmp_path / "data.csv")
    assert "data.csv" in msg and "unsupported file type" in msg and ".jsonl" in msg


def test_invalid_json_names_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", [json.dumps({"prompt": "ok"}), "", '{"prompt": "cut off'])
    msg = error_of(path)
    assert f"{path}:3" in msg and "invalid JSON" in msg and "fix or remove this line" in msg
    msg = error_of(write(tmp_path / "arr.jsonl", ['[1, 2]']))
    assert "arr.jsonl:1" in msg and "list, not an object" in msg
    msg = error_of(write(tmp_path / "array.json", ['[{"prompt": "a"},', '{"prompt": "b"}]']))
    assert "array.json:1" in msg and "JSON array, not JSON Lines" in msg


def test_missing_prompt_field_lists_record_fields(tmp_path):
    path = write(tmp_path / "d.jsonl", [json.dumps({"prompt": "a"}),
                                        json.dumps({"question": "b", "answer": "1"})])
    msg = error_of(path)
    assert f"{path}:2" in msg and "no prompt field 'prompt'" in msg
    assert "'question', 'answer'" in msg and "data.prompt_field" in msg


def test_non_string_and_empty_prompt(tmp_path):
    msg = error_of(write(tmp_path / "d.jsonl", [json.dumps({"prompt": [{"role": "user", "content": "x"}]})]))
    assert "d.jsonl:1" in msg and "'prompt' is a list, not a string" in msg and "chat messages" in msg
    msg = error_of(write(tmp_path / "n.jsonl", [json.dumps({"prompt": "a"}), json.dumps({"prompt": 5})]))
    assert "n.jsonl:2" in msg and "is a int, not a string" in msg
    msg = error_of(write(tmp_path / "e.jsonl", [json.dumps({"prompt": "a"}), json.dumps({"prompt": "  "})]))
    assert "e.jsonl:2" in msg and "'prompt' is empty" in msg


def test_answer_required(tmp_path):
    path = write(tmp_path / "d.jsonl", [json.dumps({"prompt": "a", "answer": "1"}),
                                        json.dumps({"prompt": "b", "solution": "2"})])
    assert load_problems(path)[1].answer is None  # optional by default
    msg = error_of(path, required_answer=True)
    assert f"{path}:2" in msg and "answer field 'answer' is missing" in msg
    assert "'prompt', 'solution'" in msg and "data.answer_field" in msg
    path = write(tmp_path / "null.jsonl", [json.dumps({"prompt": "a", "answer": None})])
    assert "is null" in error_of(path, required_answer=True)
    path = write(tmp_path / "list.jsonl", [json.dumps({"prompt": "a", "answer": ["1", "2"]})])
    assert "list.jsonl:1" in (msg := error_of(path)) and "not a string or number" in msg


def test_empty_file(tmp_path):
    msg = error_of(write(tmp_path / "empty.jsonl", ["", ""]))
    assert "empty.jsonl" in msg and "no records" in msg


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1")
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    msg = error_of(path)
    assert "train.parquet" in msg and f"pip install {PYARROW_PIN}" in msg


def test_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"question": ["Q0", "Q1"], "answer": ["1", None]}), path)
    problems = load_problems(path, prompt_field="question")
    assert [(p.prompt, p.answer, p.source) for p in problems] == [
        ("Q0", "1", f"{path}:row 0"), ("Q1", None, f"{path}:row 1")]
    msg = error_of(path, prompt_field="question", required_answer=True)
    assert f"{path}:row 1" in msg and "'answer' is null" in msg
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"question": ["Q0", "Q1", ""]}), bad)
    msg = error_of(bad, prompt_field="question")
    assert f"{bad}:row 2" in msg and "'question' is empty" in msg


# ------------------------------------------------------------------------------- encoding

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_toy_tokenizer(tmp_path_factory.mktemp("toy_tok"))


def problems_of(*prompts):
    return [Problem(prompt=p, answer=None, index=i, source=f"set.jsonl:{i + 1}", record={"prompt": p})
            for i, p in enumerate(prompts)]


def test_encode_matches_encode_chat(tok):
    problems = problems_of("What is 2+2?", "Solve 3x + 7 = 22.")
    ids = encode_prompts(tok, problems, max_prompt_tokens=256)
    assert ids == [encode_chat(tok, [{"role": "user", "content": p.prompt}]) for p in problems]
    text = tok.decode(ids[0])
    assert text == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


def test_system_prompt_and_thinking_switch(tok):
    ids = encode_prompts(tok, problems_of("What is 2+2?"), system_prompt="Reason step by step.",
                         enable_thinking=False, max_prompt_tokens=256)
    assert tok.decode(ids[0]) == (
        "<|im_start|>system\nReason step by step.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # Plain strings are accepted too.
    assert encode_prompts(tok, ["What is 2+2?"], system_prompt="Reason step by step.",
                          enable_thinking=False, max_prompt_tokens=256) == ids


def test_chat_template_override(tok):
    other = CHATML_TEMPLATE.replace("'<|im_start|>' + message['role'] + '\\n'",
                                    "'<|im_start|>' + message['role'] + ':\\n'")
    ids = encode_prompts(tok, problems_of("Hi"), max_prompt_tokens=256, chat_template=other)
    assert tok.decode(ids[0]) == "<|im_start|>user:\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tok, "Hi", chat_template=other) == tok.decode(ids[0])


def test_too_long_prompt_names_record_and_count(tok):
    problems = problems_of("short", "a much longer prompt " * 20, "short again")
    n_long = len(encode_prompts(tok, problems[1:2], max_prompt_tokens=10_000)[0])
    with pytest.raises(PromptDataError) as info:
        encode_prompts(tok, problems, max_prompt_tokens=n_long - 1)
    msg = str(info.value)
    assert "set.jsonl:2 has" in msg and f"{n_long} tokens" in msg and "1 of 3 prompts" in msg
    assert "raise data.max_prompt_tokens or shorten the prompt" in msg
    assert f"data.max_prompt_tokens={n_long} fits" in msg
    assert "set.jsonl:1" not in msg and "set.jsonl:3" not in msg
    assert len(encode_prompts(tok, problems, max_prompt_tokens=n_long)[1]) == n_long  # never truncated


# ------------------------------------------------------------------------------- padding

def test_left_pad():
    tokens, mask = left_pad([[5, 6, 7], [8], []], pad_id=0)
    assert tokens.dtype == np.int32 and mask.dtype == np.bool_
    np.testing.assert_array_equal(tokens, [[5, 6, 7], [0, 0, 8], [0, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1], [0, 0, 0]])
    tokens, mask = left_pad([[5, 6, 7], [8]], pad_id=-1, multiple_of=4)
    np.testing.assert_array_equal(tokens, [[-1, 5, 6, 7], [-1, -1, -1, 8]])
    tokens, _ = left_pad([[1, 2]], pad_id=0, length=5, multiple_of=4)
    assert tokens.shape == (1, 8) and tokens[0, -2:].tolist() == [1, 2]
    with pytest.raises(ValueError, match="row 1 has 3 tokens"):
        left_pad([[1], [1, 2, 3]], pad_id=0, length=2)


# ----------------------------------------------------------------------------- pipeline
# The order a run serves prompts in (opdjax.data.pipeline, Grain); more in test_data_layer.py.

def _pipe(n, batch, seed, **kw):
    return DataPipeline(range(n), batch, seed=seed, **kw)


@pytest.mark.parametrize("n,batch", [(10, 3), (7, 7), (5, 12), (1, 1)])
def test_pipeline_covers_each_epoch_exactly_once(n, batch):
    pipe = _pipe(n, batch, seed=3)
    served = np.concatenate([next(pipe).indices for _ in range(4 * n)])  # 4*batch epochs
    for e in range(len(served) // n):
        assert sorted(served[e * n:(e + 1) * n].tolist()) == list(range(n)), e


def test_pipeline_epochs_are_fresh_permutations_and_seeded():
    a, b = _pipe(50, 50, seed=0), _pipe(50, 50, seed=1)
    a0, a1, b0 = next(a).indices, next(a).indices, next(b).indices
    assert not np.array_equal(a0, a1) and not np.array_equal(a0, b0)
    assert not np.array_equal(a1, b0)  # seed 0's second epoch is not seed 1's first
    assert np.array_equal(_pipe(50, 50, seed=0).step_indices(1), a1)
    assert next(_pipe(5, 2, seed=0, shuffle=False)).indices.tolist() == [0, 1]


@pytest.mark.parametrize("n,batch,cut", [(10, 3, 1), (10, 3, 4), (10, 3, 7), (8, 4, 2), (4, 9, 3)])
def test_pipeline_resume_equals_uninterrupted(n, batch, cut):
    reference = _pipe(n, batch, seed=42)
    want = [next(reference).indices for _ in range(cut + 3 * n)]
    first = _pipe(n, batch, seed=42)
    for _ in range(cut):
        next(first)
    state = json.loads(json.dumps(first.iterator.get_state()))  # what Grain's handler writes
    resumed = _pipe(n, batch, seed=42)
    resumed.iterator.set_state(state)
    got = [next(resumed).indices for _ in range(3 * n)]
    for w, g in zip(want[cut:], got):
        np.testing.assert_array_equal(w, g)


def test_pipeline_signature_checks():
    saved = _pipe(10, 3, seed=1).signature()
    with pytest.raises(ValueError, match="num_records=10 .*num_records=11"):
        _pipe(11, 3, seed=1).check_signature(saved)
    with pytest.raises(ValueError, match="seed=1 .*seed=2"):
        _pipe(10, 3, seed=2).check_signature(saved)
    with pytest.raises(ValueError, match="batch_size=3 .*batch_size=4"):
        _pipe(10, 4, seed=1).check_signature(saved)
    with pytest.raises(ValueError, match="at least one record"):
        _pipe(0, 1, seed=0)
