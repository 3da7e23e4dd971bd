"""The host/device boundary of a multi-process (pod) job, and what its processes must agree on.

On a TPU slice every worker runs the same program over one global mesh; a global array is only
partly on each host, and `np.asarray` on it raises on every process but a single-host one. So
every crossing goes through this module:

  device -> host   `to_host(x)`        the whole array on every process (gathers across processes:
                                       a collective, every process must call it)
                   `local_rows(x)`     only the rows this process's devices hold, with their global
                                       row indices (no communication: for per-process host work)
  host -> device   `to_global(plan, full, names)`              every process holds the whole array
                   `from_local_rows(plan, rows, names, shape)`  each process holds its own rows
                   `feeding_rows(plan, shape, names)`           which rows those are, before building them

Host work on a pod is split, never repeated: `map_split(fn, items)` runs `fn` on this process's
contiguous share of `items` and gathers the results (Python objects) on every process; an error on
any process is raised on all of them, so no process is left waiting in a collective. Process 0
writes shared files (`is_writer()`); `agree_on_config` stops a job whose processes were given
different configs, `agree` one whose processes read different input files. On one process every function here is the plain local operation.

`block_on_cpu(x)`: simulated multi-device CPU meshes deadlock in XLA's CPU collectives with
several sharded calls in flight, so on CPU the loops block on each step's result; on TPU/GPU
the call returns at once and steps stay asynchronous.
"""
from __future__ import annotations

import hashlib
import json
import logging
import pickle
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class MultiHostError(RuntimeError):
    """Processes of one job that disagree (config, checkpoint directory, ...); the message says how."""


# ----------------------------------------------------------------------------------- processes
def process_count() -> int:
    return jax.process_count()


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def is_writer() -> bool:
    """Process 0 writes the run's shared files (metrics, reports, exports); the others do not."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier across processes (no-op on one process)."""
    if is_multiprocess():
        multihost_utils.sync_global_devices(name)


def block_on_cpu(tree):
    """Wait for `tree` on the CPU backend only (see the module docstring); returns `tree`."""
    if jax.default_backend() == "cpu":
        jax.block_until_ready(tree)
    return tree


# ----------------------------------------------------------------------------------- device -> host
def _allgather(x):
    return multihost_utils.process_allgather(x, tiled=True)


def _leaf_to_host(x) -> np.ndarray:
    if not isinstance(x, jax.Array):
        return np.asarray(x)
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:  # every process holds all of it: no communication
        return np.asarray(x.addressable_data(0))
    return np.asarray(_allgather(x))


def to_host(tree):
    """Every array of `tree` as a whole NumPy array on every process.

    Multi-process: arrays that span other processes' devices are all-gathered (a collective:
    call it on every process, in the same order); replicated and local arrays are copied."""
    return jax.tree.map(_leaf_to_host, tree)


class LocalRows(NamedTuple):
    index: np.ndarray  # [n] int64: the global row indices this process holds, ascending
    data: np.ndarray  # [n, ...]: those rows


def _row_blocks(index_map: dict, shape: Sequence[int], axis: int = 0) -> list[tuple[int, int]]:
    """The distinct [start, stop) row ranges of addressable shards, ascending; each shard must
    hold whole rows (every other dimension complete)."""
    blocks = set()
    for idx in index_map.values():
        for d, sl in enumerate(idx):
            if d == axis:
                continue
            lo, hi, _ = sl.indices(shape[d])
            if (lo, hi) != (0, shape[d]):
                raise ValueError(f"local_rows: dimension {d} is split across devices; only arrays sharded "
                                 f"along axis {axis} (rows) can be taken row by row.")
        lo, hi, _ = idx[axis].indices(shape[axis])
        blocks.add((lo, hi))
    blocks = sorted(blocks)
    for (a0, a1), (b0, b1) in zip(blocks, blocks[1:]):
        if b0 < a1:
            raise ValueError(f"local_rows: overlapping row blocks {(a0, a1)} and {(b0, b1)}.")
    return blocks


def local_rows(x) -> LocalRows:
    """The rows of a row-sharded array that this process's devices hold (no communication).

    On one process (or for a NumPy array) that is every row. The order is ascending global row,
    the order `from_local_rows` expects back."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        a = _leaf_to_host(x)
        return LocalRows(np.arange(a.shape[0]), a)
    by_start = {}
    for s in x.addressable_shards:
        lo, hi, _ = s.index[0].indices(x.shape[0])
        by_start.setdefault((lo, hi), s)
    blocks = _row_blocks({s.device: s.index for s in x.addressable_shards}, x.shape)
    data = np.concatenate([np.asarray(by_start[b].data) for b in blocks]) if blocks else np.zeros((0,) + x.shape[1:],
                                                                                                     x.dtype)
    index = np.concatenate([np.arange(lo, hi) for lo, hi in blocks]) if blocks else np.zeros((0,), np.int64)
    return LocalRows(index, data)


def rows_of(tree, rows: np.ndarray):
    """The given global rows of every (row-sharded or replicated) array of `tree`, taken from this
    process's devices (no communication); an error when one of them is held elsewhere."""
    rows = np.asarray(rows, np.int64)

    def take(x):
        have = local_rows(x)
        pos = np.searchsorted(have.index, rows)
        ok = (pos < len(have.index)) & (have.index[np.minimum(pos, len(have.index) - 1)] == rows) if len(
            have.index) else np.zeros(rows.shape, bool)
        if not ok.all():
            raise ValueError(f"rows_of: rows {rows[~ok][:5].tolist()} are not held by process "
                             f"{jax.process_index()}'s devices.")
        return have.data[pos]
    return jax.tree.map(take, tree)


# ----------------------------------------------------------------------------------- host -> device
def _sharding(plan, names, shape):
    return plan.sharding(tuple(names), tuple(shape))


def feeding_rows(plan, shape: Sequence[int], names: Sequence[str | None]) -> np.ndarray:
    """Global row indices (ascending) that this process must supply for an array of `shape` placed
    with the logical `names` (what `from_local_rows` takes)."""
    if plan is None:
        return np.arange(shape[0])
    sh = _sharding(plan, names, shape)
    index_map = sh.addressable_devices_indices_map(tuple(shape))
    blocks = _row_blocks(index_map, shape)
    return np.concatenate([np.arange(lo, hi) for lo, hi in blocks]) if blocks else np.zeros((0,), np.int64)


def to_global(plan, full: np.ndarray, names: Sequence[str | None]) -> jax.Array:
    """A global array from a host array that every process holds whole (each device gets its slice)."""
    full = np.asarray(full)
    if plan is None:
        return jax.device_put(full)
    sh = _sharding(plan, names, full.shape)
    return jax.make_array_from_callback(full.shape, sh, lambda idx: full[idx])


def from_local_rows(plan, rows: np.ndarray, names: Sequence[str | None], global_shape: Sequence[int]) -> jax.Array:
    """A global array from this process's rows (those `feeding_rows` names, in that order)."""
    rows = np.asarray(rows)
    global_shape = tuple(global_shape)
    if plan is None:
        if rows.shape != global_shape:
            raise ValueError(f"from_local_rows: rows {rows.shape} != global shape {global_shape} on one process.")
        return jax.device_put(rows)
    want = len(feeding_rows(plan, global_shape, names))
    if rows.shape[0] != want or rows.shape[1:] != global_shape[1:]:
        raise ValueError(f"from_local_rows: this process must supply {want} rows of shape {global_shape[1:]}, "
                         f"got {rows.shape}.")
    return jax.make_array_from_process_local_data(_sharding(plan, names, global_shape), rows, global_shape)


# ----------------------------------------------------------------------------------- host objects
def gather_objects(obj: Any) -> list:
    """[obj of process 0, obj of process 1, ...] on every process (pickled; a collective)."""
    if not is_multiprocess():
        return [obj]
    payload = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = np.asarray(_allgather(np.asarray([payload.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:payload.size] = payload
    everything = np.asarray(_allgather(padded[None])).reshape(len(sizes), -1)
    return [pickle.loads(everything[p, :int(n)].tobytes()) for p, n in enumerate(sizes)]


def broadcast_object(obj: Any) -> Any:
    """Process 0's `obj` on every process."""
    return gather_objects(obj)[0]


def raise_if_any_failed(error: BaseException | None, what: str) -> None:
    """Collective: when any process passes an error, every process raises one naming it (the
    first failing process's message), so that none is left waiting for the others."""
    errors = gather_objects(None if error is None else (type(error).__name__, str(error)))
    if error is not None and not is_multiprocess():
        raise error
    failed = [(p, e) for p, e in enumerate(errors) if e is not None]
    if not failed:
        return
    if error is not None:
        raise error
    p, (kind, msg) = failed[0]
    raise MultiHostError(f"{what} failed on process {p} ({kind}): {msg}")


def share(n: int, process: int | None = None, count: int | None = None) -> range:
    """The contiguous share of range(n) that `process` (default: this one) works on."""
    process = jax.process_index() if process is None else process
    count = jax.process_count() if count is None else count
    return range(n * process // count, n * (process + 1) // count)


def map_split(fn: Callable[[Any], Any], items: Sequence, what: str = "host work", *, batched: bool = False) -> list:
    """[fn(item) for item in items], each process doing its own contiguous share; the results (in
    order) on every process. An exception on any process is raised on all of them.
    batched: fn takes this process's whole share (a list) and returns one result per item."""
    items = list(items)
    run = (lambda xs: list(fn(xs))) if batched else (lambda xs: [fn(x) for x in xs])
    if not is_multiprocess():
        return run(items)
    mine, error = [], None
    try:
        mine = run([items[i] for i in share(len(items))])
    except Exception as e:  # noqa: BLE001 -- re-raised below, on every process
        error = e
    raise_if_any_failed(error, what)
    return [r for part in gather_objects(mine) for r in part]


# ----------------------------------------------------------------------------------- agreement
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fingerprint(obj: Any) -> str:
    """sha256 of `obj` as canonical JSON (dicts with sorted keys; anything else by repr)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=repr).encode()).hexdigest()


def config_fingerprint(config) -> str:
    """sha256 of the config as canonical JSON."""
    return fingerprint(config.to_dict() if hasattr(config, "to_dict") else dict(config))


def agree(value: Any, what: str, *, fix: str = "every worker must read the same files (shared storage)") -> None:
    """Collective: stop every process with a MultiHostError when the processes hold different
    `value` (keep it small: a count, a fingerprint, a short list). Each process reads a job's input
    files itself; a decision taken from such a read must come out the same everywhere, or the
    processes part ways and the next collective hangs."""
    if not is_multiprocess():
        return
    values = gather_objects(value)
    if all(v == values[0] for v in values[1:]):
        return
    shown = "; ".join(f"process {p}: {str(v)[:200]}" for p, v in enumerate(values))
    raise MultiHostError(f"the processes of this job see different {what} ({shown}); {fix}.")


def run_everywhere(fn: Callable[[], Any], what: str) -> Any:
    """fn() on every process; when it raises on any process, every process raises (the failing
    process its own error, the others a MultiHostError naming it), so none waits in a collective."""
    result, error = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 -- re-raised below, on every process
        error = e
    raise_if_any_failed(error, what)
    return result


def agree_on_config(config) -> None:
    """Stop, on every process, when the processes were started with different configs; the message
    names the fields that differ and what each process has."""
    if not is_multiprocess():
        return
    mine = config_fingerprint(config)
    prints = gather_objects(mine)
    if len(set(prints)) == 1:
        return
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    flats = [_flat(x) for x in gather_objects(json.loads(json.dumps(d, default=repr)))]
    keys = sorted(set().union(*flats))
    diffs = [k for k in keys if len({json.dumps(f.get(k, "<unset>"), sort_keys=True) for f in flats}) > 1]
    shown = "; ".join(f"config.{k}: " + ", ".join(f"process {p}: {f.get(k, '<unset>')!r}" for p, f in
                                                    enumerate(flats)) for k in diffs[:5])
    more = f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""
    raise MultiHostError(
        f"the {len(flats)} processes of this job were given different configs: {shown}{more}. Every worker "
        f"must run the same command with the same overrides (launch/gcloud_tpu.sh run does).")
