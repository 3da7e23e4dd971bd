"""Shared pieces of the OPD benchmarks (bench_opd_step.py, bench_vs_trl.py, bench_sampler.py).

  * `make_pair(kind, root)`: the teacher/student checkpoints the benchmarks run on, as Hugging
    Face directories that both opdjax and transformers' Qwen3ForCausalLM load:
      toy     the shipped pair opdjax/assets/toy_pair/{teacher,student} when it exists, else a
              random stand-in of the same shapes (teacher D=128/L=4, student D=64/L=2, built with
              opdjax.models.toy.build_random_checkpoint: one shared toy tokenizer);
      100m    bench_forward.py's ~100M student (L=8, D=768, F=2048, 12/4 heads, V=32768,
              untied) and a ~2x teacher (L=24, same width, ~201M), random weights (normal 0.02),
              sharing a byte-level BPE tokenizer trained to ~32k ids on synthetic text;
      tiny    --quick: two very small random models.
  * `OPDHarness(config)`: the set-up of `opdjax.train.opd.run` (tokenizers, validation, data,
    mesh, optimizer, train state, teacher, sampling settings, jitted train step), and `step(i)`
    that runs ONE loop iteration exactly as `run` does it: `opd.rollout_and_release` (sample /
    score / release timings measured there) then the jitted, donated train step + device_get
    (update). No eval, metrics writer, pictures or checkpoints (they are not part of a step).
  * machine / load helpers (the busy-core accounting of bench_forward.py).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
RESULTS = os.path.join(BENCH_DIR, "results")
if REPO not in sys.path:
    sys.path.insert(0, REPO)
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

from bench_forward import _busy_cpu_seconds, _cpu_name, _loadavg, _other_busy_cores, _wait_quiet  # noqa: E402,F401

QUIET = 0.1  # a step counts as quiet when other processes used fewer cores than this meanwhile

TOY_PAIR = os.path.join(REPO, "opdjax", "assets", "toy_pair")

# (hidden, layers, heads, kv_heads, head_dim, intermediate)
TOY_TEACHER = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=256)
TOY_STUDENT = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128)
M100_STUDENT = dict(hidden_size=768, num_layers=8, num_heads=12, num_kv_heads=4, head_dim=64, intermediate_size=2048)
M100_TEACHER = dict(M100_STUDENT, num_layers=24)
TINY_TEACHER = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128)
TINY_STUDENT = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64)
M100_VOCAB = 32768


# ------------------------------------------------------------------------------ machine / load
def machine_info() -> dict:
    import jax
    info = {"cpu": _cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__,
            "jax_backend": jax.devices()[0].platform, "loadavg_at_start": _loadavg(),
            "note": "shared machine: other workers run on the same cores; see other_busy_cores"}
    for mod in ("torch", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return info


class LoadMeter:
    """Cores other processes kept busy between start() and stop()."""

    def start(self):
        self.b0, self.c0, self.w0 = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
        return self

    def stop(self):
        return _other_busy_cores(self.b0, self.c0, self.w0)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def write_json(path: str, obj) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    print(f"wrote {os.path.relpath(path, os.getcwd()) if path.startswith(os.getcwd()) else path}", flush=True)
    return path


# ------------------------------------------------------------------------------ checkpoints
def _synthetic_corpus(n_sentences: int = 60000, n_words: int = 60000, seed: int = 0) -> list[str]:
    """Sentences of Zipf-distributed pseudo-words (plus the toy task's text) for a ~32k BPE."""
    import numpy as np

    from opdjax.data import toy_task
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lens = rng.integers(2, 10, n_words)
    words = ["".join(rng.choice(letters, n)) for n in lens]
    ranks = np.minimum(rng.zipf(1.2, size=n_sentences * 12), n_words) - 1
    lines, k = [], 0
    for _ in range(n_sentences):
        n = int(rng.integers(4, 14))
        ws = [words[i] for i in ranks[k:k + n]]
        k += n
        ws[0] = ws[0].capitalize()
        lines.append(" ".join(ws) + rng.choice([".", ".", ".", "?", "!", ","]) + " ")
        if rng.random() < 0.1:
            lines.append(f"{int(rng.integers(0, 10000))} + {int(rng.integers(0, 10000))} = "
                         f"{int(rng.integers(0, 20000))}.\n")
    for p in toy_task.make_problems(2000, seed=0, split="train"):
        lines.append(p["prompt"] + "\n")
        lines.append(str(p.get("solution", p.get("answer", ""))) + "\n")
    return lines


def _random_hf_checkpoint(out_dir: str, tok_dir: str, arch: dict, vocab: int, seed: int, std: float,
                          tie: bool) -> str:
    import jax

    from opdjax.data.tokenizer import load_tokenizer
    from opdjax.models import hf_io, qwen
    from opdjax.models.config import ModelConfig
    tok = load_tokenizer(tok_dir)
    cfg = ModelConfig(model_type="qwen3", vocab_size=vocab, tie_word_embeddings=tie, dtype="float32",
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      max_position_embeddings=4096, **arch)
    params = qwen.init_params(cfg, jax.random.key(seed), std=std)
    hf_io.save_pretrained(params, cfg, out_dir, tokenizer=tok_dir)
    return out_dir


def make_pair(kind: str, root: str) -> dict:
    """{'teacher': dir, 'student': dir, 'source': str, ...} for kind toy | 100m | tiny; checkpoints
    that have to be built go under `root` (reused when already there)."""
    from opdjax.data.tokenizer import build_toy_tokenizer
    from opdjax.models.toy import build_random_checkpoint
    if kind == "toy":
        t, s = os.path.join(TOY_PAIR, "teacher"), os.path.join(TOY_PAIR, "student")
        if all(os.path.isfile(os.path.join(d, "config.json")) for d in (t, s)):
            return {"teacher": t, "student": s, "source": "shipped toy pair opdjax/assets/toy_pair (trained)"}
        t, s = os.path.join(root, "toy_teacher"), os.path.join(root, "toy_student")
        if not os.path.isfile(os.path.join(t, "config.json")):
            build_random_checkpoint(t, seed=1, **TOY_TEACHER)
            build_random_checkpoint(s, seed=2, **TOY_STUDENT)
        return {"teacher": t, "student": s,
                "source": "RANDOM stand-in for the toy pair (opdjax/assets/toy_pair not present): "
                          "build_random_checkpoint teacher D=128/L=4, student D=64/L=2, std 0.5"}
    if kind == "tiny":
        t, s = os.path.join(root, "tiny_teacher"), os.path.join(root, "tiny_student")
        if not os.path.isfile(os.path.join(t, "config.json")):
            build_random_checkpoint(t, seed=1, **TINY_TEACHER)
            build_random_checkpoint(s, seed=2, **TINY_STUDENT)
        return {"teacher": t, "student": s, "source": "tiny random pair (--quick)"}
    if kind == "100m":
        tok_dir = os.path.join(root, "tok32k")
        t, s = os.path.join(root, "m100_teacher"), os.path.join(root, "m100_student")
        if not os.path.isfile(os.path.join(t, "config.json")):
            t0 = time.perf_counter()
            tok = build_toy_tokenizer(tok_dir, corpus=_synthetic_corpus(), vocab_size=M100_VOCAB)
            vocab = len(tok)
            _random_hf_checkpoint(s, tok_dir, M100_STUDENT, vocab, seed=2, std=0.02, tie=False)
            _random_hf_checkpoint(t, tok_dir, M100_TEACHER, vocab, seed=1, std=0.02, tie=False)
            print(f"built the 100M pair (tokenizer {vocab} ids) in {time.perf_counter() - t0:.0f} s", flush=True)
        return {"teacher": t, "student": s,
                "source": "random ~100M student (bench_forward.py's config) + ~2x teacher (L=24), normal(0.02) "
                          "weights, shared ~32k byte-level BPE tokenizer trained on synthetic text"}
    raise ValueError(kind)


def num_params(ckpt_dir: str) -> int:
    from opdjax.models.config import ModelConfig
    return ModelConfig.from_pretrained(ckpt_dir).num_params()


# ------------------------------------------------------------------------------ configs
def demo_config(pair: dict, **over):
    """configs/opd_demo.py with the pair's paths, then dotted overrides {'rollout.max_new_tokens': 32}."""
    sys.path.insert(0, os.path.join(REPO, "configs"))
    import opd_demo
    c = opd_demo.get_config()
    c.job = "opd"
    c.student.path, c.teacher.path = pair["student"], pair["teacher"]
    c.eval.num_problems = 0
    c.data.num_eval = 0
    c.data.max_prompt_tokens = 512  # the random stand-ins' generic tokenizer is less compact
    for k, v in over.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


# ------------------------------------------------------------------------------ the loop, timed
class OPDHarness:
    """opd.run's set-up and its per-step work, phase-timed (see the module docstring)."""

    def __init__(self, config):
        import jax
        import jax.numpy as jnp

        from opdjax import sharding
        from opdjax.models import qwen
        from opdjax.rollout.sampler import SamplingSettings
        from opdjax.train import opd
        from opdjax.train.step import StepSettings, init_state, jit_train_step, make_optimizer, state_shardings
        from opdjax.train.validate import validate_config

        self.config = c = config
        t0 = time.perf_counter()
        self.student_tok = opd.load_tokenizer_for(c.student, "student")
        teacher_tok = opd.load_tokenizer_for(c.teacher, "teacher")
        checked = validate_config(c, tokenizers=(self.student_tok, teacher_tok))
        self.student_cfg, self.teacher_cfg, self.settings = checked.student_cfg, checked.teacher_cfg, checked.release
        template = {"": None, "student": self.student_tok.chat_template,
                    "teacher": teacher_tok.chat_template}[c.tokenizer.chat_template]
        self.data = opd.encode_data(c, self.student_tok, template)
        self.plan = plan = sharding.ShardingPlan(sharding.make_mesh(tuple(c.mesh.shape)))
        steps = c.train.steps
        tx = make_optimizer(c.optimizer, steps)
        dtype = opd._dtype(c.student.dtype)
        st_sh = state_shardings(tx, self.student_cfg, plan, dtype)
        params = opd.load_params(c.student, self.student_cfg, plan)
        self.state = jax.jit(lambda p: init_state(p, tx), out_shardings=st_sh)(params)
        del params
        self.teacher_params = opd.load_params(c.teacher, self.teacher_cfg, plan)
        extra = {}  # settings added to SamplingSettings after this bench was written, as run() passes them
        if "cache_dtype" in {f.name for f in dataclasses.fields(SamplingSettings)} and "cache_dtype" in c.rollout:
            extra["cache_dtype"] = c.rollout.cache_dtype
        self.sampling = SamplingSettings(c.rollout.max_new_tokens, float(c.rollout.temperature),
                                         float(c.rollout.top_p), int(c.rollout.top_k), self.settings.top_k,
                                         opd.stop_ids(c, self.student_tok, self.student_cfg), **extra).check(
                                             self.student_cfg.vocab_size)
        s = StepSettings(loss=c.loss.name, prompt_len=self.data.prompt_len, microbatches=c.batch.microbatches,
                         chunk_tokens=c.loss.chunk_tokens, clip_eps=float(c.loss.clip_eps),
                         jsd_beta=float(c.loss.jsd_beta))
        self.train_step = jit_train_step(tx, self.student_cfg, self.teacher_cfg, s, plan, dtype)
        self.root = jax.random.key(c.seed)
        # the trainer's own prompt pipeline (Grain; this process's rows read and encoded)
        self.pipeline = opd.train_pipeline(c, self.data, functools.partial(opd.encode_problems, c, self.student_tok,
                                                                           template), plan)
        self._opd, self._jax, self._jnp, self._qwen = opd, jax, jnp, qwen
        self.setup_s = time.perf_counter() - t0
        self.rows_log = []  # the prompt rows of every step (for the TRL side)

    def step(self, i: int, wait_quiet: float = 0.0) -> dict:
        """One loop iteration; with wait_quiet > 0 it first waits (untimed, up to that many s)
        for other processes to leave the machine idle."""
        import numpy as np
        jax, opd = self._jax, self._opd
        c = self.config
        if wait_quiet > 0:
            _wait_quiet(wait_quiet)
        meter = LoadMeter().start()
        key = jax.random.fold_in(self.root, i)
        step_data = next(self.pipeline)
        prompts = step_data.by_index()
        rows = [int(j) for j in step_data.indices for _ in range(c.rollout.samples_per_prompt)]
        self.rows_log.append([list(map(int, prompts[j])) for j in rows])
        batch, decision, roll, scores, timings = opd.rollout_and_release(
            c, self.settings, self.sampling, self.state["params"], self.teacher_params, self.student_cfg,
            self.teacher_cfg, self.student_tok, prompts, rows, self.data.prompt_len, key, self.plan)
        t = time.perf_counter()
        self.state, out = self.train_step(self.state, batch, self.teacher_params)
        out = jax.device_get(out)
        timings["update_s"] = time.perf_counter() - t
        timings["step_s"] = sum(timings[k] for k in ("sample_s", "score_s", "release_s", "update_s"))
        mask = np.asarray(roll.mask)
        stats = {k: float(np.asarray(v)) for k, v in decision.stats.items() if np.ndim(v) == 0}
        return {**timings, "other_busy_cores": meter.stop(), "rows": int(mask.shape[0]),
                "response_columns": int(mask.shape[1]), "real_tokens": int(mask.sum()),
                "train_columns": int(batch.tokens.shape[1]), "loss": float(out["loss/total"]),
                "mean_num_sentences": stats.get("mean_num_sentences"),
                "rule_release_rate": stats.get("rule_release_rate"), "kept_share": stats.get("rule_kept_share")}


PHASES = ("sample_s", "score_s", "release_s", "update_s")


def summarize(steps: list[dict]) -> dict:
    """Medians over the timed steps of every phase, the step, shares and tokens/s."""
    out = {k: median([s[k] for s in steps]) for k in PHASES + ("step_s",)}
    out["min_step_s"] = min(s["step_s"] for s in steps)
    out["shares"] = {k: median([s[k] / s["step_s"] for s in steps]) for k in PHASES}
    out["release_share"] = out["shares"]["release_s"]
    out["release_share_max"] = max(s["release_s"] / s["step_s"] for s in steps)
    # host sentence segmentation runs while the teacher scores (inside score_s): its share, if it
    # were not overlapped, is the release rule's whole cost
    out["segment_s"] = median([s.get("segment_s", 0.0) for s in steps])
    out["release_share_incl_segments"] = median([(s["release_s"] + s.get("segment_s", 0.0)) / s["step_s"]
                                                 for s in steps])
    out["real_tokens_per_step"] = median([s["real_tokens"] for s in steps])
    out["rollout_tokens_per_s"] = median([s["real_tokens"] / s["step_s"] for s in steps])
    out["generated_columns_per_s"] = median([s["rows"] * s["response_columns"] / s["step_s"] for s in steps])
    out["other_busy_cores_median"] = median([s["other_busy_cores"] for s in steps])
    quiet = [s for s in steps if s["other_busy_cores"] is not None and s["other_busy_cores"] < QUIET]
    out["quiet_steps"] = len(quiet)
    out["quiet_step_s"] = median([s["step_s"] for s in quiet])
    out["quiet_phases"] = {k: median([s[k] for s in quiet]) for k in PHASES} if quiet else None
    out["mean_num_sentences"] = median([s["mean_num_sentences"] for s in steps])
    return out
