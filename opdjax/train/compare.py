"""Side-by-side OPD runs: the same student, data, seed and budget, differing only in
`release.mode` (the rule vs its baselines), then one report.

    python launch/tpu_run.py --config configs/opd_demo.py     # the README's main command

Each arm is a complete `opd` run in workdir/<arm> (its own checkpoints, metrics, pictures,
exported student), so an interrupted comparison resumes arm by arm. The untrained student is
evaluated once, in the first arm (eval draws use one fixed key, so every arm is scored on the
same problems with the same sampling noise).
"""
from __future__ import annotations

import json
import logging
import os
import time

import ml_collections

from opdjax import multihost
from opdjax.train import opd, report
from opdjax.teachability.rule import MODES

log = logging.getLogger(__name__)


def arm_config(config, arm: str, first: bool) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(config.to_dict())
    c.job = "opd"
    c.workdir = os.path.join(config.workdir, arm)
    c.release.mode = arm
    c.compare.arms = ()
    c.eval.before = bool(config.eval.before and first)
    return c


def run(config) -> dict:
    t0 = time.perf_counter()
    arms = tuple(config.compare.arms)
    if not arms:
        raise ValueError("config.compare.arms is empty; name at least one release.mode, e.g. ('bic', 'full').")
    bad = [a for a in arms if a not in MODES]
    if bad or len(set(arms)) != len(arms):
        raise ValueError(f"config.compare.arms={arms}: each arm is a distinct release.mode, one of {', '.join(MODES)}.")
    results = {}
    for i, arm in enumerate(arms):
        log.info("=== arm %d/%d: release.mode=%s ===", i + 1, len(arms), arm)
        s = opd.run(arm_config(config, arm, first=(i == 0)))
        s.pop("final_params", None)
        results[arm] = s
    untrained = results[arms[0]].get("eval_before", {})
    out = {"arms": results, "untrained": untrained, "wall_s": time.perf_counter() - t0}
    if multihost.is_writer():  # the arms' metrics files are process 0's; so are the report's
        out["report"] = report.write_compare_report(config, out)
        with open(os.path.join(config.workdir, "compare.json"), "w") as f:
            json.dump(out, f, indent=2)
        print(f"OPD comparison done in {out['wall_s'] / 60:.1f} min; report: {out['report']}")
    return out
