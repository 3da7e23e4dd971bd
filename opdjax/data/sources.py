"""Record sources: random access to the records of a dataset, wherever it lives.

    src = open_source("problems.jsonl")                                # .jsonl(.gz) / .parquet
    src = open_source("saved_dir", split="test")                       # datasets save_to_disk
    src = open_source("tfds:my_set", split="train[:90%]", data_dir="gs://bucket/tfds")
    src = open_source("gs://bucket/tfds/my_set/1.0.0", split="train")  # a prepared TFDS directory
    src = open_source("/data/shards/train.array_record-*")             # ArrayRecord files
    len(src), src[i] -> dict, src.where(i) -> "problems.jsonl:12" | "my_set[train] record 11"

Every source is what Grain calls a random-access data source (`__len__`, `__getitem__`), so the
pipeline (`opdjax.data.pipeline`) and a process reading only its own rows need nothing more.

The spec (one string, e.g. data.train_file) says what the data is:
  - `tfds:NAME[/CONFIG][:VERSION]`: a TFDS dataset prepared under `data_dir` ("" = TFDS's default,
    $TFDS_DATA_DIR or ~/tensorflow_datasets). The shipped builders (`opdjax.data.builders`) are
    prepared there on first use; any other name must have been prepared already (no downloads).
  - a directory holding `dataset_info.json`: a prepared TFDS dataset (what `prepare_data` writes).
  - a directory written by Hugging Face `datasets`' `save_to_disk` (state.json / dataset_dict.json).
  - ArrayRecord files: a name containing `.array_record`, a glob, or several joined by commas.
    Each record is a JSON object (UTF-8) or a serialized tf.train.Example; an Example's features are
    lists, so a one-element list reads as its element and text is UTF-8 decoded.
  - a JSON Lines (`.jsonl`, `.ndjson`, `.json`, optionally `.gz`) or Parquet (`.parquet`, `.pq`) file.
Paths may be local or remote (`gs://...`, any fsspec URL etils.epath knows); JSONL, Parquet and
save_to_disk data are read through etils.epath, TFDS and ArrayRecord data through their readers.

Splits use TFDS's split syntax for every source: `train`, `train[:90%]`, `train[100:200]`,
`train[:50%]+test` (TFDS's own arithmetic: the same records whatever the source). A single file has
one split whose name is only a label. `split=""` picks the only split, else `default_split`.
An unknown split, a slice that selects nothing, a missing or damaged shard are `PromptDataError`s
naming the dataset, split, record index and file, raised before any compile where possible.
"""
from __future__ import annotations

import collections
import abc
import glob
import gzip
import json
import mmap
import os
import re
import threading
import types
from typing import Any, Sequence

import numpy as np
from etils import epath

__all__ = ["RecordSource", "open_source", "source_kind", "select", "TFDS_PREFIX", "PromptDataError",
           "describe_fields", "iter_records"]

TFDS_PREFIX = "tfds:"
PYARROW_PIN = "pyarrow==26.0.1"
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")


class PromptDataError(ValueError):
    """A data source, or one of its records, cannot be used as given."""


def describe_fields(record: dict[str, Any]) -> str:
    """The record's field names for an error message: "'a', 'b'" (or "none")."""
    return ", ".join(repr(k) for k in record) if record else "none"


def _is_remote(path: str) -> bool:
    return "://" in path


def _path(path: str) -> epath.Path:
    return epath.Path(path if _is_remote(path) else os.path.abspath(os.path.expanduser(path)))


def missing_local_path(spec: str) -> bool:
    """True for a plain local path (no tfds:, URL, glob or list) that does not exist: what config
    validation reports by field name before anything is opened."""
    spec = (spec or "").strip()
    if not spec or spec.startswith(TFDS_PREFIX) or _is_remote(spec) or any(c in spec for c in "*?[,"):
        return False
    return not os.path.exists(os.path.expanduser(spec))


class RecordSource(abc.ABC):
    """Random access to one split's records. Subclasses set `name` (for messages), `split` and
    implement `__len__`, `_get(i)` (the decoded record) and `where(i)`."""
    name: str = ""
    split: str = ""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def _get(self, i: int) -> dict[str, Any]: ...

    @abc.abstractmethod
    def where(self, i: int) -> str: ...

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} of {self.name} ({len(self)} records)")
        return self._get(i)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, split={self.split!r}, {len(self)} records)"


# ---------------------------------------------------------------------------------- files
def _file_kind(path: str) -> tuple[str, bool]:
    """('jsonl' | 'parquet', gzipped) from the file name."""
    name = path.rsplit("/", 1)[-1].lower()
    gz = name.endswith(".gz")
    stem = name[:-3] if gz else name
    if stem.endswith(JSONL_SUFFIXES):
        return "jsonl", gz
    if stem.endswith(PARQUET_SUFFIXES) and not gz:
        return "parquet", False
    suffix = "".join(epath.Path(path).suffixes) or "(no extension)"
    raise PromptDataError(
        f"File {path}: unsupported file type {suffix!r}. Use JSON Lines ({', '.join(JSONL_SUFFIXES)}, "
        f"optionally .gz) with one JSON object per line, Parquet ({', '.join(PARQUET_SUFFIXES)}), "
        "ArrayRecord files (*.array_record*), a prepared TFDS directory or 'tfds:NAME'.")


def _read_bytes(path: str) -> bytes | mmap.mmap:
    if _is_remote(path):
        return _path(path).read_bytes()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # pages are read when touched


class JsonlSource(RecordSource):
    """One JSON object per line; blank lines are not records. The line starts are indexed once
    (a vectorised scan of the bytes); a record is parsed when it is read, so an invalid line is an
    error naming file:line when that record is first read (the start-up pass reads them all)."""

    def __init__(self, path: str, gz: bool):
        self.name, self.split = path, ""
        data = _read_bytes(path)
        if gz:
            try:
                data = gzip.decompress(bytes(data))
            except (OSError, EOFError) as e:
                raise PromptDataError(f"File {path} is not a readable gzip file ({e}).") from None
        self._data = data
        buf = np.frombuffer(data, np.uint8) if len(data) else np.zeros((0,), np.uint8)
        ends = np.flatnonzero(buf == 10)
        if not len(ends) and len(buf) and (buf == 13).any():  # old Mac line ends: a bare \r
            ends = np.flatnonzero(buf == 13)
        starts = np.concatenate([[0], ends + 1]).astype(np.int64)
        stops = np.concatenate([ends, [len(buf)]]).astype(np.int64)
        # Blank lines (only whitespace) are not records. Memory stays ~1 byte per file byte: only a
        # line that is empty or starts with whitespace or a non-ASCII byte is decoded and stripped
        # (as Python's str.strip does, so a no-break-space line is blank too).
        first = buf[np.minimum(starts, max(len(buf) - 1, 0))] if len(buf) else np.zeros(len(starts), np.uint8)
        maybe_blank = (stops <= starts) | np.isin(first, (9, 10, 11, 12, 13, 32)) | (first >= 0x80)
        keep = ~maybe_blank
        for k in np.flatnonzero(maybe_blank):
            if stops[k] > starts[k]:
                keep[k] = bool(bytes(data[starts[k]:stops[k]]).decode("utf-8", "replace").strip())
        self._starts, self._stops = starts[keep], stops[keep]
        self._lines = np.flatnonzero(keep) + 1  # 1-based, as an editor counts

    def __len__(self):
        return len(self._starts)

    def where(self, i):
        return f"{self.name}:{int(self._lines[i])}"

    def _get(self, i):
        raw = bytes(self._data[self._starts[i]:self._stops[i]])
        where = self.where(i)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PromptDataError(f"{where}: not UTF-8 text ({e}); re-encode the file as UTF-8.") from None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if self._lines[i] == 1 and line.lstrip().startswith("["):
                raise PromptDataError(
                    f"{where}: the file is a JSON array, not JSON Lines. Write one JSON object per line, "
                    "e.g. python -c \"import json,sys; [print(json.dumps(r)) for r in json.load(open(sys.argv[1]))]\" "
                    "in.json > out.jsonl") from None
            raise PromptDataError(f"{where}: invalid JSON ({e.msg} at column {e.colno}). Each line must be one "
                                  "complete JSON object; fix or remove this line.") from None
        if not isinstance(record, dict):
            raise PromptDataError(f"{where}: the line is a JSON {type(record).__name__}, not an object. Each "
                                  "line must be one JSON object.")
        return record


def _pyarrow(what: str):
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise PromptDataError(f"Reading {what} needs pyarrow, which is not installed: pip install "
                              f"{PYARROW_PIN} (or convert it to JSON Lines).") from None
    return pyarrow


class ParquetSource(RecordSource):
    """A Parquet file, read one row group at a time (the group of the record asked for). Decoded
    groups are kept as Arrow tables (up to CACHE_BYTES) and a record is converted alone: a shuffled
    read visits the groups at random, and decoding a whole group per record is O(group size)."""
    CACHE_BYTES = 1 << 30

    def __init__(self, path: str):
        pa = _pyarrow(f"the Parquet file {path}")
        self.name, self.split = path, ""
        try:
            handle = _path(path).open("rb") if _is_remote(path) else path
            self._file = pa.parquet.ParquetFile(handle)
        except pa.ArrowInvalid as e:
            raise PromptDataError(f"File {path} is not a readable Parquet file ({e}).") from None
        sizes = [self._file.metadata.row_group(g).num_rows for g in range(self._file.num_row_groups)]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._groups: collections.OrderedDict = collections.OrderedDict()  # group -> pyarrow.Table, LRU
        self._cached_bytes = 0
        self._lock = threading.Lock()  # Grain's reader thread and the caller may read at once

    def __len__(self):
        return int(self._offsets[-1])

    def where(self, i):
        return f"{self.name}:row {i}"

    def _get(self, i):
        g = int(np.searchsorted(self._offsets, i, side="right") - 1)
        with self._lock:
            table = self._groups.get(g)
            if table is None:
                table = self._groups[g] = self._file.read_row_group(g)
                self._cached_bytes += table.nbytes
                while self._cached_bytes > self.CACHE_BYTES and len(self._groups) > 1:
                    self._cached_bytes -= self._groups.popitem(last=False)[1].nbytes
            else:
                self._groups.move_to_end(g)
        return table.slice(int(i - self._offsets[g]), 1).to_pylist()[0]


# ------------------------------------------------------------------ save_to_disk directories
class ArrowDirSource(RecordSource):
    """One split of a `datasets` save_to_disk directory: its .arrow shards, memory-mapped."""

    def __init__(self, path: str, split: str, default_split: str, setting: str):
        pa = _pyarrow(f"the dataset directory {path}")
        root = _path(path)
        dict_file = root / "dataset_dict.json"
        ds_dir, self.split = root, ""
        if dict_file.exists():
            try:
                splits = [str(s) for s in json.loads(dict_file.read_text())["splits"]]
            except (ValueError, KeyError, TypeError) as e:
                raise PromptDataError(f"{dict_file}: not a readable datasets DatasetDict index ({e}); re-save "
                                      "the dataset with save_to_disk.") from None
            self.split = _pick_split(path, split, splits, default_split, split_setting_for(setting))
            ds_dir = root / self.split
        self.name = str(ds_dir) if self.split else path
        state_file = ds_dir / "state.json"
        if not state_file.exists():
            raise PromptDataError(
                f"Directory {ds_dir} is not a dataset saved with Hugging Face datasets' save_to_disk (no state.json "
                f"or dataset_dict.json) nor a prepared TFDS dataset (no dataset_info.json). {setting} must be a "
                ".jsonl / .parquet / ArrayRecord file, a save_to_disk or TFDS directory, or 'tfds:NAME'.")
        try:
            state = json.loads(state_file.read_text())
            names = [f["filename"] for f in state["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise PromptDataError(f"{state_file}: cannot read its list of data files ({e}); re-save the "
                                  "dataset with save_to_disk.") from None
        if state.get("_indices_data_files"):
            raise PromptDataError(f"Dataset directory {ds_dir} stores an indices mapping; re-save it with "
                                  "ds.flatten_indices().save_to_disk(...).")
        tables = []
        for n in names:
            f = ds_dir / n
            if not f.exists():
                raise PromptDataError(f"Dataset directory {ds_dir}: data file {f} named in state.json is "
                                      "missing; copy the whole directory.")
            tables.append(self._read_arrow(pa, str(f)))
        self._table = pa.concat_tables(tables) if tables else None

    @staticmethod
    def _read_arrow(pa, f: str):
        source = pa.BufferReader(epath.Path(f).read_bytes()) if _is_remote(f) else pa.memory_map(f)
        try:
            return pa.ipc.open_stream(source).read_all()  # what datasets writes
        except pa.ArrowInvalid:
            source.seek(0)
            try:
                return pa.ipc.open_file(source).read_all()
            except pa.ArrowInvalid as e:
                raise PromptDataError(f"{f}: not an Arrow IPC file ({e}).") from None

    def __len__(self):
        return 0 if self._table is None else self._table.num_rows

    def where(self, i):
        return f"{self.name}:row {i}"

    def _get(self, i):
        return self._table.slice(i, 1).to_pylist()[0]


# ------------------------------------------------------------------------ decoding records
def _plain(value):
    """A TFDS / Example value as plain Python: text decoded, arrays as lists, numpy scalars as int/float."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.ndim else _plain(value.item())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def decode_array_record(raw: bytes) -> dict[str, Any]:
    """One ArrayRecord record: a UTF-8 JSON object, or a serialized tf.train.Example (parsed with
    TFDS's own copy of the proto: no TensorFlow). An Example has no scalars, so a one-element list
    reads as its element."""
    from tensorflow_datasets.proto import tf_example_pb2

    # An Example starts with byte 0x0a and may hold 0x7b ("{") next: try JSON only on a leading "{"
    # (no whitespace stripped) and fall back to the proto.
    if raw[:1] == b"{":
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
    example = tf_example_pb2.Example.FromString(raw)
    out = {}
    for key, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        values = list(getattr(feature, kind).value) if kind else []
        values = [_plain(v) for v in values]
        out[key] = values[0] if len(values) == 1 else values
    return out


# -------------------------------------------------------------------------------- TFDS
def _tfds():
    import tensorflow_datasets as tfds

    return tfds


class _ShardedReader:
    """Which shard file holds record i (for error messages), from a split's shard lengths."""

    def __init__(self, files: Sequence[str], lengths: Sequence[int]):
        self.files = list(files)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def file_of(self, i: int) -> str:
        if not self.files:
            return "?"
        return self.files[min(int(np.searchsorted(self.offsets, i, side="right") - 1), len(self.files) - 1)]


class TfdsSource(RecordSource):
    """One split of a prepared TFDS dataset (array_record), read through TFDS's data source: a
    record is decoded with the dataset's own features, text to str."""

    def __init__(self, builder, split: str, label: str):
        info = builder.info
        self.name, self.split = label, split
        split_info = info.splits[split]
        if "array_record" not in str(getattr(info.file_format, "value", info.file_format)).lower():
            raise PromptDataError(
                f"{label}: split {split!r} is stored as {info.file_format}, which needs TensorFlow to read. "
                "Re-prepare it with file_format=array_record (opdjax's prepare_data job does).")
        files = [os.fspath(f) for f in split_info.filepaths]
        self._shards = _ShardedReader(files, split_info.shard_lengths)
        _check_shards(label, split, files, split_info)
        try:
            self._source = builder.as_data_source(split=split)
        except Exception as e:  # noqa: BLE001 -- a damaged shard header fails here
            raise PromptDataError(f"{label}[{split}]: its shards cannot be opened ({type(e).__name__}: {e}); "
                                  f"re-prepare the dataset or copy its files again.") from None
        self._length = len(self._source)
        from opdjax.data.builders import opdjax_meta  # noqa: PLC0415 -- builders imports this module

        self._meta = opdjax_meta(os.fspath(builder.data_dir))

    def __len__(self):
        return self._length

    def where(self, i):
        return f"{self.name}[{self.split}] record {i}"

    def _get(self, i):
        from opdjax.data.builders import decode_record  # noqa: PLC0415

        try:
            raw = _plain(self._source[i])
        except Exception as e:  # noqa: BLE001
            raise PromptDataError(
                f"{self.where(i)}: unreadable (shard {self._shards.file_of(i)}: {type(e).__name__}: {e}). The shard "
                "is damaged or truncated; re-prepare the dataset or copy its files again.") from None
        try:
            return decode_record(raw, self._meta)
        except ValueError as e:
            raise PromptDataError(f"{self.where(i)}: a JSON field of this record does not parse ({e}); the dataset's "
                                  "metadata.json and its records disagree: re-prepare it.") from None


def _check_shards(label: str, split: str, files: Sequence[str], split_info) -> None:
    """Every shard of the split exists and has bytes: a missing or emptied shard is named now,
    not at the first record it holds (a truncated one is caught when it is read)."""
    for f in files:
        p = epath.Path(f)
        if not p.exists():
            raise PromptDataError(f"{label}[{split}]: shard {f} is missing; copy the whole dataset directory "
                                  "or re-prepare it.")
        if not _is_remote(f) and os.path.getsize(f) == 0 and split_info.num_examples:
            raise PromptDataError(f"{label}[{split}]: shard {f} is empty; re-prepare the dataset.")


def _tfds_builder(spec: str, data_dir: str, setting: str):
    """(builder, label) of 'tfds:NAME' or a prepared directory."""
    tfds = _tfds()
    if spec.startswith(TFDS_PREFIX):
        name = spec[len(TFDS_PREFIX):]
        if not name:
            raise PromptDataError(f"{setting}={spec!r}: give the dataset name after 'tfds:', e.g. tfds:my_set.")
        from opdjax.data import builders

        builder = builders.shipped_builder(name, data_dir)  # prepared on first use
        if builder is None:
            try:
                builder = tfds.builder(name, data_dir=data_dir or None)
            except Exception as e:  # noqa: BLE001 -- DatasetNotFoundError and friends
                where = data_dir or "TFDS's default data_dir"
                raise PromptDataError(
                    f"{setting}={spec!r}: no prepared TFDS dataset {name!r} in {where} ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200]}). Prepare it with the prepare_data job (or tfds build) and "
                    "set data.data_dir to where it was written; nothing is downloaded here.") from None
            if not builder.is_prepared():
                raise PromptDataError(
                    f"{setting}={spec!r}: TFDS dataset {name!r} is not prepared in {builder.data_dir}; prepare it "
                    "with the prepare_data job and set data.data_dir; nothing is downloaded here.")
        return builder, name
    try:
        return tfds.builder_from_directory(spec), spec
    except Exception as e:  # noqa: BLE001
        raise PromptDataError(f"{setting}={spec!r}: not a readable TFDS dataset directory ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}).") from None


# -------------------------------------------------------------------------- ArrayRecord
class ArrayRecordSource(RecordSource):
    """ArrayRecord files read in order as one split (Grain's ArrayRecordDataSource)."""

    def __init__(self, files: Sequence[str]):
        import grain

        self.name, self.split = ",".join(files) if len(files) <= 3 else f"{files[0]} (+{len(files) - 1} files)", ""
        lengths = []
        try:
            self._source = grain.sources.ArrayRecordDataSource(list(files))
            for f in files:  # per-file lengths, to name the file of a bad record
                lengths.append(len(grain.sources.ArrayRecordDataSource([f])))
        except Exception as e:  # noqa: BLE001 -- a damaged footer fails at open
            bad = files[len(lengths)] if len(lengths) < len(files) else files[0]
            raise PromptDataError(f"ArrayRecord file {bad} cannot be opened ({type(e).__name__}: {e}); it is damaged "
                                  "or not an ArrayRecord file.") from None
        self._shards = _ShardedReader(files, lengths)
        self._length = len(self._source)

    def __len__(self):
        return self._length

    def where(self, i):
        f = self._shards.file_of(i)
        k = self._shards.files.index(f)
        return f"{f}:record {i - int(self._shards.offsets[k])}"

    def _get(self, i):
        try:
            raw = self._source[i]
        except Exception as e:  # noqa: BLE001
            raise PromptDataError(f"{self.where(i)}: unreadable ({type(e).__name__}: {e}); the file is damaged "
                                  "or truncated.") from None
        try:
            record = decode_array_record(raw)
        except Exception as e:  # noqa: BLE001
            raise PromptDataError(f"{self.where(i)}: neither a JSON object nor a tf.train.Example "
                                  f"({type(e).__name__}: {e}).") from None
        if not isinstance(record, dict):
            raise PromptDataError(f"{self.where(i)}: a JSON {type(record).__name__}, not an object.")
        return record


def _array_record_files(spec: str) -> list[str]:
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    files: list[str] = []
    for p in parts:
        if any(c in p for c in "*?["):
            found = sorted(os.fspath(f) for f in epath.Path(p).parent.glob(epath.Path(p).name)) if _is_remote(p) \
                else sorted(glob.glob(p))
            if not found:
                raise PromptDataError(f"No ArrayRecord file matches {p!r}; check the path.")
            files += found
        else:
            if not _path(p).exists():
                raise PromptDataError(f"ArrayRecord file {p} does not exist; check the path.")
            files.append(p)
    return files


# ------------------------------------------------------------------------------- splits
def split_setting_for(setting: str) -> str:
    """The config field holding the split of the source in `setting`: data.train_file ->
    data.train_split, eval.problems -> eval.split."""
    section, _, field = setting.rpartition(".")
    if field.endswith("_file"):
        return f"{section}.{field[:-5]}_split" if section else f"{field[:-5]}_split"
    return f"{section}.split" if section else "split"


def _pick_split(name: str, split: str, splits: Sequence[str], default_split: str, split_setting: str) -> str:
    """The split to read: the one given (it must exist), else the only one, else `default_split`.
    `split_setting` is the config field holding the split, named in the errors."""
    if split:
        if split not in splits:
            raise PromptDataError(f"{name} has splits {list(splits)}; there is no split {split!r}. Set "
                                  f"{split_setting} (split=) to one of them.")
        return split
    if len(splits) == 1:
        return splits[0]
    if default_split in splits:
        return default_split
    raise PromptDataError(f"{name} has splits {list(splits)} and no split was given (none is the only one, none "
                          f"is {default_split!r}). Set {split_setting} (split=) to the one to read.")


class Selection(RecordSource):
    """Records [from, to) of one or more split sources, concatenated (a TFDS split expression)."""

    def __init__(self, parts: Sequence[tuple[RecordSource, int, int]], name: str, split: str):
        self.name, self.split = name, split
        self._parts = list(parts)
        self._offsets = np.concatenate([[0], np.cumsum([b - a for _, a, b in parts])]).astype(np.int64)

    def __len__(self):
        return int(self._offsets[-1])

    def _locate(self, i):
        k = int(np.searchsorted(self._offsets, i, side="right") - 1)
        src, a, _ = self._parts[k]
        return src, a + i - int(self._offsets[k])

    def where(self, i):
        src, j = self._locate(i)
        return src.where(j)

    def _get(self, i):
        src, j = self._locate(i)
        return src[j]


_SPLIT_NAME = re.compile(r"^([\w\-]+)")


def select(spec: str, split: str, open_split, splits: Sequence[str], default_split: str, setting: str,
           label: str, *, labels: bool = False) -> RecordSource:
    """The records of `split` (TFDS split syntax) over a dataset whose splits are `splits`;
    `open_split(name)` opens one whole split. `labels`: a single file, whose one split any name
    labels; a dataset with named splits must have the split asked for. `setting` is the config
    field holding the split."""
    tfds = _tfds()
    split = split.strip()
    if not split:
        name = _pick_split(label, "", splits, default_split, setting)
        return open_split(name)
    try:
        instruction = tfds.core.ReadInstruction.from_spec(split)
    except (ValueError, AssertionError, AttributeError) as e:
        raise PromptDataError(f"{setting}={split!r} is not a TFDS split expression ({e}); write e.g. "
                              "'train', 'train[:90%]', 'train[100:200]' or 'train[:50%]+test'.") from None
    names = []
    for part in split.split("+"):
        m = _SPLIT_NAME.match(part.strip())
        if m and m.group(1) not in names:
            names.append(m.group(1))
    single = labels and len(splits) == 1
    for n in names:
        if not single and n not in splits:
            _pick_split(label, n, splits, default_split, setting)  # raises, naming the splits
    opened = {n: open_split(splits[0] if single else n) for n in names}
    lengths = {n: len(s) for n, s in opened.items()}
    infos = {n: types.SimpleNamespace(num_examples=k, shard_lengths=[k]) for n, k in lengths.items()}
    try:
        absolute = instruction.to_absolute(infos)
    except (ValueError, AssertionError) as e:
        raise PromptDataError(f"{label}: split {split!r} cannot be applied ({str(e).splitlines()[0]}).") from None
    parts = [(opened[a.splitname], a.from_ or 0, lengths[a.splitname] if a.to is None else a.to) for a in absolute]
    parts = [(s, a, b) for s, a, b in parts if b > a]
    if len(names) == 1 and split == names[0]:
        return opened[names[0]]
    return Selection(parts, label, split)


# ---------------------------------------------------------------------------------- entry
def source_kind(spec: str) -> str:
    """'tfds' | 'tfds_dir' | 'save_to_disk' | 'array_record' | 'jsonl' | 'parquet' for a spec."""
    if spec.startswith(TFDS_PREFIX):
        return "tfds"
    first = spec.split(",")[0].strip()
    if ".array_record" in first.rsplit("/", 1)[-1]:
        return "array_record"
    p = _path(first) if not any(c in first for c in "*?[") else None
    if p is not None and p.is_dir():
        # save_to_disk writes a dataset_info.json of its own too: its state.json / dataset_dict.json decide
        if (p / "state.json").exists() or (p / "dataset_dict.json").exists():
            return "save_to_disk"
        return "tfds_dir" if (p / "dataset_info.json").exists() else "save_to_disk"
    return _file_kind(first)[0]


def open_source(spec: str | os.PathLike, *, split: str = "", data_dir: str = "", default_split: str = "train",
                setting: str = "data.train_file", split_setting: str = "") -> RecordSource:
    """The records `spec` names (see the module docstring), `split` selected. Raises
    PromptDataError naming `setting` (the config field the spec came from; `split_setting` the one
    holding the split, default from `split_setting_for`) when it cannot be read, and when the
    selection is empty."""
    spec = os.fspath(spec).strip() if spec is not None else ""
    ss = split_setting or split_setting_for(setting)
    if spec and not spec.startswith(TFDS_PREFIX) and not _is_remote(spec):
        spec = ",".join(os.path.expanduser(part.strip()) for part in spec.split(","))  # "~/data/x.jsonl"
    if not spec:
        raise PromptDataError(f"{setting} is empty; give a .jsonl / .parquet / ArrayRecord file, a dataset "
                              "directory (TFDS or save_to_disk) or 'tfds:NAME'.")
    kind = source_kind(spec) if spec.startswith(TFDS_PREFIX) or "," in spec or any(
        c in spec for c in "*?[") or _path(spec).exists() else None  # a remote path is checked too
    if kind is None:
        raise PromptDataError(f"Problem file {spec} does not exist; check {setting}.")
    if kind in ("tfds", "tfds_dir"):
        builder, label = _tfds_builder(spec, data_dir, setting)
        splits = list(builder.info.splits.keys())
        src = select(spec, split, lambda n: TfdsSource(builder, n, label), splits, default_split, ss, label)
    elif kind == "save_to_disk":
        root = _path(spec)
        if (root / "dataset_dict.json").exists():
            try:
                splits = [str(s) for s in json.loads((root / "dataset_dict.json").read_text())["splits"]]
            except (ValueError, KeyError, TypeError) as e:
                raise PromptDataError(f"{root / 'dataset_dict.json'}: not a readable datasets DatasetDict index "
                                      f"({e}); re-save the dataset with save_to_disk.") from None
            src = select(spec, split, lambda n: ArrowDirSource(spec, n, default_split, setting), splits,
                         default_split, ss, spec)
        else:
            src = select(spec, split, lambda n: ArrowDirSource(spec, "", default_split, setting), ["train"],
                         default_split, ss, spec, labels=True)
    else:
        if kind == "array_record":
            files = _array_record_files(spec)
            whole = lambda n: ArrayRecordSource(files)  # noqa: E731
        else:
            if "," in spec or any(c in spec for c in "*?["):
                raise PromptDataError(f"{setting}={spec!r}: a glob or a comma list names ArrayRecord files only; give "
                                      "one JSONL / Parquet file (or prepare several into one TFDS dataset with "
                                      "prepare_data).")
            if kind == "parquet":
                whole = lambda n: ParquetSource(spec)  # noqa: E731
            else:
                gz = _file_kind(spec)[1]
                whole = lambda n: JsonlSource(spec, gz)  # noqa: E731
        src = select(spec, split, whole, ["train"], default_split, ss, spec, labels=True)
    if len(src) == 0:
        shown = f" split {split!r}" if split else ""
        raise PromptDataError(f"{getattr(src, 'name', spec) or spec}{shown} selects no records ({setting}, {ss}); "
                              "check the split expression or the file.")
    return src


def iter_records(spec, *, split: str = "", data_dir: str = "", default_split: str = "test",
                 setting: str = "data.problems"):
    """(where, record) for every selected record, in order: the whole-dataset readers (eval sets,
    DAIL problems) use this; the spec, kind and split are checked at the call."""
    src = open_source(spec, split=split, data_dir=data_dir, default_split=default_split, setting=setting)
    return ((src.where(i), src[i]) for i in range(len(src)))
