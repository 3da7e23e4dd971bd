"""The smoke job: load a checkpoint onto the mesh, greedy-generate for a few chat prompts with
the KV cache, and check every generated token against the argmax of a full forward.

It runs until the OPD demo replaces it as the README's main command, and stays useful as the
first thing to run on a new machine or a new checkpoint (`--config.model.path=...`).
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from opdjax import multihost, sharding
from opdjax.data.tokenizer import encode_chat
from opdjax.models import qwen
from opdjax.models.load import load_model, model_tokenizer
from opdjax.toy.checkpoints import build_random_checkpoint
from opdjax.rollout.greedy import greedy_generate

log = logging.getLogger(__name__)


def load_checkpoint(model_cfg, plan, workdir):
    """(params, cfg, tokenizer) from config.model: a GGUF file, a HF directory, or (neither
    given) a tiny random Qwen3 checkpoint built into the workdir."""
    if model_cfg.gguf:
        params, cfg = load_model(gguf=model_cfg.gguf, plan=plan, dtype=model_cfg.dtype)
        return params, cfg, model_tokenizer(gguf=model_cfg.gguf)
    path = model_cfg.path
    if not path:
        path = os.path.join(workdir, "random_qwen3")
        # process 0 builds it in the (shared) workdir; the others wait, then load it
        if multihost.is_writer() and not os.path.isfile(os.path.join(path, "model.safetensors")):
            log.info("no model.path given: building a tiny random Qwen3 checkpoint in %s", path)
            build_random_checkpoint(path)
        multihost.sync("opdjax smoke: random checkpoint built")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"config.model.path={path!r} is not a directory; give a Hugging Face "
                                "checkpoint directory (config.json, *.safetensors, tokenizer files).")
    tok = model_tokenizer(path)  # checked first: cheap, and a missing tokenizer is a common mistake
    params, cfg = load_model(path, plan=plan, dtype=model_cfg.dtype)
    return params, cfg, tok


def run(config) -> dict:
    os.makedirs(config.workdir, exist_ok=True)
    plan = sharding.plan_from_config(config.mesh)
    mesh = plan.mesh
    log.info("mesh %s over %d %s device(s)", dict(mesh.shape), mesh.size, jax.devices()[0].platform)
    if not config.prompts:
        raise ValueError("config.prompts is empty; give at least one prompt string.")

    t0 = time.perf_counter()
    params, cfg, tok = load_checkpoint(config.model, plan, config.workdir)
    log.info("loaded %s: %.2fM params, %s, in %.1f s", cfg.model_type, cfg.num_params() / 1e6,
             jax.tree.leaves(params)[0].dtype, time.perf_counter() - t0)

    rows = [encode_chat(tok, [{"role": "user", "content": p}]) for p in config.prompts]
    shards = plan.batch_shards
    n = -(-len(rows) // shards) * shards  # pad the batch with repeats to fill the batch shards
    rows = rows + [rows[-1]] * (n - len(rows))
    P = max(map(len, rows))
    prompt = np.full((n, P), tok.pad_token_id, np.int32)
    pmask = np.zeros((n, P), bool)
    for i, r in enumerate(rows):  # left-padded: every row's prompt ends at the same column
        prompt[i, P - len(r):], pmask[i, P - len(r):] = r, True
    prompt_d = multihost.to_global(plan, prompt, ("batch", "length"))
    pmask_d = multihost.to_global(plan, pmask, ("batch", "length"))

    gen = lambda: greedy_generate(params, prompt_d, pmask_d, cfg, max_new_tokens=config.max_new_tokens,
                                  eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, plan=plan)
    t0 = time.perf_counter()
    jax.block_until_ready(gen())
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens_d, real_d = jax.block_until_ready(gen())
    gen_s = time.perf_counter() - t0
    tokens, real = multihost.to_host((tokens_d, real_d))
    new_tokens = int(real.sum())
    log.info("generated %d tokens for %d rows in %.2f s (%.1f tokens/s; first call incl. compile %.1f s)",
             new_tokens, n, gen_s, new_tokens / gen_s, compile_s)

    # The KV-cache path must pick exactly the argmax of a full forward over the same tokens.
    full = jnp.concatenate([prompt_d, tokens_d], axis=1)
    fmask = jnp.concatenate([pmask_d, real_d], axis=1)
    logits = qwen.jit_forward(cfg, plan)(params, full, fmask)
    argmax = multihost.to_host(jnp.argmax(logits, axis=-1))[:, P - 1:-1]  # prediction for each generated position
    mismatches = int(((argmax != tokens) & real).sum())
    if mismatches:
        raise AssertionError(f"KV-cache greedy decoding disagrees with full-forward argmax at {mismatches} "
                             f"of {new_tokens} tokens")
    log.info("KV-cache greedy == argmax of full forwards at all %d generated tokens", new_tokens)

    outputs = [tok.decode(t[r]) for t, r in zip(tokens[:len(config.prompts)], real)]
    for p, o in zip(config.prompts, outputs):
        print(f"--- prompt: {p}\n    output: {o!r}")
    result = dict(model=config.model.path or config.model.gguf or "random_qwen3", num_params=cfg.num_params(),
                  mesh=dict(mesh.shape), rows=n, new_tokens=new_tokens, generate_seconds=gen_s,
                  tokens_per_second=new_tokens / gen_s, compile_seconds=compile_s,
                  kv_cache_matches_full_forward=True, outputs=outputs)
    if multihost.is_writer():
        with open(os.path.join(config.workdir, "smoke.json"), "w") as f:
            json.dump(result, f, indent=2)
    print(f"smoke OK: {new_tokens} tokens at {new_tokens / gen_s:.1f} tokens/s; results in "
          f"{os.path.join(config.workdir, 'smoke.json')}")
    return result
