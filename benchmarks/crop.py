"""Benchmark ``hipoa crop-patches`` on one core against a bare read of the same hip DICOMs.

Prints, from one run on the same images:

- bare read: images/s of ``zipfile.ZipFile`` + ``pydicom.dcmread`` + ``.pixel_array`` per hip;
- read_image: images/s of ``hipoa.dicom.read_image`` alone (the reader crop_shard uses), to show
  how much of crop_shard's time is reading;
- crop_shard: images/s of the whole shard job (read, mirror, 3 sites x sample/normalise, masks and
  manual context crops of annotated images, Zarr write);
- their ratio, and the store's bytes per image (with the extrapolation to 40,000 images).

Both run pinned to one CPU (``os.sched_setaffinity``, like ``taskset -c``) with BLAS/OpenMP
threads set to 1 before NumPy is imported; each is repeated and the best repeat is reported,
interleaved so that a noisy shared machine slows both alike.

Images come from ``hipoa.synth.make_cohort`` (UKB-like zips, 8-bit 600 x 680 hips) when it is
available, else from a built-in generator of the same format. Usage::

    python benchmarks/crop.py --n 300 [--repeat 3] [--cpu 0] [--profile]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import pstats  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pydicom  # noqa: E402

from hipoa.patches import crop_shard  # noqa: E402
from hipoa.sites import DEFAULT_SITES  # noqa: E402

log = logging.getLogger("benchmarks.crop")


# ----------------------------------------------------------------------------------------------
# cohort


def _own_cohort(root: Path, n: int, seed: int, annotated_fraction: float) -> pd.DataFrame:
    """UKB-like zips (hip + 3 other scans + manifest.cvs), 8-bit 600 x 680 hips, .pts and masks."""
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ImplicitVRLittleEndian, generate_uid

    from hipoa.points import write_pts

    rows_px, cols_px = 600, 680
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows_px, 0:cols_px]

    def dcm(pixels: np.ndarray, protocol: str, uid: str) -> bytes:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
        meta.MediaStorageSOPInstanceUID = uid
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.Modality, ds.ProtocolName = "CR", protocol
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.ExposedArea = [170, 150]
        ds.PixelData = pixels.astype(np.uint8).tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    records = []
    for k in range(n):
        eid = str(1_000_000 + k)
        side = "L" if k % 2 == 0 else "R"
        c = np.array([300.0, 280.0]) + rng.uniform(-20, 20, 2)
        t = np.linspace(0.3 * np.pi, 2.3 * np.pi, 45)
        femur = c + 110 * np.c_[np.cos(t), np.sin(t)]
        t = np.linspace(0.9 * np.pi, 1.9 * np.pi, 40)
        pelvis = c + 150 * np.c_[np.cos(t), np.sin(t)]
        pts = np.vstack([femur, pelvis])
        head = (xx - c[0]) ** 2 + (yy - c[1]) ** 2 <= 110**2
        img = 30 + 140 * head + rng.normal(0, 10, (rows_px, cols_px))
        mask = np.zeros((rows_px, cols_px), np.uint8)
        for site in DEFAULT_SITES:
            cx, cy = pts[site.centre]
            blob = ((xx - cx) / 10) ** 2 + ((yy - cy) / 7) ** 2 <= 1
            mask[blob] = site.label
            img[blob] += 50
        img = np.clip(img, 0, 255).astype(np.uint8)
        if side == "R":
            img, mask = img[:, ::-1], mask[:, ::-1]
            pts = pts.copy()
            pts[:, 0] = cols_px - 1 - pts[:, 0]
        zpath = root / f"{eid}_20158_2_0.zip"
        member = f"1.2.840.{eid}.2.dcm"
        others = {f"1.2.840.{eid}.{j}.dcm": dcm(rng.integers(0, 255, (300, 200), dtype=np.uint8), p, generate_uid())
                  for j, p in enumerate(("AP Spine", "Total Body", "Left Knee"), start=3)}
        with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(member, dcm(img, "Left Femur" if side == "L" else "Right Femur", generate_uid()))
            for name, data in others.items():
                zf.writestr(name, data)
            zf.writestr("manifest.cvs", "scans\n")
        p_auto = root / f"auto_{eid}_2_{side}.pts"
        write_pts(p_auto, pts)
        p_manual = p_mask = ""
        if rng.random() < annotated_fraction:
            p_manual = str(root / f"manual_{eid}_2_{side}.pts")
            write_pts(p_manual, pts + rng.normal(0, 1.5, pts.shape))
            p_mask = str(root / f"{eid}_2_{side}.png")
            Image.fromarray(mask).save(p_mask)
        records.append(dict(
            eid=eid, instance=2, array=0, side=side, image=str(zpath), member=member, points_auto=str(p_auto),
            points_manual=p_manual, mask=p_mask, rows=rows_px, cols=cols_px, spacing_row_mm=150 / rows_px,
            spacing_col_mm=170 / cols_px, annotated=bool(p_mask), shard=0, qc_reason="",
        ))
    return pd.DataFrame.from_records(records)


def _synth_cohort(root: Path, n: int, seed: int, annotated_fraction: float) -> pd.DataFrame | None:
    """``n`` hip images (n/2 participants, both hips) from hipoa.synth + hipoa.ingest, or None."""
    try:
        from hipoa.ingest import build_manifest
        from hipoa.synth import make_cohort
    except ImportError:
        return None
    if not (root / "truth.parquet").exists():  # --workdir keeps a cohort between runs
        make_cohort(root, participants=max(1, n // 2), seed=seed, annotated_fraction=annotated_fraction)
    layout = dict(
        images=str(root / "ukb/20158/{eid}_20158_{instance}_{array}.zip"),
        points_auto=str(root / "points/auto/{eid}_{instance}_{side}.pts"),
        points_manual=str(root / "points/manual/{eid}_{instance}_{side}.pts"),
        masks=str(root / "masks/{eid}_{instance}_{side}.png"),
    )
    frames = [build_manifest(side=side, n_shards=1, **layout) for side in ("L", "R")]
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------------------------
# timing


def timed(fn, *args, **kwargs) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn(*args, **kwargs)
    return time.perf_counter() - w0, time.process_time() - c0


def bare_read(manifest: pd.DataFrame) -> None:
    """Open each zip, dcmread the hip member and decode its pixels."""
    for image, member in zip(manifest["image"], manifest["member"]):
        with zipfile.ZipFile(image) as zf, zf.open(member) as fp:
            ds = pydicom.dcmread(fp)
            ds.pixel_array  # noqa: B018 - the decode is what is timed


def hipoa_read(manifest: pd.DataFrame) -> None:
    """``hipoa.dicom.read_image`` of each hip (what crop_shard reads with)."""
    from hipoa.dicom import read_image

    for image, member in zip(manifest["image"], manifest["member"]):
        read_image(image, member or None)


def store_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="images (one shard)")
    parser.add_argument("--repeat", type=int, default=3, help="repeats of each timing (best is reported)")
    parser.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: the last allowed one)")
    parser.add_argument("--annotated-fraction", type=float, default=0.1, help="fraction of annotated images (synth: of participants, left hips)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="keep the cohort and store here (default: a temp dir)")
    parser.add_argument("--own-cohort", action="store_true", help="use the built-in generator even if hipoa.synth exists")
    parser.add_argument("--profile", action="store_true", help="print the top of a cProfile of one crop_shard")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    allowed = sorted(os.sched_getaffinity(0))
    cpu = allowed[-1] if args.cpu is None else args.cpu
    os.sched_setaffinity(0, {cpu})

    tmp = tempfile.TemporaryDirectory(prefix="hipoa-bench-") if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    cohort_dir = work / "cohort"
    cohort_dir.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    manifest = None if args.own_cohort else _synth_cohort(cohort_dir, args.n, args.seed, args.annotated_fraction)
    source = "hipoa.synth"
    if manifest is None:
        manifest = _own_cohort(cohort_dir, args.n, args.seed, args.annotated_fraction)
        source = "built-in generator"
    manifest["shard"] = 0
    # time what is readable: rows flagged by ingest are skipped by crop and have no DICOM to read
    manifest = manifest[manifest["qc_reason"].fillna("") == ""].reset_index(drop=True)
    n = len(manifest)
    print(f"cohort: {n} hip images from {source} ({manifest['annotated'].sum()} annotated), made in {time.perf_counter() - t0:.0f} s")
    print(f"pinned to CPU {cpu} of {allowed}; BLAS/OpenMP threads 1; machine load {os.getloadavg()[0]:.2f}")

    out = work / "shard-0000.zarr"
    sites = list(DEFAULT_SITES)
    times: dict[str, list[tuple[float, float]]] = {"bare read": [], "read_image": [], "crop_shard": []}
    bare_read(manifest.head(20))  # warm the page cache and imports alike for both
    crop_shard(manifest=manifest.head(20), shard=0, out=out, sites=sites)
    counts: dict = {}
    for _ in range(args.repeat):
        times["bare read"].append(timed(bare_read, manifest))
        times["read_image"].append(timed(hipoa_read, manifest))
        shutil.rmtree(out, ignore_errors=True)  # as Snakemake does before a job: not timed
        w0, c0 = time.perf_counter(), time.process_time()
        counts = crop_shard(manifest=manifest, shard=0, out=out, sites=sites)
        times["crop_shard"].append((time.perf_counter() - w0, time.process_time() - c0))
    best = {k: (min(w for w, _ in v), min(c for _, c in v)) for k, v in times.items()}
    print(f"best of {args.repeat} repeats; wall = elapsed time, cpu = this process's CPU time (less sensitive to a busy machine)")
    notes = {"bare read": "zip + dcmread + pixel_array", "read_image": "hipoa.dicom.read_image alone", "crop_shard": "whole shard job"}
    for k, (w, c) in best.items():
        print(f"{k:11s}: wall {n / w:7.1f} images/s, cpu {n / c:7.1f} images/s  ({notes[k]}; walls {', '.join(f'{x:.2f}' for x, _ in times[k])} s)")
    (bw, bc), (cw, cc) = best["bare read"], best["crop_shard"]
    print(f"ratio crop/bare: wall {bw / cw:.2f}, cpu {bc / cc:.2f}  (goals: ratio >= 0.5, crop >= 200 images/s)")
    nbytes = store_bytes(out)
    print(f"store: {nbytes:,} bytes = {nbytes / n:,.0f} bytes/image -> {nbytes / n * 40_000 / 1e9:.2f} GB per 40k-image side "
          f"({counts['manual']} manual context crops, {counts['flagged']} flagged)")

    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        crop_shard(manifest=manifest, shard=0, out=out, sites=sites)
        prof.disable()
        stats = pstats.Stats(prof)
        stats.sort_stats("cumulative").print_stats(25)
        stats.sort_stats("tottime").print_stats(20)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
