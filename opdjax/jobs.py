"""Registry: config.job -> the function that runs it. A new kind of job is a new entry here."""
from __future__ import annotations

import importlib

JOBS = {
    "smoke": "opdjax.smoke:run",
    "opd": "opdjax.train.opd:run",
    "opd_compare": "opdjax.train.compare:run",
    "compile": "opdjax.aot.job:run",
    "diagnose": "opdjax.train.diagnose:run",
    "dail_synthesize": "opdjax.dail.synthesize:run",
    "dail_train": "opdjax.dail.distill:run",
    "dail_eval": "opdjax.dail.evaluate:run",
    "dail_demo": "opdjax.dail.demo:run",
    "prepare_data": "opdjax.data.prepare:run",
}


def get_job(name: str):
    if name not in JOBS:
        raise ValueError(f"config.job={name!r} is unknown; known jobs: {', '.join(sorted(JOBS))}.")
    module, fn = JOBS[name].split(":")
    return getattr(importlib.import_module(module), fn)
