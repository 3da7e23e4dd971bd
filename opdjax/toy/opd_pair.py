"""The embedded demo's toy teacher/student pair: two real Qwen3 checkpoints (Hugging Face format,
one shared tokenizer) trained from scratch on `opdjax.toy.arithmetic`, shipped in
`opdjax/assets/toy_pair/{teacher,student}` and rebuilt by

    python -m opdjax.toy.opd_pair --out DIR [--seed 0] [--teacher-steps N] [--student-steps N]

Training is supervised next-token cross-entropy on the chat-rendered prompt (exactly
`encode_chat(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True,
enable_thinking=False)`, what the OPD run feeds the student) followed by the solution and
<|im_end|>; the loss covers the solution tokens and the EOS only. optax AdamW (warmup + cosine),
one jitted train step, batches cut to length buckets of 32 tokens (one compile per bucket).
Both models get the same data and the same 800 steps (batch 32); only the size differs. The
teacher (4 layers, hidden 128, 635k params) reaches ~98% greedy on held-out problems; the student
(2 layers, hidden 64, 96k params) ~40%, its first wrong sentence mostly in the second half of the
solution (the larger-number steps). The student's accuracy is steep in its step count (700: 12%,
800: 40%, 900: 62%, 1400: 99%), so change `STUDENT_TRAIN` with care. Same seed and settings give
the same weights on the same machine (init, data order and batching are all seeded).
The measured numbers of the shipped pair are in opdjax/assets/toy_pair/BUILD.json.

`load_toy_pair()` returns the shipped (teacher_dir, student_dir).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import os
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from opdjax.toy import arithmetic
from opdjax.data.tokenizer import build_toy_tokenizer, check_same_tokenizer, encode_chat, load_tokenizer
from opdjax.models import hf_io, qwen
from opdjax.models.config import ModelConfig
from opdjax.rollout import draw
from opdjax.rollout.decode import decode
from opdjax.rollout.greedy import greedy_generate

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "toy_pair")


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    steps: int
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    init_std: float = 0.02
    bucket: int = 32  # batches are cut to a multiple of this many tokens (see `train`)


TEACHER_ARCH = ArchSpec(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                        intermediate_size=256)
STUDENT_ARCH = ArchSpec(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                        intermediate_size=128)
TEACHER_TRAIN = TrainSpec(steps=800)
STUDENT_TRAIN = TrainSpec(steps=800)
VOCAB_SIZE = 400  # the task text runs out of merges first: 345 tokens
NUM_TRAIN = 20000
NUM_EVAL = 256


def load_toy_pair(dir: str | os.PathLike | None = None) -> tuple[str, str]:
    """(teacher_dir, student_dir) of a built pair (default: the one shipped in the package)."""
    root = os.fspath(dir) if dir is not None else ASSET_DIR
    teacher, student = os.path.join(root, "teacher"), os.path.join(root, "student")
    for d in (teacher, student):
        if not os.path.isfile(os.path.join(d, "config.json")):
            raise FileNotFoundError(f"No toy checkpoint at {d}: build it with "
                                    f"`python -m opdjax.toy.opd_pair --out {root}`.")
    return teacher, student


# ---------------------------------------------------------------------------------------- data
def tokenizer_corpus(problems: list[dict]) -> list[str]:
    lines = ["user\n", "assistant\n", "\n\n"]
    for p in problems:
        lines += [p["prompt"] + "\n", p["solution"] + "\n"]
    return lines


def encode_prompt(tok, prompt: str) -> list[int]:
    """The prompt ids the OPD run uses (and SFT trains on)."""
    return encode_chat(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True,
                       enable_thinking=False)


def encode_sft(tok, problems: list[dict], length: int | None = None):
    """Right-padded tokens [N, T] (prompt + solution + EOS), mask [N, T] (real tokens) and
    loss_mask [N, T] (True at positions whose *next* token is a solution/EOS token)."""
    rows = []
    for p in problems:
        prompt = encode_prompt(tok, p["prompt"])
        answer = tok.encode(p["solution"], add_special_tokens=False) + [tok.eos_token_id]
        rows.append((prompt, answer))
    need = max(len(a) + len(b) for a, b in rows)
    T = length or -(-need // 16) * 16
    if need > T:
        raise ValueError(f"sequence of {need} tokens does not fit length={T}")
    tokens = np.full((len(rows), T), tok.pad_token_id, np.int32)
    mask = np.zeros((len(rows), T), bool)
    loss_mask = np.zeros((len(rows), T), bool)
    for i, (a, b) in enumerate(rows):
        n = len(a) + len(b)
        tokens[i, :n] = a + b
        mask[i, :n] = True
        loss_mask[i, len(a) - 1:n - 1] = True  # predicting b[0..] from the position before it
    return tokens, mask, loss_mask


def model_config(arch: ArchSpec, tok) -> ModelConfig:
    return ModelConfig(
        model_type="qwen3", vocab_size=len(tok), hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size, num_layers=arch.num_layers, num_heads=arch.num_heads,
        num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim, tie_word_embeddings=True,
        dtype="float32", eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        max_position_embeddings=1024, rope=dataclasses.replace(qwen.RopeConfig(), theta=10000.0),
    )


# ---------------------------------------------------------------------------------------- train
def make_train_step(cfg: ModelConfig, opt: optax.GradientTransformation):
    def loss_fn(params, tokens, mask, loss_mask):
        logits, _ = qwen.forward(params, tokens, cfg, mask=mask)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        w = loss_mask[:, :-1].astype(jnp.float32)
        return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)

    @jax.jit
    def step(params, opt_state, tokens, mask, loss_mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, mask, loss_mask)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


@functools.lru_cache(maxsize=8)
def _optimizer_and_step(cfg: ModelConfig, spec: TrainSpec):
    """One compiled train step per (model config, train spec): rebuilding the same model twice
    (tests, determinism checks) compiles once."""
    sched = optax.warmup_cosine_decay_schedule(0.0, spec.lr, min(spec.warmup, max(spec.steps - 1, 1)),
                                               max(spec.steps, 2), end_value=spec.lr * 0.05)
    no_decay_on_norms = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(sched, b1=0.9, b2=0.98, weight_decay=spec.weight_decay,
                                  mask=no_decay_on_norms))
    return opt, make_train_step(cfg, opt)


def train(cfg: ModelConfig, data, spec: TrainSpec, seed: int, log_every: int = 100, name: str = "model"):
    """SFT from a fresh init; returns (params, list of (step, loss))."""
    tokens, mask, loss_mask = data
    params = qwen.init_params(cfg, jax.random.key(seed), std=spec.init_std)
    opt, step_fn = _optimizer_and_step(cfg, spec)
    opt_state = opt.init(params)
    # Length buckets (multiples of spec.bucket tokens): a batch is drawn from one bucket and cut to its
    # length, so short problems do not pay for the longest one's padding (one compile per bucket).
    lengths = mask.sum(axis=1)
    bucket_of = -(-lengths // spec.bucket) * spec.bucket
    buckets, carry = {}, np.zeros(0, np.int64)
    for b in np.unique(bucket_of):  # ascending; a bucket smaller than a batch joins the next one
        carry = np.concatenate([carry, np.flatnonzero(bucket_of == b)])
        if len(carry) >= spec.batch_size or b == bucket_of.max():
            buckets[min(int(b), tokens.shape[1])], carry = np.sort(carry), np.zeros(0, np.int64)
    keys = sorted(buckets)
    probs = np.array([len(buckets[b]) for b in keys], float)
    probs /= probs.sum()
    rng = np.random.default_rng([seed, 1])
    log, t0 = [], time.time()
    for s in range(spec.steps):
        b = keys[int(rng.choice(len(keys), p=probs))]
        idx = np.sort(rng.choice(buckets[b], spec.batch_size, replace=len(buckets[b]) < spec.batch_size))
        params, opt_state, loss = step_fn(params, opt_state, tokens[idx, :b], mask[idx, :b], loss_mask[idx, :b])
        if (s + 1) % log_every == 0 or s == spec.steps - 1:
            loss = float(loss)
            log.append([s + 1, round(loss, 5)])
            print(f"[{name}] step {s + 1}/{spec.steps} loss {loss:.4f} ({time.time() - t0:.0f}s)",
                  file=sys.stderr, flush=True)
    return params, log


# ---------------------------------------------------------------------------------------- eval
@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def sample_generate(params, prompt, prompt_mask, cfg: ModelConfig, key, *, max_new_tokens: int,
                    eos_id, temperature, pad_id: int = 0):
    """Like greedy_generate, sampling at `temperature` (> 0) instead of the argmax. Each step
    splits the carried key (the shipped BUILD.json's sampled evaluation was drawn this way, with
    jax.random.categorical's Gumbel draw then; rollout.draw's inverse CDF since issue 17)."""
    def choose(i, logits, key):
        key, sub = jax.random.split(key)
        return draw.categorical(sub, logits[0] / temperature).astype(prompt.dtype), (), key

    tokens, mask, _ = decode(params, [(prompt, prompt_mask)], cfg, choose, key, max_new_tokens=max_new_tokens,
                             stop_ids=eos_id, pad_id=pad_id)
    return tokens, mask


def generate_from_ids(params, cfg: ModelConfig, tok, prompts: list[list[int]], *, temperature: float = 0.0,
                      seed: int = 0, batch_size: int = 64, max_new_tokens: int = 112) -> list[str]:
    """Decoded completions (special tokens dropped) of rendered prompt ids, greedy or sampled,
    in fixed-shape batches (one compile)."""
    P = max(len(p) for p in prompts)
    P = -(-P // 8) * 8
    key = jax.random.key(seed)
    texts = []
    for b0 in range(0, len(prompts), batch_size):
        chunk = prompts[b0:b0 + batch_size]
        rows = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - rows)  # fixed shapes: one compile
        toks = np.full((batch_size, P), tok.pad_token_id, np.int32)
        mask = np.zeros((batch_size, P), bool)
        for i, p in enumerate(chunk):  # left-padded
            toks[i, P - len(p):], mask[i, P - len(p):] = p, True
        if temperature and temperature > 0:
            key, sub = jax.random.split(key)
            out, real = sample_generate(params, jnp.asarray(toks), jnp.asarray(mask), cfg, sub,
                                        max_new_tokens=max_new_tokens, eos_id=tok.eos_token_id,
                                        temperature=jnp.float32(temperature), pad_id=tok.pad_token_id)
        else:
            out, real = greedy_generate(params, jnp.asarray(toks), jnp.asarray(mask), cfg,
                                        max_new_tokens=max_new_tokens, eos_id=tok.eos_token_id,
                                        pad_id=tok.pad_token_id)
        out, real = np.asarray(out), np.asarray(real)
        for i in range(rows):
            texts.append(tok.decode(out[i][real[i]].tolist(), skip_special_tokens=True))
    return texts


def generate_texts(params, cfg: ModelConfig, tok, problems: list[dict], *, temperature: float = 0.0,
                   seed: int = 0, batch_size: int = 64, max_new_tokens: int = 112) -> list[str]:
    """Decoded completions for each problem's chat prompt."""
    return generate_from_ids(params, cfg, tok, [encode_prompt(tok, p["prompt"]) for p in problems],
                             temperature=temperature, seed=seed, batch_size=batch_size,
                             max_new_tokens=max_new_tokens)


def evaluate(params, cfg: ModelConfig, tok, problems: list[dict], *, temperature: float = 0.0,
             seed: int = 0, batch_size: int = 64, max_new_tokens: int = 112) -> dict[str, Any]:
    """Accuracy and the first-wrong-step histograms (absolute sentence index, and the index
    relative to the solution's length, in fifths) over `problems`."""
    texts = generate_texts(params, cfg, tok, problems, temperature=temperature, seed=seed,
                           batch_size=batch_size, max_new_tokens=max_new_tokens)
    correct = [arithmetic.is_correct(t, p["answer"]) for t, p in zip(texts, problems)]
    fws = [arithmetic.first_wrong_step(t, p) for t, p in zip(texts, problems)]
    hist = collections.Counter("none" if f is None else str(f) for f in fws)
    rel = collections.Counter()
    for f, p in zip(fws, problems):
        if f is not None:  # fraction of the way through the solution's sentences, 0..1
            rel[f"{min(f / (arithmetic.num_steps(p) - 1), 1.0):.1f}"] += 1
    wrong = [f for f in fws if f is not None]
    return {
        "n": len(problems), "accuracy": float(np.mean(correct)),
        "exact_solution": float(np.mean([f is None for f in fws])),
        "first_wrong_step_hist": dict(sorted(hist.items())),
        "first_wrong_step_relative_hist": dict(sorted(rel.items())),
        "first_wrong_step_mean_relative": (float(np.mean([min(f / (arithmetic.num_steps(p) - 1), 1.0)
                                                          for f, p in zip(fws, problems) if f is not None]))
                                           if wrong else None),
        "examples": [{"prompt": p["prompt"], "output": t, "first_wrong_step": f}
                     for p, t, f in list(zip(problems, texts, fws))[:3]],
    }


# ---------------------------------------------------------------------------------------- build
def build_toy_pair(out: str | os.PathLike, *, seed: int = 0, teacher_arch: ArchSpec = TEACHER_ARCH,
                   student_arch: ArchSpec = STUDENT_ARCH, teacher_train: TrainSpec = TEACHER_TRAIN,
                   student_train: TrainSpec = STUDENT_TRAIN, num_train: int = NUM_TRAIN,
                   num_eval: int = NUM_EVAL, vocab_size: int = VOCAB_SIZE, eval_temperature: bool = True,
                   models: tuple[str, ...] = ("teacher", "student"),
                   command: str | None = None) -> dict[str, Any]:
    """Train tokenizer, teacher and student; write out/{teacher,student} and out/BUILD.json.
    Returns the BUILD record.

    `models`: which of the two to (re)train; the other is kept as it is in `out` with its
    BUILD.json entry. The two are trained independently (own init seed, same data, same
    tokenizer), so retraining only the student gives the weights a full build would."""
    out = os.fspath(out)
    t_start = time.time()
    previous = {}
    if set(models) != {"teacher", "student"}:
        with open(os.path.join(out, "BUILD.json")) as f:
            previous = json.load(f)
        if previous.get("seed") != seed:
            raise ValueError(f"{out}/BUILD.json was built with seed {previous.get('seed')}, not {seed}")
    os.makedirs(out, exist_ok=True)
    train_problems = arithmetic.make_problems(num_train, seed, "train")
    eval_problems = arithmetic.make_problems(num_eval, seed, "eval")
    tok_dir = os.path.join(out, "tokenizer")
    build_toy_tokenizer(tok_dir, corpus=tokenizer_corpus(train_problems[:4000]), vocab_size=vocab_size)
    tok = load_tokenizer(tok_dir)
    data = encode_sft(tok, train_problems)
    record: dict[str, Any] = {
        "command": command, "seed": seed, "num_train_problems": num_train, "num_eval_problems": num_eval,
        "vocab_size": len(tok), "sequence_length": int(data[0].shape[1]),
        "jax_version": jax.__version__, "platform": jax.devices()[0].platform, "models": {},
    }
    for name, arch, spec, model_seed in (("teacher", teacher_arch, teacher_train, seed * 2 + 1),
                                         ("student", student_arch, student_train, seed * 2 + 2)):
        model_dir = os.path.join(out, name)
        if name in models:
            cfg = model_config(arch, tok)
            t0 = time.time()
            params, log = train(cfg, data, spec, model_seed, name=name)
            train_s = time.time() - t0
            hf_io.save_pretrained(params, cfg, model_dir, tokenizer=tok_dir)
        else:  # kept from the previous build: its training record, re-evaluated here
            kept = previous["models"][name]
            if kept["arch"] != dataclasses.asdict(arch) or kept["train"] != dataclasses.asdict(spec):
                raise ValueError(f"the {name} in {out} was trained with other settings: {kept['train']}")
            check_same_tokenizer(tok_dir, model_dir, "rebuilt tokenizer", f"kept {name}")
            params, cfg = hf_io.load_pretrained(model_dir)
            log, train_s = kept["loss_log"], kept["train_wall_s"]
        t0 = time.time()
        evals = {"greedy": evaluate(params, cfg, tok, eval_problems)}
        if eval_temperature:
            evals["temperature_1.0"] = evaluate(params, cfg, tok, eval_problems, temperature=1.0,
                                                seed=seed + 7)
        eval_s = time.time() - t0
        n_params = int(sum(x.size for x in jax.tree.leaves(params)))
        record["models"][name] = {
            "arch": dataclasses.asdict(arch), "train": dataclasses.asdict(spec), "init_seed": model_seed,
            "num_params": n_params, "train_wall_s": round(train_s, 1), "eval_wall_s": round(eval_s, 1),
            "loss_log": log, "eval": evals,
        }
        print(f"[{name}] greedy acc {evals['greedy']['accuracy']:.3f} "
              f"first-wrong {evals['greedy']['first_wrong_step_hist']}", file=sys.stderr, flush=True)
    shutil.rmtree(tok_dir)
    record["wall_s"] = round(time.time() - t_start, 1)
    if previous:  # the full build's wall time: this run's plus the kept model's training
        record["wall_s"] = round(record["wall_s"] + sum(
            record["models"][name]["train_wall_s"] for name in record["models"] if name not in models), 1)
        record["rebuilt_only"] = list(models)
    with open(os.path.join(out, "BUILD.json"), "w") as f:
        json.dump(record, f, indent=2)
    return record


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher-steps", type=int, default=TEACHER_TRAIN.steps)
    ap.add_argument("--student-steps", type=int, default=STUDENT_TRAIN.steps)
    ap.add_argument("--num-eval", type=int, default=NUM_EVAL)
    ap.add_argument("--only", choices=("teacher", "student"), default=None,
                    help="retrain only this model, keeping the other one already in --out")
    args = ap.parse_args(argv)
    args_list = list(argv if argv is not None else sys.argv[1:])
    if args.only:  # record the equivalent full build (the kept model is what it would train)
        i = args_list.index("--only") if "--only" in args_list else None
        args_list = ([a for a in args_list if not a.startswith("--only=")] if i is None
                     else args_list[:i] + args_list[i + 2:])
    command = "python -m opdjax.toy.opd_pair " + " ".join(args_list)
    rec = build_toy_pair(args.out, seed=args.seed,
                         teacher_train=dataclasses.replace(TEACHER_TRAIN, steps=args.teacher_steps),
                         student_train=dataclasses.replace(STUDENT_TRAIN, steps=args.student_steps),
                         num_eval=args.num_eval, command=command,
                         models=(args.only,) if args.only else ("teacher", "student"))
    summary = {k: {m: v["eval"][m]["accuracy"] for m in v["eval"]} for k, v in rec["models"].items()}
    print(json.dumps({"wall_s": rec["wall_s"], "accuracy": summary}))


if __name__ == "__main__":
    main()
