r"""DAIL step 1 for a non-thinking model: Qwen2.5-7B-Instruct rewrites expert solutions into
2048-token traces with the mixed rollout, on a TPU v5p-8 slice (4 chips; launch/gcloud_tpu.sh).

    launch/gcloud_tpu.sh create --type v5p-8 && launch/gcloud_tpu.sh install
    launch/gcloud_tpu.sh run "python launch/tpu_run.py --config configs/dail_synthesize_qwen2p5_7b.py \
        --config.model.path=/ckpt/Qwen2.5-7B-Instruct --config.data.problems=/data/e1_verifiable.jsonl"
    # then configs/dail_train_qwen2p5_7b.py (same workdir)

Resumable: re-running skips problems already in traces.jsonl. No end-of-thinking token exists
in this model's vocabulary, so nothing is banned.

Memory per chip, compiled for v5p:2x2x1 by the TPU compiler (`--config.job=compile`,
bench/results/compile/): 10.5 GiB for the mixed rollout — the weights fsdp-sharded over 4 chips
(3.6 GiB), the two KV caches of 32 rows x 4,096 slots, a second copy of them while decoding, and
the gathered unembedding. The hand estimate (opdjax.dail.memory; tests/test_dail_memory.py): ~13
GiB. Roofline estimate (published v5p peaks, not measured): ~93 s per problem (32 traces of 2,048
tokens), bound by the fsdp weight all-gathers of every decode step. Not run on a TPU here.
"""
from opdjax.dail.config import dail_config

MODEL = "Qwen2.5-7B-Instruct"
NUM_CHIPS = 4


def get_config(arg=None):
    del arg
    c = dail_config()
    c.job = "dail_synthesize"
    c.workdir = "runs/dail_qwen2p5_7b"
    c.chip = "v5p"
    c.mesh.shape = (1, -1, 1)  # fsdp over the 4 chips
    c.compile.model = MODEL  # job=compile needs no checkpoint
    c.compile.topology = "v5p:2x2x1"  # job=compile: the slice above (bench/results/compile/)
    c.model.path = ""  # --config.model.path=<Qwen2.5-7B-Instruct HF checkpoint dir>
    c.model.dtype = "bfloat16"

    c.data.problems = ""
    c.prompts.enable_thinking = False  # no thinking mode in Qwen2.5 (its template ignores the switch)
    c.prompts.max_prompt_tokens = 2048

    c.synthesis.accept_threshold = 0.5
    c.synthesis.num_samples = 32
    c.synthesis.max_new_tokens = 2048  # the paper's Qwen2.5-Instruct traces
    c.synthesis.ban_tokens = ()
    c.synthesis.problems_per_batch = 1
    c.synthesis.cache_dtype = "bfloat16"
    return c
