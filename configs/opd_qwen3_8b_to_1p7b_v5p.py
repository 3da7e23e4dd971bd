r"""Release-rule OPD, Qwen3-8B teacher -> Qwen3-1.7B student, math reasoning with thinking on,
on a TPU v5p-64 slice (32 chips, 4 hosts; a v5p-32 slice, 16 chips, fits too).

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

Every worker runs the same `launch/tpu_run.py` command and joins the job with
jax.distributed.initialize(); the checkpoint directory must be one place every worker sees (a gs://
path, or a shared disk). Process 0 writes metrics, pictures and the report to its local workdir. Data files: JSONL with "prompt" and "answer" fields.

Expected time (estimated from FLOPs and HBM bandwidth — 35% MFU for teacher scoring and the
train step, decode at 25% of HBM bandwidth — not measured): ~1.5 min per step, of which ~70 s
is decoding 4,096 tokens for 512 rollouts; 200 steps ~ 5 h, plus evaluations.

Memory per chip (opdjax.train.memory with the Qwen3 presets): ~29 GiB of 95 GiB at peak, the
rollout's float32 KV cache (17.5 GiB) being the largest term; see tests/test_memory.py.
"""
from opdjax.train.config import opd_config

# For opdjax.train.memory (no weights needed): the published architectures and the slice size.
STUDENT = "Qwen3-1.7B"
TEACHER = "Qwen3-8B"
NUM_CHIPS = 32  # v5p-64: 64 TensorCores = 32 chips (JAX devices)


def get_config(arg=None):
    del arg
    c = opd_config()
    c.job = "opd"
    c.workdir = "runs/opd_qwen3_8b_to_1p7b_v5p"  # metrics/pictures (process 0); checkpoints: checkpoint.directory
    c.chip = "v5p"

    c.student.path = ""  # --config.student.path=<Qwen3-1.7B HF checkpoint dir>
    c.student.dtype = "float32"  # trained: float32 params and AdamW state (bf16 would round away 1e-6 updates)
    c.teacher.path = ""  # --config.teacher.path=<Qwen3-8B HF checkpoint dir>
    c.teacher.dtype = "bfloat16"  # frozen: bf16 halves its memory

    c.mesh.shape = (1, -1, 1)  # all 32 chips on fsdp: params, AdamW state and rows 32-way

    c.data.train_file = ""  # --config.data.train_file=... (JSONL/Parquet: prompt, answer)
    c.data.eval_file = ""
    c.data.system_prompt = "Please reason step by step, and put your final answer within \\boxed{}."
    c.data.enable_thinking = True
    c.data.max_prompt_tokens = 1024

    c.rollout.samples_per_prompt = 8
    c.rollout.max_new_tokens = 4096
    c.rollout.cache_dtype = "bfloat16"  # halves the largest per-chip term (the sampler KV cache)
    c.rollout.temperature = 1.0  # on-policy: sample from the student's own distribution
    c.rollout.top_p = 1.0

    c.batch.prompts_per_step = 64  # 512 rollouts per step, 16 per chip
    c.batch.microbatches = 8  # 64 rows (2 per chip) per forward/backward

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
    return c
