"""Teachability diagnosis on the shipped toy teacher/student pair (opdjax/assets/toy_pair):
does the teacher's margin over the student's candidates collapse late in the student's own
rollouts, more often than chance? No training.

    python launch/tpu_run.py --config configs/diagnose_toy_pair.py

64 rollouts (16 toy arithmetic prompts x 4 samples, up to 512 new tokens), every margin
variant, plain BIC and permutation calibration (P=200). Writes runs/diagnose_toy_pair/diagnosis/
report.md (+ PNGs, diagnosis.json, arrays.npz) and release_settings.json, the recommended
release.margin / release.calibration that a training config reads with release.from_diagnosis. Time on the 2-core CI CPU: see the README.
"""
import os

import opdjax
from opdjax.train.config import opd_config

PAIR = os.path.join(os.path.dirname(opdjax.__file__), "assets", "toy_pair")


def get_config(arg=None):
    del arg
    c = opd_config()
    c.job = "diagnose"
    c.workdir = "runs/diagnose_toy_pair"
    c.seed = 0
    c.student.path = os.path.join(PAIR, "student")
    c.teacher.path = os.path.join(PAIR, "teacher")
    c.data.task = "toy_arithmetic"
    c.data.num_train = 16
    c.data.max_prompt_tokens = 96

    c.rollout.samples_per_prompt = 4
    c.rollout.max_new_tokens = 512
    c.rollout.temperature = 1.0
    c.batch.prompts_per_step = 16  # all 64 rollouts in one sampler call

    c.release.top_k = 8
    c.release.permutations = 200
    c.release.alpha = 0.05

    c.diagnose.num_prompts = 16
    c.diagnose.examples = 3
    return c
