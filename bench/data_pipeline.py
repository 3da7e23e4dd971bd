"""Throughput of the data pipeline (opdjax.data.sources + opdjax.data.pipeline) on one host core,
for every kind of record source, against what the shipped configs need per training step.

Synthetic prompt records of realistic size (a ~300-character maths word problem with some
non-ASCII, a numeric answer, an id and a level) are written once as JSON Lines (plain and gzipped),
Parquet (one row group, as a small file is written, and row groups of 1,000 rows, as large
published files are), a `datasets` save_to_disk directory, a prepared TFDS dataset (array_record,
opdjax.data.builders.prepare), ArrayRecord files of JSON records, and the TFDS shards read as raw
ArrayRecord (tf.train.Example). Each is then read in full, in the run's shuffled order, through
the pipeline OPD builds: `DataPipeline(ProblemSet(open_source(...)), batch)`, so every record is
read, decoded and checked by `problem_from_record` in Grain's reader thread; "+ encode" also
renders each prompt through the chat template and tokenizes it with the embedded toy student's
tokenizer (`encode_prompts`, what OPD's per-row transform does), on the first --encode-records
records. The process is pinned to one core (os.sched_setaffinity), reader thread included.

Need: for each config in configs/, records per step (OPD: batch.prompts_per_step; DAIL:
batch.sequences_per_step) / its estimated step time: the roofline step of
bench/results/compile/summary.md, else a "~N s (min) per step" estimate in the config's docstring,
else a conservative 1 s per step. The ratio is the slowest source's rate (with encoding) over the
largest need; it must be >= 100x. (On a pod each process reads only its rows, so its need is lower.)

    .venv/bin/python bench/data_pipeline.py [--records 20000] [--batch 64] [--encode-records 4000]

Writes the printed table to bench/results/data_pipeline.txt.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import importlib.util
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
import warnings

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from opdjax.data import builders, prompts  # noqa: E402
from opdjax.data.pipeline import DataPipeline  # noqa: E402
from opdjax.data.sources import open_source  # noqa: E402

RESULT = os.path.join(ROOT, "bench", "results", "data_pipeline.txt")
NAMES = ["Amélie", "Jonas", "Priya", "Mateo", "Yuki", "Zoë", "Kwame", "Ingrid"]
ITEMS = ["apples", "notebooks", "litres of paint", "tickets", "bricks", "crêpes", "kilograms of rice"]


def synthetic_record(rng: np.random.Generator, i: int) -> dict:
    """A word problem of ~300 characters, its numeric answer, an id and a level."""
    a, b, c, d = (int(x) for x in rng.integers(3, 500, 4))
    price = float(rng.integers(50, 999)) / 100
    who, what = NAMES[i % len(NAMES)], ITEMS[(i // 3) % len(ITEMS)]
    prompt = (f"{who} buys {a} {what} on Monday and {b} more on Tuesday. On Wednesday {who} gives away "
              f"{c % (a + b) + 1} of them and sells the rest at ${price:.2f} each, keeping a record in a notebook "
              f"labelled «inventaire №{d}». How much money does {who} receive in total? Reason step by step, "
              "then give the final answer in \\boxed{}.")
    answer = round((a + b - (c % (a + b) + 1)) * price, 2)
    return {"id": f"syn-{i:06d}", "prompt": prompt, "answer": f"{answer:.2f}", "level": int(i % 5) + 1}


def write_sources(records: list[dict], d: str) -> dict[str, tuple[str, dict, float]]:
    """{kind: (spec, open_source kwargs, seconds to write)}."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python.array_record_module import ArrayRecordWriter

    out = {}

    def timed(kind, fn, spec, **kw):
        t0 = time.perf_counter()
        fn()
        out[kind] = (spec, kw, time.perf_counter() - t0)

    def jsonl(path, gz):
        with (gzip.open if gz else open)(path, "wt", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    def array_record(path):
        w = ArrayRecordWriter(path, "group_size:1")
        for r in records:
            w.write(json.dumps(r, ensure_ascii=False).encode("utf-8"))
        w.close()

    table = pa.Table.from_pylist(records)
    datasets.disable_progress_bars()
    timed("jsonl", lambda: jsonl(f"{d}/p.jsonl", False), f"{d}/p.jsonl")
    timed("jsonl.gz", lambda: jsonl(f"{d}/p.jsonl.gz", True), f"{d}/p.jsonl.gz")
    timed("parquet (1 row group)", lambda: pq.write_table(table, f"{d}/p.parquet"), f"{d}/p.parquet")
    timed("parquet (1,000-row groups)", lambda: pq.write_table(table, f"{d}/g.parquet", row_group_size=1000),
          f"{d}/g.parquet")
    timed("save_to_disk", lambda: datasets.Dataset.from_list(records).save_to_disk(f"{d}/hf"), f"{d}/hf")
    timed("tfds (prepared dir)", lambda: builders.prepare({"train": records}, name="bench_prompts",
                                                          data_dir=f"{d}/tfds"),
          f"{d}/tfds/bench_prompts/1.0.0", split="train")
    timed("array_record (JSON)", lambda: array_record(f"{d}/p.array_record"), f"{d}/p.array_record")
    shards = sorted(glob.glob(f"{d}/tfds/bench_prompts/1.0.0/*.array_record-*"))
    out["array_record (tf.Example)"] = (",".join(shards), {}, out["tfds (prepared dir)"][2])
    return out


def full_read(spec, kw, batch: int, records: int, encode=None) -> tuple[float, float]:
    """(seconds to open, records/s) of reading `records` records through the pipeline."""
    t0 = time.perf_counter()
    source = prompts.ProblemSet(open_source(spec, **kw))
    opened = time.perf_counter() - t0
    steps = math.ceil(records / batch)
    t0 = time.perf_counter()
    pipe = DataPipeline(source, batch, seed=0, transform=encode)
    for _ in range(steps):
        step = next(pipe)
    took = time.perf_counter() - t0
    assert step.items[-1] is not None
    return opened, steps * batch / took


def step_times() -> dict[str, tuple[float, str]]:
    """{config: (estimated seconds per step, where from)} from the compile summary."""
    out = {}
    summary = os.path.join(ROOT, "bench", "results", "compile", "summary.md")
    if os.path.exists(summary):
        for m in re.finditer(r"^- (\S+) \(([^)]*)\): roofline step ([\d.]+) s", open(summary).read(), re.M):
            out[m.group(1)] = (float(m.group(3)), f"roofline, {m.group(2)} (compile/summary.md)")
    return out


def config_needs() -> list[dict]:
    """Records per step and estimated step time of every config in configs/."""
    known = step_times()
    rows = []
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
        name = os.path.basename(path)[:-3]
        try:
            spec = importlib.util.spec_from_file_location(f"_bench_cfg_{name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            c = module.get_config()
        except Exception as e:  # noqa: BLE001 -- a config being edited: say so, go on
            rows.append({"config": name, "error": f"{type(e).__name__}: {e}"[:120]})
            continue
        if "batch" in c and "prompts_per_step" in c.batch:
            kind, per_step = "OPD prompts_per_step", int(c.batch.prompts_per_step)
        elif "batch" in c and "sequences_per_step" in c.batch:
            kind, per_step = "DAIL sequences_per_step", int(c.batch.sequences_per_step)
        else:
            continue
        if name in known:
            seconds, source = known[name]
        else:
            m = re.search(r"~\s*([\d.]+)\s*(s|min)\s+per\s+step", module.__doc__ or "")
            if m:
                seconds = float(m.group(1)) * (60 if m.group(2) == "min" else 1)
                source = "estimate in the config's docstring"
            else:
                seconds, source = 1.0, "not known: 1 s assumed"
        rows.append({"config": name, "kind": kind, "per_step": per_step, "seconds": seconds, "source": source,
                     "need": per_step / seconds})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=64, help="records per step read (the largest OPD batch)")
    parser.add_argument("--encode-records", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3, help="reads per source and column; the best is kept")
    parser.add_argument("--out", default=RESULT)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")

    pinned = "not pinned (no sched_setaffinity)"
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
        pinned = "pinned to core 0 (reader thread included)"
    lines = []

    def say(text=""):
        print(text, flush=True)
        lines.append(text)

    rng = np.random.default_rng(0)
    records = [synthetic_record(rng, i) for i in range(args.records)]
    chars = np.mean([len(r["prompt"]) for r in records])
    jsonl_bytes = np.mean([len(json.dumps(r, ensure_ascii=False).encode()) for r in records])

    from opdjax.data.tokenizer import load_tokenizer
    from opdjax.toy.opd_pair import load_toy_pair

    tok = load_tokenizer(load_toy_pair()[1])

    def encode(i, problem):  # what OPD's transform does per row (encode_problems with the toy pair's settings)
        return prompts.encode_prompts(tok, [problem], system_prompt="", enable_thinking=False,
                                      max_prompt_tokens=4096)[0]

    tokens = np.mean([len(encode(0, prompts.problem_from_record("", r, 0))) for r in records[:200]])
    say(f"host: {os.cpu_count()} cores, {pinned}, load {os.getloadavg()[0]:.1f}; python {sys.version.split()[0]}")
    say(f"{args.records:,} records: prompt ~{chars:.0f} chars (~{tokens:.0f} toy-student tokens chat-rendered), "
        f"~{jsonl_bytes:.0f} bytes as JSON; batch {args.batch}, shuffled (seed 0), best of {args.repeats} full reads")
    say(f"'+ encode': chat template + tokenizer of the toy student (opdjax/assets/toy_pair/student) on the first "
        f"{args.encode_records:,} records")
    say()
    with tempfile.TemporaryDirectory() as d:
        kinds = write_sources(records, d)
        full_read(*kinds["jsonl"][:2], args.batch, args.records)  # warm-up: imports, first thread, page cache
        head = f"{'source':28s}{'write s':>9s}{'open s':>9s}{'records/s':>12s}{'+ encode rec/s':>16s}"
        say(head)
        say("-" * len(head))
        rates = {}
        for kind, (spec, kw, wrote) in kinds.items():
            best_open, best, enc = float("inf"), 0.0, 0.0
            for _ in range(args.repeats):
                opened, r = full_read(spec, kw, args.batch, args.records)
                best_open, best = min(best_open, opened), max(best, r)
                enc = max(enc, full_read(spec, kw, args.batch, args.encode_records, encode=encode)[1])
            rates[kind] = (best, enc)
            say(f"{kind:28s}{wrote:9.2f}{best_open:9.2f}{best:12,.0f}{enc:16,.0f}")
    say()
    needs = config_needs()
    head = f"{'config':34s}{'records/step':>24s}{'s/step':>8s}{'need rec/s':>12s}  step time from"
    say(head)
    say("-" * (len(head) + 20))
    for n in needs:
        if "error" in n:
            say(f"{n['config']:34s}  (not read: {n['error']})")
            continue
        say(f"{n['config']:34s}{n['kind'] + ' ' + str(n['per_step']):>24s}{n['seconds']:8.1f}{n['need']:12.1f}  "
            f"{n['source']}")
    ok = [n for n in needs if "error" not in n]
    worst_need = max(ok, key=lambda n: n["need"])
    largest = max(ok, key=lambda n: n["per_step"])
    slowest_kind = min(rates, key=lambda k: rates[k][1])
    slowest = rates[slowest_kind][1]
    ratio = slowest / worst_need["need"]
    say()
    say(f"largest need: {worst_need['config']} ({worst_need['per_step']} records/step / {worst_need['seconds']:.1f} "
        f"s = {worst_need['need']:.1f} records/s)")
    say(f"slowest source with encoding: {slowest_kind}, {slowest:,.0f} records/s on one core "
        f"-> {ratio:,.0f}x the largest need ({'OK, >= 100x' if ratio >= 100 else 'BELOW 100x'})")
    say(f"stricter: the largest batch ({largest['config']}, {largest['per_step']}) at 1 s per step = "
        f"{largest['per_step']} records/s -> {slowest / largest['per_step']:,.0f}x; without encoding the slowest "
        f"source ({min(rates, key=lambda k: rates[k][0])}) reads {min(r[0] for r in rates.values()):,.0f} records/s")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(f"# bench/data_pipeline.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
        f.write("\n".join(lines) + "\n")
    print(f"\nwritten to {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
    main()
