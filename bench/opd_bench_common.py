"""Shared pieces of the OPD benchmarks (bench_opd_step.py, bench_vs_trl.py, bench_sampler.py).

  * `make_pair(kind, root)`: the teacher/student checkpoints the benchmarks run on, as Hugging
    Face directories that both opdjax and transformers' Qwen3ForCausalLM load:
      toy     the shipped pair opdjax/assets/toy_pair/{teacher,student} when it exists, else a
              random stand-in of the same shapes (teacher D=128/L=4, student D=64/L=2, built with
              opdjax.toy.checkpoints.build_random_checkpoint: one shared toy tokenizer);
      100m    bench_forward.py's ~100M student (L=8, D=768, F=2048, 12/4 heads, V=32768,
              untied) and a ~2x teacher (L=24, same width, ~201M), random weights (normal 0.02),
              sharing a byte-level BPE tokenizer trained to ~32k ids on synthetic text;
      tiny    --quick: two very small random models.
  * `OPDHarness(config)`: the trainer's own OPD job (`opdjax.train.opd.OPDJob`: its set-up,
    restore-or-init and `step`), driven one step at a time; the phase timings are the ones the
    trainer logs. No eval, pictures or checkpoints (they are not part of a step).
  * machine / load helpers (the busy-core accounting of bench_forward.py).
"""
from __future__ import annotations

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


def finish(res: dict, t0: float, print_table, path: str) -> dict:
    """The end of every bench's main: total time, the table, the JSON."""
    res["total_s"] = time.perf_counter() - t0
    print_table(res)
    print(f"total {res['total_s']:.0f} s")
    write_json(path, res)
    return res


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

    from opdjax.toy import arithmetic
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
    for p in arithmetic.make_problems(2000, seed=0, split="train"):
        lines.append(p["prompt"] + "\n")
        lines.append(str(p.get("solution", p.get("answer", ""))) + "\n")
    return lines


def random_hf_checkpoint(out_dir: str, tok_dir: str, arch: dict, vocab: int, seed: int, std: float,
                         tie: bool) -> str:
    """A random Qwen3 HF checkpoint of `arch` with normal(std) weights and the tokenizer of `tok_dir`."""
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
    from opdjax.toy.checkpoints import build_random_checkpoint
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
            random_hf_checkpoint(s, tok_dir, M100_STUDENT, vocab, seed=2, std=0.02, tie=False)
            random_hf_checkpoint(t, tok_dir, M100_TEACHER, vocab, seed=1, std=0.02, tie=False)
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
    """The real OPD trainer's job (opdjax.train.opd.OPDJob: its set-up and its step), phase-timed."""

    def __init__(self, config):
        import tempfile

        from opdjax.train import opd

        config.metrics.pictures_every = 0  # pictures are not part of a step's cost
        config.metrics.tensorboard = False
        config.checkpoint.directory = tempfile.mkdtemp(prefix="opd_bench_ckpt_")  # never resume a stale run
        self.config = config
        t0 = time.perf_counter()
        self.job = opd.OPDJob(config)
        self.job.record_rows = True
        self.state = self.job.start().tree["train"]
        self.setup_s = time.perf_counter() - t0
        self.data, self.student_tok = self.job.data, self.job.tokenizer
        self.student_cfg, self.teacher_cfg = self.job.student_cfg, self.job.teacher_cfg

    @property
    def rows_log(self):
        """The prompt rows of every step (for the TRL side)."""
        return [r["prompts"] for r in self.job.rows_log]

    def step(self, i: int, wait_quiet: float = 0.0) -> dict:
        """One step of the trainer; with wait_quiet > 0 it first waits (untimed, up to that many s)
        for other processes to leave the machine idle."""
        if wait_quiet > 0:
            _wait_quiet(wait_quiet)
        meter = LoadMeter().start()
        self.state, m = (lambda r: (r.state, r.metrics))(self.job.step(i, self.state))
        shapes = self.job.rows_log[-1]
        timings = {k: m[f"timing/{k}"] for k in PHASES + ("segment_s",)}
        timings["step_s"] = sum(timings[k] for k in PHASES)
        return {**timings, "other_busy_cores": meter.stop(), "rows": len(shapes["prompts"]),
                "response_columns": shapes["response_columns"], "real_tokens": int(m["rollout/tokens"]),
                "train_columns": shapes["train_columns"], "loss": float(m["loss/total"]),
                "mean_num_sentences": m.get("release/mean_num_sentences"),
                "rule_release_rate": m.get("release/rule_release_rate"), "kept_share": m.get("release/rule_kept_share")}


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
