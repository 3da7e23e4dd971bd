"""The BIC change-point scan on this machine's CPU: jitted `bic_scan` over a whole batch against a
`ruptures` Dynp loop and the plain O(J^2) NumPy loop (`bic_scan_numpy_loop`), one trajectory at a time.

    .venv/bin/python bench/bench_changepoint.py            # 4,096 trajectories x 256 sentences (~5 s)
    .venv/bin/python bench/bench_changepoint.py --quick    # 512 x 64, a smoke run (~3 s)
    .venv/bin/python bench/bench_changepoint.py --variance separate

Signals: per trajectory an offset, a noise scale and Gaussian noise; about half get a downward
mean shift at a random sentence, a quarter an upward one, a quarter none (all rows full length).

- ours: one jitted call on the [B, J] batch already on the device; compile reported apart,
  --warmup untimed calls, then the median of --repeats back-to-back timed calls
  (block_until_ready). XLA uses every core; ruptures and NumPy run on one.
- ruptures: `Dynp(model, min_size=min_segment, jump=1).fit(m).predict(n_bkps=1)` per trajectory
  (model "l2" for shared variance, "normal" for separate). That loop is slow, so only the first
  --subset trajectories are timed and the time is extrapolated linearly to B (stated in the
  output). It yields only the argmin split: no BIC value, no detection, which flatters it.
- NumPy loop: `bic_scan_numpy_loop` on the same subset, extrapolated the same way.
Decisions are compared on the subset: ours vs the NumPy loop (split and detected, both
directions), and ours vs ruptures on the rows whose ruptures split is downward.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import ruptures

from opdjax.teachability import changepoint as cp


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trajectories", type=int, default=4096)
    p.add_argument("--sentences", type=int, default=256)
    p.add_argument("--subset", type=int, default=64, help="trajectories timed for the two loops")
    p.add_argument("--repeats", type=int, default=20, help="timed calls of ours (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls of ours after compile")
    p.add_argument("--variance", choices=cp.VARIANCES, default="shared")
    p.add_argument("--min-segment", type=int, default=2)
    p.add_argument("--penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="512 x 64, subset 16: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.trajectories, args.sentences, args.subset, args.repeats = 512, 64, 16, 5
    return args


def piecewise_signals(rows, length, seed):
    rs = np.random.RandomState(seed)
    noise = rs.uniform(0.3, 2.0, (rows, 1))
    M = rs.uniform(-2, 4, (rows, 1)) + noise * rs.randn(rows, length)
    direction = rs.choice([-1, -1, 1, 0], rows)[:, None]   # down in ~1/2, up in ~1/4
    where = np.arange(length)[None] >= rs.randint(length // 8, length - length // 8, (rows, 1))
    M += direction * rs.uniform(0.2, 1.5, (rows, 1)) * noise * where
    return M.astype(np.float32)


def main(argv=None):
    args = parse_args(argv)
    B, J, n = args.trajectories, args.sentences, min(args.subset, args.trajectories)
    scan_kw = dict(penalty=args.penalty, min_segment=args.min_segment, variance=args.variance)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores, "
          f"load average before: {os.getloadavg()[0]:.2f}")
    M = piecewise_signals(B, J, args.seed)
    M_dev, valid_dev = jnp.asarray(M), jnp.ones((B, J), bool)

    t = time.perf_counter()
    ours = jax.block_until_ready(cp.bic_scan(M_dev, valid_dev, **scan_kw))
    compile_s = time.perf_counter() - t
    for _ in range(args.warmup):  # the first calls after compile run slower (allocation, threads)
        jax.block_until_ready(cp.bic_scan(M_dev, valid_dev, **scan_kw))
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        jax.block_until_ready(cp.bic_scan(M_dev, valid_dev, **scan_kw))
        times.append(time.perf_counter() - t)
    ours_s = statistics.median(times)
    ours = jax.tree.map(np.asarray, ours)

    model = {"shared": "l2", "separate": "normal"}[args.variance]
    splits_rpt = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "normal": notice of its 1e-6 variance bias
        t = time.perf_counter()
        for m in M[:n]:
            algo = ruptures.Dynp(model=model, min_size=args.min_segment, jump=1).fit(m)
            splits_rpt.append(algo.predict(n_bkps=1)[0])
        rpt_s = (time.perf_counter() - t) / n * B
    t = time.perf_counter()
    ref = cp.bic_scan_numpy_loop(M[:n], np.ones((n, J), bool), **scan_kw)
    loop_s = (time.perf_counter() - t) / n * B

    print(f"\n{B} trajectories x {J} sentences, variance={args.variance}, "
          f"min_segment={args.min_segment}, penalty={args.penalty}; detected {ours.detected.mean():.1%} "
          f"(upward {ours.upward_detected.mean():.1%})")
    print(f"{'method':<44}{'seconds for all B':>18}{'per trajectory':>16}{'vs ours':>10}")
    rows = [("ours: jitted bic_scan, median of %d" % args.repeats, ours_s),
            (f"ruptures Dynp loop ({n} timed, x{B / n:g} extrapolated)", rpt_s),
            (f"NumPy O(J^2) loop ({n} timed, x{B / n:g} extrapolated)", loop_s)]
    for name, seconds in rows:
        print(f"{name:<44}{seconds:>18.4f}{seconds / B * 1e6:>14.1f}us{seconds / ours_s:>9.0f}x")
    print(f"(ours: fastest call {min(times):.4f} s, compile {compile_s:.2f} s, both excluded above; "
          f"load average after: {os.getloadavg()[0]:.2f})")

    same = lambda a, b: int((np.asarray(a)[:n] == np.asarray(b)).sum())  # noqa: E731
    print(f"\ndecisions on the {n}-trajectory subset, ours (float32) vs the NumPy loop (float64):")
    for name in ("split", "detected", "upward_split", "upward_detected"):
        print(f"  {name:<16} identical on {same(getattr(ours, name), getattr(ref, name))}/{n}")
    down = [i for i, k in enumerate(splits_rpt) if M[i, k:].mean() < M[i, :k].mean()]
    agree = sum(int(ours.split[i]) == splits_rpt[i] for i in down)
    print(f"  split vs ruptures identical on {agree}/{len(down)} rows whose ruptures split is downward")
    fin = np.isfinite(ref.delta_bic)
    err = np.abs(ours.delta_bic[:n][fin] - ref.delta_bic[fin]) / np.maximum(1, np.abs(ref.delta_bic[fin]))
    print(f"  max |delta_bic error| / max(1, |delta_bic|) = {err.max():.1e}")


if __name__ == "__main__":
    main()
