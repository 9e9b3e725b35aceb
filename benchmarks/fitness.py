"""Image-fitness detector on a synthetic cohort: sensitivity per unfit kind, false flags, cost.

    python benchmarks/fitness.py --cohort DIR [--cohort DIR2 ...] [--limits JSON]

Each cohort is one written by ``hipoa synth`` (``--unfit K`` plants implants, cropped fields of
view and motion; ``--second-scanner F`` images a fraction on the second scanner). Every readable
image with usable automatic points goes through :func:`hipoa.fitness.check_image`, exactly as the
crop runs it; the planted faults of ``--faults`` (unreadable files, bad points) are skipped.
Prints, per cohort and over all of them, the flags by truth kind, each unfit kind's sensitivity,
the false-flag rate on normal hips (by scanner), the score distributions (implant area, motion
score) of normal and unfit hips, and the milliseconds per image.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from hipoa import fitness, qc
from hipoa.dicom import read_image
from hipoa.points import read_pts
from hipoa.synth import FIELD, PROTOCOLS, UNFIT, image_stem, zip_name


def _hip_member(zip_path: Path, side: str) -> str:
    import io
    import zipfile

    import pydicom

    with zipfile.ZipFile(zip_path) as zf:
        for name in zf.namelist():
            if name.endswith(".dcm"):
                ds = pydicom.dcmread(io.BytesIO(zf.read(name)), stop_before_pixels=True)
                if str(ds.get("ProtocolName", "")) == PROTOCOLS[side]:
                    return name
    raise ValueError(f"{zip_path}: no {side} hip")


def score_cohort(cohort: Path, limits: qc.Limits) -> pd.DataFrame:
    truth = pd.read_parquet(cohort / "truth.parquet")
    rows = []
    for r in truth.itertuples(index=False):
        if r.fault and not r.unfit:
            continue
        zip_path = cohort / "ukb" / str(FIELD) / zip_name(r.eid)
        hip = read_image(zip_path, _hip_member(zip_path, r.side))
        pts = read_pts(cohort / "points" / "auto" / f"{image_stem(r.eid, r.side)}.pts", n_points=85)
        t0 = time.perf_counter()
        fit = fitness.check_image(hip.pixels, pts, hip.spacing_mm, limits, hip.max_value)
        ms = 1000.0 * (time.perf_counter() - t0)
        rows.append({"cohort": cohort.name, "kind": r.fault if r.unfit else "normal", "scanner": r.scanner,
                     "expected": UNFIT.get(r.fault, "") if r.unfit else "", "reason": fit.reason,
                     "implant_area_mm2": fit.implant_area_mm2, "motion_score": fit.motion_score, "ms": ms})
    return pd.DataFrame(rows)


def report(d: pd.DataFrame, title: str) -> None:
    print(f"\n== {title}: {len(d)} images")
    print(pd.crosstab(d["kind"], d["reason"].replace("", "(fit)")).to_string())
    for kind, expected in UNFIT.items():
        k = d[d["kind"] == kind]
        if len(k):
            hit = int((k["reason"] == expected).sum())
            print(f"{kind:>13}: {hit}/{len(k)} flagged {expected} (sensitivity {hit / len(k):.3f})")
    normal = d[d["kind"] == "normal"]
    for scanner, g in normal.groupby("scanner"):
        bad = int((g["reason"] != "").sum())
        print(f"normal hips, scanner {scanner}: {bad}/{len(g)} flagged ({100 * bad / max(len(g), 1):.2f} %)")
    for col in ("implant_area_mm2", "motion_score"):
        for kind, g in d.groupby("kind"):
            v = g[col].dropna()
            if len(v):
                print(f"{col} {kind:>13}: min {v.min():.3f} median {v.median():.3f} max {v.max():.3f}")
    print(f"cost: {d['ms'].mean():.1f} ms per image (median {d['ms'].median():.1f})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", type=Path, action="append", required=True)
    ap.add_argument("--limits", default="", help="qc limits as JSON (default: hipoa.qc.Limits())")
    args = ap.parse_args(argv)
    limits = qc.load_limits(args.limits or None)
    frames = [score_cohort(c, limits) for c in args.cohort]
    for d in frames:
        report(d, str(d["cohort"].iloc[0]) if len(d) else "empty")
    if len(frames) > 1:
        report(pd.concat(frames, ignore_index=True), "all cohorts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
