"""prepare_data: records from JSONL / Parquet / save_to_disk / TFDS / ArrayRecord -> a TFDS dataset
directory (array_record), read afterwards by any job as data.train_file="tfds:<name>" with
data.data_dir (local or gs://). See opdjax/data/prepare.py.

    python launch/tpu_run.py --config configs/prepare_data.py --config.prepare.name=my_problems \
        --config.prepare.splits="train=problems.jsonl;test=eval.jsonl" --config.prepare.data_dir=gs://b/tfds
    python launch/tpu_run.py --config configs/prepare_data.py --config.prepare.shipped=opdjax_toy_arithmetic
"""
import ml_collections


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.job = "prepare_data"
    c.workdir = "runs/prepare_data"
    c.prepare = ml_collections.ConfigDict()
    c.prepare.name = ""  # the TFDS dataset name to write (lower_snake_case)
    c.prepare.splits = ""  # "train=problems.jsonl;test=eval.parquet": one source per split
    c.prepare.source_split = ""  # the split read inside each source (TFDS syntax; save_to_disk / TFDS sources)
    c.prepare.source_data_dir = ""  # data_dir of tfds:NAME sources
    c.prepare.data_dir = ""  # where to write; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets; gs:// works
    c.prepare.version = "1.0.0"
    c.prepare.description = ""
    c.prepare.overwrite = False  # replace an existing prepared version
    # Or one of the shipped datasets (opdjax_toy_arithmetic, opdjax_word_problems, opdjax_dail_toy):
    c.prepare.shipped = ""
    c.prepare.seed = 0  # toy_arithmetic / dail_toy: the seed config (seed0, seed1, ...)
    return c
