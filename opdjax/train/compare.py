"""Side-by-side OPD runs: the same student, data, seed and budget, differing only in
`release.mode` (the rule vs its baselines), then one report.

    python launch/tpu_run.py --config configs/opd_demo.py     # the README's main command

Each arm is a complete `opd` run in workdir/<arm> (its own checkpoints, metrics, pictures,
exported student), so an interrupted comparison resumes arm by arm. The untrained student is
evaluated once, in the first arm (eval draws use one fixed key, so every arm is scored on the
same problems with the same sampling noise).

compare.seeds = (0, 1, ...): every arm at every seed, in workdir/seed<N>/<arm>; the report
(report.write_seeds_report) gives per-arm means and the paired differences rule − baseline with
paired-bootstrap intervals over seeds and problems (eval/paired_bootstrap.py) and a verdict.
compare.diagnose_first: the diagnosis runs once first and every arm reads its
release_settings.json (release.from_diagnosis).
"""
from __future__ import annotations

import json
import logging
import os
import time

import ml_collections

from opdjax import multihost
from opdjax.train import diagnose, opd, report
from opdjax.teachability.rule import MODES

log = logging.getLogger(__name__)


def arm_config(config, arm: str, first: bool, seed: int | None = None) -> ml_collections.ConfigDict:
    """The config of one arm: `seed` None = the config's own seed in workdir/<arm>; else that seed
    in workdir/seed<N>/<arm> (compare.seeds)."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.job = "opd"
    if seed is None:
        c.workdir = os.path.join(config.workdir, arm)
    else:
        c.seed = int(seed)
        c.workdir = os.path.join(config.workdir, f"seed{int(seed)}", arm)
    c.release.mode = arm
    c.compare.arms = ()
    c.compare.seeds = ()
    c.eval.before = bool(config.eval.before and first)
    return c


def check_compare(config) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
    """compare.arms and compare.seeds, checked before anything loads (names the field)."""
    arms = tuple(config.compare.arms)
    if not arms:
        raise ValueError("config.compare.arms is empty; name at least one release.mode, e.g. ('bic', 'full').")
    bad = [a for a in arms if a not in MODES]
    if bad or len(set(arms)) != len(arms):
        raise ValueError(f"config.compare.arms={arms}: each arm is a distinct release.mode, one of {', '.join(MODES)}.")
    raw = tuple(config.compare.seeds)
    if not raw:
        return arms, None
    if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in raw) or len(set(raw)) != len(raw):
        raise ValueError(f"config.compare.seeds={raw}: distinct non-negative integers, e.g. (0, 1, 2, 3, 4); "
                         "() = one run at config.seed.")
    return arms, tuple(int(x) for x in raw)


def run(config) -> dict:
    t0 = time.perf_counter()
    arms, seeds = check_compare(config)
    diagnose.release_settings_for(config)  # compare.diagnose_first: diagnose, then every arm reads its file
    results = {}  # arm -> summary (one seed) or seed -> arm -> summary
    for si, seed in enumerate(seeds or (None,)):
        per_seed = {}
        for i, arm in enumerate(arms):
            where = f"arm {i + 1}/{len(arms)}" + ("" if seed is None else f", seed {seed} ({si + 1}/{len(seeds)})")
            log.info("=== %s: release.mode=%s ===", where, arm)
            s = opd.run(arm_config(config, arm, first=(i == 0), seed=seed))
            s.pop("final_params", None)
            per_seed[arm] = s
        if seed is None:
            results = per_seed
        else:
            results[str(seed)] = per_seed
    if seeds is not None:
        out = {"seeds": list(seeds), "runs": results, "wall_s": time.perf_counter() - t0}
        if multihost.is_writer():
            out["report"] = report.write_seeds_report(config, out)
            with open(os.path.join(config.workdir, "compare.json"), "w") as f:
                json.dump(out, f, indent=2)
            print(f"OPD comparison over {len(seeds)} seeds done in {out['wall_s'] / 60:.1f} min; "
                  f"report: {out['report']}")
        return out
    untrained = results[arms[0]].get("eval_before", {})
    out = {"arms": results, "untrained": untrained, "wall_s": time.perf_counter() - t0}
    if multihost.is_writer():  # the arms' metrics files are process 0's; so are the report's
        out["report"] = report.write_compare_report(config, out)
        with open(os.path.join(config.workdir, "compare.json"), "w") as f:
            json.dump(out, f, indent=2)
        print(f"OPD comparison done in {out['wall_s'] / 60:.1f} min; report: {out['report']}")
    return out
