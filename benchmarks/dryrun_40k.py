"""How fast does Snakemake plan a UK Biobank-sized run?

Writes a manifest of 40,000 synthetic hip images (rows only: no pixels, no files behind them)
and times `snakemake -n` of the real Snakefile with `inputs.manifest` pointing at it and 40
shards per side (config/config.yaml, which the Snakefile reads, under this override). Prints the seconds and the number of jobs. The DAG must not depend on
reading any image: shards are `blake2b(eid) mod shards`, decided at ingest time.

    python benchmarks/dryrun_40k.py [--images 40000] [--shards 40] [--sides L]
"""

from __future__ import annotations

import argparse
import csv
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def write_manifest(path: Path, n_images: int, sides: list[str]) -> None:
    """``n_images`` rows spread over participants and ``sides`` (instance 2, UKB naming)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["eid", "instance", "side", "image", "points_auto", "points_manual", "mask"])
        for i in range(n_images):
            side = sides[i % len(sides)]
            eid = 9_000_000 + i // len(sides)
            annotated = i % 10 == 0
            writer.writerow([
                eid, 2, side, f"ukb/20158/{eid}_20158_2_0.zip", f"ukb/points/auto/{eid}_2_{side}.pts",
                f"ukb/points/manual/{eid}_2_{side}.pts" if annotated else "",
                f"ukb/masks/{eid}_2_{side}.png" if annotated else "",
            ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40_000, help="manifest rows (40000)")
    parser.add_argument("--shards", type=int, default=40, help="shards per side (40, config/config.yaml)")
    parser.add_argument("--sides", nargs="+", default=["L"], choices=["L", "R"], help="sides (L)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="hipoa-dryrun-") as tmp:
        work = Path(tmp)
        manifest = work / "manifest.csv"
        t0 = time.perf_counter()
        write_manifest(manifest, args.images, args.sides)
        t_write = time.perf_counter() - t0
        override = {
            "cohort": {"synthesize": False},
            "inputs": {"manifest": str(manifest), "images": "", "points_auto": "",
                       "points_manual": "", "masks": ""},
            "sides": args.sides,
            "patches": {"shards": args.shards},
        }
        (work / "override.yaml").write_text(yaml.safe_dump(override))
        cmd = [
            "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(work),
            "--configfile", str(work / "override.yaml"),
            "--dry-run", "--quiet", "rules", "--cores", "1",
        ]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            return done.returncode
        totals = re.findall(r"^total\s+(\d+)", done.stdout + done.stderr, flags=re.M)
        jobs = int(totals[-1]) if totals else -1
        rules = dict(re.findall(r"^(\w+)\s+(\d+)$", done.stdout + done.stderr, flags=re.M))

    print(f"manifest rows: {args.images}  sides: {' '.join(args.sides)}  shards per side: {args.shards}")
    print(f"writing the manifest CSV: {t_write:.2f} s")
    print(f"snakemake --dry-run (parse, validate config and manifest, build the DAG): {seconds:.2f} s")
    print(f"jobs: {jobs}  ({', '.join(f'{k} {v}' for k, v in rules.items() if k != 'total')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
