"""Benchmark: ingest rate (zips per second) on a synthetic UKB cohort.

    python benchmarks/ingest.py --participants 200 [--workers 1 2] [--cohort DIR] [--keep]

Makes a cohort with ``hipoa.synth.make_cohort`` (UKB layout: ``ukb/20158/{eid}_20158_2_0.zip``
with both hips, other scans and ``manifest.cvs``), then times ``hipoa.ingest.build_manifest``
for the left side at each worker count and prints zips/s and the extrapolated time for 40k zips.
``--simple`` builds plain zips here instead (600 x 680 8-bit hips, a spine and a total-body scan,
no anatomy) when ``hipoa.synth`` is not available.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from hipoa.ingest import build_manifest

IMAGES = "ukb/20158/{eid}_20158_{instance}_{array}.zip"
AUTO = "points/auto/{eid}_{instance}_{side}.pts"


def simple_cohort(root: Path, participants: int, seed: int) -> None:
    """UKB-shaped zips without anatomy: smooth images plus noise (compress like DXAs, roughly)."""
    from hipoa.points import write_pts
    from hipoa.synth import dicom_bytes

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:600, 0:680]
    base = (120 + 60 * np.sin(x / 40) * np.cos(y / 55)).astype(np.float32)
    (root / "ukb" / "20158").mkdir(parents=True, exist_ok=True)
    (root / "points" / "auto").mkdir(parents=True, exist_ok=True)
    for i in range(participants):
        eid = 9000000 + i
        members = {"manifest.cvs": b"file,description\n"}
        for k, (protocol, shape, area) in enumerate(
            [
                ("Left Femur", (600, 680), [170, 150]),
                ("Right Femur", (600, 680), [170, 150]),
                ("AP Spine", (800, 600), [150, 200]),
                ("Total Body", (1000, 500), [600, 1950]),
            ]
        ):
            img = np.resize(base, shape) + rng.normal(0, 4, shape)
            uid = f"1.2.840.113619.2.110.{eid}.{k}"
            members[uid] = dicom_bytes(
                np.clip(img, 0, 255).astype(np.uint8),
                protocol,
                sop_uid=uid,
                study_uid=f"1.2.840.113619.2.110.{eid}",
                series_uid=f"{uid}.1",
                patient_id=f"SYNTH{i:06d}",
                study_date="20200101",
                series_number=k + 1,
                spacing_mm=area[0] / shape[1],
            )
        with zipfile.ZipFile(root / "ukb" / "20158" / f"{eid}_20158_2_0.zip", "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        for side in "LR":
            pts = np.column_stack([rng.uniform(50, 630, 85), rng.uniform(50, 550, 85)])
            write_pts(root / "points" / "auto" / f"{eid}_2_{side}.pts", pts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--participants", type=int, default=200, help="zips in the cohort (200)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (1 2)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cohort", type=Path, help="existing or new cohort folder (default: a temp folder)")
    parser.add_argument("--simple", action="store_true", help="build plain zips here, not with hipoa.synth")
    parser.add_argument("--keep", action="store_true", help="keep the temp cohort")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    root = args.cohort or Path(tempfile.mkdtemp(prefix="hipoa-bench-ingest-"))
    try:
        if not any((root / "ukb" / "20158").glob("*.zip")):
            t0 = time.perf_counter()
            if args.simple:
                simple_cohort(root, args.participants, args.seed)
                how = "simple zips"
            else:
                from hipoa.synth import make_cohort

                make_cohort(root, participants=args.participants, seed=args.seed)
                how = "hipoa.synth.make_cohort"
            print(f"cohort: {args.participants} participants ({how}) in {time.perf_counter() - t0:.1f} s -> {root}")
        zips = sorted((root / "ukb" / "20158").glob("*.zip"))
        size_mb = sum(p.stat().st_size for p in zips) / 1e6
        print(f"{len(zips)} zips, {size_mb / max(len(zips), 1):.2f} MB each on average")
        for workers in args.workers:
            t0 = time.perf_counter()
            df = build_manifest(
                images=str(root / IMAGES), points_auto=str(root / AUTO), side="L", n_shards=16, workers=workers
            )
            dt = time.perf_counter() - t0
            rate = len(df) / dt
            print(
                f"workers={workers}: {len(df)} zips in {dt:.2f} s = {rate:.1f} zips/s "
                f"(40,000 zips: {40000 / rate / 60:.1f} min); qc: "
                + ", ".join(f"{k or 'ok'} {v}" for k, v in df["qc_reason"].value_counts().items())
            )
    finally:
        if args.cohort is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
