"""The data layer end to end: every record source (opdjax.data.sources), the Grain pipeline
(opdjax.data.pipeline) and the TFDS preparation (opdjax.data.builders).

One set of 37 small records (non-ASCII prompts, str-or-int answers, lists of str and int with
empty and one-element lists, a field null in some records) is written as JSON Lines, gzipped JSON
Lines, Parquet, a `datasets` save_to_disk directory, a prepared TFDS dataset (read as a directory,
as 'tfds:NAME' and as its raw ArrayRecord shards) and ArrayRecord files of JSON records written here;
every source must give the same records (under each format's documented rules) and a pipeline over
each must serve the same batches. Remote paths use an in-memory filesystem registered as gs://.
Everything TFDS writes goes to tmp_path; nothing is downloaded.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import shutil
import sys

import numpy as np
import pytest

from opdjax.data import builders
from opdjax.data.pipeline import DataPipeline
from opdjax.data.sources import PromptDataError, open_source

N = 37


def make_records(n: int = N, start: int = 0) -> list[dict]:
    out = []
    for i in range(start, start + n):
        out.append({
            "prompt": (f"Problème {i} : combien font {i} × 3 ? ✓ 数学 🙂" if i % 3 == 0
                       else f"Problem {i}: what is {i} times 3?"),
            "answer": 3 * i if i % 2 == 0 else str(3 * i),  # str or int
            "solution": [f"Step {j}: {i} × {j + 1} = {i * (j + 1)}." for j in range(i % 4)],  # 0..3 items
            "ids": list(range(i, i + i % 3)),  # [], [i], [i, i + 1]
            "note": None if i % 4 == 0 else f"note {i}",
        })
    return out


RECORDS = make_records()
TEST_RECORDS = make_records(11, start=100)


def as_columnar(records):
    """A Parquet / Arrow column has one type: the answer is stored as its text there."""
    return [{**r, "answer": str(r["answer"])} for r in records]


def as_example(record):
    """A tf.train.Example read raw (no dataset metadata): a one-element list reads as its
    element, text is text, and a null text field is the "" TFDS stored for it."""
    out = {}
    for k, v in record.items():
        if v is None:
            v = ""
        if isinstance(v, list) and len(v) == 1:
            v = v[0]
        out[k] = v
    return out


def write_jsonl(path, records, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.write("\n")  # a blank line is not a record


def write_array_record(path, records):
    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(os.fspath(path), "group_size:1")
    for r in records:
        w.write(json.dumps(r, ensure_ascii=False).encode("utf-8"))
    w.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """{kind: (spec, open_source kwargs)} for the same records in every format, plus paths."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("data_layer")
    write_jsonl(d / "r.jsonl", RECORDS)
    write_jsonl(d / "r.jsonl.gz", RECORDS, gz=True)
    pq.write_table(pa.Table.from_pylist(as_columnar(RECORDS)), d / "r.parquet", row_group_size=10)
    datasets.disable_progress_bars()
    datasets.Dataset.from_list(as_columnar(RECORDS)).save_to_disk(os.fspath(d / "hf"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(as_columnar(RECORDS)),
                          "test": datasets.Dataset.from_list(as_columnar(TEST_RECORDS))}
                         ).save_to_disk(os.fspath(d / "hf_dict"))
    tfds_dir = os.fspath(d / "tfds")
    one = builders.prepare({"train": RECORDS}, name="layer_records", data_dir=tfds_dir)
    two = builders.prepare({"train": RECORDS, "test": TEST_RECORDS}, name="layer_two_splits", data_dir=tfds_dir)
    shards = sorted(os.path.join(one, f) for f in os.listdir(one) if ".array_record" in f)
    write_array_record(d / "own-00000.array_record", RECORDS[:20])
    write_array_record(d / "own-00001.array_record", RECORDS[20:])
    kinds = {
        "jsonl": (os.fspath(d / "r.jsonl"), {}),
        "jsonl_gz": (os.fspath(d / "r.jsonl.gz"), {}),
        "parquet": (os.fspath(d / "r.parquet"), {}),
        "save_to_disk": (os.fspath(d / "hf"), {}),
        "tfds_dir": (one, {"split": "train"}),
        "tfds_name": ("tfds:layer_records", {"data_dir": tfds_dir}),
        "tfds_shards": (",".join(shards), {}),
        "array_record_json": (os.fspath(d / "own-*.array_record"), {}),
    }
    return {"kinds": kinds, "dir": d, "tfds_dir": tfds_dir, "one": one, "two": two, "shards": shards}


def expected(kind):
    """The records each source must give, by the documented rules."""
    if kind in ("jsonl", "jsonl_gz", "array_record_json"):
        return RECORDS  # JSON throughout: exactly what was written
    if kind == "tfds_shards":
        return [as_example(r) for r in as_columnar(RECORDS)]
    # Parquet / Arrow: one type per column; TFDS: mixed text and numbers -> text, null -> None
    return as_columnar(RECORDS)


KINDS = ["jsonl", "jsonl_gz", "parquet", "save_to_disk", "tfds_dir", "tfds_name", "tfds_shards",
         "array_record_json"]


# ------------------------------------------------------------------------------- sources
@pytest.mark.parametrize("kind", KINDS)
def test_every_source_gives_the_same_records(data, kind):
    spec, kw = data["kinds"][kind]
    src = open_source(spec, **kw)
    assert len(src) == N
    got = [src[i] for i in range(len(src))]
    assert got == expected(kind)
    # the text fields agree across every source
    assert [r["prompt"] for r in got] == [r["prompt"] for r in RECORDS]
    assert [str(r["answer"]) for r in got] == [str(r["answer"]) for r in RECORDS]
    assert all(src.where(i) for i in (0, N - 1))
    with pytest.raises(IndexError):
        src[N]


def test_parquet_random_access_with_a_small_cache(data, monkeypatch):
    from opdjax.data import sources

    monkeypatch.setattr(sources.ParquetSource, "CACHE_BYTES", 1)  # keeps one decoded row group
    src = open_source(data["kinds"]["parquet"][0])
    order = np.random.default_rng(0).permutation(N)
    assert [src[int(i)] for i in order] == [as_columnar(RECORDS)[i] for i in order]
    assert len(src._groups) == 1


def test_where_names_file_and_record(data):
    k = data["kinds"]
    assert open_source(k["jsonl"][0]).where(4).endswith("r.jsonl:5")  # 1-based line
    assert open_source(k["parquet"][0]).where(12).endswith("r.parquet:row 12")
    assert open_source(k["array_record_json"][0]).where(25).endswith("own-00001.array_record:record 5")
    assert open_source(k["tfds_name"][0], **k["tfds_name"][1]).where(3) == "layer_records[train] record 3"


def _prompt(i, record):
    return record["prompt"]


@pytest.mark.parametrize("epoch_end", ["straddle", "pad"])
def test_pipeline_serves_the_same_batches_from_every_source(data, epoch_end):
    runs = {}
    for kind in KINDS:
        spec, kw = data["kinds"][kind]
        pipe = DataPipeline(open_source(spec, **kw), 8, seed=11, transform=_prompt, epoch_end=epoch_end)
        runs[kind] = [next(pipe) for _ in range(6)]  # 48 > 37 records: crosses an epoch
    ref = runs["jsonl"]
    for s, step in enumerate(ref):
        assert step.items == [None if i < 0 else RECORDS[i]["prompt"] for i in step.indices]
        for kind in KINDS:
            np.testing.assert_array_equal(runs[kind][s].indices, step.indices, err_msg=kind)
            assert runs[kind][s].items == step.items, kind


# -------------------------------------------------------------------------------- splits
@pytest.mark.parametrize("split", ["train[:90%]", "train[5:10]", "train[-4:]", "train[10%:20%]",
                                   "train[:3]+train[30:]"])
def test_split_syntax_selects_as_tfds_does(data, split):
    import tensorflow_datasets as tfds

    oracle = tfds.builder_from_directory(data["one"]).as_data_source(split=split)  # TFDS's own reader
    want = [oracle[i]["prompt"].decode("utf-8") for i in range(len(oracle))]
    k = data["kinds"]
    for kind in ("jsonl", "parquet", "tfds_dir", "array_record_json"):
        src = open_source(k[kind][0], split=split, **{a: b for a, b in k[kind][1].items() if a != "split"})
        assert [r["prompt"] for r in src] == want, kind
    if split == "train[:90%]":
        assert want == [r["prompt"] for r in RECORDS[:33]]  # 33.3 rounds to 33
    if split == "train[5:10]":
        assert want == [r["prompt"] for r in RECORDS[5:10]]


@pytest.mark.parametrize("split", ["train[:3]+test[-2:]", "test+train[:10%]", "test"])
def test_split_sum_of_two_splits(data, split):
    import tensorflow_datasets as tfds

    oracle = tfds.builder_from_directory(data["two"]).as_data_source(split=split)
    want = [oracle[i]["prompt"].decode("utf-8") for i in range(len(oracle))]
    for spec in (data["two"], os.fspath(data["dir"] / "hf_dict")):
        assert [r["prompt"] for r in open_source(spec, split=split)] == want, spec
    if split == "train[:3]+test[-2:]":
        assert want == [r["prompt"] for r in RECORDS[:3] + TEST_RECORDS[-2:]]


def test_default_split(data):
    assert len(open_source(data["two"])) == N  # two splits, none given: default_split="train"
    assert len(open_source(data["two"], default_split="test")) == len(TEST_RECORDS)
    assert len(open_source(data["kinds"]["jsonl"][0], split="eval")) == N  # one file: the name is a label


# -------------------------------------------------------------------------- remote paths
@pytest.fixture
def fake_gcs():
    """fsspec's MemoryFileSystem (with its own store) registered as gs://, restored afterwards.
    etils.epath asks fsspec for 'gcs' when given gs://, so it is registered under both names."""
    import fsspec
    from etils.epath import backend as epath_backend
    from fsspec.implementations.memory import MemoryFileSystem

    class FakeGcs(MemoryFileSystem):
        protocol = ("gs", "gcs")
        store: dict = {}
        pseudo_dirs = [""]

        @classmethod
        def _strip_protocol(cls, path):
            path = os.fspath(path)
            for p in ("gs://", "gcs://"):
                if path.startswith(p):
                    path = path[len(p):]
            return MemoryFileSystem._strip_protocol(path)

    registry = sys.modules["fsspec.registry"]._registry
    saved = {p: registry.get(p) for p in ("gs", "gcs")}
    clear = epath_backend._FileSystemSpecBackend._get_filesystem.cache_clear
    for p in ("gs", "gcs"):
        fsspec.register_implementation(p, FakeGcs, clobber=True)
    clear()
    try:
        yield FakeGcs
    finally:
        FakeGcs.store.clear()
        for p, cls in saved.items():
            if cls is None:
                registry.pop(p, None)
            else:
                registry[p] = cls
        clear()


def test_remote_gs_paths(data, fake_gcs):
    from etils import epath

    def upload(local, remote):
        epath.Path(remote).write_bytes(open(local, "rb").read())

    d = data["dir"]
    upload(d / "r.jsonl", "gs://bucket/x.jsonl")
    upload(d / "r.jsonl.gz", "gs://bucket/x.jsonl.gz")
    upload(d / "r.parquet", "gs://bucket/x.parquet")
    for sub in ("", "train", "test"):
        for f in os.listdir(d / "hf_dict" / sub):
            if os.path.isfile(d / "hf_dict" / sub / f):
                upload(d / "hf_dict" / sub / f, f"gs://bucket/hf_dict/{sub + '/' if sub else ''}{f}")
    for f in os.listdir(d / "hf"):
        upload(d / "hf" / f, f"gs://bucket/hf/{f}")
    assert "/bucket/x.jsonl" in fake_gcs.store  # went through the fake, not the local disk

    cases = {"gs://bucket/x.jsonl": RECORDS, "gs://bucket/x.jsonl.gz": RECORDS,
             "gs://bucket/x.parquet": as_columnar(RECORDS), "gs://bucket/hf": as_columnar(RECORDS),
             "gs://bucket/hf_dict": as_columnar(RECORDS)}
    for spec, want in cases.items():
        src = open_source(spec)
        assert [src[i] for i in range(len(src))] == want, spec
        assert src.where(0).startswith("gs://bucket/"), spec
    sel = open_source("gs://bucket/hf_dict", split="train[:2]+test[-1:]")
    assert [r["prompt"] for r in sel] == [r["prompt"] for r in RECORDS[:2] + TEST_RECORDS[-1:]]
    pipe = DataPipeline(open_source("gs://bucket/x.parquet"), 8, seed=11, transform=_prompt)
    ref = DataPipeline(open_source(data["kinds"]["jsonl"][0]), 8, seed=11, transform=_prompt)
    for _ in range(3):
        assert next(pipe).items == next(ref).items
    with pytest.raises(PromptDataError, match="gs://bucket/missing.jsonl"):
        open_source("gs://bucket/missing.jsonl")


# ------------------------------------------------------------------------------ pipeline
class Recording:
    """A list source that records which indices were read."""

    def __init__(self, records):
        self.records, self.read = records, []

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        self.read.append(int(i))
        return self.records[i]


def _flat(pipe, steps):
    return np.concatenate([next(pipe).indices for _ in range(steps)])


@pytest.mark.parametrize("n,b", [(37, 8), (10, 3), (5, 8)])
def test_straddle_every_epoch_covers_every_record_once(n, b):
    epochs = 4
    pipe = DataPipeline(list(range(n)), b, seed=0)
    flat = _flat(pipe, math.ceil(epochs * n / b))
    perms = [flat[e * n:(e + 1) * n] for e in range(epochs)]
    for p in perms:
        assert sorted(p.tolist()) == list(range(n))
    assert len({tuple(p) for p in perms}) == epochs  # reshuffled every epoch
    np.testing.assert_array_equal(pipe.step_indices(2), flat[2 * b:3 * b])  # random access agrees


@pytest.mark.parametrize("n,b", [(37, 8), (10, 3), (5, 8)])
def test_pad_fills_only_the_end_of_each_epoch(n, b):
    spe = math.ceil(n / b)
    pipe = DataPipeline([{"i": i} for i in range(n)], b, seed=0, epoch_end="pad")
    assert pipe.steps_per_epoch == spe
    perms = []
    for _ in range(3):
        steps = [next(pipe) for _ in range(spe)]
        flat = np.concatenate([s.indices for s in steps])
        assert sorted(flat[:n].tolist()) == list(range(n))
        assert (flat[n:] == -1).all() and len(flat) - n == spe * b - n
        for s in steps:
            assert all((item is None) == (i < 0) for i, item in zip(s.indices, s.items))
        perms.append(tuple(flat[:n]))
    assert len(set(perms)) == 3


def _epoch(seed, e, n=37):
    pipe = DataPipeline(list(range(n)), n, seed=seed, epoch_end="pad")
    return pipe.step_indices(e).tolist()


def test_seeds_give_different_orders():
    assert _epoch(0, 0) == _epoch(0, 0)  # deterministic
    assert _epoch(0, 0) != _epoch(1, 0)
    assert _epoch(0, 1) != _epoch(1, 0)  # the run seed is hashed: no overlap between seeds
    assert _epoch(0, 0) != _epoch(0, 1)
    assert DataPipeline(list(range(37)), 8, seed=0, shuffle=False).step_indices(0).tolist() == list(range(8))


def _positions(procs, k, b, layout):
    if layout == "contiguous":
        return np.arange(b)[k * b // procs:(k + 1) * b // procs]
    return np.arange(k, b, procs)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("procs", [2, 4])
def test_processes_read_only_their_rows(procs, layout):
    n, b, steps, seed = 400, 8, 6, 5
    records = [{"prompt": f"p{i}"} for i in range(n)]
    full = DataPipeline(records, b, seed=seed, transform=_prompt)
    full_steps = [next(full) for _ in range(steps)]
    where = {int(i): (s, p) for s in range(n // b) for p, i in enumerate(full.step_indices(s))}  # epoch 0
    positions = [_positions(procs, k, b, layout) for k in range(procs)]
    assert sorted(np.concatenate(positions).tolist()) == list(range(b))
    readers = [Recording(records) for _ in range(procs)]
    runs = []
    for k in range(procs):
        pipe = DataPipeline(readers[k], b, seed=seed, positions=positions[k], transform=_prompt)
        runs.append([next(pipe) for _ in range(steps)])
    for s in range(steps):
        got = {}
        for k in range(procs):
            np.testing.assert_array_equal(runs[k][s].indices, full_steps[s].indices)
            for p, item in zip(runs[k][s].positions, runs[k][s].items):
                assert int(p) not in got  # disjoint
                got[int(p)] = item
        assert [got[p] for p in range(b)] == full_steps[s].items  # the union is the whole batch
    for k in range(procs):
        reads = readers[k].read
        assert len(reads) == len(set(reads))  # each record read once
        assert all(where[i][1] in positions[k] for i in reads)  # only this process's positions
        mine = {int(full_steps[s].indices[p]) for s in range(steps) for p in positions[k]}
        assert mine <= set(reads)


@pytest.mark.parametrize("epoch_end", ["straddle", "pad"])
def test_resume_from_iterator_state(epoch_end):
    src, k, m = [{"prompt": f"p{i}"} for i in range(N)], 5, 6  # step 5 is mid-epoch 1
    ref = DataPipeline(src, 8, seed=2, epoch_end=epoch_end, transform=_prompt)
    ref_steps = [next(ref) for _ in range(k + m)]
    a = DataPipeline(src, 8, seed=2, epoch_end=epoch_end, transform=_prompt)
    for _ in range(k):
        next(a)
    state = a.iterator.get_state()
    b = DataPipeline(src, 8, seed=2, epoch_end=epoch_end, transform=_prompt)
    b.iterator.set_state(state)
    assert b.next_step == k
    for want in ref_steps[k:]:
        got = next(b)
        np.testing.assert_array_equal(got.indices, want.indices)
        assert got.items == want.items
    c = DataPipeline(src, 8, seed=2, epoch_end=epoch_end, transform=_prompt)
    c.skip_to(k + 2)
    np.testing.assert_array_equal(next(c).indices, ref_steps[k + 2].indices)


def test_resume_through_orbax(tmp_path):
    import grain
    import orbax.checkpoint as ocp

    src, k = [{"prompt": f"p{i}"} for i in range(N)], 7
    ref = DataPipeline(src, 8, seed=9, transform=_prompt)
    ref_steps = [next(ref) for _ in range(k + 4)]
    a = DataPipeline(src, 8, seed=9, transform=_prompt)
    for _ in range(k):
        next(a)

    def manager():
        return ocp.CheckpointManager(
            os.fspath(tmp_path / "ckpt"), item_handlers={"data": grain.checkpoint.CheckpointHandler()},
            options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True))

    with manager() as mngr:
        mngr.save(k, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(a.iterator)))
        mngr.wait_until_finished()
    b = DataPipeline(src, 8, seed=9, transform=_prompt)
    with manager() as mngr:
        assert mngr.latest_step() == k
        mngr.restore(k, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(b.iterator)))
    # the handler alone, as opdjax.train.checkpoint restores it
    handler = grain.checkpoint.CheckpointHandler()
    (tmp_path / "direct").mkdir()  # orbax makes the item directory before calling the handler
    handler.save(tmp_path / "direct", args=grain.checkpoint.CheckpointSave(a.iterator))
    c = DataPipeline(src, 8, seed=9, transform=_prompt)
    handler.restore(tmp_path / "direct", args=grain.checkpoint.CheckpointRestore(c.iterator))
    for want in ref_steps[k:]:
        for pipe in (b, c):
            got = next(pipe)
            np.testing.assert_array_equal(got.indices, want.indices)
            assert got.items == want.items


def test_check_signature():
    src = list(range(N))
    saved = DataPipeline(src, 8, seed=3).signature()
    DataPipeline(src, 8, seed=3).check_signature(saved)
    DataPipeline(src, 8, seed=3).check_signature(None)
    for pipe, key in [(DataPipeline(src, 8, seed=4), "seed"), (DataPipeline(src, 4, seed=3), "batch_size"),
                      (DataPipeline(src[:-1], 8, seed=3), "num_records"),
                      (DataPipeline(src, 8, seed=3, epoch_end="pad"), "epoch_end"),
                      (DataPipeline(src, 8, seed=3, shuffle=False), "shuffle")]:
        with pytest.raises(ValueError, match=key):
            pipe.check_signature(saved)


# -------------------------------------------------------------------------------- errors
def test_error_missing_split(data):
    for spec in (data["two"], os.fspath(data["dir"] / "hf_dict")):
        with pytest.raises(PromptDataError, match=r"no split 'valid'") as e:
            open_source(spec, split="valid")
        assert "['train', 'test']" in str(e.value)
    with pytest.raises(PromptDataError, match=r"\['train', 'test'\]"):
        open_source(data["two"], split="train[:2]+valid")


def test_error_empty_selection(data):
    for spec in (data["kinds"]["jsonl"][0], data["one"]):
        with pytest.raises(PromptDataError, match=r"train\[5:5\].*selects no records"):
            open_source(spec, split="train[5:5]")


@pytest.mark.parametrize("split", ["train[abc", "train[:200%]", "train[1:2:3]"])
def test_error_invalid_split_expression(data, split):
    for spec in (data["kinds"]["jsonl"][0], data["one"]):
        with pytest.raises(PromptDataError) as e:
            open_source(spec, split=split)
        assert split in str(e.value)


def _damaged_copy(data, tmp_path, how):
    d = os.fspath(tmp_path / "copy")
    shutil.copytree(data["one"], d)
    shard = next(os.path.join(d, f) for f in sorted(os.listdir(d)) if ".array_record" in f)
    raw = open(shard, "rb").read()
    if how == "truncate":
        open(shard, "wb").write(raw[:len(raw) // 2])
    elif how == "overwrite":
        open(shard, "wb").write(raw[:100] + b"\xff" * 300 + raw[400:])
    elif how == "empty":
        open(shard, "wb").close()
    else:
        os.remove(shard)
    return d, shard


@pytest.mark.parametrize("how", ["truncate", "overwrite", "empty", "delete"])
def test_error_damaged_tfds_shard(data, tmp_path, how):
    d, shard = _damaged_copy(data, tmp_path, how)
    with pytest.raises(PromptDataError) as e:
        src = open_source(d, split="train")  # a missing or empty shard: named at open
        for i in range(len(src)):  # a damaged one: when a record in it is read
            src[i]
    assert shard in str(e.value)


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_error_damaged_array_record_file(tmp_path, how):
    f = tmp_path / "bad.array_record"
    if how == "garbage":
        f.write_bytes(b"not an ArrayRecord file " * 40)
    else:
        write_array_record(f, RECORDS)
        raw = f.read_bytes()
        f.write_bytes(raw[:len(raw) // 2])
    with pytest.raises(PromptDataError, match="bad.array_record"):
        src = open_source(os.fspath(f))
        for i in range(len(src)):
            src[i]


def test_error_unknown_tfds_name(tmp_path):
    with pytest.raises(PromptDataError, match="no_such_dataset") as e:
        open_source("tfds:no_such_dataset", data_dir=os.fspath(tmp_path))
    assert os.fspath(tmp_path) in str(e.value)


def test_error_invalid_jsonl_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a"}\n\n{"prompt": "b"\n[1, 2]\n', encoding="utf-8")
    src = open_source(os.fspath(f))
    assert len(src) == 3 and src[0] == {"prompt": "a"}
    with pytest.raises(PromptDataError, match=r"bad\.jsonl:3: invalid JSON"):
        src[1]
    with pytest.raises(PromptDataError, match=r"bad\.jsonl:4: .*not an object"):
        src[2]


def test_error_missing_path(tmp_path):
    for spec in (tmp_path / "nope.jsonl", tmp_path / "nope.parquet"):
        with pytest.raises(PromptDataError, match="nope"):
            open_source(spec)
    with pytest.raises(PromptDataError, match="nothing-.*array_record"):
        open_source(os.fspath(tmp_path / "nothing-*.array_record"))


# ------------------------------------------------------------------------------ builders
def test_prepare_feature_rules_round_trip(tmp_path):
    records = [
        {"text": "a", "int": 1, "float": 1, "mixed": "x", "str_or_list": "one", "obj": {"k": [1, 2]},
         "maybe": "here", "flag": True, "floats": [0.5, 1], "nested": [[1], [2, 3]], "tags": ["t"]},
        {"text": "b", "int": -7, "float": 2.5, "mixed": 32, "str_or_list": ["two", "three"], "obj": {"k": None},
         "maybe": None, "flag": False, "floats": [], "nested": [], "sometimes": "only here", "tags": None},
        {"text": "c", "int": 0, "float": 0.1, "mixed": 0, "str_or_list": [], "obj": [], "maybe": "",
         "flag": True, "floats": [1e-3], "nested": [[]]},  # "" of a nullable text field reads as None
    ]
    spec = builders.infer_features({"train": records})
    assert spec == {"text": ("text", False), "int": ("int", False), "float": ("float", False),
                    "mixed": ("text", False), "str_or_list": ("seq_text", False), "obj": ("json", False),
                    "maybe": ("text", True), "flag": ("bool", False), "floats": ("seq_float", False),
                    "nested": ("json", False), "sometimes": ("text", True),
                    "tags": ("json", True)}  # a list that may be null: Text holding JSON
    out = builders.prepare({"train": records}, name="rules", data_dir=os.fspath(tmp_path))
    got = list(open_source(out))
    assert got[0] == {"text": "a", "int": 1, "float": 1.0, "mixed": "x", "str_or_list": ["one"], "obj": {"k": [1, 2]},
                      "maybe": "here", "flag": True, "floats": [0.5, 1.0], "nested": [[1], [2, 3]], "sometimes": None,
                      "tags": ["t"]}
    assert got[1] == {"text": "b", "int": -7, "float": 2.5, "mixed": "32", "str_or_list": ["two", "three"],
                      "obj": {"k": None}, "maybe": None, "flag": False, "floats": [], "nested": [],
                      "sometimes": "only here", "tags": None}
    assert got[2] == {"text": "c", "int": 0, "float": 0.1, "mixed": "0", "str_or_list": [], "obj": [], "maybe": None,
                      "flag": True, "floats": [1e-3], "nested": [[]], "sometimes": None, "tags": None}
    assert isinstance(got[0]["float"], float) and isinstance(got[0]["int"], int)  # 0.1 and 1e-3 exact, not float32
    with pytest.raises(PromptDataError, match="already holds"):
        builders.prepare({"train": records}, name="rules", data_dir=os.fspath(tmp_path))


def test_prepare_keeps_order_and_records_checksums(data):
    d = data["two"]
    info = json.load(open(os.path.join(d, "dataset_info.json")))
    assert info.get("disableShuffling") is True
    lengths = {s["name"]: sum(int(x) for x in s["shardLengths"]) for s in info["splits"]}
    assert lengths == {"train": N, "test": len(TEST_RECORDS)}
    meta = json.load(open(os.path.join(d, "metadata.json")))["opdjax"]
    assert meta["records"] == {"train": N, "test": len(TEST_RECORDS)}
    assert meta["nullable_fields"] == ["note"]
    files = sorted(f for f in os.listdir(d) if ".array_record" in f)
    assert sorted(meta["shards"]) == files and len(files) == 2
    for f in files:
        assert meta["shards"][f] == hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
    for split, want in (("train", RECORDS), ("test", TEST_RECORDS)):
        assert [r["prompt"] for r in open_source(d, split=split)] == [r["prompt"] for r in want]


def test_shipped_word_problems_prepared_once(tmp_path, monkeypatch):
    calls = []
    real = builders.prepare
    monkeypatch.setattr(builders, "prepare", lambda *a, **k: calls.append(k["name"]) or real(*a, **k))
    b1 = builders.shipped_builder("opdjax_word_problems", os.fspath(tmp_path))
    b2 = builders.shipped_builder("opdjax_word_problems", os.fspath(tmp_path))
    assert calls == ["opdjax_word_problems"]
    assert os.fspath(b1.data_dir) == os.fspath(b2.data_dir)
    src = open_source("tfds:opdjax_word_problems", data_dir=os.fspath(tmp_path))
    assert calls == ["opdjax_word_problems"]
    path = os.path.join(os.path.dirname(builders.__file__), "..", "assets", "prompts", "word_problems.jsonl")
    assert [r["prompt"] for r in src] == [r["prompt"] for r in open_source(path)]
    assert builders.shipped_builder("not_shipped", os.fspath(tmp_path)) is None
    with pytest.raises(PromptDataError, match="no configs"):
        builders.shipped_builder("opdjax_word_problems/seed1", os.fspath(tmp_path))


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    """One preparation of opdjax_toy_arithmetic/seed0 (8192 + 1024 records, ~4 s) per session."""
    d = os.fspath(tmp_path_factory.mktemp("toy_tfds"))
    builders.shipped_builder("opdjax_toy_arithmetic/seed0", d)
    return d


def test_shipped_toy_arithmetic_matches_make_problems(toy_dir):
    from opdjax.toy import arithmetic

    n = 40
    for split in ("train", "eval"):
        src = open_source("tfds:opdjax_toy_arithmetic/seed0", split=f"{split}[:{n}]", data_dir=toy_dir)
        want = arithmetic.make_problems(n, 0, split)
        assert [r["prompt"] for r in src] == [p["prompt"] for p in want]
        assert [r["answer"] for r in src] == [str(p["answer"]) for p in want]
        assert [r["steps"] for r in src] == [list(p["steps"]) for p in want]
    full = open_source("tfds:opdjax_toy_arithmetic", data_dir=toy_dir)  # seed0 is the default config
    assert len(full) == builders.TOY_TRAIN
