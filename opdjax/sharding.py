"""Device mesh and logical-axis sharding (MaxText style).

Arrays are described by *logical* axis names ("embed", "heads", "batch", ...). One rules table
maps each logical name to mesh axes ("data", "fsdp", "tensor"), so moving from one CPU to a
v5p pod changes the mesh shape and perhaps the table, never the model.

A `ShardingPlan` (mesh + rules) is hashable, so jitted functions take it as a static argument
and call `plan.constrain(x, names)` on activations; `plan=None` means single-device, no-op.
Names resolve through flax's `nn.logical_to_mesh_axes` (the MaxText idiom), plus one rule of our
own: a dimension its mesh axes do not divide is replicated rather than rejected.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from typing import Sequence

import jax
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated); earlier rules win a mesh axis
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]
DEFAULT_RULES: Rules = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("cache_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


class ShardingError(ValueError):
    """A mesh or sharding request that cannot work; the message names the field and the fix."""


def rules_from_config(pairs: Sequence, field: str = "config.mesh.sharding_rules") -> Rules:
    """The rules table a config asks for: (logical name, mesh axes) pairs; empty = DEFAULT_RULES.

    A table replaces the default one whole, so it must give every logical name the model uses a
    rule (None = replicated).
    """
    if not pairs:
        return DEFAULT_RULES
    rules = _checked_rules(pairs, MESH_AXES, field)
    missing = sorted({n for n, _ in DEFAULT_RULES} - {n for n, _ in rules})
    if missing:
        raise ShardingError(f"{field} has no rule for {missing}; give every logical axis of "
                            "sharding.DEFAULT_RULES a rule (None to replicate it).")
    return rules


def _checked_rules(pairs, axis_names: Sequence[str], field: str) -> Rules:
    """`pairs` as a hashable rules table, or a ShardingError naming `field`."""
    rules = []
    for pair in pairs:
        name, axes = pair if isinstance(pair, (tuple, list)) and len(pair) == 2 else (None, None)
        if not isinstance(name, str) or not (axes is None or isinstance(axes, (str, tuple, list))):
            raise ShardingError(f"{field}: {pair!r} must be a (logical name, mesh axes) pair, the mesh "
                                f"axes one of {tuple(axis_names)}, a tuple of them, or None.")
        for a in _as_tuple(axes):
            if a not in axis_names:
                raise ShardingError(f"{field}: rule {name!r} -> {axes!r} names mesh axis {a!r}; the "
                                    f"mesh has {tuple(axis_names)}.")
        rules.append((name, axes if axes is None or isinstance(axes, str) else tuple(axes)))
    names = [n for n, _ in rules]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ShardingError(f"{field} name {dup} more than once; keep one rule per logical axis.")
    return tuple(rules)


def mesh_shape_from_config(shape: Sequence[int], num_devices: int, field: str = "mesh.shape",
                           where: str | None = None) -> tuple[int, ...]:
    """Resolve a (data, fsdp, tensor) shape against the device count; one entry may be -1."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ShardingError(f"{field}={shape} must have {len(MESH_AXES)} entries, for axes {MESH_AXES}.")
    if sum(s == -1 for s in shape) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ShardingError(f"{field}={shape}: entries must be positive, with at most one -1 (fill).")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ShardingError(
                f"{field}={shape}: the fixed axes multiply to {known}, which does not divide the "
                f"{num_devices} devices; choose sizes whose product divides {num_devices}."
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ShardingError(
            f"{field}={shape} ({dict(zip(MESH_AXES, shape))}) needs {math.prod(shape)} devices but "
            f"{num_devices} are present ({where or _where()}); make the product equal "
            f"{num_devices}, or put -1 on one axis to fill it."
        )
    return shape


def _where() -> str:
    """'cpu' on one process; 'tpu, 4 processes x 8 local devices' on a pod."""
    platform = jax.devices()[0].platform
    if jax.process_count() == 1:
        return platform
    return f"{platform}, {jax.process_count()} processes x {jax.local_device_count()} local devices"


def plan_from_config(mesh_section, devices: Sequence[jax.Device] | None = None) -> "ShardingPlan":
    """The run's plan from its `mesh` section: the mesh of mesh.shape over `devices` (default all)
    and the rules of mesh.sharding_rules (empty = DEFAULT_RULES)."""
    return ShardingPlan(make_mesh(tuple(mesh_section.shape), devices=devices),
                        rules_from_config(mesh_section.get("sharding_rules", ())))


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices (all hosts' devices under multi-host).

    Axis types are Auto (classic GSPMD): the compiler propagates shardings and
    `with_sharding_constraint` works inside jit. `jax.make_mesh` lays devices out along the
    physical topology on TPU.
    """
    given = devices is not None
    devices = list(devices if given else jax.devices())
    shape = mesh_shape_from_config(shape, len(devices),
                                   where=f"{devices[0].device_kind}, given" if given and devices else None)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def maybe_initialize_distributed() -> bool:
    """Join a multi-host job (TPU pod slice, multi-node GPU) when the environment says there is one.

    On a TPU VM pod every worker runs the same command and `jax.distributed.initialize()` finds
    the coordinator from the TPU metadata (under Slurm / Open MPI, set OPDJAX_MULTIHOST=1). Or set
    JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process.
    On one host nothing happens. Must run before any other JAX call.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    tpu_pod = "," in env.get("TPU_WORKER_HOSTNAMES", "")
    explicit = "JAX_COORDINATOR_ADDRESS" in env
    # Slurm / Open MPI jobs are auto-detected by JAX once asked to: OPDJAX_MULTIHOST=1.
    if not (tpu_pod or explicit or env.get("OPDJAX_MULTIHOST") == "1"):
        return False
    if explicit:
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
        if missing:
            raise ShardingError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not; set all "
                                "three on every process (or unset it on a single host).")
        address = env["JAX_COORDINATOR_ADDRESS"]
        try:
            count, index = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
        except ValueError:
            raise ShardingError(f"JAX_NUM_PROCESSES={env['JAX_NUM_PROCESSES']!r} and JAX_PROCESS_ID="
                                f"{env['JAX_PROCESS_ID']!r} must be integers.") from None
        if not 0 <= index < count:
            raise ShardingError(f"JAX_PROCESS_ID={index} must lie in [0, JAX_NUM_PROCESSES={count}).")
        kwargs = {}
        if _is_loopback(address):
            # Every process on this machine (tests, a local multi-process run): keep the coordinator
            # and the CPU collectives on loopback, whatever the host name resolves to.
            kwargs["coordinator_bind_address"] = address
            _gloo_on_loopback()
        jax.distributed.initialize(address, count, index, **kwargs)
    else:
        jax.distributed.initialize()
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _gloo_on_loopback() -> None:
    """Make the CPU backend's gloo collectives listen on 127.0.0.1 (jax builds them with no host
    name, and gloo then binds to the address of gethostname(), which may not resolve)."""
    try:
        from jax._src.lib import _jax
        make = _jax.make_gloo_tcp_collectives
    except (ImportError, AttributeError):  # private API moved: keep jax's default
        return
    if getattr(make, "_opdjax_loopback", False):
        return

    def on_loopback(distributed_client, **_):
        return make(distributed_client=distributed_client, hostname="127.0.0.1")

    on_loopback._opdjax_loopback = True
    _jax.make_gloo_tcp_collectives = on_loopback


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """A mesh and the rules table; hashable, so jitted functions take it as a static argument."""
    mesh: Mesh
    rules: Rules = DEFAULT_RULES

    def __post_init__(self):
        object.__setattr__(self, "rules", _checked_rules(self.rules, self.mesh.axis_names, "sharding rules"))

    @functools.cached_property
    def _flax_rules(self) -> Rules:
        """The rules less their size-1 mesh axes (which shard nothing, so they never block another dim)."""
        return tuple((name, tuple(a for a in _as_tuple(axes) if self.mesh.shape[a] > 1)) for name, axes in self.rules)

    def spec(self, names: Sequence[str | None], shape: Sequence[int] | None = None) -> PartitionSpec:
        """PartitionSpec for an array with these logical axis names.

        flax's `logical_to_mesh_axes` resolves the names: rules apply in table order, and a rule
        whose mesh axes are already taken by another dim of the array is skipped. Then a dim that
        its mesh axes do not divide is replicated instead (e.g. 2 KV heads on tensor=4): correct,
        just less sharded, and logged once.
        """
        for name in names:
            if name is not None and name not in dict(self.rules):
                raise ShardingError(f"logical axis {name!r} has no sharding rule; add it to the rules table.")
        spec = nn.logical_to_mesh_axes(names, self._flax_rules)
        if shape is None:
            return spec
        return PartitionSpec(*(self._if_divisible(names[i], entry, i, shape[i]) for i, entry in enumerate(spec)))

    def _if_divisible(self, name, entry, dim, size):
        split = math.prod(self.mesh.shape[a] for a in _as_tuple(entry))
        if size % split == 0:
            return entry
        _log_once(f"dim {dim} ({name}={size}) not divisible by mesh axes {_as_tuple(entry)} (size {split}): replicated")
        return None

    @property
    def batch_shards(self) -> int:
        """How many pieces the rules cut the "batch" axis into (a global batch must divide it)."""
        return math.prod(self.mesh.shape[a] for a in _as_tuple(dict(self.rules).get("batch")))

    def sharding(self, names: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names, shape))

    def constrain(self, x: jax.Array, names: Sequence[str | None]) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.sharding(names, x.shape))

    def tree_shardings(self, axes_tree, shapes_tree):
        """NamedShardings for a pytree of logical-axis tuples and a matching pytree of shapes."""
        return jax.tree.map(lambda names, s: self.sharding(names, s.shape), axes_tree, shapes_tree,
                            is_leaf=_is_axes)


def constrain(plan: ShardingPlan | None, x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Annotate an activation; a no-op without a plan (single device)."""
    return x if plan is None else plan.constrain(x, names)


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.info("sharding: %s", msg)
