"""Benchmark ``hipoa synth``: participants per second for N participants.

Usage::

    python benchmarks/synth.py [--participants 200] [--workers W] [--seed 0] [--out DIR]

Prints one line with the rate, the wall time, the CPU count and the load average (the machine may
be shared: compare runs at similar load). The target is 1,000 participants in under 2 minutes on
2 cores (>= 8.3 participants/s).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from hipoa.synth import make_cohort


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--participants", type=int, default=200, metavar="N")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="W")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--faults", type=int, default=0)
    p.add_argument("--out", metavar="DIR", help="keep the cohort here (default: a temporary directory, removed)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="hipoa-synth-bench-"))
    try:
        load0 = os.getloadavg()[0]
        t0, c0, k0 = time.perf_counter(), time.process_time(), os.times()
        truth = make_cohort(out, participants=args.participants, seed=args.seed, faults=args.faults,
                            workers=args.workers)
        wall = time.perf_counter() - t0
        k1 = os.times()
        cpu = (time.process_time() - c0) + (k1.children_user - k0.children_user) + (
            k1.children_system - k0.children_system)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(f"synth: {args.participants} participants ({len(truth)} hips) in {wall:.1f} s = "
              f"{args.participants / wall:.2f} participants/s with {args.workers} workers on {os.cpu_count()} CPUs "
              f"(load avg {load0:.1f} -> {os.getloadavg()[0]:.1f}); CPU {1000 * cpu / args.participants:.0f} ms "
              f"per participant (all processes); {size / 2**20:.0f} MiB written; 1000 participants: "
              f"~{1000 * wall / args.participants:.0f} s at this load, "
              f"~{1000 * cpu / args.participants / args.workers:.0f} s with {args.workers} idle cores")
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
