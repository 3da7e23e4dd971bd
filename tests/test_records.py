"""opdjax.data.records: where strings, the DatasetDict split rule, and errors naming the setting."""
from __future__ import annotations

import gzip
import json

import pytest

from opdjax.data.records import PromptDataError, iter_records

ROWS = [{"q": "a"}, {"q": "b"}]


def _rows(records):
    return [(where, rec["q"]) for where, rec in records]


def test_files_where(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    assert _rows(iter_records(path)) == [(f"{path}:1", "a"), (f"{path}:3", "b")]
    gz = tmp_path / "p.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS))
    assert _rows(iter_records(gz)) == [(f"{gz}:1", "a"), (f"{gz}:2", "b")]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    pqp = tmp_path / "p.parquet"
    assert _rows(iter_records(pqp, split="ignored")) == [(f"{pqp}:row 0", "a"), (f"{pqp}:row 1", "b")]


def test_path_errors_name_the_setting(tmp_path):
    with pytest.raises(PromptDataError, match="eval.problems is empty"):
        iter_records("", setting="eval.problems")
    with pytest.raises(PromptDataError, match="does not exist; check eval.problems"):
        iter_records(tmp_path / "nope.jsonl", setting="eval.problems")  # raised at the call
    (tmp_path / "p.csv").write_text("q\na\n")
    with pytest.raises(PromptDataError, match="unsupported file type '.csv'"):
        iter_records(tmp_path / "p.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PromptDataError, match="save_to_disk.*eval.problems must be"):
        iter_records(tmp_path / "empty", setting="eval.problems")


@pytest.fixture
def saved(tmp_path):
    datasets = pytest.importorskip("datasets")

    def save(name, splits=None):
        if splits is None:
            datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / name))
        else:
            datasets.DatasetDict({s: datasets.Dataset.from_list([{"q": f"{s}{i}"} for i in range(2)])
                                  for s in splits}).save_to_disk(str(tmp_path / name))
        return tmp_path / name
    return save


def test_dataset_dir(saved):
    path = saved("ds")
    assert _rows(iter_records(path)) == [(f"{path}:row 0", "a"), (f"{path}:row 1", "b")]
    assert _rows(iter_records(path, split="train")) == _rows(iter_records(path))  # split ignored


def test_split_rule(saved):
    one = saved("one", ["validation"])
    assert _rows(iter_records(one)) == [(f"{one / 'validation'}:row 0", "validation0"),
                                        (f"{one / 'validation'}:row 1", "validation1")]
    both = saved("both", ["train", "test"])
    assert _rows(iter_records(both))[1] == (f"{both / 'test'}:row 1", "test1")
    assert _rows(iter_records(both, split="train"))[0] == (f"{both / 'train'}:row 0", "train0")
    with pytest.raises(PromptDataError, match=r"splits \['train', 'test'\].*'validation'.*eval\.split"):
        iter_records(both, split="validation", setting="eval.problems")
    neither = saved("neither", ["train", "validation"])
    with pytest.raises(PromptDataError, match=r"splits \['train', 'validation'\].*data\.split"):
        iter_records(neither)
    with pytest.raises(PromptDataError, match=r"\(split=\)"):
        iter_records(neither, setting="problems")
