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


# ---------------------------------------------------------------- review regressions (each failed before)
def test_a_dataset_with_named_splits_has_no_label_split(tmp_path):
    from opdjax.data import builders

    builders.prepare({"train": [{"prompt": "a"}]}, name="only_train", data_dir=str(tmp_path))
    with pytest.raises(PromptDataError, match=r"no split 'test'.*data\.eval_split"):
        open_source("tfds:only_train", split="test", data_dir=str(tmp_path), setting="data.eval_file")
    f = tmp_path / "one.jsonl"
    f.write_text('{"prompt": "a"}\n')
    assert open_source(str(f), split="test")[0] == {"prompt": "a"}  # a single file: the name is a label


def test_prepare_reads_the_split_of_the_same_name(tmp_path):
    from opdjax.data import builders

    src = {"train": [{"p": "train0"}], "test": [{"p": "test0"}]}
    builders.prepare(src, name="two_splits", data_dir=str(tmp_path))
    out = _launch(["--config.prepare.name=copied", f"--config.prepare.data_dir={tmp_path}",
                   f"--config.prepare.source_data_dir={tmp_path}",
                   "--config.prepare.splits=train=tfds:two_splits;test=tfds:two_splits"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    got = open_source("tfds:copied", split="test", data_dir=str(tmp_path))
    assert got[0] == {"p": "test0"}
    out = _launch(["--config.prepare.name=copied2", f"--config.prepare.data_dir={tmp_path}",
                   f"--config.prepare.source_data_dir={tmp_path}", "--config.prepare.splits=eval=tfds:two_splits"],
                  tmp_path)
    assert out.returncode == 2 and "config.prepare.source_split" in out.stderr, out.stderr[-2000:]


def test_nullable_numbers_keep_their_type(tmp_path):
    from opdjax.data import builders

    records = [{"n": 3, "x": 1.5, "flag": False, "ids": [1]}, {"n": None, "x": None, "flag": None, "ids": None}]
    builders.prepare({"train": records}, name="nullable", data_dir=str(tmp_path))
    src = open_source("tfds:nullable", data_dir=str(tmp_path))
    assert [src[0], src[1]] == records


def test_a_tf_example_holding_a_brace_byte_is_not_json(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter
    from tensorflow_datasets.proto import tf_example_pb2

    for n in range(100, 130):  # one of these lengths puts 0x7b ("{") right after the leading 0x0a
        ex = tf_example_pb2.Example()
        ex.features.feature["prompt"].bytes_list.value.append(b"x" * n)
        path = tmp_path / f"ex{n}.array_record"
        w = ArrayRecordWriter(str(path), "group_size:1")
        w.write(ex.SerializeToString())
        w.close()
        assert open_source(str(path))[0] == {"prompt": "x" * n}


def test_split_errors_name_the_split_field(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n')
    with pytest.raises(PromptDataError, match=r"data\.train_split='train\[:x\]' is not a TFDS split expression"):
        open_source(str(f), split="train[:x]")
    with pytest.raises(PromptDataError, match=r"selects no records \(data\.eval_file, data\.eval_split\)"):
        open_source(str(f), split="train[1:]", setting="data.eval_file")


def test_jsonl_blank_lines_and_line_ends(tmp_path):
    f = tmp_path / "mac.jsonl"
    f.write_bytes(b'{"a": 1}\r{"a": 2}\r')  # bare \r line ends
    assert [r["a"] for r in open_source(str(f))] == [1, 2]
    f = tmp_path / "blank.jsonl"
    f.write_text('  {"a": 1}\n\u00a0\n \t \n\n{"a": 2}\r\n', encoding="utf-8")  # no-break space: blank
    src = open_source(str(f))
    assert [r["a"] for r in src] == [1, 2] and src.where(1) == f"{f}:5"


def test_home_relative_paths_and_jsonl_globs(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n')
    assert len(open_source("~/p.jsonl")) == 1
    from opdjax.data import builders

    assert builders.default_data_dir("~/tfds") == str(tmp_path / "tfds")
    with pytest.raises(PromptDataError, match="names ArrayRecord files only"):
        open_source(str(tmp_path / "*.jsonl"))


def test_a_checkpoint_without_data_state_is_a_mismatch_not_damage(tmp_path):
    import jax
    import jax.numpy as jnp

    from opdjax.data.pipeline import DataPipeline
    from opdjax.train.checkpoint import CheckpointMismatchError, Checkpointer

    tree = {"w": jnp.ones((2,))}
    ck = Checkpointer(tmp_path / "ck", async_save=False)
    ck.save(1, tree, {"step": 1})  # no data item: as an opdjax before the pipeline wrote it
    sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"w": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=sh)}
    with pytest.raises(CheckpointMismatchError, match="no data pipeline state"):
        ck.restore_latest(abstract, data=DataPipeline(range(4), 2, seed=0).iterator)
    assert ck.all_steps() == [1]  # not set aside as damaged
    ck.close()
