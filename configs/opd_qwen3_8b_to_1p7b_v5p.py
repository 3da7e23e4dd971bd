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

Expected time: a roofline estimate from the TPU compiler's FLOPs and HBM bytes per phase
(`--config.job=compile`, bench/results/compile/; published v5p peaks; not measured): ~83 s per
step, of which ~56 s is sampling (decoding 4,096 tokens for 512 rollouts, HBM-bound), ~15 s
teacher scoring and ~12 s the train step (splash attention); 200 steps ~ 4.6 h, plus evaluations (~16 min each:
500 problems x 4 samples and greedy, 4,096 tokens).

Memory per chip (the TPU compiler, v5p:2x4x4): 21.4 GiB of 95 at peak, in sampling (two copies
of the bf16 KV cache, 4.4 GiB each, while decoding); the hand estimate (opdjax.train.memory,
tests/test_memory.py) says 22.3 GiB.
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
    c.compile.student, c.compile.teacher = STUDENT, TEACHER  # job=compile needs no checkpoint
    c.compile.topology = "v5p:2x4x4"  # job=compile: the slice above (bench/results/compile/)

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
