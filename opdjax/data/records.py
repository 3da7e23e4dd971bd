"""Reading problem records: the one place that turns a JSON Lines file, a Parquet file or a Hugging
Face `save_to_disk` directory into (where, record) pairs.

    for where, record in iter_records("problems.jsonl"):             # or .jsonl.gz / .parquet
        ...
    iter_records("saved_dataset_dir", split="test", setting="eval.problems")

Sources.
  - JSON Lines: `.jsonl`, `.ndjson`, `.json` holding one object per line, any of them gzipped
    (`.gz`). Blank lines are skipped (they are not records); every other line must be one JSON
    object. `where` is "file:line", the line 1-based as an editor counts.
  - Parquet: `.parquet`, `.pq` (needs pyarrow). `where` is "file:row N", N 0-based as
    pandas/pyarrow count.
  - A directory written by `datasets`' `save_to_disk`: a Dataset (`state.json` beside its `.arrow`
    shards; `split` is ignored) or a DatasetDict (`dataset_dict.json` and one sub-directory per
    split). The shards are read with pyarrow alone, so no `datasets` package is needed. `where` is
    "dir:row N" for a Dataset and "dir/split:row N" for a DatasetDict's split, N 0-based and
    counted across shards.

Split rule (DatasetDict only). An explicit `split` must be one of its splits. With `split=""`, a
DatasetDict with a single split reads it, else its "test" split if it has one; otherwise it is an
error listing the splits. Errors name `<section>.split`, the section being that of `setting`
(`setting="eval.problems"` -> eval.split).

Every error is a `PromptDataError` naming the file (and line or row) and what to do; `setting` is
the config field the path came from, named in the errors about the path itself.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

__all__ = ["PromptDataError", "PYARROW_PIN", "JSONL_SUFFIXES", "PARQUET_SUFFIXES", "iter_records",
           "iter_file_records", "describe_fields"]

PYARROW_PIN = "pyarrow==26.0.1"
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")

Records = Iterator[tuple[str, dict[str, Any]]]


class PromptDataError(ValueError):
    """A problem/prompt file, or one of its records, cannot be used as given."""


def describe_fields(record: dict[str, Any]) -> str:
    """The record's field names for an error message: "'a', 'b'" (or "none")."""
    return ", ".join(repr(k) for k in record) if record else "none"


# ---------------------------------------------------------------------------------------------
# Files: JSON Lines and Parquet

def _file_kind(path: Path) -> tuple[str, bool]:
    """('jsonl' | 'parquet', gzipped) from the file name."""
    suffixes = [s.lower() for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    last = suffixes[-2] if gz and len(suffixes) >= 2 else (suffixes[-1] if suffixes and not gz else "")
    if last in JSONL_SUFFIXES:
        return "jsonl", gz
    if last in PARQUET_SUFFIXES and not gz:
        return "parquet", False
    raise PromptDataError(
        f"File {path}: unsupported file type {''.join(path.suffixes) or '(no extension)'!r}. "
        f"Use JSON Lines ({', '.join(JSONL_SUFFIXES)}, optionally .gz) with one JSON object per "
        f"line, or Parquet ({', '.join(PARQUET_SUFFIXES)}).")


def _iter_jsonl(path: Path, gz: bool) -> Records:
    opener = gzip.open if gz else open
    with opener(path, "rt", encoding="utf-8") as f:
        try:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    if line_no == 1 and line.lstrip().startswith("["):
                        raise PromptDataError(
                            f"{where}: the file is a JSON array, not JSON Lines. Write one JSON "
                            "object per line, e.g. python -c \"import json,sys; [print(json.dumps(r)) "
                            "for r in json.load(open(sys.argv[1]))]\" in.json > out.jsonl") from None
                    raise PromptDataError(
                        f"{where}: invalid JSON ({e.msg} at column {e.colno}). Each line must be "
                        "one complete JSON object; fix or remove this line.") from None
                if not isinstance(record, dict):
                    raise PromptDataError(
                        f"{where}: the line is a JSON {type(record).__name__}, not an object. Each "
                        "line must be one JSON object.")
                yield where, record
        except UnicodeDecodeError as e:
            raise PromptDataError(f"File {path} is not UTF-8 text ({e}); re-encode it as "
                                  "UTF-8.") from None


def _iter_parquet(path: Path) -> Records:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PromptDataError(
            f"Reading the Parquet file {path} needs pyarrow, which is not installed: "
            f"pip install {PYARROW_PIN} (or convert the file to JSON Lines).") from None
    table = pq.read_table(path)
    for row, record in enumerate(table.to_pylist()):
        yield f"{path}:row {row}", record


def iter_file_records(path: str | os.PathLike) -> Records:
    """(where, record) for every record of a JSON Lines or Parquet file (chosen by its name). The
    caller has checked that the file exists; an unsupported name is an error right away."""
    path = Path(path)
    kind, gz = _file_kind(path)
    return _iter_parquet(path) if kind == "parquet" else _iter_jsonl(path, gz)


# ---------------------------------------------------------------------------------------------
# Hugging Face save_to_disk directories

def _split_setting(setting: str) -> str:
    section = setting.rpartition(".")[0]
    return f"{section}.split" if section else "split"


def _split_dir(path: Path, split: str, setting: str) -> Path:
    """The directory holding one Dataset's state.json and .arrow shards (see the split rule)."""
    dict_file = path / "dataset_dict.json"
    if not dict_file.is_file():
        return path
    try:
        splits = [str(s) for s in json.loads(dict_file.read_text(encoding="utf-8"))["splits"]]
    except (ValueError, KeyError, TypeError) as e:
        raise PromptDataError(f"{dict_file}: not a readable datasets DatasetDict index ({e}); "
                              "re-save the dataset with save_to_disk.") from None
    split_setting = _split_setting(setting)
    if split:
        if split not in splits:
            raise PromptDataError(
                f"Dataset directory {path} is a DatasetDict with splits {splits}; there is no split "
                f"{split!r}. Set {split_setting} (split=) to one of them.")
        return path / split
    if len(splits) == 1:
        return path / splits[0]
    if "test" in splits:
        return path / "test"
    raise PromptDataError(
        f"Dataset directory {path} is a DatasetDict with splits {splits} and no split was given "
        f"(none is the only one, none is 'test'). Set {split_setting} (split=) to the one to read.")


def _arrow_files(ds_dir: Path, setting: str) -> list[Path]:
    state_file = ds_dir / "state.json"
    if not state_file.is_file():
        raise PromptDataError(
            f"Directory {ds_dir} is not a dataset saved with Hugging Face datasets' save_to_disk (no "
            f"state.json or dataset_dict.json). {setting} must be a .jsonl / .jsonl.gz / .parquet "
            "file or a save_to_disk directory.")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        names = [f["filename"] for f in state["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise PromptDataError(f"{state_file}: cannot read its list of data files ({e}); re-save the "
                              "dataset with save_to_disk.") from None
    files = [ds_dir / n for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise PromptDataError(f"Dataset directory {ds_dir}: data file(s) {', '.join(missing)} named in "
                              "state.json are missing; copy the whole directory.")
    if state.get("_indices_data_files"):
        raise PromptDataError(f"Dataset directory {ds_dir} stores an indices mapping; re-save it with "
                              "ds.flatten_indices().save_to_disk(...).")
    return files


def _iter_arrow_rows(ds_dir: Path, files: Iterable[Path]) -> Records:
    import pyarrow as pa

    row = 0
    for f in files:
        with pa.memory_map(os.fspath(f)) as source:
            try:
                reader = pa.ipc.open_stream(source)  # what datasets writes
            except pa.ArrowInvalid:
                source.seek(0)
                try:
                    reader = pa.ipc.open_file(source)
                except pa.ArrowInvalid as e:
                    raise PromptDataError(f"{f}: not an Arrow IPC file ({e}).") from None
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = iter(reader)
            for batch in batches:
                for record in batch.to_pylist():
                    yield f"{ds_dir}:row {row}", record
                    row += 1


def _iter_dataset_dir(path: Path, split: str, setting: str) -> Records:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise PromptDataError(f"Reading the dataset directory {path} needs pyarrow, which is not "
                              f"installed: pip install {PYARROW_PIN}.") from None
    ds_dir = _split_dir(path, split, setting)
    return _iter_arrow_rows(ds_dir, _arrow_files(ds_dir, setting))


# ---------------------------------------------------------------------------------------------
# Any source

def iter_records(path: str | os.PathLike, *, split: str = "", setting: str = "data.problems") -> Records:
    """(where, record) for every record of a JSONL / Parquet file or a save_to_disk directory, in
    order (see the module docstring for `where` and the split rule). `setting` is the config field
    `path` came from, named in errors. The path, file type and split are checked here, at the
    call; the records are read (and a bad one raised) as they are iterated."""
    if not os.fspath(path):
        raise PromptDataError(f"{setting} is empty; give a .jsonl / .parquet file or a dataset "
                              "directory saved with save_to_disk.")
    path = Path(path)
    if not path.exists():
        raise PromptDataError(f"Problem file {path} does not exist; check {setting}.")
    if path.is_dir():
        return _iter_dataset_dir(path, split, setting)
    return iter_file_records(path)
