r"""DAIL step 2 for a non-thinking model: contrastive LoRA training of Qwen2.5-7B-Instruct on the
2048-token traces of configs/dail_synthesize_qwen2p5_7b.py, on a TPU v5p-8 slice (4 chips).

    launch/gcloud_tpu.sh run "python launch/tpu_run.py --config configs/dail_train_qwen2p5_7b.py \
        --config.model.path=/ckpt/Qwen2.5-7B-Instruct"

The authors' recipe with 5 epochs (non-thinking): LoRA r = alpha = 32 on all projections, AdamW
lr 2e-4, 5 warm-up steps then linear decay, weight decay 0.01, 16 sequences per step, gamma 0.1.

Memory per chip, compiled for v5p:2x2x1 by the TPU compiler (`--config.job=compile`,
bench/results/compile/): 8.6 GiB for the contrastive step (splash attention) with 4 microbatches of 4 sequences x
4,096 tokens; the hand estimate (opdjax.dail.memory; tests/test_dail_memory.py): ~10 GiB.
Roofline estimate (published v5p peaks, not measured): ~3 s per step, compute-bound. Not run on a
TPU here.
"""
from opdjax.dail.config import dail_config

MODEL = "Qwen2.5-7B-Instruct"
NUM_CHIPS = 4


def get_config(arg=None):
    del arg
    c = dail_config()
    c.job = "dail_train"
    c.workdir = "runs/dail_qwen2p5_7b"
    c.chip = "v5p"
    c.mesh.shape = (1, -1, 1)
    c.compile.model = MODEL  # job=compile needs no checkpoint
    c.compile.topology = "v5p:2x2x1"  # job=compile: the slice above (bench/results/compile/)
    c.model.path = ""
    c.model.dtype = "bfloat16"
    c.prompts.enable_thinking = False
    c.prompts.max_prompt_tokens = 2048
    c.synthesis.max_new_tokens = 2048

    c.train.gamma = 0.1
    c.train.epochs = 5
    c.train.sequences_per_step = 16
    c.train.microbatches = 4
    c.train.chunk_tokens = 128
    c.lora.rank = 32
    c.lora.alpha = 32.0
    c.optimizer.learning_rate = 2e-4
    c.optimizer.schedule = "linear"
    c.optimizer.warmup_steps = 5
    c.optimizer.weight_decay = 0.01

    c.eval.samples = 128
    c.eval.temperature = 0.6
    c.eval.top_p = 0.95
    c.eval.budgets = (2048,)
    c.eval.forced_answer = "\n\nThe final answer is \\boxed{"
    return c
