r"""Release-rule OPD, Qwen3-8B teacher -> Qwen3-0.6B student, math reasoning with thinking on,
on one TPU v6e-8 host (8 Trillium chips).

On the TPU VM itself (one host: no gcloud wrapper needed), from the repository root:

    python3 -m venv .venv && .venv/bin/pip install -e ".[tpu]" \
        -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
    .venv/bin/hf download Qwen/Qwen3-8B --local-dir ckpt/Qwen3-8B
    .venv/bin/hf download Qwen/Qwen3-0.6B --local-dir ckpt/Qwen3-0.6B
    .venv/bin/python launch/tpu_run.py --config configs/opd_qwen3_8b_to_0p6b_v6e.py \
        --config.student.path=ckpt/Qwen3-0.6B --config.teacher.path=ckpt/Qwen3-8B \
        --config.data.train_file=data/math_train.jsonl --config.data.eval_file=data/math500.jsonl

    python launch/tpu_run.py --config configs/opd_qwen3_8b_to_0p6b_v6e.py:runlocal   # CPU check, toy pair

Or from a workstation: `ACCELERATOR_TYPE=v6e-8 launch/gcloud_tpu.sh create|install|run ...`
(launch/README.md). On a larger slice, raise --config.batch.prompts_per_step with the chip count
for more rollouts at the same memory per chip (check with --config.job=compile).

Memory per chip and the roofline time per phase (TPU compiler, `--config.job=compile`): the
README's compile table; `opdjax.train.memory` checks the estimate against config.chip at start.
"""
from opdjax import schema
from opdjax.train.config import opd_config, runlocal

# For opdjax.train.memory (no weights needed): the published architectures and the host size.
STUDENT = "Qwen3-0.6B"
TEACHER = "Qwen3-8B"
NUM_CHIPS = 8  # v6e-8: 8 chips (v6e counts chips, not cores)


def get_config(arg=None):
    c = opd_config()
    c.job = "opd"
    c.workdir = "runs/opd_qwen3_8b_to_0p6b_v6e"
    c.chip = "v6e"

    c.student.path = ""  # --config.student.path=<Qwen3-0.6B HF checkpoint dir>
    c.student.dtype = "float32"  # trained: float32 params and AdamW state
    c.teacher.path = ""  # --config.teacher.path=<Qwen3-8B HF checkpoint dir>
    c.teacher.dtype = "bfloat16"

    c.mesh.shape = (1, -1, 1)  # every chip on fsdp
    c.compile.student, c.compile.teacher = STUDENT, TEACHER  # job=compile needs no checkpoint
    c.compile.topology = "v6e:2x4"  # job=compile: the slice above (bench/results/compile/)

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

    c.batch.prompts_per_step = 16  # x samples_per_prompt rollouts per step
    c.batch.microbatches = 4

    c.release.max_sentences = 1024

    c.loss.chunk_tokens = 256

    c.optimizer.learning_rate = 2e-6
    c.optimizer.warmup_steps = 10
    c.optimizer.grad_clip = 1.0

    c.train.steps = 300

    c.eval.every = 50
    c.eval.num_problems = 500
    c.eval.samples = 4
    c.eval.k = (1, 4)
    c.eval.temperature = 0.6
    c.eval.max_new_tokens = 4096

    c.checkpoint.every = 25
    c.checkpoint.keep = 3
    c.metrics.pictures_every = 10
    return runlocal(c) if schema.runlocal_arg(arg) else c
