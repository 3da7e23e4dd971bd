r"""DAIL step 2 for a non-thinking model: contrastive LoRA training of Qwen2.5-7B-Instruct on the
2048-token traces of configs/dail_synthesize_qwen2p5_7b.py, on a TPU v5p-8 slice (4 chips).

    launch/gcloud_tpu.sh run "python launch/tpu_run.py --config configs/dail_train_qwen2p5_7b.py \
        --config.model.path=/ckpt/Qwen2.5-7B-Instruct"

    # CPU check on the toy model: synthesis, then training, in one runlocal workdir
    python launch/tpu_run.py --config configs/dail_synthesize_qwen2p5_7b.py:runlocal
    python launch/tpu_run.py --config configs/dail_train_qwen2p5_7b.py:runlocal

The authors' recipe with 5 epochs (non-thinking): LoRA r = alpha = 32 on all projections, AdamW
lr 2e-4, 5 warm-up steps then linear decay, weight decay 0.01, 16 sequences per step, gamma 0.1.

Memory per chip and the roofline time (TPU compiler, `--config.job=compile`): the README's
compile table; `opdjax.dail.memory_estimate` checks the estimate against config.chip at start. Not run on a
TPU here.
"""
from opdjax import schema
from opdjax.dail.config import dail_config, runlocal

MODEL = "Qwen2.5-7B-Instruct"
NUM_CHIPS = 4


def get_config(arg=None):
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
    c.data.max_prompt_tokens = 2048
    c.rollout.max_new_tokens = 2048  # the traces' length (memory estimate)

    c.train.gamma = 0.1
    c.train.epochs = 5
    c.batch.sequences_per_step = 16
    c.batch.microbatches = 4
    c.loss.chunk_tokens = 128
    c.lora.rank = 32
    c.lora.alpha = 32.0
    c.optimizer.learning_rate = 2e-4
    c.optimizer.schedule = "linear"
    c.optimizer.warmup_steps = 5
    c.optimizer.weight_decay = 0.01

    c.eval.samples = 128
    c.eval.temperature = 0.6
    c.eval.top_p = 0.95
    # authors' code: eval/eval_array.sbatch, MAX_TOKENS=4096 for Qwen2.5-7B-Instruct (thinking off: the
    # budget bounds the whole response; a sample without an answer is forced, up to 100 more tokens)
    c.eval.budgets = (4096,)
    c.eval.forced_answer = "\n\nThe final answer is \\boxed{"
    return runlocal(c) if schema.runlocal_arg(arg) else c
