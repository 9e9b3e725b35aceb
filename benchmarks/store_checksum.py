"""Benchmark: the patch store's per-chunk checksums against the crop that writes the store.

    python benchmarks/store_checksum.py [--participants 100] [--repeat 3]

Makes a synthetic cohort (``hipoa.synth.make_cohort``, 30 % annotated as the demo), ingests the
left hips into one shard and crops it (``crop_shard``: read, sample, normalise, write, seal), then
times on that store:

- ``crc32``: hashing every file once, as :func:`hipoa.store.seal_store` does (and
  :func:`hipoa.store.check_store` on a process's first read);
- ``blake2b``: the same bytes through ``hashlib.blake2b(digest_size=16)``, for comparison;
- ``check_store``: the whole verification a reader runs cold (sizes, CRC-32s, the chunk set
  implied by the arrays' metadata), and warm (a second call in the same process: sizes only).

Each is printed per image and as a ratio to the crop's time per image (best of ``--repeat``),
with the CPU model. Run it alone: the machine's other load moves every figure.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

from hipoa import store as store_mod
from hipoa.ingest import build_manifest
from hipoa.patches import crop_shard
from hipoa.sites import DEFAULT_SITES
from hipoa.synth import make_cohort


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _hash_all(path: Path, algo: str) -> None:
    for rel in store_mod.store_files(path):
        data = (path / rel).read_bytes()
        if algo == "crc32":
            import zlib

            zlib.crc32(data)
        else:
            hashlib.blake2b(data, digest_size=16).digest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--participants", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="hipoa-checksum-"))
    make_cohort(out=root / "cohort", participants=args.participants, seed=4, annotated_fraction=0.3, workers=1)
    c = root / "cohort"
    manifest = build_manifest(images=str(c / "ukb/20158/{eid}_20158_{instance}_{array}.zip"),
                              points_auto=str(c / "points/auto/{eid}_{instance}_{side}.pts"),
                              points_manual=str(c / "points/manual/{eid}_{instance}_{side}.pts"),
                              masks=str(c / "masks/{eid}_{instance}_{side}.png"), side="L", n_shards=1)
    n = len(manifest)
    out = root / "shard-0000.zarr"
    crop = _best(lambda: crop_shard(manifest=manifest, shard=0, out=out, sites=list(DEFAULT_SITES)), args.repeat)
    nbytes = sum((out / rel).stat().st_size for rel in store_mod.store_files(out))
    crc = _best(lambda: _hash_all(out, "crc32"), args.repeat)
    blake = _best(lambda: _hash_all(out, "blake2b"), args.repeat)

    def cold() -> None:
        store_mod.VERIFIED_STORES.clear()
        store_mod.check_store(out)

    check_cold = _best(cold, args.repeat)
    store_mod.check_store(out)
    check_warm = _best(lambda: store_mod.check_store(out), args.repeat)
    per = 1000.0 / n
    print(f"store_checksum: {n} images, {nbytes / n / 1e3:.0f} kB per image, {len(store_mod.store_files(out))} files; "
          f"{_cpu()}")
    print(f"  crop_shard (read, crop, write, seal): {crop * per:7.2f} ms per image")
    for name, t in (("crc32 of every file", crc), ("blake2b of every file", blake),
                    ("check_store, cold", check_cold), ("check_store, warm", check_warm)):
        print(f"  {name:<36s} {t * per:7.3f} ms per image = {t / crop:.4f} x the crop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
