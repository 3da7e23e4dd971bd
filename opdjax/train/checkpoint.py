"""Orbax checkpoints of the train state, and a preemption guard for the loop.

Layout of a checkpoint directory (one per run, usually ``workdir/checkpoints``)::

    OPDJAX_CHECKPOINTS          marker: this directory holds opdjax checkpoints (JSON)
    OPDJAX_CHECKPOINTS_RUN      a pod's start-up nonce (see "Shared directory" below)
    <step>/                     one orbax step, e.g. 50/
        _CHECKPOINT_METADATA    orbax step metadata (item handlers, init/commit timestamps)
        commit_success.txt      orbax's finalization marker (see "Completeness" below)
        state/                  the pytree: params, opt_state, step, rng (OCDBT/zarr, sharded)
        meta/metadata           small JSON dict: data position, epoch, config snapshot, times...
    <step>.orbax-checkpoint-tmp an in-progress (or interrupted) save; never a checkpoint
    <step>.damaged              a step that failed verification on resume, set aside (see below)

Completeness. Orbax writes every save into ``<step>.orbax-checkpoint-tmp`` and finalizes it
either by an atomic rename to ``<step>`` (local/POSIX file systems; it writes
``commit_success.txt`` into the tmp dir just before renaming) or, on GCS where rename is not
atomic, by writing ``commit_success.txt`` into ``<step>`` last. Orbax's own step listing looks
only at the name on local disks, so a ``<step>`` directory that lacks ``commit_success.txt``
(a partial copy, a save cut off on GCS) would count for it. Here a step is *complete* only
when its directory has the orbax name AND carries ``commit_success.txt`` (or, for safety, a
commit timestamp in ``_CHECKPOINT_METADATA``). `latest_step`/`all_steps` list only complete
steps; on start-up leftover tmp dirs are removed by orbax (``cleanup_tmp_directories``) and
incomplete step dirs by us (they would otherwise block saving that step again, since orbax
refuses to save a step <= its latest).

Async saves. ``save`` returns once the arrays are copied off the devices (so the next,
buffer-donating train step is safe); the write and the finalization run in orbax's background
thread. ``wait`` blocks until they are committed; a second ``save`` waits for the first.

Resharding. ``restore(step, abstract_state)`` takes a pytree of ``jax.ShapeDtypeStruct`` with
``.sharding`` (e.g. ``jax.eval_shape`` of the init, with shardings from the current mesh) and
puts every array on that sharding, whatever mesh it was saved from. Structure, shapes and
dtypes are checked against the checkpoint's metadata first: a mismatch raises
`CheckpointMismatchError` naming the first differing key path and both shapes.

Damaged checkpoints. A complete step can still be damaged later (a truncated or deleted file: a
disk that filled up, a partial copy or rsync, a bucket lifecycle rule). Orbax only finds out
halfway through reading the arrays, and then fails with a raw tensorstore error while the reads
still in flight report dozens of "Event loop is closed" errors (orbax runs each restore in a
fresh asyncio loop, ``asyncio_utils.run_sync``, and closes it when the first read fails; the
later tensorstore callbacks then hit the closed loop and land in ``sys.unraisablehook``). So
every restore first *verifies* the step without reading the arrays: the JSON files parse, the
tree metadata reads, and every byte range the OCDBT index of ``state/`` references
(``tensorstore.ocdbt.dump``: manifest -> b-tree nodes -> values) lies inside a file that
exists (one one-byte read at the end of each data file; the index nodes themselves carry
checksums). Only then does orbax read, and a failure there (damage the index cannot show, e.g.
overwritten bytes) is caught too, with that noise filtered out (`_quiet_closed_event_loop_noise`).
`Checkpointer.restore_latest` walks back from the newest step to the newest intact one, logs a
warning naming the steps that are lost and the step it resumes from, and renames the damaged
ones ``<step>.damaged`` (``.damaged.1``, ... if taken). Renamed, not deleted: a damaged step may
still be repairable or be evidence of what went wrong, and deleting a user's data is not ours to
decide; the name is invisible to orbax's step listing (and accepted by the directory check), so
the resumed run saves those step numbers again. (Where the store cannot rename a directory, it
is deleted instead, with a warning: left in place it would block saving that step again.) When
no step is intact, nothing is renamed and a one-line `CheckpointError` names the directory, the
damaged steps and the fix (delete them or use a new workdir): silently restarting from step 0
would throw the run away.

Pods (several processes, one shared directory). Restore, verification and the fallback are
collective: every process verifies, the outcomes are gathered (`opdjax.multihost`), and the
processes move on to an older step together. Orbax's ``CheckpointManager.restore`` ends in a
global barrier (``Checkpointer.restore`` -> ``sync_global_processes``): a process that raised
inside it would leave the others waiting there forever, so the arrays are read through the item
handlers directly (no barrier inside) and only then do the processes agree on the outcome.
Shared directory: process 0 creates the directory and the marker and writes a fresh nonce into
``OPDJAX_CHECKPOINTS_RUN``; every other process must read the same nonce there. A directory
that is not shared (a local path on each worker, or a relative path resolved against different
working directories) otherwise shows up much later as a save that never completes; here every
process stops at start-up with a `CheckpointError` naming the processes that cannot see it.

Preemption. `PreemptionGuard` turns SIGTERM (and optionally SIGINT) into a flag the loop polls
after each step (``guard.should_stop(step)``), then saves, waits and exits 0. On a multi-host
TPU slice with ``jax.distributed`` initialized, JAX's preemption service owns SIGTERM and
agrees across hosts on the step at which everyone saves; there the guard installs no SIGTERM
handler and asks ``jax.experimental.multihost_utils.reached_preemption_sync_point(step)``
instead, so all hosts stop at the same step (a host-local flag would let one host start a
collective save the others never join). JAX starts that service by default
(``jax_enable_preemption_service``); with it off, the guard ORs its own flag across the
processes each step. Both paths are tested with SIGTERM on one of 2 CPU processes
(tests/test_pod_checkpoint.py): every process saves the same step and exits 0.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import threading
import time
import urllib.parse
import uuid
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

from opdjax import multihost

log = logging.getLogger(__name__)

MARKER_FILE = "OPDJAX_CHECKPOINTS"
RUN_FILE = "OPDJAX_CHECKPOINTS_RUN"  # a pod's start-up nonce: proves the directory is shared
FORMAT_NAME = "opdjax.orbax"
FORMAT_VERSION = 1
COMMIT_FILE = "commit_success.txt"  # orbax: atomicity_types.COMMIT_SUCCESS_FILE
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax: atomicity_types.TMP_DIR_SUFFIX
DAMAGED_SUFFIX = ".damaged"  # <step>.damaged: set aside by restore_latest; orbax's listing skips it
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
ITEMS = ("state", "meta")  # always there; DATA_ITEM only when the job has a data pipeline
DATA_ITEM = "data"  # Grain's iterator state: process_<i>-of-<n>.json per process
# How long a process waits for process 0's nonce to show up in the directory before it declares
# the directory not shared (NFS attribute caches can lag a second or two). Kept short: process 0
# waits meanwhile in a collective, and simulated CPU collectives abort after a few seconds.
SHARED_DIR_WAIT_S = 2.0
_DAMAGED_RE = re.compile(r"^\d+" + re.escape(DAMAGED_SUFFIX) + r"(\.\d+)?$")


from opdjax.errors import CheckpointError  # noqa: E402 (the one checkpoint error, shared with hf_io)


class NotACheckpointDirError(CheckpointError):
    """The directory exists but does not hold opdjax checkpoints."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's pytree differs (structure, shape or dtype) from the state to restore."""


class DamagedCheckpointError(CheckpointError):
    """A complete checkpoint step that cannot be read back (a truncated or missing file, ...)."""

    def __init__(self, message: str, step: int | None = None, reason: str | None = None):
        super().__init__(message)
        self.step = step
        self.reason = reason if reason is not None else message


# ----------------------------------------------------------------------------- helpers

def _is_primary() -> bool:
    return jax.process_index() == 0


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _short(e: BaseException | str, limit: int = 300) -> str:
    """An error as one short line (tensorstore's messages carry source locations and newlines)."""
    text = e if isinstance(e, str) else (str(e) or type(e).__name__)
    text = text.split(" [source locations=")[0]
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _failures(problem: str | None) -> list[tuple[int, str]]:
    """Collective on a pod: [(process, problem)] for every process whose `problem` is not None,
    the same list on every process (so that all of them take the same branch next)."""
    problems = multihost.gather_objects(problem) if jax.process_count() > 1 else [problem]
    return [(p, m) for p, m in enumerate(problems) if m is not None]


def _where(failed: list[tuple[int, str]]) -> str:
    """'(process 1) ' on a pod, '' on one process: which process saw a problem."""
    if jax.process_count() <= 1 or not failed:
        return ""
    return f"(process{'es' if len(failed) > 1 else ''} {', '.join(str(p) for p, _ in failed)}) "


def _raise_on_all(error: BaseException | None) -> None:
    """Collective on a pod: when any process has an error, every process raises (the failing one
    its own exception; the others the same CheckpointError subclass with the same message, naming
    the process), so none is left waiting in a later collective. One process: raise `error`."""
    if jax.process_count() <= 1:
        if error is not None:
            raise error
        return
    failed = [(p, e) for p, e in enumerate(multihost.gather_objects(
        None if error is None else (type(error).__name__, str(error)))) if e is not None]
    if error is not None:
        raise error
    if failed:
        p, (kind, msg) = failed[0]
        cls = globals().get(kind)
        if isinstance(cls, type) and issubclass(cls, CheckpointError):
            raise cls(f"{msg} (on process {p})")
        raise CheckpointError(f"{kind} on process {p}: {msg}")


def _error_of(fn) -> BaseException | None:
    """The exception `fn()` raises, or None."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 -- handed to _raise_on_all
        return e
    return None


def _read_json(path: epath.Path):
    return json.loads(path.read_text())


def _kvstore_url(path: epath.Path) -> str:
    """A tensorstore kvstore URL for a directory (local path or gs://...), with a trailing slash."""
    s = os.fspath(path)
    if "://" not in s:
        s = "file://" + os.path.abspath(s)
    return s.rstrip("/") + "/"


_REF_KINDS = ("btreenode:", "versionnode:", "value:")


def _ocdbt_refs(obj, out: list[str]) -> list[str]:
    """Every location string (``kind:base:path:offset:length``) anywhere in an ocdbt.dump result."""
    if isinstance(obj, str):
        if obj.startswith(_REF_KINDS):
            out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _ocdbt_refs(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _ocdbt_refs(v, out)
    return out


def _parse_ref(ref: str) -> tuple[str, str, int, int]:
    """'value:ocdbt.process_0/:d/ab12:0:8288' -> ('value', 'ocdbt.process_0/d/ab12', 0, 8288)."""
    kind, rest = ref.split(":", 1)
    base, rel, offset, length = rest.rsplit(":", 3)
    return kind, urllib.parse.unquote(base) + urllib.parse.unquote(rel), int(offset), int(length)


def _ocdbt_problem(state_dir: epath.Path) -> str | None:
    """Why the OCDBT database in `state_dir` cannot be read in full, or None (also when `state_dir`
    is not an OCDBT database: then there is no index to check against). Reads the manifest and
    every b-tree node (they carry checksums) and one byte at the end of each data file: every
    byte range the index references must lie inside a file that exists. No array data is read."""
    if not (state_dir / "manifest.ocdbt").exists():
        return None
    import tensorstore as ts

    try:
        kv = ts.KvStore.open(_kvstore_url(state_dir)).result()
        pending = _ocdbt_refs(ts.ocdbt.dump(kv).result(), [])
    except Exception as e:  # noqa: BLE001 -- reported as damage
        return f"its OCDBT manifest (state/manifest.ocdbt) is unreadable: {_short(e)}"
    ends: dict[str, int] = {}  # data file (relative to state/) -> the largest end offset it must have
    seen: set[str] = set()
    while pending:
        ref = pending.pop()
        if ref in seen:
            continue
        seen.add(ref)
        try:
            kind, path, offset, length = _parse_ref(ref)
        except ValueError:
            continue  # a location format we do not know: orbax's own read will judge it
        ends[path] = max(ends.get(path, 0), offset + length)
        if kind in ("btreenode", "versionnode"):
            try:
                pending.extend(_ocdbt_refs(ts.ocdbt.dump(kv, ref).result(), []))
            except Exception as e:  # noqa: BLE001
                return f"its OCDBT index node state/{path} is unreadable: {_short(e)}"
    for path, end in sorted(ends.items()):
        if end <= 0:
            continue
        try:
            got = kv.read(path, byte_range=slice(end - 1, end)).result()
        except Exception as e:  # noqa: BLE001 -- OUT_OF_RANGE: the file is shorter than its index says
            try:
                have = f"it has {(state_dir / path).stat().length} bytes"
            except Exception:  # noqa: BLE001 -- the size is a detail; tensorstore's message says it too
                have = _short(e, 120)
            return f"state/{path} is truncated: the OCDBT index needs {end} bytes, {have}"
        if got.state != "value":
            return f"state/{path} is missing (the OCDBT index references {end} bytes in it)"
    return None


def _orphaned_orbax_read(unraisable) -> bool:
    """True for the unraisable reports a failed orbax restore leaves behind (see below)."""
    e, tb = unraisable.exc_value, unraisable.exc_traceback
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        return tb is not None and tb.tb_frame.f_code.co_name == "_check_closed"
    code = getattr(unraisable.object, "cr_code", None)  # a coroutine object
    return (code is not None and code.co_name == "_read_array_index_and_device_put"
            and "orbax" in code.co_filename)


def _quiet_closed_event_loop_noise() -> None:
    """Filter out the reports a failed orbax read leaves behind for its orphaned shard reads.

    Orbax runs each restore in a fresh asyncio loop and closes it as soon as one read fails. The
    tensorstore reads still in flight then complete into the closed loop (``call_soon_threadsafe``
    from tensorstore's threads: RuntimeError 'Event loop is closed'), and the per-shard read
    coroutines left suspended are closed when collected (orbax's ``except BaseException`` turns
    their GeneratorExit into "Encountered error while reading array index ...": "Exception ignored
    in <coroutine object _read_array_index_and_device_put>"). Python reports each as an
    unraisable exception: dozens of tracebacks that bury the one error that matters, which the
    restore itself raised. Only exactly those are dropped (the RuntimeError raised in asyncio's
    ``_check_closed``; a report whose object is orbax's ``_read_array_index_and_device_put``
    coroutine); everything else goes to the previous hook. Installed once, for the rest of the
    process: the late reports arrive whenever the orphaned reads finish or are collected."""
    previous = sys.unraisablehook
    if getattr(previous, "_opdjax_quiet", False):
        return

    def hook(unraisable):
        if not _orphaned_orbax_read(unraisable):
            previous(unraisable)

    hook._opdjax_quiet = True
    sys.unraisablehook = hook


def _key_str(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _norm_path(path) -> tuple[str, ...]:
    """A key path with namedtuple fields, dict keys and sequence indices all as strings, so that
    the abstract state (optax namedtuples) matches orbax's metadata tree (dicts and lists)."""
    return tuple(_key_str(k) for k in path)


def _show_path(path: tuple[str, ...]) -> str:
    return "/".join(path) if path else "<root>"


def _jsonable(meta: Mapping[str, Any]) -> dict:
    """`meta` as plain JSON types (numpy/jax scalars -> Python, tuples -> lists), or a clear error."""
    if not isinstance(meta, Mapping):
        raise TypeError(f"checkpoint meta must be a dict, got {type(meta).__name__}")

    def default(o):
        if isinstance(o, (np.generic, np.ndarray)) or isinstance(o, jax.Array):
            a = np.asarray(o)
            return a.item() if a.ndim == 0 else a.tolist()
        if isinstance(o, (set, frozenset)):
            return sorted(o)
        raise TypeError(f"checkpoint meta value of type {type(o).__name__} is not JSON-serializable: {o!r}")

    try:
        return json.loads(json.dumps(dict(meta), default=default, allow_nan=True))
    except TypeError as e:
        raise TypeError(f"checkpoint meta must be JSON-able: {e}") from None


def _leaf_sig(x) -> tuple[tuple[int, ...] | None, str | None]:
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None and isinstance(x, (int, float, bool, np.generic)):
        shape, dtype = (), np.asarray(x).dtype
    return (tuple(shape) if shape is not None else None,
            str(np.dtype(dtype)) if dtype is not None else None)


def _fmt_sig(sig) -> str:
    shape, dtype = sig
    return f"shape {shape} {dtype}" if shape is not None else f"{dtype}"


# ----------------------------------------------------------------------------- Checkpointer

def _grain_handler():
    import grain

    return grain.checkpoint.CheckpointHandler()


def _restore_data(item_dir: epath.Path, iterator) -> None:
    """Restore a Grain iterator from the "data" item. Our pipelines' state is the global step, the
    same in every process's file, so a checkpoint written by another number of processes (a
    resized slice) is restored from process 0's file; a step without the item is an error."""
    import grain

    if not item_dir.is_dir():
        raise CheckpointError(f"{item_dir.parent} has no data pipeline state ({DATA_ITEM}/); it was written without "
                              "one (an older opdjax?). Start from a new workdir.")
    mine = item_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if mine.exists():
        grain.checkpoint.CheckpointHandler().restore(item_dir, args=grain.checkpoint.CheckpointRestore(iterator))
        return
    files = sorted(item_dir.glob("process_0-of-*.json"))
    if not files:
        raise CheckpointError(f"{item_dir}: no process_0-of-N.json iterator state; the data item is damaged.")
    log.info("data pipeline state written by another process count (%s): restoring the global position from it",
             files[0].name)
    iterator.set_state(json.loads(files[0].read_text()))


class Checkpointer:
    """Keep-N, async orbax checkpoints of a train-state pytree plus a JSON ``meta`` dict.

    >>> ckpt = Checkpointer(workdir / "checkpoints", keep=3)
    >>> if (s := ckpt.latest_step()) is not None:
    ...     state, meta = ckpt.restore(s, abstract_state)
    >>> ckpt.save(step, state, {"data_pos": 123, "epoch": 0})
    >>> ckpt.close()   # waits for the last async save
    """

    def __init__(self, directory, *, keep: int | None = 3, async_save: bool = True):
        import orbax.checkpoint as ocp

        if keep is not None and int(keep) < 1:
            raise ValueError(f"checkpoint keep={keep} must be >= 1 (or None to keep every checkpoint)")
        d = os.fspath(directory)
        self.directory = d if "://" in d else os.path.abspath(d)  # local path or gs://... (etils.epath)
        self._dir = epath.Path(self.directory)
        self.keep = keep
        self.async_save = async_save
        # On a pod every step here is collective: an error on one process is raised on all of
        # them, so that none is left waiting for the others in the next collective.
        _raise_on_all(_error_of(self._check_directory))
        if jax.process_count() > 1:
            self._check_shared()
        elif _is_primary():
            self._dir.mkdir(parents=True, exist_ok=True)
            self._write_marker()
        if _is_primary():
            self._remove_incomplete_steps()
        _sync("opdjax_checkpointer_init")
        self._ocp = ocp
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                create=True,
                cleanup_tmp_directories=True,
            ),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
                           DATA_ITEM: _grain_handler()},
        )
        self._closed = False

    # -- directory checks ------------------------------------------------------------------

    def _marker_path(self) -> epath.Path:
        return self._dir / MARKER_FILE

    def _check_directory(self) -> None:
        d = self.directory
        if not self._dir.exists():
            return
        if not self._dir.is_dir():
            raise NotACheckpointDirError(
                f"checkpoint directory {d} exists and is a file, not a directory; "
                f"point checkpointing at a new directory (e.g. a new workdir).")
        marker = self._marker_path()
        if marker.exists():
            try:
                info = json.loads(marker.read_text())
            except (OSError, ValueError) as e:
                raise NotACheckpointDirError(f"{marker} is unreadable ({e}); is {d} an opdjax checkpoint "
                                             f"directory? Use a new workdir or repair the marker.") from None
            if info.get("format") != FORMAT_NAME:
                raise NotACheckpointDirError(f"{d} holds checkpoints of format {info.get('format')!r}, "
                                             f"not {FORMAT_NAME!r}; use a new workdir.")
            if int(info.get("version", 0)) > FORMAT_VERSION:
                raise NotACheckpointDirError(
                    f"{d} was written by a newer opdjax (checkpoint format version {info.get('version')} > "
                    f"{FORMAT_VERSION}); upgrade opdjax or use a new workdir.")
            return
        # No marker: accept an empty directory, or one that holds only opdjax-shaped orbax steps
        # (e.g. the marker was lost); anything else is somebody else's directory.
        foreign = []
        for p in sorted(self._dir.iterdir(), key=lambda q: q.name):
            name = p.name
            base = name.split(TMP_SUFFIX)[0]
            if name == RUN_FILE:
                continue
            if base.isdigit() and p.is_dir():
                if TMP_SUFFIX in name or all((p / item).is_dir() for item in ITEMS):
                    continue
            if _DAMAGED_RE.match(name) and p.is_dir():  # set aside by restore_latest
                continue
            foreign.append(name)
        if foreign:
            shown = ", ".join(repr(n) for n in foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise NotACheckpointDirError(
                f"{d} exists but is not an opdjax checkpoint directory (no {MARKER_FILE} marker; it holds "
                f"{shown}). Point checkpointing at an empty or new directory (e.g. a new workdir); "
                f"opdjax will not write its checkpoints among other files.")

    def _write_marker(self) -> None:
        marker = self._marker_path()
        if marker.exists():
            return
        marker.write_text(json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, "items": list(ITEMS),
                                      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))

    def _check_shared(self) -> None:
        """Pod start-up: process 0 creates the directory and the marker and writes a fresh nonce
        into RUN_FILE; every process must then read that nonce there. Raises the same
        CheckpointError on every process when some cannot (collective)."""
        nonce, error = None, None
        if _is_primary():
            try:
                self._dir.mkdir(parents=True, exist_ok=True)
                self._write_marker()
                nonce = uuid.uuid4().hex
                # The nonce is rewritten every start: a file left by an earlier run must not pass.
                (self._dir / RUN_FILE).write_text(json.dumps({
                    "nonce": nonce, "processes": jax.process_count(), "directory_on_process_0": self.directory,
                    "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
            except Exception as e:  # noqa: BLE001 -- raised below, on every process
                error = f"process 0 cannot create {self.directory} and its {MARKER_FILE} marker: {_short(e)}"
        # process 0 wrote before joining this collective: the others look only after it
        nonce, error = multihost.broadcast_object((nonce, error))
        if error is not None:
            raise CheckpointError(f"{error}. Check the path and its permissions (config.checkpoint.directory).")
        seen = self._read_nonce(nonce)
        views = multihost.gather_objects((seen, self.directory))
        blind = [(p, what) for p, (what, _) in enumerate(views) if what is not None]
        if not blind:
            return
        paths = [d for _, d in views]
        where = (f"{paths[0]}" if len(set(paths)) == 1 else
                 "(" + "; ".join(f"process {p}: {d}" for p, d in enumerate(paths)) + ")")
        who = ", ".join(f"process {p} ({what})" for p, what in blind)
        relative = (" The processes resolve it to different paths: a relative path is taken from each "
                    "worker's working directory; give an absolute one." if len(set(paths)) > 1 else "")
        raise CheckpointError(
            f"the checkpoint directory {where} is not shared by the {len(views)} processes of this job: "
            f"{who} cannot see what process 0 wrote there ({RUN_FILE}).{relative} The checkpoint directory "
            f"must be shared storage visible from every worker (e.g. a gs:// bucket or an NFS mount); set "
            f"config.checkpoint.directory (or config.workdir) to such a path.")

    def _read_nonce(self, nonce: str) -> str | None:
        """None when RUN_FILE holds `nonce` (waiting up to SHARED_DIR_WAIT_S for it to appear);
        else what this process sees instead."""
        path = self._dir / RUN_FILE
        deadline = time.monotonic() + SHARED_DIR_WAIT_S
        delay = 0.05
        while True:
            try:
                got = json.loads(path.read_text()).get("nonce")
                what = None if got == nonce else f"another run's {RUN_FILE} there"
            except FileNotFoundError:
                what = "no such directory" if not self._dir.exists() else f"no {RUN_FILE} there"
            except Exception as e:  # noqa: BLE001 -- a half-written or unreadable file
                what = f"{RUN_FILE} unreadable: {_short(e, 120)}"
            if what is None or time.monotonic() >= deadline:
                return what
            time.sleep(delay)
            delay = min(2 * delay, 0.5)

    def _step_dir(self, step: int) -> epath.Path:
        return self._dir / str(int(step))

    def _is_complete_dir(self, path: epath.Path) -> bool:
        if TMP_SUFFIX in path.name or not path.is_dir():
            return False
        if (path / COMMIT_FILE).exists():
            return True
        try:  # orbax also records the commit time; accept it as the marker's stand-in
            return json.loads((path / STEP_METADATA_FILE).read_text()).get("commit_timestamp_nsecs") is not None
        except (OSError, ValueError):
            return False

    def _disk_steps(self) -> list[int]:
        if not self._dir.is_dir():
            return []
        return sorted(int(p.name) for p in self._dir.iterdir() if p.name.isdigit() and p.is_dir())

    def _remove_incomplete_steps(self) -> None:
        for s in self._disk_steps():
            p = self._step_dir(s)
            if not self._is_complete_dir(p):
                log.warning("removing incomplete checkpoint %s (no %s: an interrupted save)", p, COMMIT_FILE)
                p.rmtree(missing_ok=True)

    # -- queries ---------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps with a complete (finalized) checkpoint, ascending. A save still in flight is not listed."""
        return [s for s in sorted(self._mngr.all_steps()) if self._is_complete_dir(self._step_dir(s))]

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- save ------------------------------------------------------------------------------

    def save(self, step: int, state, meta: Mapping[str, Any] | None = None, *, force: bool = False,
             data=None) -> bool:
        """Save `state` (pytree of arrays) and `meta` (JSON-able dict) as checkpoint `step`.

        Asynchronous when the Checkpointer was made with ``async_save=True``: returns once the
        arrays are copied off the devices. Returns False (and saves nothing) when `step` is not
        after the latest saved step, unless ``force=True``, which saves anyway and replaces an
        existing checkpoint of the same step. Keeps the newest `keep` checkpoints. `data`: a Grain
        dataset iterator (opdjax.data.pipeline), saved as the item "data" by Grain's own handler.
        """
        self._check_open()
        step = int(step)
        meta = _jsonable(meta or {})
        ocp = self._ocp
        in_mngr = step in self._mngr.all_steps()
        latest = self._mngr.latest_step()
        if not force and latest is not None and step <= latest:
            log.info("checkpoint step %d not saved: step %d is already saved (use force=True to replace)",
                     step, latest)
            return False
        if in_mngr:  # force=True on an existing step: replace it
            self._mngr.wait_until_finished()
            self._mngr.delete(step)
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if data is not None:
            import grain

            items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data)
        t0 = time.perf_counter()
        saved = self._mngr.save(
            step,
            args=ocp.args.Composite(**items),
            force=True,
        )
        log.info("checkpoint step %d %s in %.2fs (%s)", step, "started" if self.async_save else "written",
                 time.perf_counter() - t0, self.directory)
        return bool(saved)

    def wait(self) -> None:
        """Block until every pending async save is committed (finalized on disk)."""
        self._mngr.wait_until_finished()

    # -- restore ---------------------------------------------------------------------------

    def restore(self, step: int | None, abstract_state, *, allow_dtype_cast: bool = False):
        """Restore checkpoint `step` (None: the latest) onto the shardings in `abstract_state`.

        `abstract_state` is a pytree of ``jax.ShapeDtypeStruct`` carrying ``.sharding`` (any mesh:
        the saved one need not match). Returns ``(state, meta)``. Raises `CheckpointMismatchError`
        when structure/shapes (or dtypes, unless `allow_dtype_cast`) differ from the checkpoint, and
        `DamagedCheckpointError` when the step cannot be read back (see "Damaged checkpoints"; no
        fallback here: `restore_latest` falls back). On a pod: call on every process, same step.
        """
        self._check_open()
        self._mngr.wait_until_finished()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        step = int(step)
        if not self._is_complete_dir(self._step_dir(step)):
            have = self.all_steps()
            raise FileNotFoundError(f"no complete checkpoint for step {step} in {self.directory}; "
                                    f"complete steps: {have or 'none'}")
        return self._restore_step(step, abstract_state, allow_dtype_cast=allow_dtype_cast)

    def restore_latest(self, abstract_state, data=None):
        """(step, state, meta) of the newest intact checkpoint, or None when there is none.

        A damaged newer step is skipped with a warning (its steps will be trained again) and set
        aside as ``<step>.damaged``, so that the resumed run can save that step again. When every
        step is damaged: a one-line `CheckpointError` (nothing renamed). Collective on a pod.
        `data`: a Grain iterator whose saved state (item "data") is restored into it in place.
        """
        self._check_open()
        self._mngr.wait_until_finished()
        steps = self.all_steps()
        if jax.process_count() > 1:  # one list for all: process 0's view of the directory
            steps = multihost.broadcast_object(steps)
        lost: list[tuple[int, str]] = []
        for step in reversed(steps):
            try:
                state, meta = self._restore_step(step, abstract_state, data=data)
            except DamagedCheckpointError as e:
                log.warning("checkpoint step %d in %s is damaged and cannot be restored: %s", step, self.directory,
                            e.reason)
                lost.append((step, e.reason))
                continue
            if lost:
                moved = self._set_aside([s for s, _ in lost])
                log.warning(
                    "resuming from checkpoint step %d, the newest intact one in %s: the damaged step(s) %s are "
                    "lost and the steps after %d will be trained again; set aside as %s (inspect or delete them)",
                    step, self.directory, ", ".join(str(s) for s, _ in lost), step, ", ".join(moved))
            return step, state, meta
        if lost:
            detail = "; ".join(f"step {s}: {_short(r, 160)}" for s, r in lost[:3])
            more = f"; and {len(lost) - 3} more" if len(lost) > 3 else ""
            raise CheckpointError(
                f"no intact checkpoint in {self.directory}: every step there is damaged ({detail}{more}). "
                f"Delete the damaged step directories ({', '.join(str(s) for s, _ in lost)}) to start from "
                f"scratch there, or start with a new workdir (config.workdir / config.checkpoint.directory).")
        return None

    # -- verification and the collective read --------------------------------------------

    def _verify_step(self, step: int) -> str | None:
        """Why step `step` cannot be restored, or None when it looks intact. Reads only metadata
        and the OCDBT index, plus one byte at the end of each data file (see the module doc)."""
        d = self._step_dir(step)
        try:
            if not d.is_dir():
                return "its directory is gone"
            if not self._is_complete_dir(d):
                return f"it is incomplete (no {COMMIT_FILE})"
            for item in ITEMS:
                if not (d / item).is_dir():
                    return f"its '{item}' item is missing ({d / item})"
            for rel in (STEP_METADATA_FILE, "meta/metadata", "state/_METADATA"):
                f = d / rel
                if rel == STEP_METADATA_FILE and not f.exists():
                    continue  # optional for orbax; the commit marker was checked above
                try:
                    _read_json(f)
                except FileNotFoundError:
                    return f"{rel} is missing"
                except (OSError, ValueError) as e:
                    return f"{rel} is unreadable ({_short(e, 120)})"
            try:
                self._saved_signature(step)
            except Exception as e:  # noqa: BLE001
                return f"its tree metadata is unreadable ({_short(e, 160)})"
            return _ocdbt_problem(d / "state")
        except Exception as e:  # noqa: BLE001 -- an I/O error while looking is damage too
            return _short(e)

    def _read(self, step: int, abstract_state, data=None):
        """The arrays and the meta dict of `step`, read through the item handlers directly:
        ``CheckpointManager.restore`` would end in a global barrier that a process which failed
        here would never reach (see "Pods" in the module doc)."""
        ocp = self._ocp
        d = self._step_dir(step)
        _quiet_closed_event_loop_noise()
        handler = ocp.StandardCheckpointHandler()
        try:
            state = handler.restore(d / "state", args=ocp.args.StandardRestore(abstract_state))
        finally:
            handler.close()
        meta = ocp.JsonCheckpointHandler().restore(d / "meta", args=ocp.args.JsonRestore())
        if data is not None:
            _restore_data(d / DATA_ITEM, data)
        return jax.block_until_ready(state), dict(meta or {})

    def _restore_step(self, step: int, abstract_state, *, allow_dtype_cast: bool = False, data=None):
        """Verify, check and read `step` on every process; the processes agree on each outcome, so
        all of them raise the same error (DamagedCheckpointError, CheckpointMismatchError) or all
        return. `step` must be the same on every process."""
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
            if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
                raise ValueError(
                    f"abstract_state leaf '{_show_path(_norm_path(path))}' has no sharding: give every "
                    f"jax.ShapeDtypeStruct the sharding it should be restored onto (e.g. a NamedSharding "
                    f"of the current mesh, or SingleDeviceSharding(jax.devices()[0])).")
        failed = _failures(self._verify_step(step))
        if not failed:
            # a config mismatch is not damage: it must stop the run, not skip to an older step
            _raise_on_all(_error_of(lambda: self._check_matches(step, abstract_state,
                                                                allow_dtype_cast=allow_dtype_cast)))
            if data is not None:  # written without a data pipeline (an older opdjax): not damage either
                _raise_on_all(_error_of(lambda: self._check_has_data(step)))
            state = meta = problem = None
            try:
                state, meta = self._read(step, abstract_state, data)
            except Exception as e:  # noqa: BLE001 -- damage the index did not show (e.g. overwritten bytes)
                root = e
                while root.__cause__ is not None:  # orbax wraps tensorstore's error in a long repr
                    root = root.__cause__
                problem = f"reading its arrays failed: {_short(root)}"
            failed = _failures(problem)
        if failed:
            reason = _where(failed) + failed[0][1]
            raise DamagedCheckpointError(
                f"checkpoint step {step} in {self.directory} is damaged: {reason}. Delete {self._step_dir(step)} "
                f"(Checkpointer.restore_latest falls back to an older step by itself).", step=step, reason=reason)
        return state, meta

    def _check_has_data(self, step: int) -> None:
        if not (self._step_dir(step) / DATA_ITEM).is_dir():
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} has no data pipeline state ({DATA_ITEM}/): it was written "
                "by an opdjax without the Grain pipeline, and resuming would not know which records come next. Start "
                "from a new workdir (config.workdir / config.checkpoint.directory).")

    def _set_aside(self, steps: list[int]) -> list[str]:
        """Rename damaged steps to ``<step>.damaged`` (process 0; deleted if renaming fails), so
        that neither orbax nor a later run takes them for checkpoints and the steps can be saved
        again. Returns the new names (the same on every process). Collective on a pod."""
        moved, error = [], None
        if _is_primary():
            for step in steps:
                src = self._step_dir(step)
                dst = self._dir / f"{step}{DAMAGED_SUFFIX}"
                n = 0
                while dst.exists():
                    n += 1
                    dst = self._dir / f"{step}{DAMAGED_SUFFIX}.{n}"
                try:
                    src.rename(dst)
                    moved.append(os.fspath(dst))
                except Exception as e:  # noqa: BLE001 -- e.g. a store without directory renames
                    log.warning("cannot rename the damaged checkpoint %s (%s); deleting it instead", src, _short(e))
                    try:
                        src.rmtree(missing_ok=True)
                        moved.append(f"{src} (deleted)")
                    except Exception as e2:  # noqa: BLE001
                        error = (f"cannot set aside the damaged checkpoint {src}: renaming failed ({_short(e)}) and "
                                 f"deleting failed ({_short(e2)}); delete it by hand and restart")
                        break
        if jax.process_count() > 1:
            moved, error = multihost.broadcast_object((moved, error))
        if error is not None:
            raise CheckpointError(error)
        self._mngr.reload()  # orbax caches its step list
        return moved

    def _saved_signature(self, step: int) -> dict[tuple[str, ...], tuple]:
        md = self._mngr.item_metadata(step)["state"]
        tree = getattr(md, "tree", md)
        flat, _ = jax.tree_util.tree_flatten_with_path(tree)
        return {_norm_path(p): _leaf_sig(leaf) for p, leaf in flat}

    def _check_matches(self, step: int, abstract_state, *, allow_dtype_cast: bool) -> None:
        saved = self._saved_signature(step)
        flat, _ = jax.tree_util.tree_flatten_with_path(abstract_state)
        want = {_norm_path(p): _leaf_sig(leaf) for p, leaf in flat}
        problems: list[str] = []
        for path, sig in want.items():
            if path not in saved:
                problems.append(f"'{_show_path(path)}' is in the current state ({_fmt_sig(sig)}) "
                                f"but not in the checkpoint")
                continue
            have = saved[path]
            if have[0] is not None and sig[0] is not None and have[0] != sig[0]:
                problems.append(f"'{_show_path(path)}' has shape {have[0]} in the checkpoint but the "
                                f"current state expects shape {sig[0]}")
            elif not allow_dtype_cast and have[1] and sig[1] and have[1] != sig[1]:
                problems.append(f"'{_show_path(path)}' has dtype {have[1]} in the checkpoint but the "
                                f"current state expects {sig[1]}")
        for path, sig in saved.items():
            if path not in want:
                problems.append(f"'{_show_path(path)}' is in the checkpoint ({_fmt_sig(sig)}) "
                                f"but not in the current state")
        if problems:
            shown = "; ".join(problems[:3])
            more = f" (and {len(problems) - 3} more difference(s))" if len(problems) > 3 else ""
            raise CheckpointMismatchError(
                f"cannot restore step {step} from {self.directory}: {shown}{more}. "
                f"The checkpoint in {self.directory} was made with a different model/optimizer config; "
                f"resume with the config it was made with, or use a new workdir to start fresh.")

    # -- lifecycle -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"Checkpointer for {self.directory} is closed")

    def close(self) -> None:
        """Wait for pending saves and release orbax's resources. Idempotent."""
        if not self._closed:
            self._mngr.wait_until_finished()
            self._mngr.close()
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self) -> str:
        return f"Checkpointer({self.directory!r}, keep={self.keep}, async_save={self.async_save})"


# ----------------------------------------------------------------------------- preemption

def _multihost_sync_available() -> bool:
    """True on a multi-process run whose JAX preemption service is running."""
    if jax.process_count() <= 1:
        return False
    try:
        from jax._src import distributed
        gs = distributed.global_state
        return gs.client is not None and getattr(gs, "preemption_sync_manager", None) is not None
    except Exception:  # private API moved: fall back to the local flag
        return False


class PreemptionGuard:
    """Turns SIGTERM (and, with ``sigint=True``, Ctrl-C) into a flag the training loop polls.

    >>> with PreemptionGuard(sigint=True) as guard:
    ...     for step in range(start, total):
    ...         state = train_step(state)
    ...         if guard.should_stop(step):
    ...             ckpt.save(step, state, meta, force=True); ckpt.wait(); break

    The handler only sets ``guard.requested`` (signal handlers run between Python bytecodes in
    the main thread; saving from inside one could interleave with a half-dispatched step). A
    second Ctrl-C while a stop is pending interrupts at once (KeyboardInterrupt). Previous
    handlers are restored on exit. Handlers can only be installed from the main thread;
    elsewhere the guard warns and only `request()` / the multi-host sync point can stop.

    Multi-host (``jax.process_count() > 1`` with ``jax.distributed`` initialized): JAX's
    preemption service installs its own SIGTERM notifier and agrees across hosts on a common
    step; replacing it with a Python handler would break that, and a host-local flag would let
    hosts stop at different steps (a collective save that never completes). So there the guard
    leaves SIGTERM alone and `should_stop(step)` asks
    ``multihost_utils.reached_preemption_sync_point(step)`` -- call it on every host at every
    step. If that service is not running, the guard installs its handler and ORs the flag across
    hosts with a tiny all-gather each call.
    """

    def __init__(self, *, sigterm: bool = True, sigint: bool = False, sync_point: bool | None = None):
        self.sigterm = sigterm
        self.sigint = sigint
        self.sync_point = _multihost_sync_available() if sync_point is None else sync_point
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._warned = False

    # the flag -------------------------------------------------------------------------------
    def request(self, reason: str = "requested") -> None:
        """Ask for a clean stop (what the signal handler does)."""
        self.requested = True
        self.signal_name = self.signal_name or reason

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.requested = True
        self.signal_name = name
        # logging from a signal handler can deadlock on the logging lock; stderr write is safe
        try:
            os.write(2, f"opdjax: {name} received; will checkpoint and stop after this step\n".encode())
        except OSError:
            pass

    def should_stop(self, step: int) -> bool:
        """Poll after each finished step: True when the loop should save, wait and exit."""
        if self.sync_point:
            try:
                from jax.experimental import multihost_utils
                if multihost_utils.reached_preemption_sync_point(int(step)):
                    self.request("preemption sync point")
                    return True
            except RuntimeError as e:  # preemption service disabled
                if not self._warned:
                    log.warning("preemption sync point unavailable (%s); using the signal flag", e)
                    self._warned = True
            return self.requested if jax.process_count() == 1 else False
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
            if np.any(flags):
                self.request("another host")
        return self.requested

    # context --------------------------------------------------------------------------------
    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionGuard entered outside the main thread: no signal handlers installed")
            return self
        sigs = []
        if self.sigterm and not self.sync_point:
            sigs.append(signal.SIGTERM)
        if self.sigint:
            sigs.append(signal.SIGINT)
        for s in sigs:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, prev in self._previous.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()
        return False


__all__ = [
    "Checkpointer", "CheckpointError", "CheckpointMismatchError", "NotACheckpointDirError",
    "PreemptionGuard", "MARKER_FILE",
]
