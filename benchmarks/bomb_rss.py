"""Benchmark: peak RSS of ``hipoa ingest`` and ``hipoa crop-patches`` on decompression bombs.

    python benchmarks/bomb_rss.py [--bomb-gb 1.1] [--dir DIR] [--lifted]

Makes a 4-participant synthetic cohort and turns two left hips into bombs:

- ``inflate``: the hip member's pixel data padded with ``--bomb-gb`` GB of zeros (the zip member
  is a few MB; it inflates past ``qc.max_member_mb``);
- ``matrix``: a header declaring 40000 x 40000 pixels (past ``qc.max_image_pixels``).

Then runs ``hipoa ingest`` and ``hipoa crop-patches`` on it as separate processes and prints
each one's peak RSS (``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a wrapper around that one
command) and the reasons the bombs got. ``--lifted`` also runs ingest with the member cap lifted
to 4 GiB, to show what the cap saves (that ingest reads the whole member).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pandas as pd
import pydicom

from hipoa.dicom import find_hip_member
from hipoa.synth import make_cohort

IMAGES = "ukb/20158/{eid}_20158_{instance}_{array}.zip"
AUTO = "points/auto/{eid}_{instance}_{side}.pts"
CHUNK = 16 << 20


def _rewrite(zip_path: Path, member: str, write_member) -> None:
    with zipfile.ZipFile(zip_path) as zf:
        members = [(i.filename, zf.read(i)) for i in zf.infolist()]
    tmp = zip_path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        for name, data in members:
            if name == member:
                with out.open(name, "w", force_zip64=True) as fp:
                    write_member(fp, data)
            else:
                out.writestr(name, data)
    tmp.replace(zip_path)


def inflate_bomb(zip_path: Path, n_bytes: int) -> None:
    """Pad the left hip's pixel data with ``n_bytes`` zeros, streamed (never held in memory)."""
    member = find_hip_member(zip_path, "L")

    def write(fp, data: bytes) -> None:
        at = data.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data, Implicit VR Little Endian
        length = int.from_bytes(data[at + 4 : at + 8], "little")
        fp.write(data[:at + 4] + (length + n_bytes).to_bytes(4, "little") + data[at + 8 :])
        left = n_bytes
        zeros = bytes(CHUNK)
        while left:
            k = min(left, CHUNK)
            fp.write(zeros[:k])
            left -= k

    _rewrite(zip_path, member, write)


def matrix_bomb(zip_path: Path) -> None:
    member = find_hip_member(zip_path, "L")

    def write(fp, data: bytes) -> None:
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.Rows, ds.Columns = 40000, 40000
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        fp.write(buf.getvalue())

    _rewrite(zip_path, member, write)


def peak_rss_mb(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``cmd`` under a wrapper process; the wrapper's RUSAGE_CHILDREN peak is this command's."""
    wrapper = (
        "import resource, subprocess, sys, json;"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
        "sys.stderr.write(p.stderr); sys.stdout.write(p.stdout);"
        "print(json.dumps({'rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, 'rc': p.returncode}))"
    )
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if info["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return info["rss_kb"] / 1024, proc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bomb-gb", type=float, default=1.1, help="zeros added to the hip member, GB (1.1)")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--lifted", action="store_true", help="also run ingest with the member cap lifted")
    args = ap.parse_args(argv)

    root = args.dir or Path(tempfile.mkdtemp(prefix="hipoa-bomb-"))
    truth = make_cohort(out=root / "cohort", participants=4, seed=9, annotated_fraction=0.0, workers=1)
    eids = truth["eid"].astype(str).unique().tolist()
    zdir = root / "cohort" / "ukb" / "20158"
    inflate_bomb(zdir / f"{eids[0]}_20158_2_0.zip", int(args.bomb_gb * 1e9) // 2 * 2)
    matrix_bomb(zdir / f"{eids[1]}_20158_2_0.zip")
    print(f"bomb zip {eids[0]}: {(zdir / f'{eids[0]}_20158_2_0.zip').stat().st_size / 1e6:.1f} MB on disk, "
          f"inflates by {args.bomb_gb:.2f} GB")

    ingest = ["hipoa", "ingest", "--images", str(root / "cohort" / IMAGES), "--points-auto",
              str(root / "cohort" / AUTO), "--side", "L", "--shards", "1", "--workers", "1"]
    manifest = root / "L.parquet"
    rss_ingest, _ = peak_rss_mb(ingest + ["--out", str(manifest)])
    man = pd.read_parquet(manifest).set_index("eid")
    rss_crop, _ = peak_rss_mb(["hipoa", "crop-patches", "--manifest", str(manifest), "--shard", "0",
                               "--out", str(root / "shard-0000.zarr")])
    print(f"reasons: inflate bomb {man.loc[eids[0], 'qc_reason']!r}, matrix bomb {man.loc[eids[1], 'qc_reason']!r}, "
          f"others {sorted(set(man.drop(index=eids[:2])['qc_reason']))}")
    print(f"ingest peak RSS: {rss_ingest:.0f} MB")
    print(f"crop-patches peak RSS: {rss_crop:.0f} MB")
    if args.lifted:
        rss, _ = peak_rss_mb(ingest + ["--out", str(root / "L-lifted.parquet"), "--limits", '{"max_member_mb": 4096}'])
        lifted = pd.read_parquet(root / "L-lifted.parquet").set_index("eid")
        print(f"ingest with the member cap lifted: {rss:.0f} MB, inflate bomb {lifted.loc[eids[0], 'qc_reason']!r}")
    print(f"bomb_rss: ingest {rss_ingest:.0f} MB, crop {rss_crop:.0f} MB peak RSS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
