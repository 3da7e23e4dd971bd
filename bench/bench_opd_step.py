"""One OPD step, split into its phases: sample / score / release / update.

Each step runs exactly what `opdjax.train.opd.run` runs per iteration: `opd.rollout_and_release`
(the student's jitted sampler, the chunked teacher scorer, the release rule: margins, NLTK Punkt
sentences on the host, the jitted BIC scan, release weights; its three timings are taken inside
that function) and then the jitted, donated train step + `jax.device_get` of its metrics
(`update`). The set-up is `run`'s (bench/opd_bench_common.OPDHarness). One warm-up step (compile)
is left out, then --steps steps are timed; medians per phase are reported.

Setups:
  toy   the shipped toy pair (opdjax/assets/toy_pair; a random stand-in of the same shapes when it
        is not there, flagged in the output) with configs/opd_demo.py's settings: 16 prompts x 4
        samples = 64 rollouts, max_new_tokens 96, temperature 1, pg loss, release.mode=bic.
  100m  bench_forward.py's ~100M student (L=8, D=768, V=32768) and a ~201M teacher (L=24), random
        weights, 4 prompts x 2 samples = 8 rollouts, max_new_tokens 64 (shorter, so it runs in
        minutes), otherwise the demo's settings.

The release share is release_s / step_s (goal < 2%). tokens/s counts the real (unpadded)
response tokens of a step over its wall time; generated columns/s counts every decoded column
(the sampler always decodes max_new_tokens columns).

    .venv/bin/python bench/bench_opd_step.py                   # both setups (~5 min on 2 cores)
    .venv/bin/python bench/bench_opd_step.py --setups toy      # the demo pair only
    .venv/bin/python bench/bench_opd_step.py --quick           # smoke run, tiny models (< 1 min)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import opd_bench_common as common  # noqa: E402

SETUPS = {
    "toy": dict(pair="toy", over={}),
    "100m": dict(pair="100m", over={"batch.prompts_per_step": 4, "rollout.samples_per_prompt": 2,
                                    "rollout.max_new_tokens": 64}),
    "tiny": dict(pair="tiny", over={"batch.prompts_per_step": 2, "rollout.samples_per_prompt": 2,
                                    "rollout.max_new_tokens": 16, "data.num_train": 64}),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", default="toy,100m", help="comma-separated: toy, 100m (tiny = --quick)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per setup (after 1 warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--wait-quiet", type=float, default=20.0,
                   help="before each timed step wait (untimed) up to this many s for other processes to leave "
                        "the machine idle (shared machines; 0 = don't wait)")
    p.add_argument("--ckpt-root", default=os.path.join(tempfile.gettempdir(), "opdjax_bench_ckpts"),
                   help="where built checkpoints go (reused across runs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every setup, e.g. --set rollout.max_new_tokens=32")
    p.add_argument("--json", default=os.path.join(common.RESULTS, "opd_step.json"))
    p.add_argument("--quick", action="store_true", help="tiny random pair, 2 timed steps")
    args = p.parse_args(argv)
    if args.quick:
        args.setups, args.steps, args.wait_quiet = "tiny", 2, 0.0
        if args.json == os.path.join(common.RESULTS, "opd_step.json"):
            args.json = os.path.join(common.RESULTS, "opd_step_quick.json")
    return args


def _parse_set(items):
    out = {}
    for it in items:
        k, v = it.split("=", 1)
        try:
            v = eval(v, {}, {})  # numbers, tuples, quoted strings
        except Exception:  # noqa: BLE001
            pass
        out[k] = v
    return out


def run_setup(name, args, extra):
    spec = SETUPS[name]
    pair = common.make_pair(spec["pair"], args.ckpt_root)
    config = common.demo_config(pair, **{**spec["over"], **extra})
    h = common.OPDHarness(config)
    n_s, n_t = h.student_cfg.num_params(), h.teacher_cfg.num_params()
    print(f"[{name}] {pair['source']}\n[{name}] student {n_s / 1e6:.2f}M params, teacher {n_t / 1e6:.2f}M; "
          f"{config.batch.prompts_per_step} prompts x {config.rollout.samples_per_prompt} samples, "
          f"prompt columns {h.data.prompt_len}, max_new_tokens {config.rollout.max_new_tokens}, "
          f"loss {config.loss.name}, release.mode {config.release.mode}; set-up {h.setup_s:.1f} s", flush=True)
    warm = []
    for i in range(args.warmup):
        t0 = time.perf_counter()
        warm.append(h.step(i))
        print(f"[{name}] warm-up step {i}: {time.perf_counter() - t0:.1f} s (compiles)", flush=True)
    steps = []
    for i in range(args.warmup, args.warmup + args.steps):
        r = h.step(i, wait_quiet=args.wait_quiet)
        steps.append(r)
        print(f"[{name}] step {i}: " + "  ".join(f"{k[:-2]} {r[k]:.3f}s" for k in common.PHASES + ("step_s",))
              + f"  release {100 * r['release_s'] / r['step_s']:.2f}%  tokens {r['real_tokens']}"
              + (f"  other load {r['other_busy_cores']:.2f} cores" if r["other_busy_cores"] is not None else ""),
              flush=True)
    summ = common.summarize(steps)
    return {"pair": pair, "student_params": n_s, "teacher_params": n_t, "prompt_columns": h.data.prompt_len,
            "config": {"prompts_per_step": config.batch.prompts_per_step,
                       "samples_per_prompt": config.rollout.samples_per_prompt,
                       "max_new_tokens": config.rollout.max_new_tokens, "temperature": config.rollout.temperature,
                       "loss": config.loss.name, "release_mode": config.release.mode,
                       "chunk_tokens": config.loss.chunk_tokens, "top_k": config.release.top_k},
            "setup_s": h.setup_s, "warmup_steps": warm, "steps": steps, "summary": summ}


def print_table(res):
    print()
    print(f"== OPD step phases (median of timed steps; {res['machine']['cores']} cores, shared machine; "
          f"{res['machine']['cpu']}) ==")
    hdr = (f"{'setup':<6} {'student/teacher':>16} {'rows x cols':>12} {'sample s':>9} {'score s':>8} "
           f"{'release s':>9} {'update s':>9} {'step s':>8} {'release %':>9} {'tok/s':>7} {'cols/s':>7} "
           f"{'sent/resp':>9} {'other load':>10} {'quiet step s (n)':>16}")
    print(hdr)
    print("-" * len(hdr))
    for name, r in res["setups"].items():
        s = r["summary"]
        st = f"{r['student_params'] / 1e6:.1f}M/{r['teacher_params'] / 1e6:.1f}M"
        rc = f"{r['steps'][0]['rows']}x{r['steps'][0]['response_columns']}"
        ob = s["other_busy_cores_median"]
        ns = s["mean_num_sentences"]
        print(f"{name:<6} {st:>16} {rc:>12} {s['sample_s']:9.3f} {s['score_s']:8.3f} {s['release_s']:9.3f} "
              f"{s['update_s']:9.3f} {s['step_s']:8.3f} {100 * s['release_share']:8.2f}% "
              f"{s['rollout_tokens_per_s']:7.0f} {s['generated_columns_per_s']:7.0f} "
              f"{(f'{ns:.1f}' if ns is not None else 'n/a'):>9} {(f'{ob:.2f}' if ob is not None else 'n/a'):>10} "
              + (f"{s['quiet_step_s']:11.3f} ({s['quiet_steps']})" if s["quiet_steps"] else f"{'none':>16}"))
    print("shares of the step:")
    for name, r in res["setups"].items():
        sh = r["summary"]["shares"]
        verdict = "OK (< 2%)" if r["summary"]["release_share"] < 0.02 else "ABOVE the 2% goal"
        print(f"  {name:<6} " + "  ".join(f"{k[:-2]} {100 * v:5.1f}%" for k, v in sh.items())
              + f"   release rule: {verdict} (max over steps {100 * r['summary']['release_share_max']:.2f}%; "
              f"with the host segmentation that overlaps scoring: {100 * r['summary']['release_share_incl_segments']:.2f}%, "
              f"segment {r['summary']['segment_s']:.3f} s)")
    for name, r in res["setups"].items():
        if "RANDOM" in r["pair"]["source"]:
            print(f"NOTE [{name}]: {r['pair']['source']}")


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    extra = _parse_set(args.set)
    t0 = time.perf_counter()
    res = {"machine": common.machine_info(), "args": vars(args), "setups": {}}
    for name in [s for s in args.setups.split(",") if s]:
        res["setups"][name] = run_setup(name, args, extra)
    res["total_s"] = time.perf_counter() - t0
    res["machine"]["loadavg_at_end"] = common._loadavg()
    print_table(res)
    print(f"total {res['total_s']:.0f} s; loadavg at end {res['machine']['loadavg_at_end']}")
    common.write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
