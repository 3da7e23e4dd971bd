"""The DAIL demo's model M: a tiny Qwen3 checkpoint (Hugging Face format, the toy pair's tokenizer)
trained from scratch on `opdjax.toy.arithmetic` to solve problems in three contexts
(`opdjax.toy.dail_problems`), shipped in `opdjax/assets/toy_dail/model` and rebuilt by

    python -m opdjax.toy.dail_model --out opdjax/assets/toy_dail [--seed 0] [--steps N]

DAIL needs a model that can read a reference solution in context, as a real LLM does: asked the
problem alone (the *student context*) it is right only sometimes; given the problem plus a terse
reference that skips steps (the *expert context*) it is right far more often, because it copies
the values the reference shows; given the final answer and some intermediate values (the *hint
context*) it steers to them. The toy has to be taught that, so M is trained by SFT on a mix of
the three contexts, always to the full step-by-step solution:

    student  TOY_STUDENT(problem)                        -> full solution   (MIX["student"])
    expert   TOY_EXPERT(problem, terse_solution(problem))  -> full solution   (MIX["expert"])
    hint     TOY_HINT(problem, hint)                       -> full solution   (MIX["hint"])

Every training problem gets one context, drawn with the MIX weights. The hint's landmarks are,
with equal odds, the problem's intermediate values (`opdjax.toy.dail_problems.hint_landmarks`) or the
numbers of the terse solution in order of appearance (about what the general landmarks builder
`opdjax.dail.hints` extracts from it), so both read as plausible hints. Architecture, optimizer
and batching are the toy student's (`opd_pair.STUDENT_ARCH`, `opd_pair.train`: 2 layers, hidden
64, 96k params; AdamW, warmup + cosine, length buckets); the tokenizer files are copied from the
shipped toy student, so token ids are identical. The student context's accuracy is steep in the
step count (as for the toy student), so change TRAIN with care; the measured numbers of the
shipped model are in opdjax/assets/toy_dail/BUILD.json. Same seed and settings give the same
weights on the same machine.

`load_toy_dail()` returns the shipped model directory.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

from opdjax.toy import arithmetic, dail_problems
from opdjax.data.tokenizer import load_tokenizer
from opdjax.models import hf_io
from opdjax.toy import opd_pair
from opdjax.models.config import ModelConfig

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "toy_dail")
TOKENIZER_SOURCE = os.path.join(os.path.dirname(opd_pair.ASSET_DIR), "toy_pair", "student")

ARCH = opd_pair.STUDENT_ARCH
TRAIN = opd_pair.TrainSpec(steps=1000)
MIX = {"student": 0.4, "expert": 0.35, "hint": 0.25}  # share of training problems per context
RESYNC = {"expert": 0.5, "hint": 0.3}  # share of a context's rows with a slip to recover from
CONTEXTS = ("student", "expert", "hint")
# Training only: the expert template with the *full* solution as the reference (every sentence
# can be read off), which teaches M to read a reference at all; the terse one then uses that.
TRAIN_CONTEXTS = CONTEXTS + ("full",)
NUM_TRAIN = 20000
NUM_EVAL = 128
MAX_NEW_TOKENS = 112  # the longest full solution is 86 tokens


def load_toy_dail(dir: str | os.PathLike | None = None) -> str:
    """The model directory of a built toy DAIL model (default: the one shipped in the package)."""
    root = os.fspath(dir) if dir is not None else ASSET_DIR
    model = os.path.join(root, "model")
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise FileNotFoundError(f"No toy DAIL checkpoint at {model}: build it with "
                                f"`python -m opdjax.toy.dail_model --out {root}`.")
    return model


# ---------------------------------------------------------------------------------------- data
def terse_numbers(problem: dict) -> list[str]:
    """The numbers of the terse solution before its answer sentence, in order, without repeats
    (landmarks roughly as a general extractor finds them in the solution text)."""
    body = dail_problems.terse_solution(problem).rsplit(" The answer is ", 1)[0]
    out: list[str] = []
    for n in re.findall(r"\d+", body):
        if n not in out:
            out.append(n)
    return out


def context_text(problem: dict, context: str, rng: np.random.Generator | None = None) -> str:
    """The user turn of `problem` in `context`. For the hint context, `rng` picks the landmark
    list (the problem's values or the terse solution's numbers); None: the values."""
    if context == "student":
        return dail_problems.student_text(problem)
    if context == "expert":
        return dail_problems.expert_text(problem)
    if context == "hint":
        marks = None if rng is None or rng.random() < 0.5 else terse_numbers(problem)[:8]
        return dail_problems.hint_text(problem, dail_problems.toy_hint(problem, landmarks=marks))
    if context == "full":
        return dail_problems.expert_text(problem, problem["solution"])
    raise ValueError(f"context={context!r}: expected one of {TRAIN_CONTEXTS}")


def resync_target(problem: dict, slips: dict[int, int], operand: str = "wrong") -> list[tuple[str, bool]]:
    """The full solution with slips: operation j (1-based, < the last) of each {j: wrong} writes
    `wrong` as its result; operation j + 1 then gives its true value, as read off the context,
    with `wrong` as its operand (operand="wrong") or the true one (operand="true": the sentence
    is word for word the full solution's, as a reference shows it). Pieces (text, trained): the
    slipped values are not trained on."""
    steps, ops, values = problem["steps"], problem["ops"], problem["values"]
    if operand not in ("wrong", "true"):
        raise ValueError(f"operand={operand!r}: expected 'wrong' or 'true'")
    if not all(1 <= j < len(ops) for j in slips):
        raise ValueError(f"slips at operations {sorted(slips)}: expected 1..{len(ops) - 1}")
    pieces, text = [], steps[0]
    for j in range(1, len(ops) + 1):
        sentence = steps[j]
        if operand == "wrong" and j - 1 in slips:
            op, arg = ops[j - 1]
            sentence = arithmetic._op_sentence(op, arg, slips[j - 1], values[j - 1])
        if j in slips:
            cut = sentence.rindex(" gives ") + len(" gives ")
            pieces += [(text + " " + sentence[:cut], True), (str(slips[j]), False)]
            text = "."  # every sentence ends with its value and a period
        else:
            text += " " + sentence
    pieces.append((text + " " + steps[-1], True))
    return pieces


def slip_value(v: int, rng: np.random.Generator) -> int:
    """A wrong value near v (off by 1..10), in [0, MAX_VALUE]."""
    while True:
        w = v + int(rng.choice([-1, 1])) * int(rng.integers(1, 11))
        if 0 <= w <= arithmetic.MAX_VALUE and w != v:
            return w


def training_target(problem: dict, context: str, rng: np.random.Generator,
                    resync: dict[str, float]) -> list[tuple[str, bool]]:
    """The SFT target of one row: the full solution, or one with slips it recovers from by
    reading the context (`resync_target`). Expert context (terse reference): with probability
    resync["expert"], one slip right before a sentence the reference keeps, which then follows
    word for word. "full" context (the whole solution as reference): every operation but the last
    slips with probability resync["full"], each next sentence word for word. Hint context: with
    probability resync["hint"], a slip at the next-to-last operation, after which the last one
    gives the final answer. Student context: never (it has nothing to recover from)."""
    k = len(problem["ops"])
    values = problem["values"]
    p = resync.get(context, 0.0)
    if context == "full":
        slips = {j: slip_value(values[j - 1], rng) for j in range(1, k) if rng.random() < p}
        return resync_target(problem, slips, operand="true") if slips else [(problem["solution"], True)]
    if context == "student" or rng.random() >= p:
        return [(problem["solution"], True)]
    if context == "expert":
        j = int(rng.choice([s - 1 for s in dail_problems.shown_steps(k) if s >= 2]))
        return resync_target(problem, {j: slip_value(values[j - 1], rng)}, operand="true")
    return resync_target(problem, {k - 1: slip_value(values[k - 2], rng)}, operand="wrong")


def assign_contexts(n: int, mix: dict[str, float], seed: int) -> list[str]:
    names = [c for c in TRAIN_CONTEXTS if mix.get(c, 0) > 0]
    p = np.array([mix[c] for c in names], float)
    rng = np.random.default_rng([seed, 2])
    return [names[i] for i in rng.choice(len(names), size=n, p=p / p.sum())]


def encode_target(tok, target: str | list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Ids of a target (a string, or (text, trained) pieces) + EOS, and which of them are trained.
    Pieces are encoded one by one: they are cut where the toy tokenizer's pre-tokenizer cuts
    anyway (before/after a number), so the ids are those of the joined text (checked)."""
    pieces = [(target, True)] if isinstance(target, str) else target
    ids, trained = [], []
    for text, on in pieces:
        piece = tok.encode(text, add_special_tokens=False)
        ids += piece
        trained += [on] * len(piece)
    if len(pieces) > 1 and ids != tok.encode("".join(t for t, _ in pieces), add_special_tokens=False):
        raise ValueError(f"target pieces do not tokenize like their joined text: {pieces}")
    return ids + [tok.eos_token_id], trained + [True]


def encode_rows(tok, prompts: list[list[int]], targets: list, length: int | None = None):
    """Like opd_pair.encode_sft for already rendered prompt ids and targets (strings or
    (text, trained) pieces, see `encode_target`): right-padded tokens [N, T], mask [N, T],
    loss_mask [N, T] (True where the next token is a trained target token or the EOS)."""
    rows = [(a, *encode_target(tok, t)) for a, t in zip(prompts, targets)]
    need = max(len(a) + len(b) for a, b, _ in rows)
    T = length or -(-need // 16) * 16
    if need > T:
        raise ValueError(f"sequence of {need} tokens does not fit length={T}")
    tokens = np.full((len(rows), T), tok.pad_token_id, np.int32)
    mask = np.zeros((len(rows), T), bool)
    loss_mask = np.zeros((len(rows), T), bool)
    for i, (a, b, on) in enumerate(rows):
        n = len(a) + len(b)
        tokens[i, :n] = a + b
        mask[i, :n] = True
        loss_mask[i, len(a) - 1:n - 1] = on  # predicting b[0..] from the position before it
    return tokens, mask, loss_mask


def training_data(tok, problems: list[dict], mix: dict[str, float], resync: dict[str, float], seed: int):
    """(tokens, mask, loss_mask) and the context of each row."""
    contexts = assign_contexts(len(problems), mix, seed)
    rng = np.random.default_rng([seed, 3])
    prompts = [dail_problems.render(tok, context_text(p, c, rng)) for p, c in zip(problems, contexts)]
    targets = [training_target(p, c, rng, resync) for p, c in zip(problems, contexts)]
    return encode_rows(tok, prompts, targets), contexts


# ---------------------------------------------------------------------------------------- eval
def evaluate_context(params, cfg: ModelConfig, tok, problems: list[dict], context: str, *,
                     temperature: float = 0.0, seed: int = 0, batch_size: int = 64) -> dict[str, Any]:
    """Accuracy, exact-solution rate and first-wrong-step histogram of `problems` in `context`
    (hint landmarks: the problem's values)."""
    prompts = [dail_problems.render(tok, context_text(p, context)) for p in problems]
    texts = opd_pair.generate_from_ids(params, cfg, tok, prompts, temperature=temperature, seed=seed,
                                       batch_size=batch_size, max_new_tokens=MAX_NEW_TOKENS)
    correct = [arithmetic.is_correct(t, p["answer"]) for t, p in zip(texts, problems)]
    fws = [arithmetic.first_wrong_step(t, p) for t, p in zip(texts, problems)]
    hist = collections.Counter("none" if f is None else str(f) for f in fws)
    return {
        "n": len(problems), "accuracy": float(np.mean(correct)),
        "exact_solution": float(np.mean([f is None for f in fws])),
        "first_wrong_step_hist": dict(sorted(hist.items())),
        "examples": [{"prompt": context_text(p, context), "output": t, "first_wrong_step": f}
                     for p, t, f in list(zip(problems, texts, fws))[:2]],
    }


def evaluate_all(params, cfg: ModelConfig, tok, problems: list[dict], *, seed: int = 0,
                 temperatures: tuple[float, ...] = (0.0, 1.0)) -> dict[str, dict[str, Any]]:
    """{context: {"greedy" | "temperature_T": evaluate_context(...)}}."""
    out: dict[str, dict[str, Any]] = {}
    for c in CONTEXTS:
        out[c] = {}
        for t in temperatures:
            name = "greedy" if t == 0 else f"temperature_{t}"
            out[c][name] = evaluate_context(params, cfg, tok, problems, c, temperature=t, seed=seed + 7)
    return out


# ---------------------------------------------------------------------------------------- build
def build_toy_dail(out: str | os.PathLike, *, seed: int = 0, arch: opd_pair.ArchSpec = ARCH,
                   spec: opd_pair.TrainSpec = TRAIN, mix: dict[str, float] | None = None,
                   resync: dict[str, float] | None = None,
                   num_train: int = NUM_TRAIN, num_eval: int = NUM_EVAL,
                   temperatures: tuple[float, ...] = (0.0, 1.0), command: str | None = None) -> dict[str, Any]:
    """Train M; write out/model (HF format, the toy pair's tokenizer) and out/BUILD.json.
    Returns the BUILD record."""
    mix = dict(MIX if mix is None else mix)
    resync = dict(RESYNC if resync is None else resync)
    out = os.fspath(out)
    t_start = time.time()
    os.makedirs(out, exist_ok=True)
    tok = load_tokenizer(TOKENIZER_SOURCE)
    train_problems = arithmetic.make_problems(num_train, seed, "train")
    eval_problems = arithmetic.make_problems(num_eval, seed, "eval")
    data, contexts = training_data(tok, train_problems, mix, resync, seed)
    cfg = opd_pair.model_config(arch, tok)
    model_seed = seed * 2 + 2
    t0 = time.time()
    params, log = opd_pair.train(cfg, data, spec, model_seed, name="toy_dail")
    train_s = time.time() - t0
    model_dir = os.path.join(out, "model")
    with tempfile.TemporaryDirectory() as tmp:  # write next to the old model, then swap
        staged = os.path.join(tmp, "model")
        hf_io.save_pretrained(params, cfg, staged, tokenizer=TOKENIZER_SOURCE)
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.copytree(staged, model_dir)
    t0 = time.time()
    evals = evaluate_all(params, cfg, tok, eval_problems, seed=seed, temperatures=temperatures)
    eval_s = time.time() - t0
    counts = collections.Counter(contexts)
    record: dict[str, Any] = {
        "command": command, "seed": seed, "init_seed": model_seed,
        "num_train_problems": num_train, "num_eval_problems": num_eval,
        "mix": mix, "resync": resync, "train_rows_per_context": {c: counts.get(c, 0) for c in CONTEXTS},
        "templates": {"student": dail_problems.TOY_STUDENT, "expert": dail_problems.TOY_EXPERT, "hint": dail_problems.TOY_HINT,
                      "hint_text": dail_problems.TOY_HINT_TEXT},
        "terse_keep": 3, "tokenizer": "copied from opdjax/assets/toy_pair/student",
        "vocab_size": len(tok), "sequence_length": int(data[0].shape[1]),
        "arch": dataclasses.asdict(arch), "train": dataclasses.asdict(spec),
        "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "jax_version": jax.__version__, "platform": jax.devices()[0].platform,
        "train_wall_s": round(train_s, 1), "eval_wall_s": round(eval_s, 1), "loss_log": log,
        "accuracy": {c: {m: r["accuracy"] for m, r in evals[c].items()} for c in CONTEXTS},
        "eval": evals,
    }
    record["wall_s"] = round(time.time() - t_start, 1)
    with open(os.path.join(out, "BUILD.json"), "w") as f:
        json.dump(record, f, indent=2)
    return record


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=TRAIN.steps)
    ap.add_argument("--num-train", type=int, default=NUM_TRAIN)
    ap.add_argument("--num-eval", type=int, default=NUM_EVAL)
    ap.add_argument("--mix", default=None,
                    help="student,expert,hint weights, e.g. 0.4,0.35,0.25 (default: MIX)")
    ap.add_argument("--resync", default=None, help="expert,hint slip rates, e.g. 0.5,0.3 (default: RESYNC)")
    ap.add_argument("--no-temperature", action="store_true", help="greedy evaluation only")
    args = ap.parse_args(argv)
    mix = None
    if args.mix:
        mix = dict(zip(CONTEXTS, (float(x) for x in args.mix.split(","))))
    resync = None
    if args.resync:
        resync = dict(zip(("expert", "hint"), (float(x) for x in args.resync.split(","))))
    command = "python -m opdjax.toy.dail_model " + " ".join(argv if argv is not None else sys.argv[1:])
    rec = build_toy_dail(args.out, seed=args.seed, spec=dataclasses.replace(TRAIN, steps=args.steps), mix=mix,
                         resync=resync,
                         num_train=args.num_train, num_eval=args.num_eval,
                         temperatures=(0.0,) if args.no_temperature else (0.0, 1.0), command=command)
    print(json.dumps({"wall_s": rec["wall_s"], "train_wall_s": rec["train_wall_s"], "accuracy": rec["accuracy"]}))


if __name__ == "__main__":
    main()
