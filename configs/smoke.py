"""Smoke job: load a checkpoint onto the mesh, greedy-generate with the KV cache, and check each
token against a full forward.

    python launch/tpu_run.py --config configs/smoke.py                  # ~15 s on a 2-core CPU
    python launch/tpu_run.py --config configs/smoke.py --config.model.path=/path/to/hf_checkpoint
    python launch/tpu_run.py --config configs/smoke.py --config.model.gguf=/path/to/model.gguf \
        --config.model.dtype=bfloat16 --config.max_new_tokens=64

Without a model path it builds a tiny random-weight Qwen3 checkpoint (toy tokenizer) in the
workdir, so its output text is gibberish by design: what it checks is the machinery.
"""
import ml_collections


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.job = "smoke"
    c.workdir = "runs/smoke"

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # Hugging Face checkpoint directory; empty = build a random tiny Qwen3
    c.model.gguf = ""  # or a GGUF file (qwen2/qwen3 architectures)
    c.model.dtype = ""  # "" = the checkpoint's dtype; "float32" | "bfloat16"

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1)  # (data, fsdp, tensor); -1 fills with the remaining devices

    c.prompts = ("What is 12 + 30?", "Write one sentence about the sea.", "List three prime numbers.")
    c.max_new_tokens = 24
    return c
