"""The prepare_data job (records -> a TFDS dataset directory) through launch/tpu_run.py, and the OPD
data set-up reading TFDS / ArrayRecord sources: its named errors come before any compile."""
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opdjax.data.sources import PromptDataError, open_source
from opdjax.data.tokenizer import build_toy_tokenizer
from opdjax.train import opd
from opdjax.train.config import opd_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = [{"prompt": f"Add {i} and {i + 1}.", "answer": str(2 * i + 1), "id": i} for i in range(11)]
TEST = [{"prompt": f"Double {i}.", "answer": 2 * i, "id": 100 + i} for i in range(5)]


def _launch(args, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TFDS_DATA_DIR=str(tmp_path / "default_tfds"))
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "tpu_run.py"),
                           "--config", os.path.join(ROOT, "configs", "prepare_data.py"),
                           f"--config.workdir={tmp_path / 'work'}", *args],
                          capture_output=True, text=True, env=env, timeout=240)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prepare")
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN))
    pq.write_table(pa.Table.from_pylist(TEST), tmp / "test.parquet")
    out = _launch(["--config.prepare.name=tiny_prompts", f"--config.prepare.data_dir={tmp / 'tfds'}",
                   f"--config.prepare.splits=train={tmp / 'train.jsonl'};test={tmp / 'test.parquet'}"], tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp


def test_prepare_data_job_writes_a_tfds_dataset_every_job_reads(prepared):
    summary = json.loads((prepared / "work" / "prepare_summary.json").read_text())
    assert summary["records"] == {"train": 11, "test": 5}
    assert summary["features"] == {"prompt": "text", "answer": "text", "id": "int"}  # 2*i: number -> text
    train = open_source("tfds:tiny_prompts", split="train", data_dir=str(prepared / "tfds"))
    assert [train[i] for i in range(len(train))] == TRAIN  # order and values kept
    test = open_source(str(prepared / "tfds" / "tiny_prompts" / "1.0.0"), split="test[:3]")
    assert [test[i]["answer"] for i in range(len(test))] == ["0", "2", "4"]
    meta = json.loads((prepared / "tfds" / "tiny_prompts" / "1.0.0" / "metadata.json").read_text())["opdjax"]
    assert set(meta["shards"]) == {"tiny_prompts-train.array_record-00000-of-00001",
                                   "tiny_prompts-test.array_record-00000-of-00001"}
    assert meta["sources"]["train"]["sha256"] and meta["sources"]["test"]["sha256"]


def test_prepare_data_job_errors_are_one_line(prepared, tmp_path):
    out = _launch(["--config.prepare.name=tiny_prompts", f"--config.prepare.data_dir={prepared / 'tfds'}",
                   f"--config.prepare.splits=train={prepared / 'train.jsonl'}"], tmp_path)
    assert out.returncode == 2 and "already holds a prepared tiny_prompts" in out.stderr, out.stderr[-2000:]
    out = _launch(["--config.prepare.name=x", "--config.prepare.splits=train"], tmp_path)
    assert out.returncode == 2 and "is not split=source" in out.stderr
    out = _launch(["--config.prepare.name=Bad-Name", f"--config.prepare.splits=train={prepared / 'train.jsonl'}"],
                  tmp_path)
    assert out.returncode == 2 and "lower_snake_case" in out.stderr


def _config(tmp_path, **data):
    c = opd_config()
    c.workdir = str(tmp_path / "run")
    c.eval.num_problems = 3
    for k, v in data.items():
        c.data[k] = v
    return c


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_toy_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=300)


def test_opd_reads_tfds_and_array_record_sources_alike(prepared, tmp_path, tokenizer):
    d = prepared / "tfds"
    via_tfds = opd.encode_data(_config(tmp_path, train_file="tfds:tiny_prompts", data_dir=str(d),
                                       eval_file="tfds:tiny_prompts", eval_split="test"), tokenizer, None)
    shards = str(d / "tiny_prompts" / "1.0.0" / "tiny_prompts-train.array_record-*")
    via_ar = opd.encode_data(_config(tmp_path, train_file=shards, eval_file=str(prepared / "test.parquet")),
                             tokenizer, None)
    via_jsonl = opd.encode_data(_config(tmp_path, train_file=str(prepared / "train.jsonl"),
                                        eval_file=str(prepared / "test.parquet")), tokenizer, None)
    for data in (via_ar, via_jsonl):
        assert [p.prompt for p in data.train] == [p.prompt for p in via_tfds.train]
        assert data.prompt_len == via_tfds.prompt_len
        assert list(data.eval_answers) == list(via_tfds.eval_answers) == ["0", "2", "4"]
        assert [data.eval_prompts[i] for i in range(3)] == [via_tfds.eval_prompts[i] for i in range(3)]


def test_opd_data_errors_name_dataset_split_record_and_field(prepared, tmp_path, tokenizer):
    d = str(prepared / "tfds")
    with pytest.raises(PromptDataError, match=r"tiny_prompts has splits \['train', 'test'\].*no split 'valid'.*"
                                              r"data\.train_split"):
        opd.encode_data(_config(tmp_path, train_file="tfds:tiny_prompts", data_dir=d, train_split="valid"),
                        tokenizer, None)
    with pytest.raises(PromptDataError, match=r"tiny_prompts\[train\] record 0: no prompt field 'question'"):
        opd.encode_data(_config(tmp_path, train_file="tfds:tiny_prompts", data_dir=d, prompt_field="question"),
                        tokenizer, None)
    with pytest.raises(PromptDataError, match=r"selects no records"):
        opd.encode_data(_config(tmp_path, train_file="tfds:tiny_prompts", data_dir=d, train_split="train[4:4]"),
                        tokenizer, None)
    with pytest.raises(PromptDataError, match=r"max_prompt_tokens=4 .*tiny_prompts\[train\] record 0 has \d+ tokens"):
        opd.encode_data(_config(tmp_path, train_file="tfds:tiny_prompts", data_dir=d, max_prompt_tokens=4),
                        tokenizer, None)
    with pytest.raises(PromptDataError, match=r"no prepared TFDS dataset 'nothing_here' in .*tfds"):
        opd.encode_data(_config(tmp_path, train_file="tfds:nothing_here", data_dir=d), tokenizer, None)
