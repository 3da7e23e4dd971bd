"""Records -> a prepared TFDS dataset (array_record), and the builders of the data we ship.

    prepare({"train": records, "test": more}, name="my_problems", data_dir="gs://bucket/tfds")
    shipped_builder("opdjax_toy_arithmetic/seed0", data_dir)   # prepared on first use

Features are read off the records (every split, every record), so nothing is dropped:
  str -> Text; int -> int64; float (or int and float) -> float; bool -> bool;
  list of str -> Sequence(Text); list of int -> Sequence(int64); list of float -> list of float;
  (a float, or a list of them, is stored as Text holding its JSON: a tf.train.Example holds float32
  only, and 3.14 must read back as 3.14, not 3.140000104904175);
  a field mixing text and numbers -> Text (a number kept as its text, e.g. 32 -> "32");
  a field mixing str and list of str -> Sequence(Text) (a str as a one-element list);
  dicts, nested lists, mixed lists -> Text holding its JSON, decoded again on read.
A field that is null or missing in some records reads back as None: a text field stores "" for
null ("" and null are the same thing afterwards); a number, bool or list field is stored as JSON
text ("" for null), so 3 reads back as 3, not "3". The dataset keeps the records' order (no TFDS
shuffling) with keys 0..n-1, so record i of the prepared split is record i of the input.

metadata.json (TFDS's MetadataDict, beside dataset_info.json, which holds the record and byte
counts per shard) carries under "opdjax": the features rule applied (`json_fields`,
`nullable_fields`), where each split came from with the SHA-256 of its source file, and the SHA-256
of every shard written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Any, Iterable, Mapping

import numpy as np
from etils import epath

from opdjax.data.sources import PromptDataError
from opdjax.toy import arithmetic
from opdjax.toy import dail_problems
from opdjax import multihost

log = logging.getLogger(__name__)

__all__ = ["prepare", "infer_features", "shipped_builder", "SHIPPED", "opdjax_meta", "decode_record"]

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
VERSION = "1.0.0"


# ---------------------------------------------------------------------------------- features
def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)):
        inner = {_kind(v) for v in value}
        if not inner:
            return "list"
        if inner <= {"int"}:
            return "list_int"
        if inner <= {"int", "float"}:
            return "list_float"
        if inner == {"str"}:
            return "list_str"
        return "json"
    return "json"


def _feature_rule(field: str, kinds: set[str]) -> tuple[str, bool]:
    """(storage, nullable): storage one of text|int|float|bool|seq_text|seq_int|seq_float|json."""
    nullable = "null" in kinds
    kinds = kinds - {"null"}
    if "list" in kinds:  # an empty list fits any list kind
        kinds = (kinds - {"list"}) or {"list_int"}
    if not kinds:
        return "text", True
    if "json" in kinds or (kinds & {"list_int", "list_float", "list_str"} and kinds - {"list_int", "list_float",
                                                                                       "list_str", "str"}):
        return "json", nullable
    if nullable and kinds & {"list_int", "list_float", "list_str"}:
        return "json", True  # a Sequence has no null: Text holding JSON, "" for null (read back as None)
    if kinds <= {"list_str", "str"} and "list_str" in kinds:
        return "seq_text", nullable
    if kinds <= {"list_int"}:
        return "seq_int", nullable
    if kinds <= {"list_int", "list_float"}:
        return "seq_float", nullable
    if kinds & {"list_str", "list_int", "list_float"}:
        return "json", nullable
    if "str" in kinds:  # text, or text mixed with numbers (kept as their text)
        return "text", nullable
    if nullable:  # a number or bool that is null somewhere: JSON text, so 3 reads back as 3, null as None
        return "json", True
    if kinds == {"bool"}:
        return "bool", False
    if kinds <= {"int"}:
        return "int", False
    if kinds <= {"int", "float"}:
        return "float", False
    return "text", nullable  # bool mixed with numbers: kept as text


def infer_features(splits: Mapping[str, list[dict]]) -> dict[str, tuple[str, bool]]:
    """{field: (storage, nullable)} over every record of every split (module doc)."""
    kinds: dict[str, set[str]] = {}
    total = 0
    for records in splits.values():
        for r in records:
            total += 1
            for k, v in r.items():
                kinds.setdefault(k, set()).add(_kind(v))
    counts = {k: 0 for k in kinds}
    for records in splits.values():
        for r in records:
            for k in r:
                counts[k] += 1
    out = {}
    for field, ks in kinds.items():
        if counts[field] < total:
            ks = ks | {"null"}  # missing in some records: null there
        out[field] = _feature_rule(field, ks)
    return out


def _tfds_features(spec: Mapping[str, tuple[str, bool]]):
    import tensorflow_datasets as tfds

    f = tfds.features
    make = {"text": f.Text, "json": f.Text, "int": lambda: np.int64, "float": f.Text,  # floats: JSON text
            "bool": lambda: np.bool_, "seq_text": lambda: f.Sequence(f.Text()),
            "seq_int": lambda: f.Sequence(np.int64), "seq_float": f.Text}
    return f.FeaturesDict({k: make[storage]() if storage in ("text", "json") else make[storage]()
                           for k, (storage, _) in sorted(spec.items())})


def _encode_value(value, storage: str, nullable: bool, where: str, field: str):
    if value is None:
        if storage in ("seq_text", "seq_int", "seq_float"):
            return []
        return ""
    if storage == "json":
        return json.dumps(value, ensure_ascii=False)
    if storage == "text":
        return value if isinstance(value, str) else str(value)
    if storage == "seq_text":
        return [value] if isinstance(value, str) else list(value)
    if storage == "seq_float":
        return json.dumps([float(v) for v in value])
    if storage == "seq_int":
        return list(value)
    if storage == "float":
        return json.dumps(float(value))
    return value


def encode_record(record: dict, spec: Mapping[str, tuple[str, bool]], where: str) -> dict:
    return {k: _encode_value(record.get(k), storage, nullable, where, k) for k, (storage, nullable) in spec.items()}


def decode_record(record: dict, meta: Mapping[str, Any]) -> dict:
    """A TFDS record as the input record was: JSON fields parsed, "" of a nullable field -> None."""
    if not meta:
        return record
    for k in meta.get("json_fields", ()):
        if k in record and isinstance(record[k], str):
            record[k] = json.loads(record[k]) if record[k] else None
    for k in meta.get("nullable_fields", ()):
        if record.get(k) in ("", []) and k not in meta.get("json_fields", ()):
            if meta.get("storage", {}).get(k) in ("text", None):
                record[k] = None
    return record


def opdjax_meta(dataset_dir: str) -> dict:
    """The "opdjax" block of a prepared dataset's metadata.json ({} for a foreign dataset)."""
    p = epath.Path(dataset_dir) / "metadata.json"
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text()).get("opdjax", {})
    except (ValueError, AttributeError):
        return {}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_data_dir(data_dir: str = "") -> str:
    """`data_dir`, or TFDS's default: $TFDS_DATA_DIR, else ~/tensorflow_datasets (read now, not at import)."""
    from tensorflow_datasets.core import constants

    data_dir = data_dir or constants.get_default_data_dir()
    return data_dir if "://" in data_dir else os.path.expanduser(data_dir)  # "~/tfds" from a config flag


# ---------------------------------------------------------------------------------- builder
def _builder_class(name: str, version: str, description: str, features_spec, splits: Mapping[str, list[dict]],
                   wheres: Mapping[str, list[str]], meta: dict, config=None):
    import tensorflow_datasets as tfds

    def _info(self):
        # disable_shuffling is read from the DatasetInfo (a class attribute alone is ignored)
        return tfds.core.DatasetInfo(builder=self, description=description, features=_tfds_features(features_spec),
                                     metadata=tfds.core.MetadataDict({"opdjax": meta}), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(s) for s in splits}

    def _generate_examples(self, split):
        for i, (r, where) in enumerate(zip(splits[split], wheres[split])):
            yield i, encode_record(r, features_spec, where)

    attrs = {"name": name, "VERSION": tfds.core.Version(version), "disable_shuffling": True,
             "_info": _info, "_split_generators": _split_generators, "_generate_examples": _generate_examples,
             "__module__": __name__}
    if config is not None:
        attrs["BUILDER_CONFIGS"] = [config]
    return type(f"Prepared_{name}", (tfds.core.GeneratorBasedBuilder,), attrs, skip_registration=True)


def prepare(splits: Mapping[str, Iterable], *, name: str, data_dir: str, version: str = VERSION,
            description: str = "", sources: Mapping[str, str] | None = None, config: str | None = None,
            overwrite: bool = False) -> str:
    """Write `splits` ({split: records or (where, record) pairs}) as the TFDS dataset `name` under
    `data_dir` (array_record) and return its directory. An existing prepared version is an error
    unless `overwrite`."""
    import tensorflow_datasets as tfds

    if not _NAME.match(name):
        raise PromptDataError(f"prepare.name={name!r}: a TFDS dataset name is lower_snake_case (letters, digits, "
                              "underscores, starting with a letter).")
    records, wheres = {}, {}
    for split, items in splits.items():
        rs, ws = [], []
        for n, item in enumerate(items):
            where, r = item if isinstance(item, tuple) else (f"{split} record {n}", item)
            if not isinstance(r, dict):
                raise PromptDataError(f"{where}: a {type(r).__name__}, not a record (an object of fields).")
            rs.append(r)
            ws.append(where)
        if not rs:
            raise PromptDataError(f"prepare: split {split!r} has no records; nothing to write.")
        records[split], wheres[split] = rs, ws
    spec = infer_features(records)
    meta = {"storage": {k: s for k, (s, _) in spec.items()},
            "json_fields": sorted(k for k, (s, _) in spec.items() if s in ("json", "float", "seq_float")),
            "nullable_fields": sorted(k for k, (_, n) in spec.items() if n),
            "records": {s: len(r) for s, r in records.items()},
            "sources": {s: {"from": src, "sha256": _sha256(src) if src and epath.Path(src).is_file() else None}
                        for s, src in (sources or {}).items()}}
    cfg = tfds.core.BuilderConfig(name=config) if config else None
    cls = _builder_class(name, version, description or f"{name}: records prepared by opdjax", spec, records, wheres,
                         meta, cfg)
    builder = cls(data_dir=data_dir or None, file_format="array_record", config=config)
    out = os.fspath(builder.data_dir)
    if builder.is_prepared():
        if not overwrite:
            raise PromptDataError(f"{out} already holds a prepared {name} {version}; give another prepare.version, "
                                  "delete it, or set prepare.overwrite=True.")
        epath.Path(out).rmtree()
        builder = cls(data_dir=data_dir or None, file_format="array_record", config=config)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
    _record_shard_checksums(builder)
    return out


def _record_shard_checksums(builder) -> None:
    d = epath.Path(builder.data_dir)
    meta_file = d / "metadata.json"
    data = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    block = data.setdefault("opdjax", {})
    block["shards"] = {os.path.basename(os.fspath(f)): _sha256(os.fspath(f))
                       for s in builder.info.splits.values() for f in s.filepaths}
    meta_file.write_text(json.dumps(data, indent=1))


# --------------------------------------------------------------------------- shipped data
def _toy_arithmetic(seed: int):

    def fields(p):
        return {"prompt": p["prompt"], "answer": str(p["answer"]), "solution": p["solution"],
                "values": [int(v) for v in p["values"]], "steps": list(p["steps"])}
    return {"train": [fields(p) for p in arithmetic.make_problems(TOY_TRAIN, seed, "train")],
            "eval": [fields(p) for p in arithmetic.make_problems(TOY_EVAL, seed, "eval")]}


def _word_problems(seed: int):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "prompts",
                        "word_problems.jsonl")
    with open(path, encoding="utf-8") as f:
        return {"train": [json.loads(line) for line in f if line.strip()]}


def _dail_toy(seed: int):

    return {"train": dail_problems.demo_records(DAIL_TRAIN, seed, "train"), "eval": dail_problems.demo_records(DAIL_EVAL, seed, "eval")}


TOY_TRAIN, TOY_EVAL = 8192, 1024  # make_problems(n) is a prefix of make_problems(N): slice train[:n]
DAIL_TRAIN, DAIL_EVAL = 1024, 1024

# name -> (records of a seed, description, has a seed config)
SHIPPED = {
    "opdjax_toy_arithmetic": (_toy_arithmetic, "Multi-step arithmetic problems of the embedded toy pair "
                                               "(opdjax.toy.arithmetic): prompt, answer, worked solution.", True),
    "opdjax_word_problems": (_word_problems, "24 short word problems with numeric answers "
                                             "(opdjax/assets/prompts/word_problems.jsonl).", False),
    "opdjax_dail_toy": (_dail_toy, "DAIL toy problems: arithmetic problems with terse expert solutions "
                                   "(opdjax.toy.dail_problems.demo_records).", True),
}


def _parse_name(name: str) -> tuple[str, str | None, str | None]:
    version = None
    if ":" in name:
        name, version = name.split(":", 1)
    base, _, config = name.partition("/")
    return base, config or None, version


def shipped_builder(name: str, data_dir: str):
    """The TFDS builder of a shipped dataset ('opdjax_toy_arithmetic/seed0'), prepared under
    `data_dir` if it is not yet; None for any other name. On a pod process 0 prepares first; a
    process that then cannot see it (a data_dir not shared) prepares its own identical copy."""
    import tensorflow_datasets as tfds


    base, config, version = _parse_name(name)
    if base not in SHIPPED:
        return None
    make, description, seeded = SHIPPED[base]
    if seeded:
        m = re.fullmatch(r"seed(\d+)", config or "seed0")
        if not m:
            raise PromptDataError(f"tfds:{name}: the shipped dataset {base} has configs seed0, seed1, ...; got "
                                  f"{config!r}.")
        seed, config = int(m.group(1)), config or "seed0"
    else:
        if config:
            raise PromptDataError(f"tfds:{name}: the shipped dataset {base} has no configs.")
        seed = 0
    if version not in (None, VERSION):
        raise PromptDataError(f"tfds:{name}: the shipped dataset {base} has version {VERSION} only.")
    data_dir = default_data_dir(data_dir)
    from opdjax.data.sources import _is_remote  # noqa: PLC0415 -- one helper, same package

    def built_dir() -> str:
        parts = [data_dir, base] + ([config] if config else []) + [VERSION]
        return "/".join(parts) if _is_remote(data_dir) else os.path.join(*parts)

    def ensure():
        if not (epath.Path(built_dir()) / "dataset_info.json").exists():
            log.info("preparing the shipped dataset %s in %s", name, data_dir)
            prepare(make(seed), name=base, data_dir=data_dir, description=description, config=config)

    def attempt(writer: bool):
        """ensure() on the processes whose turn it is; a failure is raised on every process."""
        error = None
        if multihost.is_writer() == writer:
            try:
                ensure()
            except Exception as e:  # noqa: BLE001 -- shared below so no process waits alone
                error = e
        multihost.raise_if_any_failed(error, f"preparing {name}")

    attempt(writer=True)  # process 0 first; then a process that cannot see it (data_dir not shared)
    attempt(writer=False)  # prepares its own identical copy
    return tfds.builder_from_directory(built_dir())
