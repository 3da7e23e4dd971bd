"""Ahead-of-time compilation for TPU: every phase of a run compiled for a topology, checked
against HBM, costed (the `compile` job; `python launch/tpu_run.py --config ... --config.job=compile`)."""
