r"""DAIL step 1 for a non-thinking model: Qwen2.5-7B-Instruct rewrites expert solutions into
2048-token traces with the mixed rollout, on a TPU v5p-8 slice (4 chips; launch/gcloud_tpu.sh).

    launch/gcloud_tpu.sh create --type v5p-8 && launch/gcloud_tpu.sh install
    launch/gcloud_tpu.sh run "python launch/tpu_run.py --config configs/dail_synthesize_qwen2p5_7b.py \
        --config.model.path=/ckpt/Qwen2.5-7B-Instruct --config.data.problems=/data/e1_verifiable.jsonl"
    # then configs/dail_train_qwen2p5_7b.py (same workdir)

    python launch/tpu_run.py --config configs/dail_synthesize_qwen2p5_7b.py:runlocal   # CPU check, toy model

Resumable: re-running skips problems already in traces.jsonl. No end-of-thinking token exists
in this model's vocabulary, so nothing is banned.

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
    c.job = "dail_synthesize"
    c.workdir = "runs/dail_qwen2p5_7b"
    c.chip = "v5p"
    c.mesh.shape = (1, -1, 1)  # every chip on fsdp
    c.compile.model = MODEL  # job=compile needs no checkpoint
    c.compile.topology = "v5p:2x2x1"  # job=compile: the slice above (bench/results/compile/)
    c.model.path = ""  # --config.model.path=<Qwen2.5-7B-Instruct HF checkpoint dir>
    c.model.dtype = "bfloat16"

    c.data.problems = ""
    c.prompts.enable_thinking = False  # no thinking mode in Qwen2.5 (its template ignores the switch)
    # ours: 2048 (as configs/dail_train_qwen2p5_7b.py, whose contexts must match); the authors allow
    # 16,000, which the synthesis estimate fits too (39.5 GiB per chip of 95). A longer
    # multi-solution reference loses trailing solutions (prompts.reference_cut, recorded per trace).
    c.data.max_prompt_tokens = 2048

    c.rollout.max_new_tokens = 2048  # the paper's Qwen2.5-Instruct traces
    c.synthesis.accept_threshold = 0.8  # the authors' tau for a non-reasoning recipe (the per-recipe default)
    c.synthesis.selection = "auto"  # graded here: the first trace whose answer matches (authors)
    c.synthesis.num_samples = 32
    c.synthesis.ban_tokens = ()
    c.synthesis.problems_per_batch = 1
    c.rollout.cache_dtype = "bfloat16"
    return runlocal(c) if schema.runlocal_arg(arg) else c
