"""Image-fitness detector on a synthetic cohort: sensitivity per unfit kind, false flags, cost.

    python benchmarks/fitness.py --cohort DIR [--cohort DIR2 ...] [--limits JSON]
    python benchmarks/fitness.py --scanners N [--implants K] [--motion M] [--workers W] [--seed S]

``--scanners N``: per scanner texture of :data:`hipoa.synth.anatomy.TEST_SCANNERS` (the two shipped
scanners, line banding, periodic stripes at 3 mm, 7 mm oblique and any period 1.5-12 mm and
direction, noise grain), N normal hips, K implants in each export of :data:`hipoa.synth.EXPORTS`
(as stored, scaled 8-bit, 12 bits in 16, windowed above the bone, windowed clipping the bone) and
M doubled images (2.5-10 mm, weight 0.3-0.5), each written as a DICOM by
:func:`hipoa.synth.fitness_hip`, decoded by :func:`hipoa.dicom.read_image` and checked; prints per
scanner the implant sensitivity per export, the motion sensitivity and each detector's false flags
on the normal hips, with n per cell.

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


def _one(job: tuple) -> dict:
    import tempfile

    from hipoa.synth import anatomy
    from hipoa.synth import fitness_hip

    seed, index, scanner_name, unfit, export, limits_json = job
    scanner = next(s for s in anatomy.TEST_SCANNERS if s.name == scanner_name)
    h = fitness_hip(seed, index, scanner, unfit, export)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hip.dcm"
        path.write_bytes(h.dicom)
        img = read_image(path)
    limits = qc.load_limits(limits_json or None)
    t0 = time.perf_counter()
    fit = fitness.check_image(img.pixels, h.points, img.spacing_mm, limits, img.max_value)
    ms = 1000.0 * (time.perf_counter() - t0)
    return {"scanner": scanner_name, "unfit": unfit, "export": export, "reason": fit.reason,
            "implant_area_mm2": fit.implant_area_mm2, "motion_score": fit.motion_score, "ms": ms}


def scanner_table(n_normal: int, n_implant: int, n_motion: int, seed: int, workers: int, limits: str) -> pd.DataFrame:
    from multiprocessing import Pool

    from hipoa.synth import anatomy
    from hipoa.synth import EXPORTS

    jobs = []
    for s in anatomy.TEST_SCANNERS:
        cells = [("", "", n_normal), ("motion", "", n_motion)] + [("implant", e, n_implant) for e in EXPORTS]
        for unfit, export, n in cells:
            base = len(jobs)
            jobs += [(seed, base + i, s.name, unfit, export, limits) for i in range(n)]
    with Pool(workers) as pool:
        return pd.DataFrame(pool.map(_one, jobs, chunksize=8))


def scanner_report(d: pd.DataFrame) -> None:
    from hipoa.synth import EXPORTS

    def rate(g: pd.DataFrame, reason: str) -> str:
        hit = int((g["reason"] == reason).sum())
        return f"{hit}/{len(g)} ({100 * hit / max(len(g), 1):.1f} %)"

    rows = []
    for scanner, g in d.groupby("scanner", sort=False):
        normal = g[g["unfit"] == ""]
        row = {"scanner": scanner}
        for e in EXPORTS:
            row[f"implant {e or 'as stored'}"] = rate(g[(g["unfit"] == "implant") & (g["export"] == e)], qc.IMPLANT)
        row["motion"] = rate(g[g["unfit"] == "motion"], qc.MOTION)
        row["false implant"] = rate(normal, qc.IMPLANT)
        row["false motion"] = rate(normal, qc.MOTION)
        row["normal motion score max"] = f"{normal['motion_score'].max():.2f}"
        row["doubled motion score min"] = f"{g.loc[g['unfit'] == 'motion', 'motion_score'].min():.2f}"
        rows.append(row)
    t = pd.DataFrame(rows).set_index("scanner").T
    print(t.to_string())
    print(f"cost: {d['ms'].mean():.1f} ms per image (median {d['ms'].median():.1f})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", type=Path, action="append", default=[])
    ap.add_argument("--scanners", type=int, default=0, help="normal hips per test scanner texture")
    ap.add_argument("--implants", type=int, default=40, help="implants per export and scanner")
    ap.add_argument("--motion", type=int, default=100, help="doubled images per scanner")
    ap.add_argument("--seed", type=int, default=22)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limits", default="", help="qc limits as JSON (default: hipoa.qc.Limits())")
    args = ap.parse_args(argv)
    if args.scanners:
        d = scanner_table(args.scanners, args.implants, args.motion, args.seed, args.workers, args.limits)
        scanner_report(d)
        if not args.cohort:
            return 0
    limits = qc.load_limits(args.limits or None)
    frames = [score_cohort(c, limits) for c in args.cohort]
    for d in frames:
        report(d, str(d["cohort"].iloc[0]) if len(d) else "empty")
    if len(frames) > 1:
        report(pd.concat(frames, ignore_index=True), "all cohorts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
