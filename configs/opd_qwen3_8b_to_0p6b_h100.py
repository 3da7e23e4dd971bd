r"""Release-rule OPD, Qwen3-8B teacher -> Qwen3-0.6B student, math reasoning with thinking on,
on one NVIDIA H100 80 GB (an H200 works unchanged).

    python3 -m venv .venv && .venv/bin/pip install -e . "jax[cuda12]==0.10.2"
    .venv/bin/hf download Qwen/Qwen3-8B --local-dir ckpt/Qwen3-8B
    .venv/bin/hf download Qwen/Qwen3-0.6B --local-dir ckpt/Qwen3-0.6B
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 .venv/bin/python launch/tpu_run.py \
        --config configs/opd_qwen3_8b_to_0p6b_h100.py \
        --config.student.path=ckpt/Qwen3-0.6B --config.teacher.path=ckpt/Qwen3-8B \
        --config.data.train_file=data/math_train.jsonl --config.data.eval_file=data/math500.jsonl

    python launch/tpu_run.py --config configs/opd_qwen3_8b_to_0p6b_h100.py:runlocal   # CPU check, toy pair

(JAX preallocates 75% of GPU memory by default; 0.95 leaves more room for XLA's temporaries.)
Memory: `opdjax.train.memory` with the Qwen3 presets (tests/test_memory.py), checked against
config.chip at start; the resident bf16 teacher, the float32 student with its AdamW state and the
sampler's bf16 KV cache are the largest terms. Not run on a GPU here; times are not measured.
"""
from opdjax import schema
from opdjax.train.config import opd_config, runlocal

# For opdjax.train.memory (no weights needed): the published architectures and the chip count.
STUDENT = "Qwen3-0.6B"
TEACHER = "Qwen3-8B"
NUM_CHIPS = 1


def get_config(arg=None):
    c = opd_config()
    c.job = "opd"
    c.workdir = "runs/opd_qwen3_8b_to_0p6b_h100"
    c.chip = "h100"

    c.student.path = ""  # --config.student.path=<Qwen3-0.6B HF checkpoint dir>
    c.student.dtype = "float32"
    c.teacher.path = ""  # --config.teacher.path=<Qwen3-8B HF checkpoint dir>
    c.teacher.dtype = "bfloat16"

    c.mesh.shape = (1, 1, 1)  # one device
    c.compile.student, c.compile.teacher = STUDENT, TEACHER  # job=compile needs no checkpoint
    # job=compile needs --config.compile.topology=<a TPU slice>: no GPU compiler runs without a GPU

    c.data.train_file = ""
    c.data.eval_file = ""
    c.data.system_prompt = "Please reason step by step, and put your final answer within \\boxed{}."
    c.data.enable_thinking = True
    c.data.max_prompt_tokens = 1024

    c.rollout.samples_per_prompt = 4
    c.rollout.max_new_tokens = 4096
    c.rollout.cache_dtype = "bfloat16"  # the sampler KV cache at half the float32 student's size
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0

    c.batch.prompts_per_step = 4  # x samples_per_prompt rollouts per step
    c.batch.microbatches = 4

    c.release.max_sentences = 1024

    c.loss.chunk_tokens = 256

    c.optimizer.learning_rate = 2e-6
    c.optimizer.warmup_steps = 10
    c.optimizer.grad_clip = 1.0

    c.train.steps = 300

    c.eval.every = 50
    c.eval.num_problems = 200
    c.eval.samples = 4
    c.eval.k = (1, 4)
    c.eval.temperature = 0.6
    c.eval.max_new_tokens = 4096

    c.checkpoint.every = 25
    c.checkpoint.keep = 3
    c.metrics.pictures_every = 10
    return runlocal(c) if schema.runlocal_arg(arg) else c
