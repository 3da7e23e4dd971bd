"""Lazy reading and streaming writing of Hugging Face safetensors checkpoints.

Reading: `SafetensorsCheckpoint.open(ckpt_dir)` parses the headers only and memory-maps the
data, so `get(name)` returns a read-only zero-copy view. A caller placing a checkpoint bigger
than host memory onto devices slices that view per device, and only the touched pages are read.

Writing: `save_safetensors` writes `model.safetensors`, or shards plus the
`model.safetensors.index.json` that transformers writes, one tensor at a time.

We parse the format ourselves (8-byte little-endian header length, JSON header, raw data)
because `safetensors.numpy` cannot represent bfloat16; numpy gets bf16/fp8 from `ml_dtypes`,
which ships with jax. Assumes a little-endian host (every CPU that drives TPUs/GPUs is).
"""
from __future__ import annotations

import difflib
import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_FILE_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# The reference implementation refuses headers above 100 MB; a bigger length is corruption,
# and refusing it stops us from trying to read gigabytes of tensor data as JSON.
_MAX_HEADER_BYTES = 100_000_000

_DTYPE_OF_CODE = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODE_OF_DTYPE = {dtype: code for code, dtype in _DTYPE_OF_CODE.items()}


@dataclass(frozen=True)
class _TensorEntry:
    path: str  # file holding the tensor
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets into the file's data section (after the header)
    end: int


def _read_header(path: str) -> tuple[dict[str, _TensorEntry], int]:
    """Parses and validates one .safetensors header; returns its tensors and where data starts."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({file_size} bytes, no header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(file_size - 8, _MAX_HEADER_BYTES):
            raise ValueError(f"{path}: header length {header_len} exceeds the file ({file_size} bytes); "
                             "truncated or not a safetensors file")
        header_bytes = f.read(header_len)
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is a JSON {type(header).__name__}, expected an object")

    data_start = 8 + header_len
    data_len = file_size - data_start
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} needs dtype, shape and data_offsets [begin, end], "
                             f"got {info!r}") from None
        if code not in _DTYPE_OF_CODE:
            raise ValueError(f"{path}: tensor {name!r} has dtype {code!r}, which we do not support "
                             f"(supported: {', '.join(_DTYPE_OF_CODE)})")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError(f"{path}: tensor {name!r} has invalid shape {shape!r}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_len):
            raise ValueError(f"{path}: tensor {name!r} has data_offsets [{begin}, {end}] outside the "
                             f"{data_len}-byte data section (truncated file?)")
        dtype = _DTYPE_OF_CODE[code]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != nbytes:
            raise ValueError(f"{path}: tensor {name!r} spans {end - begin} bytes but {code}{shape} "
                             f"needs {nbytes}")
        entries[name] = _TensorEntry(path, dtype, tuple(shape), begin, end)

    # Overlapping tensors would alias each other's data: a corrupt (or hostile) file.
    # Gaps are tolerated: harmless to us, though the reference writer never leaves any.
    by_offset = sorted((e.begin, e.end, n) for n, e in entries.items() if e.end > e.begin)
    for (_, prev_end, prev_name), (begin, _, name) in zip(by_offset, by_offset[1:]):
        if begin < prev_end:
            raise ValueError(f"{path}: tensors {prev_name!r} and {name!r} overlap in the data section")
    return entries, data_start


class SafetensorsCheckpoint:
    """A single-file or sharded safetensors checkpoint, headers parsed and data memory-mapped."""

    def __init__(self, ckpt_dir: str, entries: dict[str, _TensorEntry], data_starts: dict[str, int]):
        self.ckpt_dir = ckpt_dir
        self._entries = entries
        self._data_starts = data_starts
        self._maps: dict[str, np.ndarray] = {}  # path -> uint8 view of its data section, mapped on first use
        self._names = sorted(entries)

    @classmethod
    def open(cls, ckpt_dir: str | os.PathLike) -> "SafetensorsCheckpoint":
        ckpt_dir = os.fspath(ckpt_dir)
        if not os.path.isdir(ckpt_dir):
            raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist "
                                    f"(expected a directory holding {SINGLE_FILE} or {INDEX_FILE})")
        single, index = os.path.join(ckpt_dir, SINGLE_FILE), os.path.join(ckpt_dir, INDEX_FILE)
        if os.path.isfile(single):  # transformers also prefers the single file when both exist
            entries, data_start = _read_header(single)
            return cls(ckpt_dir, entries, {single: data_start})
        if not os.path.isfile(index):
            raise FileNotFoundError(f"{ckpt_dir} holds neither {SINGLE_FILE} nor {INDEX_FILE}")

        with open(index, encoding="utf-8") as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index with a weight_map ({e!r})") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: weight_map is a {type(weight_map).__name__}, expected an object")
        names_of_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            names_of_shard.setdefault(shard, []).append(name)

        entries, data_starts = {}, {}
        for shard, names in sorted(names_of_shard.items()):
            path = os.path.join(ckpt_dir, shard)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{index} maps {len(names)} tensors (e.g. {names[0]!r}) to shard "
                                        f"{shard}, but {path} does not exist")
            shard_entries, data_starts[path] = _read_header(path)
            for name in names:
                if name not in shard_entries:
                    raise ValueError(f"{index} maps tensor {name!r} to {path}, but that shard's header "
                                     "does not contain it")
                entries[name] = shard_entries[name]
        return cls(ckpt_dir, entries, data_starts)

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, name: str) -> _TensorEntry:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._names, n=3, cutoff=0.5)
            raise KeyError(f"no tensor {name!r} in checkpoint {self.ckpt_dir}; "
                           f"closest names: {close or 'none'}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name).dtype

    def file_of(self, name: str) -> str:
        return self._entry(name).path

    def get(self, name: str) -> np.ndarray:
        """A read-only memmap view of the tensor: no bytes are read until it is indexed."""
        entry = self._entry(name)
        data = self._maps.get(entry.path)
        if data is None:
            start = self._data_starts[entry.path]
            if os.path.getsize(entry.path) > start:
                data = np.memmap(entry.path, dtype=np.uint8, mode="r", offset=start)
            else:  # mmap refuses zero-length maps; a file of empty tensors has nothing to map
                data = np.zeros(0, np.uint8)
            self._maps[entry.path] = data
        return data[entry.begin:entry.end].view(entry.dtype).reshape(entry.shape)


class LazyTensor(NamedTuple):
    """A tensor `save_safetensors` materializes only when it writes it (a plain 3-tuple works too).

    The header precedes all data, so shape and dtype must be known before `produce` runs.
    """
    shape: tuple[int, ...]
    dtype: Any  # anything np.dtype accepts, e.g. ml_dtypes.bfloat16
    produce: Callable[[], Any]  # returns an array (numpy, jax, ...) of that shape and dtype


def _spec_of(name: str, value: Any) -> tuple[tuple[int, ...], np.dtype]:
    shape, dtype = (value[0], value[1]) if isinstance(value, tuple) else (value.shape, value.dtype)
    dtype = np.dtype(dtype)
    if dtype.byteorder == ">":  # written little-endian; the conversion happens in _write_file
        dtype = dtype.newbyteorder("<")
    if dtype not in _CODE_OF_DTYPE:
        raise TypeError(f"tensor {name!r}: dtype {dtype} has no safetensors code")
    return tuple(int(d) for d in shape), dtype


def _write_file(path: str, specs: dict[str, tuple[tuple[int, ...], np.dtype]],
                tensors: Mapping[str, Any], metadata: dict[str, str] | None) -> None:
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (shape, dtype) in specs.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _CODE_OF_DTYPE[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the reference pads so data starts 8-aligned

    # Write to a temporary name so a crash never leaves a truncated file under the real name.
    tmp_path = path + ".tmp"
    with open(tmp_path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name, (shape, dtype) in specs.items():
            value = tensors[name]
            array = np.asarray(value[2]() if isinstance(value, tuple) else value)
            if array.shape != shape or np.dtype(array.dtype).newbyteorder("=") != dtype.newbyteorder("="):
                raise ValueError(f"tensor {name!r}: produced {array.dtype}{list(array.shape)}, "
                                 f"declared {dtype}{list(shape)}")
            # One tensor in memory at a time; copies only if not already C-contiguous little-endian.
            f.write(np.ascontiguousarray(array, dtype=dtype).reshape(-1).view(np.uint8).data)
            del array, value
    os.replace(tmp_path, path)


def save_safetensors(tensors: Mapping[str, Any], ckpt_dir: str | os.PathLike,
                     max_shard_bytes: int | None = None,
                     metadata: dict[str, str] | None = None) -> list[str]:
    """Writes `tensors` as a safetensors checkpoint in `ckpt_dir`; returns the paths written.

    `tensors` maps name -> array (numpy, ml_dtypes.bfloat16 numpy, jax, anything with shape and
    dtype that np.asarray accepts) or name -> LazyTensor(shape, dtype, produce) for tensors that
    should only exist while being written. Tensors are written in sorted-name order. When their
    total size exceeds `max_shard_bytes`, they are split greedily (a tensor never straddles two
    shards; one bigger than the limit gets its own) into model-0000i-of-0000N.safetensors plus
    model.safetensors.index.json, as transformers' save_pretrained does. `metadata` (str -> str)
    goes into every file's `__metadata__`; it defaults to {"format": "pt"}, which transformers
    expects.
    """
    ckpt_dir = os.fspath(ckpt_dir)
    metadata = {"format": "pt"} if metadata is None else metadata
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError(f"safetensors metadata must map str to str, got {metadata!r}")
    specs = {name: _spec_of(name, tensors[name]) for name in sorted(tensors)}
    nbytes = {n: int(np.prod(s, dtype=np.int64)) * d.itemsize for n, (s, d) in specs.items()}

    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name in specs:
        if shards[-1] and max_shard_bytes is not None and shard_bytes + nbytes[name] > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += nbytes[name]
    if len(shards) == 1:
        filenames = [SINGLE_FILE]
    else:
        filenames = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]

    os.makedirs(ckpt_dir, exist_ok=True)
    written = []
    for filename, names in zip(filenames, shards):
        path = os.path.join(ckpt_dir, filename)
        _write_file(path, {n: specs[n] for n in names}, tensors, metadata)
        written.append(path)
    if len(shards) > 1:
        index = {
            # total_parameters is what transformers 5 adds next to total_size.
            "metadata": {"total_parameters": sum(int(np.prod(s, dtype=np.int64)) for s, _ in specs.values()),
                         "total_size": sum(nbytes.values())},
            "weight_map": {name: filename for filename, names in zip(filenames, shards) for name in names},
        }
        path = os.path.join(ckpt_dir, INDEX_FILE)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")  # byte-identical to transformers
        os.replace(path + ".tmp", path)
        written.append(path)

    # Remove what an earlier save left: a stale model.safetensors would shadow a new index, and
    # stale shards would confuse anyone globbing the directory. Done last, after the new files exist.
    keep = {os.path.basename(p) for p in written}
    for filename in os.listdir(ckpt_dir):
        stale = filename in (SINGLE_FILE, INDEX_FILE) or _SHARD_FILE_RE.fullmatch(filename)
        if stale and filename not in keep:
            os.remove(os.path.join(ckpt_dir, filename))
    return written
