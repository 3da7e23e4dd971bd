"""Compile phases for TPU and say, per chip: does it fit, what it costs, roughly how long it takes.

Per phase: the compiler's memory analysis (arguments, outputs, aliased, temporaries), plus the
run's long-lived arrays that sit in HBM meanwhile without being arguments (the train state while
sampling, the teacher while training...); FLOPs, HBM bytes and collectives per call with loop
trip counts applied (`hlo.analyze`); a roofline time from the chip's published peak and
bandwidths — an estimate, labelled so, never a measured time.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time

import jax

from opdjax.aot import hlo
from opdjax.aot.chips import Chip
from opdjax.aot.phases import Phase, argument_shards, per_chip_bytes
from opdjax.errors import DoesNotFitError  # noqa: F401 (raised here; importable from here)

log = logging.getLogger(__name__)
GiB = 1024 ** 3


@dataclasses.dataclass
class PhaseReport:
    name: str
    what: str
    compile_s: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    resident_outside: int
    expected_argument_bytes: int  # our shard shapes of the arguments, in the compiler's TPU tiles
    argument_shapes_match: bool  # every argument's per-device shape is the one our shardings give
    flops: float  # per call, loops applied
    hbm_bytes: float  # per call, loops applied
    collectives: dict
    loops: list
    unknown_loops: int
    xla_flops_once: float  # XLA's cost_analysis (loop bodies counted once), for reference
    xla_bytes_once: float
    calls_per_step: float
    per_step: bool
    roofline: dict
    largest: list  # [(bytes, description)] largest values in the program
    error: str = ""  # the compiler's refusal (e.g. out of HBM)

    @property
    def program_bytes(self) -> int:
        """What the program itself needs live at once: arguments + outputs - donated + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def total_bytes(self) -> int:
        return self.program_bytes + self.resident_outside


def roofline(chip: Chip, flops: float, nbytes: float, collectives: dict) -> dict:
    compute = flops / chip.bf16_flops
    memory = nbytes / chip.hbm_bytes_per_s
    coll = sum(v["bytes"] for v in collectives.values()) / chip.ici_bytes_per_s
    bound = max((compute, "compute"), (memory, "HBM"), (coll, "ICI"))
    return {"compute_s": compute, "hbm_s": memory, "ici_s": coll, "time_s": bound[0], "bound": bound[1],
            "note": "roofline estimate from published peaks (max of compute, HBM, ICI), not a measurement"}


def _largest_values(comps: dict, n: int = 5) -> list:
    seen = []
    for comp in comps.values():
        if comp.name.startswith(("fused_computation", "bitcast_fusion")) or ".fused" in comp.name:
            continue
        for ins in comp.instrs:
            if ins.opcode in ("parameter", "tuple", "get-tuple-element", "bitcast", "constant"):
                continue
            op = re.search(r'op_name="([^"]*)"', ins.attrs)
            seen.append((int(ins.bytes), f"{ins.shape.split('{')[0]} {ins.opcode} ({op.group(1) if op else ins.name})"))
    seen.sort(key=lambda x: -x[0])
    out, names = [], set()
    for b, d in seen:
        if d not in names:
            out.append((b, d))
            names.add(d)
        if len(out) == n:
            break
    return out


def compile_phase(phase: Phase, chip: Chip) -> PhaseReport:
    t = time.perf_counter()
    try:
        lowered = phase.fn.lower(*phase.args, **phase.static)
        compiled = lowered.compile()
    except Exception as e:  # the TPU compiler refuses programs that do not fit HBM
        msg = str(e)
        if not re.search(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|exceed", msg):
            raise
        return PhaseReport(phase.name, phase.what, time.perf_counter() - t, 0, 0, 0, 0, 0, phase.resident_outside,
                           0, False, 0.0, 0.0, {}, [], 0, 0.0, 0.0, phase.calls_per_step, phase.per_step, {}, [],
                           error=_first_lines(msg))
    dt = time.perf_counter() - t
    mem = compiled.memory_analysis()
    text = compiled.as_text()
    parsed = hlo.parse_module(text)  # large for an 8B model: parse once
    cost = hlo.analyze(text, parsed=parsed)
    expected, match = _expected_arguments(phase, text, _kept_arguments(lowered))
    xla = compiled.cost_analysis() or {}
    if isinstance(xla, list):  # older jax: one dict per program
        xla = xla[0] if xla else {}
    return PhaseReport(
        phase.name, phase.what, dt, int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes),
        int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes), int(mem.generated_code_size_in_bytes),
        phase.resident_outside, expected, match, cost.flops, cost.bytes, cost.collectives, cost.loops, cost.unknown_loops,
        float(xla.get("flops", 0.0)), float(xla.get("bytes accessed", 0.0)), phase.calls_per_step, phase.per_step,
        roofline(chip, cost.flops, cost.bytes, cost.collectives), _largest_values(parsed[0]))


def _kept_arguments(lowered) -> set | None:
    """Indices of the array arguments jit kept (unused ones are pruned from the program)."""
    try:
        return set(lowered._lowering.compile_args["kept_var_idx"])
    except (AttributeError, KeyError, TypeError):  # private API moved: compare all
        return None


def _expected_arguments(phase: Phase, text: str, kept: set | None) -> tuple[int, bool]:
    """Bytes of the arguments from our shard shapes, padded to the tiles the compiler laid them out
    in; and whether the compiled program's parameters have exactly those per-device shapes."""
    ours = argument_shards(phase)
    if kept is not None:
        ours = [s for i, s in enumerate(ours) if i in kept]
    params = hlo.entry_parameters(text)
    if len(ours) != len(params):
        return int(sum(p[2] for p in params)), False
    match = all(tuple(s) == p[1] for s, p in zip(ours, params))
    return int(sum(p[2] for p in params)), match


def _first_lines(msg: str, n: int = 25) -> str:
    return "\n".join(msg.strip().splitlines()[:n])


def compile_all(phases: list[Phase], chip: Chip, progress=print) -> list[PhaseReport]:
    out = []
    for i, p in enumerate(phases):
        progress(f"[{i + 1}/{len(phases)}] compiling {p.name}: {p.what}")
        r = compile_phase(p, chip)
        if r.error:
            progress(f"    {r.compile_s:.1f} s; DOES NOT FIT: {r.error.splitlines()[0][:300]}")
            out.append(r)
            continue
        status = "DOES NOT FIT" if r.total_bytes > chip.hbm_bytes else "fits"
        progress(f"    {r.compile_s:.1f} s; {r.total_bytes / GiB:.2f} GiB per chip of {chip.hbm_bytes / GiB:.0f} "
                 f"({status}); {r.flops / 1e12:.3g} TFLOP, {r.hbm_bytes / 1e9:.3g} GB HBM per call; roofline "
                 f"{r.roofline.get('time_s', float('nan')):.3g} s ({r.roofline.get('bound', '-')}-bound)")
        out.append(r)
    return out


def precheck(phases: list[Phase], chip: Chip) -> None:
    """Reject before compiling what cannot fit whatever the compiler does: a phase whose arguments
    plus the run's other long-lived arrays already exceed the chip's HBM (seconds, not minutes)."""
    bad = []
    for p in phases:
        args = [a for a in jax.tree.leaves(p.args) if isinstance(a, jax.ShapeDtypeStruct)]
        need = per_chip_bytes(args) + p.resident_outside
        if need > chip.hbm_bytes:
            bad.append(f"phase {p.name!r} needs at least {need / GiB:.2f} GiB per chip before any temporary "
                       f"(its arguments {per_chip_bytes(args) / GiB:.2f} + the run's other long-lived arrays "
                       f"{p.resident_outside / GiB:.2f}) of {chip.name}'s {chip.hbm_bytes / GiB:.0f} GiB")
    if bad:
        raise DoesNotFitError("; ".join(bad) + ". Not compiled. Fixes: more chips (mesh / compile.topology), "
                              "bfloat16 params for a frozen model, LoRA (DAIL), a smaller model.")


def step_time(reports: list[PhaseReport]) -> float:
    return sum(r.roofline.get("time_s", 0.0) * r.calls_per_step for r in reports if r.per_step)


def check_fit(reports: list[PhaseReport], chip: Chip) -> None:
    bad = [r for r in reports if r.error or r.total_bytes > chip.hbm_bytes]
    if not bad:
        return
    lines = []
    for r in bad:
        if r.error:
            lines.append(f"phase {r.name!r}: the TPU compiler ran out of HBM ({chip.name}, "
                         f"{chip.hbm_bytes / GiB:.0f} GiB per chip):\n{r.error}")
            continue
        lines.append(f"phase {r.name!r} needs {r.total_bytes / GiB:.2f} GiB per chip of {chip.name}'s "
                     f"{chip.hbm_bytes / GiB:.0f} GiB: arguments {r.argument_bytes / GiB:.2f}, outputs "
                     f"{r.output_bytes / GiB:.2f} (donated {r.alias_bytes / GiB:.2f}), temporaries "
                     f"{r.temp_bytes / GiB:.2f}, other long-lived arrays {r.resident_outside / GiB:.2f}. Largest "
                     "values: " + "; ".join(f"{b / GiB:.2f} GiB {d}" for b, d in r.largest[:3]))
    raise DoesNotFitError("\n".join(lines) + "\nFixes: more chips (mesh / topology), batch.microbatches, a bf16 "
                          "sampler cache (rollout.cache_dtype), fewer rollout rows, or LoRA (DAIL).")


def to_dict(reports: list[PhaseReport], chip: Chip, meta: dict) -> dict:
    phases = []
    for r in reports:
        d = dataclasses.asdict(r)
        d["program_bytes"], d["total_bytes"] = r.program_bytes, r.total_bytes
        d["fits"] = not r.error and r.total_bytes <= chip.hbm_bytes
        phases.append(d)
    return {**meta, "chip": dataclasses.asdict(chip), "phases": phases,
            "roofline_step_s": step_time(reports),
            "note": "memory from the TPU compiler; FLOPs/bytes from its HLO with loop trip counts; "
                    "times are roofline estimates from published chip peaks, not measurements"}


def write(report: dict, directory: str) -> tuple[str, str]:
    os.makedirs(directory, exist_ok=True)
    jpath, mpath = os.path.join(directory, "compile_report.json"), os.path.join(directory, "compile_report.md")
    with open(jpath, "w") as f:
        json.dump(report, f, indent=2, default=str)
    with open(mpath, "w") as f:
        f.write(markdown(report))
    return jpath, mpath


def _g(b) -> str:
    return f"{b / GiB:.2f}"


def markdown(rep: dict) -> str:
    chip = rep["chip"]
    lines = [f"# Compile report: {rep.get('config', '')}", "",
             f"Topology {rep['topology']} ({rep['num_devices']} chips, {chip['name']}: "
             f"{chip['hbm_bytes'] / GiB:.0f} GiB HBM, {chip['bf16_flops'] / 1e12:.0f} TFLOP/s bf16, "
             f"{chip['hbm_bytes_per_s'] / 1e9:.0f} GB/s), mesh {rep['mesh']}, jax {rep.get('jax', '')}, "
             f"libtpu {rep.get('libtpu', '')}.", "",
             "Per chip. HBM from the TPU compiler's memory analysis; *other* = the run's long-lived arrays "
             "(train state, teacher) in HBM during the phase without being its arguments. FLOPs and HBM "
             "bytes per call from the compiled HLO with loop trip counts applied. **Times are roofline "
             "estimates** (published peaks), not measurements.", "",
             "| phase | args GiB | temp GiB | out GiB | other GiB | total GiB | fits | TFLOP/call | GB HBM/call | "
             "collectives GB/call | roofline s/call | bound | calls/step | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in rep["phases"]:
        if p["error"]:
            lines.append(f"| {p['name']} | | | | | | **no** (compiler: out of HBM) | | | | | | | {p['compile_s']:.0f} |")
            continue
        coll = sum(v["bytes"] for v in p["collectives"].values())
        lines.append(
            f"| {p['name']} | {_g(p['argument_bytes'])} | {_g(p['temp_bytes'])} | "
            f"{_g(p['output_bytes'] - p['alias_bytes'])} | {_g(p['resident_outside'])} | {_g(p['total_bytes'])} | "
            f"{'yes' if p['fits'] else '**no**'} | {p['flops'] / 1e12:.3g} | {p['hbm_bytes'] / 1e9:.3g} | "
            f"{coll / 1e9:.3g} | {p['roofline']['time_s']:.3g} | {p['roofline']['bound']} | "
            f"{p['calls_per_step']:g}{'' if p['per_step'] else ' (eval)'} | {p['compile_s']:.0f} |")
    lines += ["", f"Roofline time per training step: **{rep['roofline_step_s']:.3g} s** (estimate).", ""]
    if rep.get("estimate"):
        lines += ["## Hand estimate vs compiler (per chip, GiB)", "",
                  "| phase | estimate | compiler | estimate / compiler |", "|---|---|---|---|"]
        for row in rep["estimate"]:
            lines.append(f"| {row['phase']} | {row['estimate_gib']:.2f} | {row['compiler_gib']:.2f} | "
                         f"{row['ratio']:.2f} |")
        lines.append("")
    lines += ["## Phases", ""]
    for p in rep["phases"]:
        lines.append(f"- **{p['name']}**: {p['what']}.")
        if p["error"]:
            lines.append(f"  Compiler: `{p['error'].splitlines()[0][:300]}`")
            continue
        kinds = ", ".join(f"{k} x{v['count']:g} ({v['bytes'] / 1e9:.3g} GB)" for k, v in p["collectives"].items())
        trips = ", ".join(str(lp["trip"]) for lp in p["loops"][:6]) + (" ..." if len(p["loops"]) > 6 else "")
        lines.append(f"  Loops (trip counts): {trips or 'none'}"
                     f"{'; ' + str(p['unknown_loops']) + ' unread (counted once)' if p['unknown_loops'] else ''}. "
                     f"Collectives: {kinds or 'none'}. Largest values: "
                     + "; ".join(f"{b / GiB:.2f} GiB {d[:90]}" for b, d in p["largest"][:3]) + ".")
    return "\n".join(lines) + "\n"
