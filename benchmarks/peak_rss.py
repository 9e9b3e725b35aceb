"""Peak memory of a command and all its processes, sampled often (docs/scale.md).

Snakemake's benchmark files sample a job's memory every 0.5 s for its first 15 s, then every
30 s, so the peak of a longer job (ingest, a prediction group) can fall between two samples.
This runs one command and samples the summed RSS of its whole process tree every 0.1 s:

    python benchmarks/peak_rss.py [--interval 0.1] -- COMMAND [ARG ...]

Prints one line: the command's wall time, the peak of the summed RSS of the tree (what a SLURM
memory limit counts), and the kernel's high-water mark of the largest single process
(``ru_maxrss``, never missed by sampling). The exit status is the command's.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import psutil


def tree_rss(process: psutil.Process) -> int:
    """Summed RSS in bytes of ``process`` and every descendant still alive."""
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass  # it ended between the listing and the reading
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--interval", type=float, default=0.1, metavar="S")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give a command after --")
    t0 = time.perf_counter()
    child = subprocess.Popen(command)
    proc = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        try:
            peak = max(peak, tree_rss(proc))
        except psutil.Error:
            break
        time.sleep(args.interval)
    rc = child.wait()
    wall = time.perf_counter() - t0
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB -> MiB
    print(f"peak_rss: {wall:.1f} s; process tree peak {peak / 2**20:,.0f} MiB (sampled every "
          f"{args.interval:g} s); largest single process {largest:,.0f} MiB (kernel); exit {rc}; "
          f"{' '.join(command)[:120]}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
