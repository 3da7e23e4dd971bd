r"""DAIL step 1 at the paper's scale: Qwen3-8B (thinking) rewrites expert solutions into 256-token
in-distribution traces with the mixed rollout, on one NVIDIA H100 80 GB (an H200 works unchanged).

    python3 -m venv .venv && .venv/bin/pip install -e . "jax[cuda12]==0.10.2"
    .venv/bin/hf download Qwen/Qwen3-8B --local-dir ckpt/Qwen3-8B
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 .venv/bin/python launch/tpu_run.py \
        --config configs/dail_synthesize_qwen3_8b.py --config.model.path=ckpt/Qwen3-8B \
        --config.data.problems=data/e1_verifiable.jsonl
    # then: configs/dail_train_qwen3_8b.py (same workdir: it reads runs/dail_qwen3_8b/traces.jsonl)

Data: one record per problem with `problem`, `solution` (or a list of solutions) and `answer`
(e.g. the paper's e1-verifiable: 417 AIME problems with their official solutions).
The run is resumable: re-running the same command skips problems already in traces.jsonl.

Memory (opdjax.dail.memory with the Qwen3-8B preset; tests/test_dail_memory.py): ~40 GiB at
peak on one H100 — the bf16 weights (15.3 GiB) and the two KV caches of 32 rows x 2,304 slots
(20.3 GiB); each context is prefilled once per problem and its cache copied to the 32 samples.
Not run here (no GPU on our CI machine); times are not measured.
"""
from opdjax.dail.config import dail_config

MODEL = "Qwen3-8B"  # opdjax.models.presets name: memory estimates without weights
NUM_CHIPS = 1


def get_config(arg=None):
    del arg
    c = dail_config()
    c.job = "dail_synthesize"
    c.workdir = "runs/dail_qwen3_8b"
    c.chip = "h100"
    c.mesh.shape = (1, 1, 1)
    c.compile.model = MODEL  # job=compile needs no checkpoint
    # job=compile needs --config.compile.topology=<a TPU slice>: no GPU compiler runs without a GPU
    c.model.path = ""  # --config.model.path=<Qwen3-8B HF checkpoint dir>
    c.model.dtype = "bfloat16"

    c.data.problems = ""  # --config.data.problems=<problems with expert solutions>
    c.prompts.enable_thinking = True  # traces are thinking text; </think> is banned below
    c.prompts.max_prompt_tokens = 2048

    c.synthesis.accept_threshold = 0.5
    c.synthesis.top_n = 20
    c.synthesis.retries = 5
    c.synthesis.num_samples = 32
    c.synthesis.max_new_tokens = 256  # the paper's Qwen3 thinking traces
    c.synthesis.ban_tokens = ("</think>",)
    c.synthesis.problems_per_batch = 1  # 32 rows per call
    c.synthesis.cache_dtype = "bfloat16"
    return c
