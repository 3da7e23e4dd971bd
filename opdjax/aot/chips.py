"""TPU chips as published, and abstract TPU devices to compile for from any host.

`jax.experimental.topologies.get_topology_desc` gives the devices of a slice (e.g. "v5p:4x4x2")
without any TPU attached; libtpu (the `[tpu]` extra, also in the test extra) compiles for them.
The chip figures are Google's published per-chip numbers (cloud.google.com/tpu/docs/v4, v5e,
v5p, v6e): bf16 peak, HBM capacity and bandwidth, ICI bandwidth. They feed a roofline estimate
only; nothing here is a measured TPU time.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re

import jax

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int  # per chip
    bf16_flops: float  # peak, per chip
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # per chip, all links together
    cores_per_chip: int  # TensorCores behind one JAX device (megacore)


CHIPS = {
    # v4: 275 TFLOP/s, 32 GiB HBM2 at 1,228 GB/s, ICI 2,400 Gbit/s (6 links)
    "v4": Chip("v4", 32 * GiB, 275e12, 1228e9, 2400e9 / 8, 2),
    # v5e: 197 TFLOP/s, 16 GiB HBM2 at 819 GB/s, ICI 1,600 Gbit/s
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9, 1600e9 / 8, 1),
    # v5p: 459 TFLOP/s, 95 GiB HBM2e at 2,765 GB/s, ICI 4,800 Gbit/s
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9, 4800e9 / 8, 2),
    # v6e (Trillium): 918 TFLOP/s, 32 GiB HBM at 1,640 GB/s, ICI 3,584 Gbit/s
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1640e9, 3584e9 / 8, 1),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}


class TopologyError(ValueError):
    """A topology string we cannot compile for; names the field and the accepted forms."""


def parse_topology(topology: str, field: str = "compile.topology") -> tuple[Chip, tuple[int, ...]]:
    """"v5p:4x4x2" -> (the v5p chip, (4, 4, 2)). Also accepts a slice name like "v5p-64"
    (TensorCores; v4/v5p have 2 per chip) or "v6e-8" (chips), mapped to a standard shape."""
    t = (topology or "").strip().lower()
    m = re.fullmatch(r"(v\d+[a-z]*)[:](\d+(?:x\d+)*)", t)
    if m:
        chip = _chip(m.group(1), topology, field)
        dims = tuple(int(x) for x in m.group(2).split("x"))
        if any(d < 1 for d in dims):
            raise TopologyError(f"{field}={topology!r}: every dimension must be >= 1.")
        return chip, dims
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", t)
    if m:
        chip = _chip(m.group(1), topology, field)
        chips = int(m.group(2)) // chip.cores_per_chip
        return chip, _default_shape(chip, chips, topology, field)
    raise TopologyError(f"{field}={topology!r}: write <chip>:<shape> (e.g. v5p:2x2x1, v6e:2x4, v5e:4x4) or "
                        f"a slice name (v5p-64, v6e-8); chips: {', '.join(CHIPS)}.")


def _chip(name: str, topology: str, field: str) -> Chip:
    name = _ALIASES.get(name, name)
    if name not in CHIPS:
        raise TopologyError(f"{field}={topology!r}: unknown chip {name!r}; known: {', '.join(CHIPS)}.")
    return CHIPS[name]


def _default_shape(chip: Chip, chips: int, topology: str, field: str) -> tuple[int, ...]:
    if chips < 1:
        raise TopologyError(f"{field}={topology!r} has no whole chip.")
    if chip.name in ("v4", "v5p"):  # 3-D tori: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...
        if chips < 4 or chips & (chips - 1):
            raise TopologyError(f"{field}={topology!r}: {chips} chips is not a standard {chip.name} slice; "
                                "give the shape as <chip>:AxBxC.")
        dims = [2, 2, 1]
        while dims[0] * dims[1] * dims[2] < chips:
            smallest = min(dims)
            i = max(j for j, d in enumerate(dims) if d == smallest)  # double the last smallest axis
            dims[i] *= 2
        return tuple(dims)
    side = int(math.isqrt(chips))  # 2-D: 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16
    for a in range(side, 0, -1):
        if chips % a == 0:
            return (a, chips // a)
    return (1, chips)


def topology_name(chip: Chip, dims: tuple[int, ...]) -> str:
    return f"{chip.name}:{'x'.join(map(str, dims))}"


@functools.lru_cache(maxsize=None)
def abstract_devices(topology: str, num_slices: int = 1):
    """The devices of `topology` (x num_slices) for ahead-of-time compilation, from libtpu."""
    chip, dims = parse_topology(topology)
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - part of jax
        raise TopologyError(f"jax.experimental.topologies is unavailable: {e}") from None
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    if platforms and "tpu" not in platforms:
        # No TPU runtime on this host: tell libtpu so, instead of it probing a metadata server and
        # printing warnings (values only for its start-up; the target is `topology`).
        for k, v in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5p-8"),
                     ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0")):
            os.environ.setdefault(k, v)
    # compiling needs no exclusive TPU: let several processes (tests, a bench beside a job) load libtpu
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        kwargs = {}
        if math.prod(dims) < 4:  # smaller than one 2x2 host (e.g. one v5e chip): a host of exactly this
            kwargs["chips_per_host_bounds"] = tuple(dims) + (1,) * (3 - len(dims))
        topo = topologies.get_topology_desc(platform="tpu", topology_name=topology_name(chip, dims),
                                            num_slices=int(num_slices), **kwargs)
    except Exception as e:  # libtpu missing, or a shape libtpu refuses
        text = str(e).lower()
        hint = ("another process holds libtpu's lock file: set ALLOW_MULTIPLE_LIBTPU_LOAD=1" if "lockfile" in text
                else "install the TPU compiler: pip install -e '.[tpu]' (jax[tpu]==0.10.2 brings libtpu)"
                if "libtpu" in text or "plugin" in text or "tpu" not in text else "check the slice shape")
        raise TopologyError(f"compile.topology={topology!r} (num_slices={num_slices}): the TPU compiler refused "
                            f"it ({type(e).__name__}: {str(e).splitlines()[0][:200]}); {hint}.") from None
    return chip, tuple(topo.devices)
