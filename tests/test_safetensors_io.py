"""Tests for opdjax.models.safetensors_io, with the official safetensors/huggingface_hub as oracles."""
import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch
from huggingface_hub import load_torch_model

from opdjax.models.safetensors_io import (INDEX_FILE, SINGLE_FILE, LazyTensor, SafetensorsCheckpoint,
                                          save_safetensors)

BF16 = ml_dtypes.bfloat16


def mixed_tensors(seed=0):
    rng = np.random.default_rng(seed)
    # bf16 with the bit patterns a careless conversion would mangle: NaN, +-inf, -0, subnormal.
    specials = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-40, 3.0], np.float32).astype(BF16)
    return {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "bf16": np.concatenate([rng.standard_normal(10).astype(BF16), specials]).reshape(4, 4),
        "f16": rng.standard_normal((2, 3, 4)).astype(np.float16),
        "f64": rng.standard_normal(7),
        "i64": rng.integers(-2**62, 2**62, (4,), dtype=np.int64),
        "i32": rng.integers(-2**31, 2**31 - 1, (2, 2), dtype=np.int32),
        "i8": rng.integers(-128, 127, (9,), dtype=np.int8),
        "u8": rng.integers(0, 255, (3, 3), dtype=np.uint8),
        "bool": rng.random((5,)) > 0.5,
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }


def assert_bit_exact(expected, actual):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if expected.dtype == BF16:  # bf16 == would treat NaN != NaN and -0 == 0; compare the bits
        np.testing.assert_array_equal(actual.view(np.uint16), expected.view(np.uint16))
    else:
        assert np.ascontiguousarray(actual).tobytes() == np.ascontiguousarray(expected).tobytes()


def write_raw(path, header, data=b""):
    """Writes a safetensors file with an arbitrary (possibly invalid) header."""
    header_bytes = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)) + header_bytes + data)


def test_round_trip_is_bit_exact(tmp_path):
    tensors = mixed_tensors()
    [path] = save_safetensors(tensors, tmp_path)
    assert os.path.basename(path) == SINGLE_FILE
    ckpt = SafetensorsCheckpoint.open(tmp_path)
    assert ckpt.names() == sorted(tensors) and len(ckpt) == len(tensors)
    for name, expected in tensors.items():
        assert name in ckpt and ckpt.file_of(name) == path
        assert ckpt.shape(name) == expected.shape and ckpt.dtype(name) == expected.dtype
        assert_bit_exact(expected, ckpt.get(name))
    assert ckpt.dtype("bf16") == np.dtype(BF16)


def test_written_layout_matches_reference(tmp_path):
    tensors = {"b": np.ones(3, np.float32), "a": np.arange(4, dtype=np.int16)}
    save_safetensors(tensors, tmp_path)
    raw = (tmp_path / SINGLE_FILE).read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert header_len % 8 == 0 and (8 + header_len) % 8 == 0
    header = json.loads(raw[8:8 + header_len])
    assert header["__metadata__"] == {"format": "pt"}
    # Sorted-name order, contiguous, little-endian.
    assert header["a"]["data_offsets"] == [0, 8] and header["b"]["data_offsets"] == [8, 20]
    assert raw[8 + header_len:] == np.arange(4, dtype="<i2").tobytes() + np.ones(3, "<f4").tobytes()


def test_our_files_load_with_official_safetensors(tmp_path):
    tensors = mixed_tensors()
    save_safetensors(tensors, tmp_path)
    loaded = safetensors.torch.load_file(tmp_path / SINGLE_FILE)
    assert sorted(loaded) == sorted(tensors)
    for name, expected in tensors.items():
        got = loaded[name]
        if expected.dtype == BF16:
            assert got.dtype == torch.bfloat16
            np.testing.assert_array_equal(got.float().numpy(), expected.astype(np.float32))
        else:
            np.testing.assert_array_equal(got.numpy(), expected)
            assert got.numpy().dtype == expected.dtype


def test_official_files_read_bit_exact(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "bf16": torch.randn(6, 5).to(torch.bfloat16),
        "f16": torch.randn(4).to(torch.float16),
        "f32": torch.randn(2, 3, 2),
        "i64": torch.arange(-5, 5, dtype=torch.int64),
        "bool": torch.tensor([True, False, True]),
        "fp8": torch.randn(8).to(torch.float8_e4m3fn),
    }
    tmp_path.joinpath("ckpt").mkdir()
    safetensors.torch.save_file(tensors, tmp_path / "ckpt" / SINGLE_FILE, metadata={"format": "pt"})
    ckpt = SafetensorsCheckpoint.open(tmp_path / "ckpt")
    assert ckpt.names() == sorted(tensors)
    for name, t in tensors.items():
        got = ckpt.get(name)
        assert got.shape == tuple(t.shape)
        if t.dtype in (torch.bfloat16, torch.float16):
            np.testing.assert_array_equal(got.view(np.int16), t.view(torch.int16).numpy())
        elif t.dtype == torch.float8_e4m3fn:
            assert got.dtype == ml_dtypes.float8_e4m3fn
            np.testing.assert_array_equal(got.view(np.int8), t.view(torch.int8).numpy())
        else:
            assert got.dtype == t.numpy().dtype
            assert got.tobytes() == t.numpy().tobytes()
    assert ckpt.dtype("bf16") == np.dtype(BF16)


def test_sharded_write_matches_transformers_index(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    rng = np.random.default_rng(1)
    tensors = {name: rng.standard_normal(tuple(p.shape)).astype(np.float32)
               for name, p in model.state_dict().items()}
    total = sum(t.nbytes for t in tensors.values())
    limit = 300  # "0.weight" alone is 512 bytes: it must get a shard of its own
    written = save_safetensors(tensors, tmp_path, max_shard_bytes=limit)

    assert not (tmp_path / SINGLE_FILE).exists()
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert set(index) == {"metadata", "weight_map"}
    assert index["metadata"]["total_size"] == total
    assert index["metadata"]["total_parameters"] == sum(t.size for t in tensors.values())
    assert sorted(index["weight_map"]) == sorted(tensors)
    shard_files = sorted(set(index["weight_map"].values()))
    n = len(shard_files)
    assert n > 1 and shard_files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(map(os.path.basename, written)) == sorted(shard_files + [INDEX_FILE])
    for shard in shard_files:
        in_shard = safetensors.torch.load_file(tmp_path / shard)
        assert sorted(in_shard) == sorted(k for k, v in index["weight_map"].items() if v == shard)
        size = sum(tensors[k].nbytes for k in in_shard)
        assert size <= limit or len(in_shard) == 1

    # huggingface_hub's loader (what transformers relies on) follows our index and fills the model.
    load_torch_model(model, tmp_path, strict=True)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), tensors[name])

    ckpt = SafetensorsCheckpoint.open(tmp_path)
    assert ckpt.names() == sorted(tensors)
    for name, expected in tensors.items():
        assert os.path.basename(ckpt.file_of(name)) == index["weight_map"][name]
        assert_bit_exact(expected, ckpt.get(name))


def test_resaving_removes_stale_layout(tmp_path):
    big = {f"w{i}": np.full((16,), i, np.float32) for i in range(4)}
    save_safetensors({"old": np.zeros(2, np.float32)}, tmp_path)
    save_safetensors(big, tmp_path, max_shard_bytes=64)
    # A leftover model.safetensors would shadow the new index.
    assert not (tmp_path / SINGLE_FILE).exists()
    assert SafetensorsCheckpoint.open(tmp_path).names() == sorted(big)

    save_safetensors({"new": np.ones(2, np.float32)}, tmp_path)
    assert sorted(os.listdir(tmp_path)) == [SINGLE_FILE]
    assert SafetensorsCheckpoint.open(tmp_path).names() == ["new"]


def test_lazy_tensors_are_produced_only_while_writing(tmp_path):
    produced = []

    def producer(name, value):
        def produce():
            produced.append(name)
            return value
        return produce

    values = {"a": np.arange(6, dtype=np.float32).reshape(2, 3).astype(BF16), "b": np.arange(3, dtype=np.int32)}
    lazy = {"a": LazyTensor((2, 3), BF16, producer("a", values["a"])),
            "b": ((3,), np.int32, producer("b", values["b"]))}  # a plain tuple works too
    save_safetensors(lazy, tmp_path, max_shard_bytes=12)
    assert produced == ["a", "b"]  # once each, in write order
    ckpt = SafetensorsCheckpoint.open(tmp_path)
    for name, expected in values.items():
        assert_bit_exact(expected, ckpt.get(name))

    wrong = {"a": LazyTensor((2, 3), np.float32, lambda: np.zeros((3, 2), np.float32))}
    with pytest.raises(ValueError, match="'a'.*declared"):
        save_safetensors(wrong, tmp_path / "wrong")


def test_get_is_a_read_only_zero_copy_view(tmp_path):
    weight = np.arange(48, dtype=np.float32).reshape(6, 8)
    save_safetensors({"pad": np.zeros(3, np.int8), "w": weight}, tmp_path)
    ckpt = SafetensorsCheckpoint.open(tmp_path)
    w = ckpt.get("w")
    assert isinstance(w, np.memmap) and not w.flags.writeable
    assert np.shares_memory(w, ckpt.get("w"))  # both views of the same mapping, nothing copied
    block = w[2:4, 1::3]  # what a caller does to place one device's shard
    assert np.shares_memory(block, w)
    np.testing.assert_array_equal(block, weight[2:4, 1::3])
    with pytest.raises(ValueError):
        w[0, 0] = 1.0


def test_missing_paths_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        SafetensorsCheckpoint.open(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=f"{SINGLE_FILE}.*{INDEX_FILE}"):
        SafetensorsCheckpoint.open(tmp_path)


def test_index_naming_missing_shard(tmp_path):
    save_safetensors({f"w{i}": np.zeros(8, np.float32) for i in range(3)}, tmp_path, max_shard_bytes=32)
    os.remove(tmp_path / "model-00002-of-00003.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        SafetensorsCheckpoint.open(tmp_path)


def test_index_naming_tensor_absent_from_shard(tmp_path):
    save_safetensors({f"w{i}": np.zeros(8, np.float32) for i in range(2)}, tmp_path, max_shard_bytes=32)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="'ghost'.*model-00001-of-00002.safetensors"):
        SafetensorsCheckpoint.open(tmp_path)


@pytest.mark.parametrize("corruption, message", [
    ("truncated_data", "outside"),
    ("truncated_header", "header length"),
    ("too_short", "truncated"),
    ("not_json", "JSON"),
    ("overlap", "overlap"),
    ("size_mismatch", "needs 16"),
    ("unknown_dtype", "'F4'"),
])
def test_corrupt_file_raises_naming_it(tmp_path, corruption, message):
    path = tmp_path / SINGLE_FILE
    if corruption.startswith("truncated") or corruption == "too_short":
        save_safetensors({"w": np.zeros(16, np.float32)}, tmp_path)
        raw = path.read_bytes()
        keep = {"truncated_data": len(raw) - 4, "truncated_header": 20, "too_short": 5}[corruption]
        path.write_bytes(raw[:keep])
    elif corruption == "not_json":
        path.write_bytes(struct.pack("<Q", 4) + b"{no}")
    else:
        header = {
            "overlap": {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}},
            "size_mismatch": {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}},
            "unknown_dtype": {"a": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}},
        }[corruption]
        write_raw(path, header, bytes(24))
    with pytest.raises(ValueError, match=message) as error:
        SafetensorsCheckpoint.open(tmp_path)
    assert str(path) in str(error.value)


def test_unknown_name_suggests_closest(tmp_path):
    save_safetensors({"model.layers.0.mlp.up_proj.weight": np.zeros(2, np.float32),
                      "model.embed_tokens.weight": np.zeros(2, np.float32)}, tmp_path)
    ckpt = SafetensorsCheckpoint.open(tmp_path)
    with pytest.raises(KeyError, match=r"closest names: \['model\.layers\.0\.mlp\.up_proj\.weight'") as error:
        ckpt.get("model.layers.0.mlp.up_proj.weights")
    assert str(tmp_path) in str(error.value)
