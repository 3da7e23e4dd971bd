"""The `compile` job: every phase of an OPD or DAIL config compiled for a TPU topology.

    python launch/tpu_run.py --config configs/opd_qwen3_8b_to_1p7b_v5p.py --config.job=compile \
        --config.compile.topology=v5p:2x4x4

No weights are read: architectures come from the checkpoints' config.json, or from presets
(`compile.student` / `compile.teacher` / `compile.model`). Writes compile_report.{json,md} (process
0) and raises `DoesNotFitError` (one line per phase, exit 2 from tpu_run) when a phase does not
fit. On a TPU VM the OPD and DAIL jobs run `check_at_start` on their own devices before loading
weights.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import time

import jax

from opdjax import multihost, sharding
from opdjax.aot import chips, report
from opdjax.aot.phases import Phase, opd_phases
from opdjax.errors import ConfigError
from opdjax.models.config import ModelConfig
from opdjax.sharding import ShardingPlan
from opdjax.train.validate import model_cfg
from opdjax.models.presets import preset_config
from opdjax.teachability.rule import settings_from_config
from opdjax.models import attention
from opdjax.train import memory
from opdjax.dail.memory_estimate import estimate_dail_memory

log = logging.getLogger(__name__)


def config_kind(config) -> str:
    if "teacher" in config and "student" in config:
        return "opd"
    if "synthesis" in config and "model" in config:
        return "dail"
    raise ConfigError("config.job=compile: the config is neither an OPD config (student, teacher sections) nor a "
                      "DAIL one (model, synthesis sections).")


def model_for(section, name: str, preset: str, dtype: str | None = None) -> ModelConfig:
    """The architecture of config.<name>: its checkpoint's config.json / GGUF, else the preset."""
    if section.path or section.gguf:
        cfg = model_cfg(section, name)
    elif preset:
        cfg = preset_config(preset)
    else:
        raise ConfigError(f"config.{name}.path is empty and config.compile.{name.split('.')[-1]} names no preset: "
                          f"give a checkpoint directory or a preset (e.g. --config.compile.{name}=Qwen3-8B).")
    return cfg


def target(config) -> tuple[chips.Chip, tuple, str]:
    """(chip, devices, topology name): the abstract devices of compile.topology, else this TPU VM's."""
    c = config.compile
    if c.topology:
        chip, devices = chips.abstract_devices(c.topology, int(c.num_slices))
        return chip, devices, chips.topology_name(*chips.parse_topology(c.topology))
    devices = jax.devices()
    if devices[0].platform != "tpu":
        raise ConfigError("config.compile.topology is empty and this host has no TPU: name the slice to compile "
                          "for, e.g. --config.compile.topology=v5p:2x2x1 (or v6e:2x4, v5e:4x4, v5p-64).")
    kind = devices[0].device_kind.lower()
    name = "v6e" if "v6" in kind else "v5e" if "lite" in kind else "v5p" if "v5" in kind else "v4"
    return chips.CHIPS[name], tuple(devices), f"{name} ({len(devices)} chips, this slice)"


# The phases each job runs (the start-up check compiles only those; job=compile compiles all).
JOB_PHASES = {"opd": ("sample", "teacher scoring", "release margins", "release decision", "train step",
                      "eval sampling", "eval greedy"),
              "dail_synthesize": ("mixed rollout",), "dail_train": ("contrastive step",),
              "dail_eval": ("eval sampling",)}


def phases_for(config, plan: ShardingPlan, only: tuple = ()) -> list[Phase]:
    kind = config_kind(config)
    c = config.compile
    if kind == "opd":
        student = model_for(config.student, "student", c.student)
        teacher = model_for(config.teacher, "teacher", c.teacher)
        student = _with_attention(config, student, config.student, "student")
        teacher = _with_attention(config, teacher, config.teacher, "teacher")
        try:
            release = settings_from_config(config.release)
        except ValueError as e:
            raise ConfigError(f"config.{e}") from e
        phases = opd_phases(config, student, teacher, release, plan)
    else:
        # dail_phases lowers dail.distill's step, and dail.distill calls this module's start-up check
        from opdjax.aot.dail_phases import dail_phases
        model = _with_attention(config, model_for(config.model, "model", c.model), config.model, "model")
        phases = dail_phases(config, model, plan)
    if c.phases:
        known = [p.name for p in phases]
        unknown = [n for n in c.phases if n not in known]
        if unknown:
            raise ConfigError(f"config.compile.phases names {unknown}; this config's phases: {', '.join(known)}.")
        phases = [p for p in phases if p.name in c.phases]
    if only:
        phases = [p for p in phases if p.name in only]
    return phases


def _with_attention(config, cfg: ModelConfig, section, name: str) -> ModelConfig:
    """The attention implementation a TPU run of this config would pick (model.attention:
    "auto" is splash where the kernel supports the model), for the program to compile."""
    requested = config.model.get("attention", "auto") if "model" in config else "auto"
    return attention.resolve(cfg, requested, section.dtype, name=name, backend="tpu")


def estimate_rows(config, reports: list[report.PhaseReport], plan: ShardingPlan, chip_name: str) -> list[dict]:
    """The hand estimator's per-phase peak (resident + phase) next to the compiler's."""
    if config_kind(config) != "opd":
        return _dail_estimate_rows(config, reports, plan, chip_name)
    c = config.compile
    student = model_for(config.student, "student", c.student)
    teacher = model_for(config.teacher, "teacher", c.teacher)
    est = memory.estimate_memory(config, student, teacher, num_devices=plan.mesh.size, chip=chip_name)
    pairs = {"sample": "rollout", "teacher scoring": "teacher scoring", "train step": "train step"}
    return _rows(est, reports, pairs)


def _dail_estimate_rows(config, reports, plan, chip_name):
    model = model_for(config.model, "model", config.compile.model)
    rows = []
    for job, ours, theirs in (("dail_synthesize", "mixed rollout", "rollout"),
                              ("dail_train", "contrastive step", "train step")):
        est = estimate_dail_memory(config, model, num_devices=plan.mesh.size, chip=chip_name, job=job)
        rows += _rows(est, reports, {ours: theirs})
    return rows


def _rows(est, reports, pairs):
    rows = []
    by_name = {r.name: r for r in reports}
    phases = {t.phase for t in est.terms}
    for ours, theirs in pairs.items():
        r = by_name.get(ours)
        if r is None or r.error or theirs not in phases:
            continue
        e = est.resident_bytes + est.phase_bytes(theirs)
        rows.append({"phase": ours, "estimate_phase": theirs, "estimate_gib": e / report.GiB,
                     "compiler_gib": r.total_bytes / report.GiB, "ratio": e / max(r.total_bytes, 1)})
    return rows


def run(config) -> dict:
    t0 = time.perf_counter()
    chip, devices, topo = target(config)
    plan = sharding.plan_from_config(config.mesh, devices=list(devices))
    mesh = plan.mesh
    phases = phases_for(config, plan)
    say = print if multihost.is_writer() else (lambda *_: None)
    say(f"opdjax compile: {len(phases)} phases for {topo} ({len(devices)} chips), mesh {dict(mesh.shape)}")
    report.precheck(phases, chip)
    reports = report.compile_all(phases, chip, progress=say)
    meta = {"config": getattr(config, "config_file", "") or config.workdir, "topology": topo,
            "num_slices": int(config.compile.num_slices), "num_devices": len(devices), "mesh": dict(mesh.shape),
            "jax": jax.__version__, "libtpu": _version("libtpu"), "wall_s": time.perf_counter() - t0}
    rep = report.to_dict(reports, chip, meta)
    try:
        rep["estimate"] = estimate_rows(config, reports, plan, chip.name)
    except ConfigError as e:  # the estimator refuses what does not fit; the compiler said it already
        rep["estimate_error"] = str(e).splitlines()[0]
    directory = config.compile.directory or os.path.join(config.workdir, "compile")
    if multihost.is_writer():
        jpath, mpath = report.write(rep, directory)
        say(f"wrote the compile report {mpath} (and {os.path.basename(jpath)}); roofline step "
            f"{rep['roofline_step_s']:.3g} s (an estimate)")
    report.check_fit(reports, chip)
    return rep


def check_at_start(config, plan: ShardingPlan, job: str) -> None:
    """On TPU: compile the phases of `job` for these devices before any weight is loaded; stop
    (naming the phase and its largest buffers) if one does not fit. It costs one extra compile of
    each phase (compile.check_at_start=False skips it); elsewhere it does nothing."""
    if jax.devices()[0].platform != "tpu" or not config.compile.check_at_start:
        return
    chip, _, _ = target(_without_topology(config))
    log.info("compile.check_at_start: compiling the %s phases for this slice before loading weights", job)
    check_phases(config, plan, chip, JOB_PHASES[job])


def check_phases(config, plan: ShardingPlan, chip: chips.Chip, only: tuple = ()) -> list:
    """Compile the phases of `config` on `plan`'s devices; raise DoesNotFitError naming the phase."""
    phases = phases_for(config, plan, only)
    report.precheck(phases, chip)
    reports = report.compile_all(phases, chip, progress=log.info)
    report.check_fit(reports, chip)
    return reports


def _without_topology(config):
    c = config.copy_and_resolve_references()
    c.compile.topology = ""  # the devices this job runs on
    return c


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
