r"""DAIL step 2 at the paper's scale: contrastive LoRA training of Qwen3-8B on the traces of
configs/dail_synthesize_qwen3_8b.py (run that first, same workdir), on one NVIDIA H100 80 GB.

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 .venv/bin/python launch/tpu_run.py \
        --config configs/dail_train_qwen3_8b.py --config.model.path=ckpt/Qwen3-8B
    # then evaluate: --config.job=dail_eval --config.eval.problems=data/aime2025.jsonl

    # CPU check on the toy model: synthesis, then training, in one runlocal workdir
    python launch/tpu_run.py --config configs/dail_synthesize_qwen3_8b.py:runlocal
    python launch/tpu_run.py --config configs/dail_train_qwen3_8b.py:runlocal

The authors' recipe (DAIL.md): LoRA r = alpha = 32 on every attention and MLP projection, the
frozen reference is the base with the adapter off; AdamW lr 2e-4, 5 warm-up steps then linear
decay, weight decay 0.01, 16 sequences per step, 3 epochs (thinking); gamma = 0.1, reverse KL.
The product: runs/dail_qwen3_8b/student_hf (merged) and adapter/ (PEFT format).

Memory: `opdjax.dail.memory_estimate` with the Qwen3-8B preset (tests/test_dail_memory.py), checked against
config.chip at start. Not run on a GPU here.
"""
from opdjax import schema
from opdjax.dail.config import dail_config, runlocal

MODEL = "Qwen3-8B"
NUM_CHIPS = 1


def get_config(arg=None):
    c = dail_config()
    c.job = "dail_train"
    c.workdir = "runs/dail_qwen3_8b"
    c.chip = "h100"
    c.mesh.shape = (1, 1, 1)
    c.compile.model = MODEL  # job=compile needs no checkpoint
    # job=compile needs --config.compile.topology=<a TPU slice>: no GPU compiler runs without a GPU
    c.model.path = ""  # --config.model.path=<Qwen3-8B HF checkpoint dir>
    c.model.dtype = "bfloat16"
    c.prompts.enable_thinking = True  # the same contexts the traces were synthesised with
    c.data.max_prompt_tokens = 2048
    c.rollout.max_new_tokens = 256  # the traces' length (memory estimate)

    c.train.gamma = 0.1
    c.train.divergence = "reverse"
    c.train.epochs = 3
    c.batch.sequences_per_step = 16
    c.batch.microbatches = 4
    c.loss.chunk_tokens = 64
    c.lora.enabled = True
    c.lora.rank = 32
    c.lora.alpha = 32.0
    c.optimizer.learning_rate = 2e-4
    c.optimizer.schedule = "linear"
    c.optimizer.warmup_steps = 5
    c.optimizer.weight_decay = 0.01

    c.eval.samples = 128
    c.eval.temperature = 0.6
    c.eval.top_p = 0.95
    # authors' code: eval/run_eval_dataset_reasoning.sh, MAX_TOKENS=(512 1024 2048 4096) thinking tokens
    # (thinking on: generation stops at </think>, then every sample gets the forced answer)
    c.eval.budgets = (512, 1024, 2048, 4096)
    return runlocal(c) if schema.runlocal_arg(arg) else c
