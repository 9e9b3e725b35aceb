"""The decoded-pixel sanity check (hipoa.pixelcheck) on synthetic cohorts: false flags and catches.

    python benchmarks/pixel_sanity.py --cohort DIR [--cohort DIR2 ...]

Each cohort is one written by ``hipoa synth`` (``--second-scanner F`` images a fraction on the
second scanner; ``--unfit K`` adds implants, cropped views and motion, which this check must not
flag: they are the fitness detector's). Every readable hip with usable automatic points goes
through :func:`hipoa.pixelcheck.check_pixels` as the crop runs it, then again in four forms it
must catch: inverted by a negative Rescale Slope (``top - value``), inverted as an 8-bit window
would leave it (``255 - value``, MONOCHROME1 mislabelled), replaced by uniform noise over the
range, and by a moiré of int16 range (a broken lossless decode). Prints, per scanner, the
false-flag rate on the hips as written, each form's catch rate, the distributions of contrast
and roughness, and milliseconds per image.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from hipoa import pixelcheck
from hipoa.dicom import find_hip_member, read_image
from hipoa.points import read_pts
from hipoa.synth import FIELD, image_stem, zip_name

FORMS = ("as written", "negative slope", "window inverted", "uniform noise", "int16 moire")


def _form(rng: np.random.Generator, pixels: np.ndarray, top: float, form: str) -> np.ndarray:
    if form == "as written":
        return pixels
    if form == "negative slope":
        return (top - pixels).astype(np.float32)
    if form == "window inverted":
        return (255.0 - pixels).astype(np.float32)
    if form == "uniform noise":
        return rng.uniform(0.0, top, pixels.shape).astype(np.float32)
    yy, xx = np.mgrid[: pixels.shape[0], : pixels.shape[1]].astype(np.float32)
    return (32767.0 * np.sin(0.9 * xx * xx + 1.3 * yy * yy)).astype(np.float32)


def score_cohort(cohort: Path) -> pd.DataFrame:
    truth = pd.read_parquet(cohort / "truth.parquet")
    rng = np.random.default_rng(0)
    rows = []
    for r in truth.itertuples(index=False):
        if r.fault:
            continue
        zip_path = cohort / "ukb" / str(FIELD) / zip_name(r.eid)
        hip = read_image(zip_path, find_hip_member(zip_path, r.side))
        pts = read_pts(cohort / "points" / "auto" / f"{image_stem(r.eid, r.side)}.pts", n_points=85)
        for form in FORMS:
            pixels = _form(rng, hip.pixels, hip.max_value, form)
            t0 = time.perf_counter()
            check = pixelcheck.check_pixels(pixels, pts, hip.spacing_mm)
            ms = 1000.0 * (time.perf_counter() - t0)
            rows.append({"scanner": r.scanner, "unfit": bool(r.unfit), "form": form, "flagged": bool(check.reason),
                         "contrast": check.contrast, "roughness": check.roughness, "ms": ms})
    return pd.DataFrame(rows)


def report(d: pd.DataFrame) -> None:
    for scanner, g in d.groupby("scanner"):
        print(f"\n== scanner {scanner}: {int((g['form'] == 'as written').sum())} hips")
        for form in FORMS:
            f = g[g["form"] == form]
            n, k = len(f), int(f["flagged"].sum())
            label = "false flags" if form == "as written" else "caught"
            print(f"{form:>16}: {label} {k}/{n} ({100 * k / max(n, 1):.2f} %); contrast min {f['contrast'].min():+.3f} "
                  f"median {f['contrast'].median():+.3f} max {f['contrast'].max():+.3f}; roughness median "
                  f"{f['roughness'].median():.3f} max {f['roughness'].max():.3f}")
    print(f"\ncost: {d['ms'].mean():.1f} ms per image (median {d['ms'].median():.1f}); thresholds: contrast >= "
          f"{pixelcheck.MIN_CONTRAST}, roughness <= {pixelcheck.MAX_ROUGHNESS}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", type=Path, action="append", required=True)
    args = ap.parse_args(argv)
    report(pd.concat([score_cohort(c) for c in args.cohort], ignore_index=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
