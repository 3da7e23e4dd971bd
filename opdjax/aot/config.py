"""The `compile` section, shared by the OPD and DAIL configs."""
from __future__ import annotations

import ml_collections


def compile_section() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # job=compile: the TPU slice to compile for, as <chip>:<shape> (v5p:4x4x2, v6e:2x4, v5e:4x4) or a
    # slice name (v5p-64). "" = the TPU devices this job runs on (a TPU VM).
    c.topology = ""
    c.num_slices = 1  # multislice (DCN) jobs: slices of `topology`
    # Architectures when the model sections have no checkpoint yet (no weights are needed):
    # a preset name of opdjax.models.presets ("Qwen3-8B", ...); a path's config.json wins.
    c.student = ""
    c.teacher = ""
    c.model = ""  # DAIL's one model
    c.phases = ()  # names to compile; () = every phase of the config's jobs
    c.directory = ""  # "" = workdir/compile
    # OPD/DAIL jobs on TPU compile every phase for the devices they run on before loading
    # weights, and stop if one does not fit HBM.
    c.check_at_start = True
    return c
