"""The order in which a run serves its records: one Grain pipeline for every job.

    pipe = DataPipeline(source, batch_size=8, seed=config.seed, positions=mine, transform=encode)
    step = next(pipe)        # step.indices: [8] record indices of this step, the same on every process
                             # step.items:   transform(record) for this process's batch positions only
    ckpt.save(..., data=pipe.iterator)   # Grain's orbax handler; restoring it resumes exactly

The global order. Epoch e serves every record once, in Grain's index shuffle of [0, n) seeded by
(shuffle seed + e): a global shuffle keyed by the run's seed and drawn afresh each epoch
(`shuffle=False`: file order). The shuffle seed is a hash of the run's seed, because Grain seeds
epoch e with seed + e: taken raw, seed 0's second epoch would be seed 1's first.
Two epoch-end rules:
  - "straddle" (OPD): the epochs are concatenated and cut into consecutive batches, so a batch may
    end one epoch and start the next; every batch is full and nothing is dropped.
  - "pad" (DAIL, which counts epochs): each epoch is cut on its own; its last batch is filled with
    -1 (a zero-weight filler row), so every step of epoch e holds records of epoch e only.
Step s's batch is a pure function of (seed, s, n, batch size, rule): a resumed run, another process
count or another host gets the same records in the same batch positions.

Each process reads only its rows. `positions` are the batch positions whose records this process
feeds to its devices (from the mesh: `multihost.feeding_rows`); the pipeline reads and transforms
those records only, in Grain's prefetch thread while the device works. Grain's `ShardByJaxProcess`
would instead give each process a fixed 1/P of the records (its shard, every epoch): each host
would then read a 1/P share too, but the global batch would depend on the process count and the
shuffle would no longer be global, and with a model axis across hosts (several processes feeding
the same rows, which must read the same records) it would be wrong. So the positions come from
the mesh: on a pure data-parallel mesh each process reads 1/P of every global batch.

State. The iterator is Grain's own (`MapDataset` -> `to_iter_dataset`): its state is the next step,
saved by Grain's orbax CheckpointHandler (opdjax.train.checkpoint). `signature()` (records, batch
size, seed, rule) goes in the checkpoint's meta and a resume with a different one is an error.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Sequence

import numpy as np

EPOCH_ENDS = ("straddle", "pad")


def shuffle_seed(seed: int) -> int:
    """Grain's shuffle seed for the run seed `seed` (see the module doc)."""
    return int(np.random.SeedSequence([int(seed), 0x6F70646A]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class Step:
    indices: np.ndarray  # [batch_size] int64 record indices, -1 = filler (epoch_end="pad")
    positions: np.ndarray  # the batch positions this process feeds
    items: list  # transform(index, record) for each of `positions` (None for a filler)

    def by_index(self) -> dict[int, Any]:
        """{record index: item} of this process's positions (a record twice in a batch: once)."""
        return dict(zip(self.indices[self.positions].tolist(), self.items))


class _PadTo:
    def __init__(self, size: int):
        self.size = size

    def __call__(self, batch):
        batch = np.asarray(batch, np.int64)
        return np.concatenate([batch, np.full(self.size - len(batch), -1, np.int64)])


class _ReadPositions:
    """Grain map: a step's indices -> Step with this process's records read and transformed."""

    def __init__(self, source, positions: np.ndarray, transform):
        self.source, self.positions, self.transform = source, positions, transform

    def __call__(self, indices):
        indices = np.asarray(indices, np.int64)
        items = []
        for p in self.positions:
            i = int(indices[p])
            items.append(None if i < 0 else self.transform(i, self.source[i]))
        return Step(indices, self.positions, items)


def _identity(i, record):
    return record


def step_indices_dataset(num_records: int, batch_size: int, *, seed: int, shuffle: bool = True,
                         epoch_end: str = "straddle"):
    """The Grain MapDataset whose element s is step s's [batch_size] record indices."""
    import grain

    order = grain.MapDataset.range(num_records)
    if shuffle:
        order = order.shuffle(seed=shuffle_seed(seed))
    # "endless" = 2**50 records' worth of epochs: Grain's infinite repeat() has length sys.maxsize,
    # which batch(1) overflows
    if epoch_end == "straddle":
        return order.repeat(max(1, 2**50 // num_records)).batch(batch_size)
    epoch = order.batch(batch_size).map(_PadTo(batch_size))
    return epoch.repeat(max(1, 2**50 // len(epoch)))


class DataPipeline:
    """Batches of record indices, endlessly, with this process's records read (module doc)."""

    def __init__(self, source: Sequence, batch_size: int, *, seed: int, shuffle: bool = True,
                 epoch_end: str = "straddle", positions: Sequence[int] | None = None,
                 transform: Callable[[int, Any], Any] | None = None, name: str = "data",
                 prefetch: int = 2, trace: str | None = None):
        import grain

        n = len(source)
        if n < 1:
            raise ValueError(f"{name}: the pipeline needs at least one record, got none")
        if int(batch_size) < 1:
            raise ValueError(f"{name}: batch size must be >= 1, got {batch_size}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if epoch_end not in EPOCH_ENDS:
            raise ValueError(f"epoch_end={epoch_end!r}: expected one of {EPOCH_ENDS}")
        self.source, self.num_records, self.batch_size = source, n, int(batch_size)
        self.seed, self.shuffle, self.epoch_end, self.name = int(seed), bool(shuffle), epoch_end, name
        self.positions = np.arange(self.batch_size) if positions is None else np.asarray(positions, np.int64)
        if len(self.positions) and (self.positions.min() < 0 or self.positions.max() >= self.batch_size):
            raise ValueError(f"{name}: positions must lie in [0, {self.batch_size}), got {self.positions.tolist()}")
        self.indices = step_indices_dataset(n, self.batch_size, seed=self.seed, shuffle=self.shuffle,
                                            epoch_end=epoch_end)
        self.dataset = self.indices.map(_ReadPositions(source, self.positions, transform or _identity))
        # one reader thread: the records of the next steps are read while the device works
        options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=int(prefetch))
        self.iterator = iter(self.dataset.to_iter_dataset(options))
        self.trace = trace  # a JSONL file: per step, the record indices this process read

    @property
    def steps_per_epoch(self) -> float:
        if self.epoch_end == "pad":
            return float(math.ceil(self.num_records / self.batch_size))
        return self.num_records / self.batch_size

    def epochs_done(self, steps: int) -> float:
        """Epochs served after `steps` steps (for logging)."""
        return steps / self.steps_per_epoch

    def step_indices(self, step: int) -> np.ndarray:
        """Step `step`'s record indices, by random access (does not move the iterator)."""
        return np.asarray(self.indices[int(step)], np.int64)

    def __iter__(self):
        return self

    def __next__(self) -> Step:
        step = self.next_step
        out = next(self.iterator)
        if self.trace:
            with open(self.trace, "a") as f:
                f.write(json.dumps({"step": step, "batch": out.indices.tolist(),
                                    "read": out.indices[out.positions].tolist()}) + "\n")
        return out

    @property
    def next_step(self) -> int:
        return int(self.iterator.get_state()["next_index"])

    def skip_to(self, step: int) -> None:
        """Continue at `step` (what restoring the iterator's state does)."""
        self.iterator.set_state({"next_index": int(step)})

    def signature(self) -> dict:
        """What must match for a checkpointed position to mean the same records."""
        return {"name": self.name, "num_records": self.num_records, "batch_size": self.batch_size,
                "seed": self.seed, "shuffle": self.shuffle, "epoch_end": self.epoch_end}

    def check_signature(self, saved: dict | None) -> None:
        """Raise when the checkpoint's pipeline served a different order than this one would."""
        if not saved:
            return
        mine = self.signature()
        for key in ("num_records", "batch_size", "seed", "shuffle", "epoch_end"):
            if key in saved and saved[key] != mine[key]:
                raise ValueError(
                    f"Cannot resume the {self.name} pipeline: the checkpoint's had {key}={saved[key]!r} but this "
                    f"run's has {key}={mine[key]!r}; resuming would serve a different order of records. Use the "
                    "same data, batch size and seed as the checkpointed run (or a new workdir).")
