r"""Release-rule OPD, Qwen3-8B teacher -> Qwen3-1.7B student, math reasoning with thinking on,
on a TPU v5p-64 slice (32 chips, 4 hosts).

From a workstation with gcloud configured (launch/README.md):

    export PROJECT=my-project ZONE=us-east5-a TPU_NAME=opd-v5p ACCELERATOR_TYPE=v5p-64
    launch/gcloud_tpu.sh create --queued --spot        # or plain `create` with quota
    launch/gcloud_tpu.sh install                       # repo + venv + jax[tpu] on every worker
    launch/gcloud_tpu.sh exec 'cd ~/opdjax && .venv/bin/hf download Qwen/Qwen3-8B --local-dir ckpt/Qwen3-8B \
        && .venv/bin/hf download Qwen/Qwen3-1.7B --local-dir ckpt/Qwen3-1.7B'
    launch/gcloud_tpu.sh run --config configs/opd_qwen3_8b_to_1p7b_v5p.py \
        --config.student.path=ckpt/Qwen3-1.7B --config.teacher.path=ckpt/Qwen3-8B \
        --config.data.train_file=data/math_train.jsonl --config.data.eval_file=data/math500.jsonl \
        --config.checkpoint.directory=gs://my-bucket/opd/qwen3_8b_to_1p7b/checkpoints

    python launch/tpu_run.py --config configs/opd_qwen3_8b_to_1p7b_v5p.py:runlocal   # CPU check, toy pair

Every worker runs the same `launch/tpu_run.py` command and joins the job with
jax.distributed.initialize(); the checkpoint directory must be one place every worker sees (a gs://
path, or a shared disk). Process 0 writes metrics, pictures and the report to its local workdir.
Data files: JSONL with "prompt" and "answer" fields.

Memory per chip and the roofline time per phase (TPU compiler, `--config.job=compile`): the
README's compile table; `opdjax.train.memory` checks the estimate against config.chip at start.
Not run on a TPU here.
"""
from opdjax import schema
from opdjax.train.config import opd_config, runlocal

# For opdjax.train.memory (no weights needed): the published architectures and the slice size.
STUDENT = "Qwen3-1.7B"
TEACHER = "Qwen3-8B"
NUM_CHIPS = 32  # v5p-64: 64 TensorCores = 32 chips (JAX devices)


def get_config(arg=None):
    c = opd_config()
    c.job = "opd"
    c.workdir = "runs/opd_qwen3_8b_to_1p7b_v5p"  # metrics/pictures (process 0); checkpoints: checkpoint.directory
    c.chip = "v5p"

    c.student.path = ""  # --config.student.path=<Qwen3-1.7B HF checkpoint dir>
    c.student.dtype = "float32"  # trained: float32 params and AdamW state (bf16 would round away 1e-6 updates)
    c.teacher.path = ""  # --config.teacher.path=<Qwen3-8B HF checkpoint dir>
    c.teacher.dtype = "bfloat16"  # frozen: bf16 halves its memory

    c.mesh.shape = (1, -1, 1)  # every chip on fsdp: params, AdamW state and rows
    c.compile.student, c.compile.teacher = STUDENT, TEACHER  # job=compile needs no checkpoint
    c.compile.topology = "v5p:2x4x4"  # job=compile: the slice above (bench/results/compile/)

    c.data.train_file = ""  # --config.data.train_file=... (JSONL/Parquet: prompt, answer)
    c.data.eval_file = ""
    c.data.system_prompt = "Please reason step by step, and put your final answer within \\boxed{}."
    c.data.enable_thinking = True
    c.data.max_prompt_tokens = 1024

    c.rollout.samples_per_prompt = 8
    c.rollout.max_new_tokens = 4096
    c.rollout.cache_dtype = "bfloat16"  # the sampler KV cache at half the float32 student's size
    c.rollout.temperature = 1.0  # on-policy: sample from the student's own distribution
    c.rollout.top_p = 1.0

    c.batch.prompts_per_step = 64  # x samples_per_prompt rollouts per step
    c.batch.microbatches = 8

    c.release.max_sentences = 1024  # 4,096-token thinking traces can exceed the default 512

    c.loss.chunk_tokens = 256

    c.optimizer.learning_rate = 1e-6
    c.optimizer.warmup_steps = 10
    c.optimizer.grad_clip = 1.0

    c.train.steps = 200

    c.eval.every = 50
    c.eval.num_problems = 500
    c.eval.samples = 4
    c.eval.k = (1, 4)
    c.eval.temperature = 0.6  # Qwen3's recommended sampling for thinking mode
    c.eval.max_new_tokens = 4096

    c.checkpoint.every = 25  # spot / queued slices are preempted: resume loses at most 25 steps
    c.checkpoint.keep = 3
    c.metrics.pictures_every = 10
    return runlocal(c) if schema.runlocal_arg(arg) else c
