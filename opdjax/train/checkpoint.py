"""Orbax checkpoints of the train state, and a preemption guard for the loop.

Layout of a checkpoint directory (one per run, usually ``workdir/checkpoints``)::

    OPDJAX_CHECKPOINTS          marker: this directory holds opdjax checkpoints (JSON)
    <step>/                     one orbax step, e.g. 50/
        _CHECKPOINT_METADATA    orbax step metadata (item handlers, init/commit timestamps)
        commit_success.txt      orbax's finalization marker (see "Completeness" below)
        state/                  the pytree: params, opt_state, step, rng (OCDBT/zarr, sharded)
        meta/metadata           small JSON dict: data position, epoch, config snapshot, times...
    <step>.orbax-checkpoint-tmp an in-progress (or interrupted) save; never a checkpoint

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

Preemption. `PreemptionGuard` turns SIGTERM (and optionally SIGINT) into a flag the loop polls
after each step (``guard.should_stop(step)``), then saves, waits and exits 0. On a multi-host
TPU slice with ``jax.distributed`` initialized, JAX's preemption service owns SIGTERM and
agrees across hosts on the step at which everyone saves; there the guard installs no SIGTERM
handler and asks ``jax.experimental.multihost_utils.reached_preemption_sync_point(step)``
instead, so all hosts stop at the same step (a host-local flag would let one host start a
collective save the others never join).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

log = logging.getLogger(__name__)

MARKER_FILE = "OPDJAX_CHECKPOINTS"
FORMAT_NAME = "opdjax.orbax"
FORMAT_VERSION = 1
COMMIT_FILE = "commit_success.txt"  # orbax: atomicity_types.COMMIT_SUCCESS_FILE
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax: atomicity_types.TMP_DIR_SUFFIX
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
ITEMS = ("state", "meta")


class CheckpointError(ValueError):
    """A checkpoint directory or request we cannot use; the message says why and what to do."""


class NotACheckpointDirError(CheckpointError):
    """The directory exists but does not hold opdjax checkpoints."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's pytree differs (structure, shape or dtype) from the state to restore."""


# ----------------------------------------------------------------------------- helpers

def _is_primary() -> bool:
    return jax.process_index() == 0


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


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
        self._check_directory()
        if _is_primary():
            self._dir.mkdir(parents=True, exist_ok=True)
            self._write_marker()
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
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
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
            if base.isdigit() and p.is_dir():
                if TMP_SUFFIX in name or all((p / item).is_dir() for item in ITEMS):
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

    def save(self, step: int, state, meta: Mapping[str, Any] | None = None, *, force: bool = False) -> bool:
        """Save `state` (pytree of arrays) and `meta` (JSON-able dict) as checkpoint `step`.

        Asynchronous when the Checkpointer was made with ``async_save=True``: returns once the
        arrays are copied off the devices. Returns False (and saves nothing) when `step` is not
        after the latest saved step, unless ``force=True``, which saves anyway and replaces an
        existing checkpoint of the same step. Keeps the newest `keep` checkpoints.
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
        t0 = time.perf_counter()
        saved = self._mngr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
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
        when structure/shapes (or dtypes, unless `allow_dtype_cast`) differ from the checkpoint.
        """
        self._check_open()
        ocp = self._ocp
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
        for item in ITEMS:
            if not (self._step_dir(step) / item).is_dir():
                raise NotACheckpointDirError(
                    f"{self._step_dir(step)} has no '{item}' item: it was not written by opdjax's "
                    f"Checkpointer; use a new workdir.")
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
            if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
                raise ValueError(
                    f"abstract_state leaf '{_show_path(_norm_path(path))}' has no sharding: give every "
                    f"jax.ShapeDtypeStruct the sharding it should be restored onto (e.g. a NamedSharding "
                    f"of the current mesh, or SingleDeviceSharding(jax.devices()[0])).")
        self._check_matches(step, abstract_state, allow_dtype_cast=allow_dtype_cast)
        restored = self._mngr.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )
        state = restored["state"]
        state = jax.block_until_ready(state)
        return state, dict(restored["meta"] or {})

    def restore_latest(self, abstract_state):
        """(step, state, meta) of the latest checkpoint, or None when there is none."""
        step = self.latest_step()
        if step is None:
            return None
        state, meta = self.restore(step, abstract_state)
        return step, state, meta

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
