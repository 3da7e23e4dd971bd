"""The demo's comparison over seeds: the rule (`bic`) against full-trajectory OPD and the random
baseline with the rule's kept share (`random_matched`), 5 seeds x 200 steps, each arm of a seed from
the same student; a report with per-arm means, paired-bootstrap 95% intervals over seeds and
problems, the paired differences rule - baseline and a verdict.

    python launch/tpu_run.py --config configs/opd_seeds.py    # about 70 min on a 2-core CPU

Everything else is configs/opd_demo.py (seed 0's `bic` and `full` runs are the demo's own runs:
evaluation does not touch the training randomness). Only the final evaluation is run per arm
(eval.every = train.steps), plus the untrained student once per seed. Writes
runs/opd_seeds/report.md (+ .html, accuracy.png, curves.png) and compare.json.
"""
import importlib.util
import os


def _demo():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "opd_demo.py")
    spec = importlib.util.spec_from_file_location("opd_demo_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def get_config(arg=None):
    c = _demo().get_config(arg)
    c.workdir = "runs/opd_seeds"
    c.compare.arms = ("bic", "full", "random_matched")
    c.compare.seeds = (0, 1, 2, 3, 4)
    c.eval.every = c.train.steps  # final evaluation only; the curves are the training metrics
    return c
