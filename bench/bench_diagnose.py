"""Where the time of a teachability diagnosis goes: the `diagnose` job on the shipped toy pair,
64 rollouts of 512 tokens (16 prompts x 4 samples in one sampler call), every margin variant,
plain BIC and permutation calibration with P=200 reorderings per rollout.

    .venv/bin/python bench/bench_diagnose.py             # ~1-2 min on a 2-core CPU
    .venv/bin/python bench/bench_diagnose.py --permutations 1000

The toy student stops at its EOS after ~70 tokens, which would time a much shorter diagnosis
than the one asked for. So this bench stops only on the pad id (which the toy student does not
emit): every rollout runs the full 512 tokens (the count is printed). Everything else is
configs/diagnose_toy_pair.py as is. Phases come from the job's own timings (diagnosis.json):
sampling and teacher scoring against the diagnosis' own cost (sentence segments + statistics),
in one run, side by side. The job compiles inside sample/score/analysis; --repeat N runs it again
in the same process (warm compile caches) and reports that run too.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
sys.path.insert(0, REPO)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--permutations", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--repeat", type=int, default=1, help="extra warm runs in the same process")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "diagnose.json"))
    args = p.parse_args(argv)

    import diagnose_toy_pair
    from opdjax.train import diagnose as job

    original = job.sampling_settings

    def full_length(config, settings, tokenizer, cfg):  # stop only on the pad id
        s = original(config, settings, tokenizer, cfg)
        return dataclasses.replace(s, stop_ids=(int(tokenizer.pad_token_id),))

    job.sampling_settings = full_length
    runs = []
    for i in range(1 + args.repeat):
        c = diagnose_toy_pair.get_config()
        c.workdir = tempfile.mkdtemp(prefix="bench_diagnose_")
        c.rollout.max_new_tokens = args.max_new_tokens
        c.release.permutations = args.permutations
        c.metrics.progress = False
        r = job.diagnose(c)
        t = r["timings"]
        tokens = r["rollouts"]["response_tokens"]
        own = t["segment_s"] + t["analysis_s"]
        core = own + t["sample_s"] + t["score_s"]
        row = {"run": "cold" if i == 0 else "warm", "rollouts": r["rollouts"]["count"], "response_tokens": tokens,
               **{k: round(v, 3) for k, v in t.items()}, "own_s": round(own, 3),
               "own_share_of_total": round(own / t["total_s"], 4),
               "own_share_of_sample_score_own": round(own / core, 4)}
        runs.append(row)
        print(f"[{row['run']}] {row['rollouts']} rollouts, {tokens} response tokens "
              f"({tokens / row['rollouts']:.0f} per rollout); P={args.permutations}")
        for k in ("load_s", "sample_s", "score_s", "segment_s", "analysis_s", "report_s", "total_s"):
            print(f"  {k:<11} {t[k]:7.2f} s  {t[k] / t['total_s']:6.1%}")
        print(f"  diagnosis' own cost (segments + statistics) {own:.2f} s = {own / t['total_s']:.1%} of the total, "
              f"{own / core:.1%} of sampling + scoring + own")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"bench": "diagnose", "permutations": args.permutations, "runs": runs}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
