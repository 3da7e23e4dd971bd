"""One OPD step, opdjax against Hugging Face TRL's on-policy GKDTrainer (lmbda = 1), on the same
checkpoints and the same batch, CPU, float32.

Set-up of the TRL side (once; TRL must NOT go into opdjax's .venv, it could move pinned versions):

    python3 -m venv /work/bench_trl_venv
    /work/bench_trl_venv/bin/pip install -e '/work/main[test]' trl==1.16.0
    /work/bench_trl_venv/bin/python -c "import trl, transformers, torch; print(trl.__version__, transformers.__version__, torch.__version__)"
    # -> 1.16.0 5.24.0 2.13.0+cpu   (TRL's deps did not move the pins; no --no-deps needed)

Run (from the repo root, in opdjax's venv; the TRL side runs as a subprocess in the TRL venv):

    .venv/bin/python bench/bench_vs_trl.py                      # toy pair, demo batch (~5 min)
    .venv/bin/python bench/bench_vs_trl.py --setup 100m         # ~100M student / ~201M teacher
    .venv/bin/python bench/bench_vs_trl.py --quick              # smoke run (tiny models)
    .venv/bin/python bench/bench_vs_trl.py --trl-python /path/to/venv/bin/python

Like with like:
  * same HF checkpoints (our toy pair / random checkpoints load in transformers'
    Qwen3ForCausalLM directly), same prompt token rows per step (opdjax's data pipeline; every
    prompt repeated samples_per_prompt times; left-padded to the same width with the same pad id),
    same max_new_tokens, temperature 1, no top-k / top-p, AdamW with global-norm clip 1.0;
  * ours `loss.name=jsd` with TRL's beta (default 0.5: the same generalized JSD, see
    opdjax/losses.py) in `release.mode=full` (every response token trained, averaged over the
    response tokens as TRL's "batchmean" over labels does), and also our default `pg` with the
    release rule (`release.mode=bic`), the step the project actually runs;
  * a step = sample + teacher score + release + update for ours (bench_opd_step.py's split), and
    generate + compute_loss (student fwd, teacher fwd, JSD) + backward + AdamW + loop overhead for
    TRL (trl_gkd_side.py). Both warm up (ours: compile) and report the median of the timed steps.
NOT like with like (see the printed caveats): ours always decodes max_new_tokens columns while
transformers' generate stops when every row has emitted EOS; ours with `jsd` also runs the teacher
scorer (release-rule inputs) that TRL does not need; TRL computes full [B, T, V] logits.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import opd_bench_common as common  # noqa: E402
from bench_opd_step import SETUPS  # noqa: E402

DEFAULT_TRL_PY = "/work/bench_trl_venv/bin/python"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", default="toy", choices=("toy", "100m", "tiny"))
    p.add_argument("--steps", type=int, default=4, help="timed steps per side (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--wait-quiet", type=float, default=20.0,
                   help="before each timed step (both sides) wait, untimed, up to this many s for other processes "
                        "to leave the machine idle; PyTorch's OpenMP threads slow down many-fold when another "
                        "process holds a core (0 = don't wait)")
    p.add_argument("--beta", type=float, default=0.5, help="TRL GKD beta = our loss.jsd_beta")
    p.add_argument("--trl-python", default=DEFAULT_TRL_PY)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--arms", default="jsd_full,pg_bic", help="our variants: jsd_full, pg_bic")
    p.add_argument("--ckpt-root", default=os.path.join(tempfile.gettempdir(), "opdjax_bench_ckpts"))
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.setup, args.steps, args.wait_quiet = "tiny", 2, 0.0
    if args.json is None:
        args.json = os.path.join(common.RESULTS, "vs_trl_quick.json" if args.quick else f"vs_trl_{args.setup}.json")
    return args


ARMS = {"jsd_full": {"loss.name": "jsd", "release.mode": "full"},
        "pg_bic": {"loss.name": "pg", "release.mode": "bic"}}


def run_ours(args, pair, arm):
    spec = SETUPS[args.setup]
    over = {**spec["over"], **ARMS[arm], "loss.jsd_beta": args.beta, "optimizer.warmup_steps": 0,
            "optimizer.grad_clip": 1.0}
    config = common.demo_config(pair, **over)
    h = common.OPDHarness(config)
    warm, steps = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        r = h.step(i, wait_quiet=args.wait_quiet if i >= args.warmup else 0.0)
        (warm if i < args.warmup else steps).append(r)
        print(f"[ours {arm}] step {i}: {time.perf_counter() - t0:.2f} s"
              + (" (compiles)" if i < args.warmup else
                 "  (" + ", ".join(f"{k[:-2]} {r[k]:.3f}" for k in common.PHASES) + ")"), flush=True)
    return h, {"config_overrides": over, "warmup_steps": warm, "steps": steps, "summary": common.summarize(steps),
               "prompt_columns": h.data.prompt_len, "rows": steps[0]["rows"],
               "max_new_tokens": config.rollout.max_new_tokens, "learning_rate": config.optimizer.learning_rate}


def run_trl(args, pair, h, ours_first):
    spec = {"student": pair["student"], "teacher": pair["teacher"], "rows": h.rows_log,
            "prompt_len": h.data.prompt_len, "pad_id": int(h.student_tok.pad_token_id),
            "max_new_tokens": int(h.config.rollout.max_new_tokens), "beta": args.beta,
            "temperature": float(h.config.rollout.temperature), "learning_rate": ours_first["learning_rate"],
            "grad_clip": 1.0, "warmup": args.warmup, "wait_quiet": args.wait_quiet, "threads": args.threads or os.cpu_count(), "seed": 0}
    with tempfile.TemporaryDirectory(prefix="vs_trl_") as d:
        sp, out = os.path.join(d, "spec.json"), os.path.join(d, "trl.json")
        with open(sp, "w") as f:
            json.dump(spec, f)
        cmd = [args.trl_python, os.path.join(common.BENCH_DIR, "trl_gkd_side.py"), "--spec", sp, "--out", out]
        print("[trl] " + " ".join(cmd), flush=True)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "JAX_PLATFORMS": "cpu"}
        proc = subprocess.run(cmd, env=env, cwd=common.REPO, capture_output=True, text=True)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        if proc.returncode != 0:
            raise RuntimeError(f"TRL side failed (rc {proc.returncode}):\n{tail}")
        print("[trl] " + tail.splitlines()[-1], flush=True)
        with open(out) as f:
            return json.load(f)


def _quiet(x, n):
    return f"{x:11.3f} ({n})" if n else f"{'none':>16}"


def print_table(res):
    m = res["machine"]
    trl = res["trl"]
    print()
    print(f"== one OPD step: opdjax vs TRL GKDTrainer (lmbda=1, beta={res['args']['beta']}), setup "
          f"'{res['setup']}', {res['rows']} rollouts x max_new_tokens {res['max_new_tokens']}, prompt columns "
          f"{res['prompt_columns']}; {m['cores']} cores (shared), {m['cpu']} ==")
    hdr = (f"{'run':<26} {'step s':>8} {'min s':>7} {'gen/sample s':>12} {'score s':>8} {'release s':>9} "
           f"{'loss+upd s':>10} {'real tok':>8} {'tok/s':>7} {'TRL/ours':>9} {'other load':>10} "
           f"{'quiet step s (n)':>16} {'TRL/ours quiet':>14}")
    print(hdr)
    print("-" * len(hdr))
    for arm, r in res["ours"].items():
        s = r["summary"]
        ratio = trl["step_s"] / s["step_s"]
        print(f"{'opdjax ' + arm:<26} {s['step_s']:8.3f} {s['min_step_s']:7.3f} {s['sample_s']:12.3f} "
              f"{s['score_s']:8.3f} {s['release_s']:9.3f} {s['update_s']:10.3f} {s['real_tokens_per_step']:8.0f} "
              f"{s['rollout_tokens_per_s']:7.0f} {ratio:8.2f}x {s['other_busy_cores_median'] or 0:10.2f} "
              + _quiet(s["quiet_step_s"], s["quiet_steps"]) + " "
              + (f"{trl['quiet_step_s'] / s['quiet_step_s']:13.2f}x" if s["quiet_steps"] and trl["quiet_steps"]
                 else f"{'n/a':>14}"))
    print(f"{'TRL GKDTrainer (torch)':<26} {trl['step_s']:8.3f} {trl['min_step_s']:7.3f} {trl['generate_s']:12.3f} "
          f"{'-':>8} {'-':>9} {trl['compute_loss_s'] + trl['rest_s']:10.3f} {trl['real_tokens_per_step']:8.0f} "
          f"{trl['rollout_tokens_per_s']:7.0f} {1.0:8.2f}x {trl['other_busy_cores_median'] or 0:10.2f} "
          + _quiet(trl["quiet_step_s"], trl["quiet_steps"]))
    print(f"TRL: compute_loss (student+teacher fwd, JSD) {trl['compute_loss_s']:.3f} s, backward+AdamW+loop "
          f"{trl['rest_s']:.3f} s; generated columns per step {trl['generated_columns_all'][trl['warmup']:]}")
    for arm, r in res["ours"].items():
        ratio = trl["step_s"] / r["summary"]["step_s"]
        q = (trl["quiet_step_s"] / r["summary"]["quiet_step_s"]) if r["summary"]["quiet_steps"] and trl["quiet_steps"] else None
        best = q if q is not None else ratio
        print(f"ratio TRL/ours step time [{arm}]: median {ratio:.2f}x, quiet-step median "
              f"{'n/a' if q is None else f'{q:.2f}x'}, at the min {trl['min_step_s'] / r['summary']['min_step_s']:.2f}x"
              f"  (goal >= 3x on {'quiet' if q is not None else 'all'} steps: {'met' if best >= 3 else 'NOT met'})")
    if "RANDOM" in res["pair"]["source"]:
        print(f"NOTE: {res['pair']['source']}")


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not os.path.exists(args.trl_python):
        sys.exit(f"no TRL venv at {args.trl_python}: see the set-up at the top of {__file__}")
    t0 = time.perf_counter()
    pair = common.make_pair(SETUPS[args.setup]["pair"], args.ckpt_root)
    res = {"machine": common.machine_info(), "args": vars(args), "setup": args.setup, "pair": pair,
           "student_params": common.num_params(pair["student"]), "teacher_params": common.num_params(pair["teacher"]),
           "ours": {}}
    arms = [a for a in args.arms.split(",") if a]
    h, res["ours"][arms[0]] = run_ours(args, pair, arms[0])
    res.update(rows=res["ours"][arms[0]]["rows"], prompt_columns=res["ours"][arms[0]]["prompt_columns"],
               max_new_tokens=res["ours"][arms[0]]["max_new_tokens"])
    first = res["ours"][arms[0]]
    del h.state  # free memory before torch loads its copies
    h.job.teacher_params = None
    res["trl"] = run_trl(args, pair, h, first)
    for arm in arms[1:]:
        _, res["ours"][arm] = run_ours(args, pair, arm)
    res["ratios_trl_over_ours"] = {a: res["trl"]["step_s"] / r["summary"]["step_s"] for a, r in res["ours"].items()}
    res["ratios_trl_over_ours_min"] = {a: res["trl"]["min_step_s"] / r["summary"]["min_step_s"]
                                       for a, r in res["ours"].items()}
    res["ratios_trl_over_ours_quiet"] = {a: (res["trl"]["quiet_step_s"] / r["summary"]["quiet_step_s"])
                                         if r["summary"]["quiet_steps"] and res["trl"]["quiet_steps"] else None
                                         for a, r in res["ours"].items()}
    res["caveats"] = [
        "ours decodes max_new_tokens columns every step; transformers generate stops once all rows emitted EOS "
        "(generated columns per TRL step are in trl.generated_columns_all)",
        "ours jsd_full also runs the teacher scorer + release rule inputs (unused by the loss in mode=full)",
        "TRL materialises [B, T, V] float32 logits for student and teacher; ours chunks the vocabulary losses",
        "the two sides run one after the other (ours jsd, TRL, ours pg), not interleaved; see other_busy_cores",
    ]
    return common.finish(res, t0, print_table, args.json)


if __name__ == "__main__":
    main()
