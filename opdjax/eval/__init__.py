"""Evaluation: pass@k / avg@n over sampled answers, and their plots."""
