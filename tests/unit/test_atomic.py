"""Outputs are complete or absent: hipoa.atomic, the Zarr completion marker, and ``kill -9``.

The kill tests run ``hipoa predict-masks`` and ``hipoa phenotypes`` as real subprocesses on the
tiny known-output model and hand-made stores of test_predict.py, wait until the job is part-way
through writing (its temporary output exists and holds data), send SIGKILL, check that nothing is
at any final output path, then rerun and compare with an uninterrupted run byte for byte.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from hipoa import phenotypes, predict
from hipoa.atomic import atomic_path, tmp_path_for
from hipoa.store import MARKER, StoreError, check_store, open_patches, read_rows, seal_store, store_attrs

from test_phenotypes import write_manifest  # noqa: E402  (tests/unit is on sys.path)
from hipoa_fixtures import SITES, example_shard, make_model, make_store, scale_affine, square_patch  # noqa: E402

EPOCH = "1700000000"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {s: make_model(d / s / "unet.keras") for s in SITES}


# ---- hipoa.atomic ---------------------------------------------------------------------------------


def test_atomic_file_appears_only_when_complete(tmp_path):
    out = tmp_path / "sub" / "a.txt"
    tmp = tmp_path_for(out)
    tmp.parent.mkdir()
    tmp.write_text("stale, from a killed run")
    with atomic_path(out) as t:
        assert t == tmp and not t.exists()  # the stale temporary was removed
        t.write_text("new")
        assert not out.exists()
    assert out.read_text() == "new" and not tmp.exists()

    with pytest.raises(RuntimeError), atomic_path(out) as t:
        t.write_text("half")
        raise RuntimeError("disk full")
    assert out.read_text() == "new" and not tmp.exists()  # the old output is untouched

    with pytest.raises(FileNotFoundError, match="nothing was written"), atomic_path(tmp_path / "b.txt"):
        pass


def test_atomic_directory_replaces_the_old_one(tmp_path):
    out = tmp_path / "d.zarr"
    out.mkdir()
    (out / "old").write_text("x")
    with atomic_path(out) as t:
        t.mkdir()
        (t / "new").write_text("y")
        assert (out / "old").exists()
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert not tmp_path_for(out).exists()


# ---- the completion marker ------------------------------------------------------------------------


def _chunk_files(store: Path) -> list[Path]:
    return sorted(p for p in store.rglob("*") if p.is_file() and "/c/" in p.as_posix())


def test_sealed_store_lists_every_file(tmp_path):
    store, _, _ = example_shard(tmp_path)
    (store / ".snakemake_timestamp").write_text("")  # Snakemake adds this to directory outputs
    listed = json.loads((store / MARKER).read_text())["files"]
    files = {p.relative_to(store).as_posix(): p.stat().st_size for p in store.rglob("*") if p.is_file()}
    assert {k: v[0] for k, v in listed.items()} == {k: v for k, v in files.items()
                                                   if k not in (MARKER, ".snakemake_timestamp")}
    assert all(len(v[1]) == 8 for v in listed.values())  # and a CRC-32 each
    assert check_store(store) == store
    assert len(open_patches([store], SITES[0])) == 6


def test_store_with_a_chunk_deleted_is_refused(tmp_path):
    store, _, _ = example_shard(tmp_path)
    chunk = _chunk_files(store / "auto" / SITES[0] / "image")[0]
    chunk.unlink()
    rel = chunk.relative_to(store).as_posix()
    for read in (lambda: open_patches([store], SITES[0]), lambda: read_rows(store), lambda: store_attrs(store)):
        with pytest.raises(StoreError, match=rf"{store}.*chunk {rel} missing"):
            read()


def test_store_with_a_truncated_chunk_is_refused(tmp_path):
    store, _, _ = example_shard(tmp_path)
    chunk = _chunk_files(store / "auto" / SITES[1] / "image")[0]
    chunk.write_bytes(chunk.read_bytes()[:-1])
    with pytest.raises(StoreError, match=r"truncated"):
        open_patches([store], SITES[1])


def _rewrite_marker(store: Path, edit) -> None:
    content = json.loads((store / MARKER).read_text())
    edit(content["files"])
    (store / MARKER).write_text(json.dumps(content))


def _one_line_refusal(store: Path, rel: str, why: str) -> None:
    """Every reader refuses the store in one line naming the store and the chunk."""
    for read in (lambda: open_patches([store], SITES[0]), lambda: read_rows(store), lambda: store_attrs(store)):
        with pytest.raises(StoreError) as info:
            read()
        msg = str(info.value)
        assert "\n" not in msg and str(store) in msg and f"chunk {rel}" in msg and why in msg, msg


def test_a_truncated_chunk_whose_marker_agrees_is_refused_not_a_segfault(tmp_path):
    store, _, _ = example_shard(tmp_path)
    chunk = _chunk_files(store / "auto" / SITES[0] / "image")[0]
    rel = chunk.relative_to(store).as_posix()
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    _rewrite_marker(store, lambda files: files[rel].__setitem__(0, chunk.stat().st_size))
    _one_line_refusal(store, rel, "changed since it was written")


@pytest.mark.parametrize("flip", ["64_bytes", "one_bit"])
def test_flipped_bytes_in_a_chunk_are_refused(tmp_path, flip):
    store, _, _ = example_shard(tmp_path)
    chunk = _chunk_files(store / "auto" / SITES[0] / "image")[0]
    data = bytearray(chunk.read_bytes())
    if flip == "64_bytes":
        data[40:104] = bytes(b ^ 0xFF for b in data[40:104])
    else:
        data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    _one_line_refusal(store, chunk.relative_to(store).as_posix(), "CRC-32")


def test_a_chunk_deleted_from_disk_and_marker_is_refused_not_read_as_zeros(tmp_path):
    store, _, _ = example_shard(tmp_path)
    chunk = _chunk_files(store / "auto" / SITES[0] / "image")[0]
    rel = chunk.relative_to(store).as_posix()
    chunk.unlink()
    _rewrite_marker(store, lambda files: files.pop(rel))
    _one_line_refusal(store, rel, "it would read as zeros")


def test_a_store_sealed_without_checksums_is_refused(tmp_path):
    store, _, _ = example_shard(tmp_path)
    content = json.loads((store / MARKER).read_text())
    (store / MARKER).write_text(json.dumps({"hipoa_store_marker": 1,
                                            "files": {k: v[0] for k, v in content["files"].items()}}))
    with pytest.raises(StoreError, match="older hipoa .* no checksums"):
        read_rows(store)


def test_the_cli_names_the_damaged_chunk_in_one_line(tmp_path):
    import subprocess
    import sys

    store, _, _ = example_shard(tmp_path)
    chunk = _chunk_files(store / "auto" / SITES[0] / "image")[0]
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0x01
    chunk.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "hipoa.cli", "show-patches", "--stores", str(store), "--out",
                           str(tmp_path / "m.png")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and chunk.relative_to(store).as_posix() in errors[0] and "Traceback" not in proc.stderr


def test_store_without_marker_is_refused(tmp_path):
    store, _, _ = example_shard(tmp_path)
    (store / MARKER).unlink()
    with pytest.raises(StoreError, match=rf"{store}: incomplete patch store \(no completion marker.*interrupted job\? rerun it"):
        open_patches([store], SITES[0])
    with pytest.raises(ValueError, match="no completion marker"):  # StoreError is a ValueError
        store_attrs(store)
    seal_store(store)
    assert len(read_rows(store)) == 6


def test_phenotypes_refuse_a_mask_store_with_a_chunk_deleted(tmp_path, models):
    store, rows, _ = example_shard(tmp_path)
    pred, masks = tmp_path / "p.parquet", tmp_path / "m.zarr"
    predict.predict_shard(store=store, models=models, out=pred, masks_out=masks, precision="float32")
    check_store(masks, "predicted-mask store")  # predict seals its mask store
    manifest = write_manifest(tmp_path / "L.parquet", rows.assign(side="L", shard=0))
    chunk = _chunk_files(masks / SITES[0] / "mask")[0]
    chunk.unlink()
    out = tmp_path / "ph" / "osteophytes_L.parquet"
    with pytest.raises(StoreError, match=rf"{masks}: damaged predicted-mask store: chunk .* missing"):
        phenotypes.gather(manifest=manifest, predictions=[pred], models=models, side="L", out=out,
                          masks_dir=tmp_path / "masks", mask_stores=[masks])
    assert not out.exists() and not (tmp_path / "masks").exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())  # nothing written, not even a temporary
    with pytest.raises(StoreError, match="missing"):
        phenotypes.write_masks(mask_stores=[masks], out_dir=tmp_path / "masks2")


# ---- kill -9 ----------------------------------------------------------------------------------------

N_BIG = 240


def _big_shard(tmp: Path) -> Path:
    """A shard of N_BIG measurable images, a square on every patch (so every PNG has a label)."""
    rows = pd.DataFrame(
        {
            "eid": [str(5000 + i) for i in range(N_BIG)],
            "instance": [2] * N_BIG,
            "qc_reason": [""] * N_BIG,
            "spacing_row_mm": [0.25] * N_BIG,
            "spacing_col_mm": [0.25] * N_BIG,
            "rows": [600] * N_BIG,
            "cols": [680] * N_BIG,
        }
    )
    patches = {s: np.stack([square_patch(10 + i % 90, 20 + (i * 7) % 90, 12) for i in range(N_BIG)]) for s in SITES}
    affines = {s: np.stack([scale_affine(2.0, 100.0 + k * 50, 50.0)] * N_BIG) for k, s in enumerate(SITES)}
    store = make_store(tmp / "shard-0000.zarr", rows, patches, affines)
    write_manifest(tmp / "L.parquet", rows.assign(side="L", shard=0, annotated=False))
    return store


def _env() -> dict[str, str]:
    env = dict(os.environ, SOURCE_DATE_EPOCH=EPOCH, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _hipoa(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "hipoa.cli", *argv]


def _run(argv: list[str], log: Path) -> None:
    with open(log, "w") as err:
        rc = subprocess.run(_hipoa(argv), env=_env(), stdout=err, stderr=subprocess.STDOUT, timeout=300).returncode
    assert rc == 0, log.read_text()[-3000:]


def _kill_when(argv: list[str], ready, log: Path, timeout: float = 240.0) -> None:
    """Start ``hipoa argv``, SIGKILL it as soon as ``ready()`` is true; it must not have finished."""
    with open(log, "w") as err:
        proc = subprocess.Popen(_hipoa(argv), env=_env(), stdout=err, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        try:
            while proc.poll() is None and time.monotonic() - t0 < timeout:
                if ready():
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.002)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"finished before it could be killed:\n{log.read_text()[-3000:]}"


def _tree(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _predict_argv(store: Path, models: dict[str, Path], out: Path, masks: Path) -> list[str]:
    argv = ["predict-masks", "--stores", str(store), "--out", str(out), "--masks-out", str(masks),
            "--batch-size", "1", "--precision", "float32"]
    for site, m in models.items():
        argv += ["--model", f"{site}={m}"]
    return argv


def test_kill_9_predict_masks_leaves_no_output_and_rerun_matches(tmp_path, models):
    store = _big_shard(tmp_path)
    ref_out, ref_masks = tmp_path / "ref" / "shard-0000.parquet", tmp_path / "ref" / "shard-0000.zarr"
    _run(_predict_argv(store, models, ref_out, ref_masks), tmp_path / "ref.log")

    out, masks = tmp_path / "run" / "shard-0000.parquet", tmp_path / "run" / "shard-0000.zarr"
    argv = _predict_argv(store, models, out, masks)
    tmp_masks = tmp_path_for(masks)
    # killed part-way through the first site: its temporary store holds some mask chunks
    _kill_when(argv, lambda: (tmp_masks / SITES[0] / "mask" / "c").exists(), tmp_path / "kill.log")
    assert not out.exists() and not masks.exists()
    assert tmp_masks.exists() and not (tmp_masks / MARKER).exists()  # a partial store, never sealed
    with pytest.raises(StoreError, match="no completion marker"):
        check_store(tmp_masks)

    _run(argv, tmp_path / "rerun.log")
    assert not tmp_masks.exists() and not tmp_path_for(out).exists()
    assert out.read_bytes() == ref_out.read_bytes()
    assert _tree(masks) == _tree(ref_masks)
    check_store(masks, "predicted-mask store")


def _phenotypes_argv(tmp: Path, preds: Path, masks: Path, models: dict[str, Path], out: Path, masks_dir: Path):
    argv = ["phenotypes", "--manifest", str(tmp / "L.parquet"), "--predictions", str(preds), "--side", "L",
            "--out", str(out), "--config-hash", "h", "--masks-dir", str(masks_dir), "--mask-stores", str(masks)]
    for site, m in models.items():
        argv += ["--model", f"{site}={m}"]
    return argv


def test_kill_9_phenotypes_leaves_no_output_and_rerun_matches(tmp_path, models):
    store = _big_shard(tmp_path)
    preds, masks = tmp_path / "shard-0000.parquet", tmp_path / "shard-0000.masks.zarr"
    predict.predict_shard(store=store, models=models, out=preds, masks_out=masks, batch_size=64, precision="float32")

    ref = tmp_path / "ref"
    _run(_phenotypes_argv(tmp_path, preds, masks, models, ref / "osteophytes_L.parquet", ref / "masks"),
         tmp_path / "ref.log")
    assert len(list((ref / "masks").glob("*.png"))) == N_BIG

    run = tmp_path / "run"
    out, masks_dir = run / "osteophytes_L.parquet", run / "masks"
    from hipoa.release import release_path

    finals = [out, phenotypes.out_tsv_path(out, "dict"), masks_dir,
              *(release_path(out.with_suffix(""), kind) for kind in ("bt", "qt", "covar", "remove"))]
    argv = _phenotypes_argv(tmp_path, preds, masks, models, out, masks_dir)
    tmp_masks = tmp_path_for(masks_dir)

    def some_pngs() -> bool:
        return tmp_masks.is_dir() and next(tmp_masks.glob("*.png"), None) is not None

    _kill_when(argv, some_pngs, tmp_path / "kill.log")
    assert [p for p in finals if p.exists()] == []
    assert some_pngs()  # it was killed while writing the PNGs, after the tables

    _run(argv, tmp_path / "rerun.log")
    assert not list(run.glob("*.tmp"))
    for p in finals:
        rel = p.relative_to(run)
        assert _tree(p) == _tree(ref / rel), rel
    meta = pq.read_schema(out).metadata
    assert meta[b"created"] == b"2023-11-14T22:13:20+00:00"  # SOURCE_DATE_EPOCH
