"""Reading problem records as (where, record) pairs, from any source `opdjax.data.sources` opens
(JSON Lines, Parquet, save_to_disk, TFDS, ArrayRecord; local or gs://).

    for where, record in iter_records("problems.jsonl"):             # or .jsonl.gz / .parquet
        ...
    iter_records("saved_dataset_dir", split="test", setting="eval.problems")
    iter_records("tfds:my_set", split="test[:50%]", data_dir="gs://bucket/tfds")

`where` names the record as errors do: "file:line" (JSON Lines, 1-based), "file:row N" (Parquet and
save_to_disk, 0-based), "name[split] record N" (TFDS), "file:record N" (ArrayRecord).
"""
from opdjax.data.sources import (JSONL_SUFFIXES, PARQUET_SUFFIXES, PYARROW_PIN, PromptDataError, describe_fields,
                                 iter_records)

__all__ = ["PromptDataError", "PYARROW_PIN", "JSONL_SUFFIXES", "PARQUET_SUFFIXES", "iter_records", "describe_fields"]
