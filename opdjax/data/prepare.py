"""The `prepare_data` job: records from any source -> a TFDS dataset directory (array_record), so
that a pod reads its prompts / problems / traces from GCS with TFDS and Grain.

    python launch/tpu_run.py --config configs/prepare_data.py \
        --config.prepare.name=my_problems \
        --config.prepare.splits="train=problems.jsonl;test=eval.parquet" \
        --config.prepare.data_dir=gs://my-bucket/tensorflow_datasets
    # then: data.train_file="tfds:my_problems", data.data_dir="gs://my-bucket/tensorflow_datasets"
    python launch/tpu_run.py --config configs/prepare_data.py --config.prepare.shipped=opdjax_dail_toy

Sources are whatever `opdjax.data.sources` opens (JSONL/Parquet/save_to_disk/TFDS/ArrayRecord, local
or gs://); `prepare.source_split` selects inside each (TFDS split syntax). Every field of every
record is kept, its feature type read off the records (`opdjax.data.builders`). The dataset records
its counts (dataset_info.json) and the SHA-256 of each source file and each written shard
(metadata.json). On a pod process 0 writes; the others wait for it.
"""
from __future__ import annotations

import functools
import json
import logging
import os

from opdjax import multihost
from opdjax.data import builders
from opdjax.data.sources import PromptDataError, open_source

log = logging.getLogger(__name__)


def parse_splits(text: str) -> list[tuple[str, str]]:
    """"train=a.jsonl;test=b.parquet" -> [("train", "a.jsonl"), ("test", "b.parquet")]."""
    out = []
    for part in (p.strip() for p in text.split(";") if p.strip()):
        split, eq, spec = part.partition("=")
        if not eq or not split.strip() or not spec.strip():
            raise PromptDataError(f"config.prepare.splits: {part!r} is not split=source; write e.g. "
                                  "\"train=problems.jsonl;test=eval.jsonl\".")
        out.append((split.strip(), spec.strip()))
    names = [s for s, _ in out]
    if len(set(names)) != len(names):
        raise PromptDataError(f"config.prepare.splits names a split twice: {names}.")
    return out


def _pairs(src):
    return ((src.where(i), src[i]) for i in range(len(src)))


def run(config) -> dict:
    p = config.prepare
    data_dir = builders.default_data_dir(p.data_dir)
    if p.shipped:
        if p.shipped not in builders.SHIPPED:
            raise PromptDataError(f"config.prepare.shipped={p.shipped!r}: shipped datasets are "
                                  f"{', '.join(sorted(builders.SHIPPED))}.")
        seeded = builders.SHIPPED[p.shipped][2]
        name = f"{p.shipped}/seed{int(p.seed)}" if seeded else p.shipped
        builder = builders.shipped_builder(name, data_dir)
        out = os.fspath(builder.data_dir)
    else:
        if not p.name:
            raise PromptDataError("config.prepare.name is empty: give the TFDS dataset name to write "
                                  "(lower_snake_case), or prepare.shipped for a shipped dataset.")
        splits = parse_splits(p.splits)
        if not splits:
            raise PromptDataError("config.prepare.splits is empty; give e.g. \"train=problems.jsonl;test=eval.jsonl\".")
        out = None
        # Every process opens the sources, one after the other (a shipped tfds: source is prepared
        # collectively; a failure on any process is raised on all); process 0 writes. A source with
        # several splits gives the split of the same name unless prepare.source_split says otherwise.
        sources = {}
        for split, spec in splits:
            sources[split] = multihost.run_everywhere(
                functools.partial(open_source, spec, split=p.source_split, data_dir=p.source_data_dir,
                                  default_split=split, setting=f"config.prepare.splits[{split}]",
                                  split_setting="config.prepare.source_split"), f"opening {spec}")
        error = None
        if multihost.is_writer():
            try:
                records = {split: _pairs(src) for split, src in sources.items()}
                out = builders.prepare(records, name=p.name, data_dir=data_dir, version=p.version,
                                       description=p.description, sources=dict(splits), overwrite=p.overwrite)
            except Exception as e:  # noqa: BLE001 -- shared with the waiting processes, then raised
                error = e
        multihost.raise_if_any_failed(error, "prepare_data")
        out = multihost.broadcast_object(out)
    info = json.loads(open(os.path.join(out, "dataset_info.json")).read()) if "://" not in out else {}
    counts = {s["name"]: sum(int(n) for n in s.get("shardLengths", [])) for s in info.get("splits", [])}
    meta = builders.opdjax_meta(out)
    summary = {"dataset_dir": out, "records": counts, "features": meta.get("storage", {}),
               "shards": meta.get("shards", {})}
    log.info("prepared %s: %s records; features %s", out, counts, summary["features"])
    if multihost.is_writer():
        os.makedirs(config.workdir, exist_ok=True)
        with open(os.path.join(config.workdir, "prepare_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
