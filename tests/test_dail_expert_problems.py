"""opdjax.dail.expert_problems: problems with expert solutions from JSONL, Parquet and datasets directories."""
from __future__ import annotations

import gzip
import json

import pytest

from opdjax.dail.expert_problems import ExpertProblem, load_expert_problems
from opdjax.data.prompts import PromptDataError

RECORDS = [
    {"uid": "a", "problem": "What is 2+2?", "solution": "2+2 = \\boxed{4}", "answer": "4"},
    {"uid": "b", "problem": "What is 3*3?", "solution": ["3*3 = 9.", "Nine: \\boxed{9}"], "answer": 9},
    {"uid": "c", "problem": "Prove it.", "solution": "By induction.", "answer": None},
    {"uid": "d", "problem": "Half of 3?", "solution": "1.5", "answer": "  "},
]
EXPECTED = [
    ExpertProblem("a", "What is 2+2?", ("2+2 = \\boxed{4}",), "4", ""),
    ExpertProblem("b", "What is 3*3?", ("3*3 = 9.", "Nine: \\boxed{9}"), "9", ""),
    ExpertProblem("c", "Prove it.", ("By induction.",), None, ""),
    ExpertProblem("d", "Half of 3?", ("1.5",), None, ""),
]


def _write_jsonl(path, records, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _strip_record(ps):
    return [ExpertProblem(p.id, p.problem, p.solutions, p.answer, "") for p in ps]


def test_jsonl(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" + ("\n" if i == 0 else "") for i, r in enumerate(RECORDS)))
    ps = load_expert_problems(path, id_field="uid")
    assert _strip_record(ps) == EXPECTED
    assert [p.record for p in ps] == [f"{path}:{n}" for n in (1, 3, 4, 5)]  # blank line 2 skipped
    # id by position; limit; no answer field at all
    ps = load_expert_problems(path, answer_field="", limit=2)
    assert [(p.id, p.answer) for p in ps] == [("0", None), ("1", None)]


def test_jsonl_gz_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    gz = _write_jsonl(tmp_path / "p.jsonl.gz", RECORDS, gz=True)
    assert _strip_record(load_expert_problems(gz, id_field="uid")) == EXPECTED
    # Parquet: one column type per field, so several solutions live in a list column
    rows = [dict(r, solution=r["solution"] if isinstance(r["solution"], list) else [r["solution"]],
                 answer=None if r["answer"] is None else str(r["answer"])) for r in RECORDS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    ps = load_expert_problems(tmp_path / "p.parquet", id_field="uid")
    assert _strip_record(ps) == EXPECTED
    assert ps[2].record == f"{tmp_path / 'p.parquet'}:row 2"


def test_hf_save_to_disk_dataset_and_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"problem": f"p{i}", "solution": f"s{i} \\boxed{{{i}}}", "answer": str(i)} for i in range(7)]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=3)  # rows count across shards
    ps = load_expert_problems(tmp_path / "ds")
    assert [(p.id, p.problem, p.answer) for p in ps] == [(str(i), f"p{i}", str(i)) for i in range(7)]
    assert ps[5].record == f"{tmp_path / 'ds'}:row 5"

    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(rows[:2])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load_expert_problems(tmp_path / "dd")) == 7  # split="train" by default
    test = load_expert_problems(tmp_path / "dd", split="test")
    assert [p.problem for p in test] == ["p0", "p1"]
    assert test[1].record == f"{tmp_path / 'dd' / 'test'}:row 1"
    with pytest.raises(PromptDataError, match=r"splits \['train', 'test'\].*'validation'.*data\.split"):
        load_expert_problems(tmp_path / "dd", split="validation")

    # A list-of-solutions column, and reading without the datasets package at all
    multi = datasets.Dataset.from_list([{"problem": "q", "solution": ["x", "y"], "answer": None}])
    multi.save_to_disk(str(tmp_path / "multi"))
    import sys
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "datasets" or k.startswith("datasets.")}
    sys.modules["datasets"] = None  # import datasets would fail
    try:
        (p,) = load_expert_problems(tmp_path / "multi")
    finally:
        del sys.modules["datasets"]
        sys.modules.update(saved)
    assert p.solutions == ("x", "y") and p.answer is None


def test_not_a_dataset_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PromptDataError, match="save_to_disk"):
        load_expert_problems(tmp_path / "empty")
    with pytest.raises(PromptDataError, match="does not exist.*data.problems"):
        load_expert_problems(tmp_path / "nope.jsonl")


GOOD = {"problem": "p", "solution": "s", "answer": "1", "uid": "x"}


@pytest.mark.parametrize("bad, kwargs, pattern", [
    ({"problem": None}, {}, r"problem field 'problem' is a NoneType"),
    ({"problem": 3}, {}, r"problem field 'problem' is a int"),
    ({"problem": " "}, {}, r"problem field 'problem' is empty"),
    ({"solution": "  \n"}, {}, r"solution field 'solution' is empty"),
    ({"solution": []}, {}, r"solution field 'solution' is an empty list"),
    ({"solution": ["ok", 3]}, {}, r"solution field 'solution', item 1, is a int"),
    ({"solution": ["ok", " "]}, {}, r"solution field 'solution', item 1, is empty"),
    ({"solution": {"a": 1}}, {}, r"solution field 'solution' is a dict"),
    ({"answer": [1]}, {}, r"answer field 'answer' is a list"),
    ({"answer": True}, {}, r"answer field 'answer' is a bool"),
    ({"uid": 1.5}, {"id_field": "uid"}, r"id field 'uid' is a float"),
])
def test_bad_values_name_the_record_and_field(tmp_path, bad, kwargs, pattern):
    path = _write_jsonl(tmp_path / "p.jsonl", [dict(GOOD, uid="first"), dict(GOOD, **bad)])
    with pytest.raises(PromptDataError, match=rf"p\.jsonl:2: {pattern}"):
        load_expert_problems(path, **kwargs)


@pytest.mark.parametrize("field, kwargs, setting", [
    ("problem", {}, "data.problem_field"),
    ("solution", {}, "data.solution_field"),
    ("answer", {}, "data.answer_field"),
    ("uid", {"id_field": "uid"}, "data.id_field"),
])
def test_missing_field_lists_the_record_fields(tmp_path, field, kwargs, setting):
    rec = {k: v for k, v in GOOD.items() if k != field}
    path = _write_jsonl(tmp_path / "p.jsonl", [GOOD, rec])
    with pytest.raises(PromptDataError) as e:
        load_expert_problems(path, **kwargs)
    msg = str(e.value)
    assert f"p.jsonl:2: no " in msg and repr(field) in msg and setting in msg
    assert "has fields: " + ", ".join(repr(k) for k in rec) in msg


def test_duplicate_ids_and_other_errors(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [GOOD, dict(GOOD, uid="y"), GOOD])
    with pytest.raises(PromptDataError, match=r"p\.jsonl:3: id 'x' .*also the id of .*p\.jsonl:1"):
        load_expert_problems(path, id_field="uid")
    assert len(load_expert_problems(path, id_field="uid", limit=2)) == 2  # limit stops before it

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(GOOD) + "\n{oops\n")
    with pytest.raises(PromptDataError, match=r"bad\.jsonl:2: invalid JSON"):
        load_expert_problems(bad_json)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(PromptDataError, match="no records"):
        load_expert_problems(empty)
    with pytest.raises(ValueError, match="data.limit"):
        load_expert_problems(path, limit=-1)


def test_parquet_and_dataset_errors_name_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([GOOD, dict(GOOD, solution="")]), tmp_path / "p.parquet")
    with pytest.raises(PromptDataError, match=r"p\.parquet:row 1: solution field 'solution' is empty"):
        load_expert_problems(tmp_path / "p.parquet")
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([GOOD, GOOD, dict(GOOD, problem="")]).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(PromptDataError, match=r"ds:row 2: problem field 'problem' is empty"):
        load_expert_problems(tmp_path / "ds")
    with pytest.raises(PromptDataError, match=r"ds:row 1: id 'x'"):
        load_expert_problems(tmp_path / "ds", id_field="uid")


def test_numeric_and_nan_answers(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join([json.dumps(dict(GOOD, answer=32)), json.dumps(dict(GOOD, answer=0.5)),
                               '{"problem": "p", "solution": "s", "answer": NaN}',
                               json.dumps(dict(GOOD, answer=" 7 "))]) + "\n")
    assert [p.answer for p in load_expert_problems(path)] == ["32", "0.5", None, "7"]
