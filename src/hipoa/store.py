"""Shard patch stores (docs/DESIGN.md "Patch store"): writing one, reading many as one lazy
dataset, and a QC montage.

A store per (side, shard) is cropped by :func:`hipoa.patches.crop_shard` and written by
:func:`write_patch_store` (atomically: a temporary directory, sealed, then renamed). Training,
evaluation and prediction read them through :func:`open_patches`, which concatenates the shards
along the first axis as Dask arrays (one Dask chunk per Zarr chunk), so nothing is loaded until
it is computed.

Example::

    ps = open_patches(sorted(Path("results/patches/L").glob("shard-*.zarr")), "superior_femoral_head")
    ok = ps.rows["qc_reason"].eq("").to_numpy()
    batch = ps.image[:64].compute()          # (64, 128, 128) float16

Every store hipoa writes is sealed last by :func:`seal_store` (a ``hipoa_complete.json`` marker
listing each file with its size and CRC-32), and every reader first runs :func:`check_store`, so a
store left by a killed job, or with a chunk file lost, cut short or changed (a flipped bit), is
refused in one line naming the store and the chunk instead of read as zeros, decoded into
garbage or crashing the decompressor.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hipoa.geometry import context_offset

log = logging.getLogger(__name__)

SOURCES = ("auto", "manual")

_STRING_COLUMNS = ("eid", "side", "qc_reason")


MARKER = "hipoa_complete.json"
"""Completion marker written last into every Zarr store hipoa writes (:func:`seal_store`)."""

_NOT_LISTED = (MARKER, MARKER + ".tmp", ".snakemake_timestamp")
"""Files of a store the marker does not list: itself (and its temporary), and the file Snakemake adds to
directory outputs."""


class StoreError(ValueError):
    """A Zarr store that is incomplete or damaged (no completion marker, a chunk missing or truncated)."""


MARKER_VERSION = 2
"""Version 2 records each file's size and CRC-32 (version 1, sizes only, is refused: rerun the job)."""

VERIFIED_STORES: dict[str, tuple] = {}
"""Stores this process has verified: resolved path -> (inode, mtime_ns, size) of the marker and of
every listed file then. A store whose files all still match is not hashed again."""


def store_files(path: Path) -> list[str]:
    """Every file under ``path`` (relative POSIX paths, sorted), marker and timestamp excluded."""
    return [rel for f in sorted(path.rglob("*")) if (rel := f.relative_to(path).as_posix()) not in _NOT_LISTED
            and f.is_file()]


def _crc32(f: Path) -> str:
    """CRC-32 of a file's bytes as 8 hex digits (zlib; ~3 GB/s, ``benchmarks/store_checksum.py``)."""
    import zlib

    crc = 0
    with open(f, "rb") as fp:
        while block := fp.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def seal_store(path: str | Path) -> Path:
    """Mark a fully written Zarr store complete: write, last, a marker listing its files, each
    with its size and CRC-32.

    Call it on the (temporary) store after its last chunk is written and before it is renamed to
    its final path; :func:`check_store` (run by every reader) then refuses a store without the
    marker (written by an interrupted job), with a listed file missing, of another size or
    other content, or without a chunk its arrays' metadata implies.

    Args:
        path: The store directory.

    Returns:
        The marker file, ``{path}/hipoa_complete.json``: ``{"hipoa_store_marker": 2, "hash":
        "crc32", "files": {relative path: [size in bytes, crc32 hex]}}`` for every file but itself
        and ``.snakemake_timestamp``.

    Raises:
        FileNotFoundError: naming the store when it is not a directory.
    """
    from hipoa.atomic import atomic_path

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such Zarr store to seal")
    files = {rel: [(path / rel).stat().st_size, _crc32(path / rel)] for rel in store_files(path)}
    marker = path / MARKER
    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps({"hipoa_store_marker": MARKER_VERSION, "hash": "crc32", "files": files},
                                  indent=0, sort_keys=True) + "\n")
    log.debug("%s: sealed (%d files, %d bytes)", path, len(files), sum(v[0] for v in files.values()))
    return marker


def expected_chunks(path: str | Path) -> list[str]:
    """Every chunk file the store's array metadata implies (``zarr.json`` of each array: shape,
    regular chunk grid, chunk key encoding), as relative POSIX paths. hipoa writes every chunk,
    empty ones too (``write_empty_chunks``), so a chunk that is not there was lost, and would
    otherwise read as the fill value."""
    path = Path(path)
    out: list[str] = []
    for meta_file in sorted(path.rglob("zarr.json")):
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            continue  # the checksum check names it
        if meta.get("node_type") != "array":
            continue
        shape = [int(v) for v in meta["shape"]]
        chunk = [int(v) for v in meta["chunk_grid"]["configuration"]["chunk_shape"]]
        encoding = meta.get("chunk_key_encoding", {})
        default = encoding.get("name", "default") == "default"
        sep = encoding.get("configuration", {}).get("separator", "/" if default else ".")
        if any(n == 0 for n in shape):
            continue
        grid = [-(-n // c) for n, c in zip(shape, chunk)]
        array = meta_file.parent.relative_to(path).as_posix()
        for index in np.ndindex(*grid):
            parts = [str(i) for i in index]
            key = sep.join(["c", *parts]) if default else (sep.join(parts) or "0")
            out.append(key if array == "." else f"{array}/{key}")
    return out


def check_store(path: str | Path, what: str = "patch store") -> Path:
    """Check a Zarr store is complete and undamaged before anything reads it.

    Its marker must exist (:func:`seal_store`), every listed file must have its size and CRC-32,
    every chunk the arrays' metadata implies must be listed (:func:`expected_chunks`: a chunk
    deleted, and deleted from the marker, would read as zeros), and no file may have appeared
    since. Sizes are checked at every call; the hashes are not recomputed by a process that
    verified the store already while none of its files has changed (inode, mtime, size).

    Args:
        path: The store directory.
        what: What the store is, for the messages (``"patch store"``, ``"predicted-mask store"``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        FileNotFoundError: naming the store when it does not exist.
        StoreError: one line naming the store and the first chunk at fault (missing, truncated,
            changed, unlisted), or the store when it has no (readable, current) marker.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such {what}")
    if not path.is_dir():
        raise StoreError(f"{path}: not a {what} (not a directory)")
    marker = path / MARKER
    if not marker.is_file():
        raise StoreError(
            f"{path}: incomplete {what} (no completion marker {MARKER}): written by an interrupted job? rerun it"
        )
    st = marker.stat()
    key = str(path.resolve())
    try:
        content = json.loads(marker.read_text())
        version, listed = content.get("hipoa_store_marker"), content["files"]
        if not isinstance(listed, dict):
            raise TypeError("files is not a mapping")
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        raise StoreError(f"{path}: unreadable completion marker {MARKER} ({exc}); rerun the job that wrote it") from None
    if version != MARKER_VERSION:
        raise StoreError(f"{path}: {what} sealed by an older hipoa (marker version {version}, no checksums); "
                         "delete it and rerun the job that wrote it")
    damaged = f"{path}: damaged {what}: chunk"
    fix = "rerun the job that wrote it"
    stamps = [(st.st_ino, st.st_mtime_ns, st.st_size)]
    for rel, entry in listed.items():
        try:
            size = int(entry[0])
        except (TypeError, ValueError, IndexError):
            raise StoreError(f"{path}: unreadable completion marker {MARKER} (entry {rel}); {fix}") from None
        try:
            fst = (path / rel).stat()
        except OSError:
            raise StoreError(f"{damaged} {rel} missing; {fix}") from None
        if fst.st_size != size:
            raise StoreError(f"{damaged} {rel} truncated or grown ({fst.st_size} bytes, {size} when written); {fix}")
        stamps.append((fst.st_ino, fst.st_mtime_ns, fst.st_size))
    if VERIFIED_STORES.get(key) != tuple(stamps):  # hash unless every file is as this process verified it
        for rel, entry in listed.items():
            got = _crc32(path / rel)
            if got != str(entry[1]):
                raise StoreError(f"{damaged} {rel} changed since it was written (CRC-32 {got}, {entry[1]} when "
                                 f"written); {fix}")
    for rel in expected_chunks(path):
        if rel not in listed:
            there = (path / rel).is_file()
            raise StoreError(f"{damaged} {rel} {'not in the completion marker' if there else 'missing'} (its array's "
                             f"metadata implies it; it would read as zeros); {fix}")
    extra = sorted(set(store_files(path)) - set(listed))
    if extra:
        raise StoreError(f"{damaged} {extra[0]} appeared after the store was sealed; {fix}")
    VERIFIED_STORES[key] = tuple(stamps)
    return path


# --------------------------------------------------------------------------------------------
# writing a patch store

PATCH_CHUNK = 64
"""Patches per Zarr chunk: 64 x 128 x 128 float16 = 2 MiB raw, ~1.5 MiB compressed (a few chunks
per shard file set, and a sensible Dask chunk for prediction batches)."""


def _compressor() -> Any:
    from zarr.codecs import BloscCodec

    # Bitshuffle groups the float16 sign/exponent bits and packs the 0/1 masks. On synthetic
    # UKB-like patches lz4 is ~5x faster than zstd-3 for 7 % more bytes (24 vs 22.5 kB per
    # 128x128 float16 patch), and the write would otherwise cost as much as the cropping.
    return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")


def _write_array(group: Any, name: str, data: np.ndarray) -> None:
    data = np.asarray(data)
    if data.dtype == object:
        data = data.astype(str) if data.size else np.zeros(0, dtype=str)
        dtype: Any = str
    else:
        dtype = data.dtype
    # patches in chunks of PATCH_CHUNK rows; per-row tables (and affines) in one chunk
    rows_per_chunk = PATCH_CHUNK if data.ndim == 3 and data.shape[1] >= 64 else data.shape[0]
    chunks = (max(1, min(rows_per_chunk, data.shape[0])),) + data.shape[1:]
    arr = group.create_array(
        name,
        shape=data.shape,
        dtype=dtype,
        chunks=chunks,
        compressors=_compressor() if dtype is not str else "auto",
        attributes={},
        # skip zarr's per-chunk "all fill value?" scan: a third of the write time, and an
        # all-zero chunk compresses to a few bytes anyway
        config={"write_empty_chunks": True},
    )
    if data.size:
        arr[...] = data


def _write_groups(
    path: Path,
    attrs: dict[str, Any],
    rows: dict[str, np.ndarray],
    auto: dict[str, dict[str, np.ndarray]],
    manual: dict[str, dict[str, np.ndarray]],
    points_source: dict[str, str],
) -> None:
    import zarr

    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs.update(attrs)
    group = root.create_group("rows", attributes={"columns": list(rows)})
    for name, data in rows.items():
        _write_array(group, name, data)
    auto_root = root.create_group("auto", attributes={"points_source": points_source["auto"]})
    manual_root = root.create_group("manual", attributes={"points_source": points_source["manual"]})
    for site, arrays in auto.items():
        size = int(arrays["image"].shape[-1])
        group = auto_root.create_group(site, attributes={"patch_size": size, "points_source": "auto"})
        for name, data in arrays.items():
            _write_array(group, name, data)
        context = int(manual[site]["image"].shape[-1])
        group = manual_root.create_group(
            site,
            attributes={"patch_size": context, "core_offset": context_offset(context, size), "points_source": "manual"},
        )
        for name, data in manual[site].items():
            _write_array(group, name, data)


def write_patch_store(
    path: str | Path,
    *,
    attrs: dict[str, Any],
    rows: dict[str, np.ndarray],
    auto: dict[str, dict[str, np.ndarray]],
    manual: dict[str, dict[str, np.ndarray]],
    points_source: dict[str, str],
) -> Path:
    """Write one shard's patch store (docs/DESIGN.md "Patch store"), complete or not at all.

    The store is written to ``path`` + ``.tmp``, sealed (:func:`seal_store`) and renamed onto
    ``path``, replacing a previous store (:func:`hipoa.atomic.atomic_path`), so a killed job leaves
    no half-written store at ``path`` and readers (:func:`check_store`) refuse the temporary one.

    Args:
        path: The ``.zarr`` directory to write.
        attrs: Root attributes (JSON-serialisable).
        rows: ``rows/`` arrays in column order, each ``(n,)``; object arrays are stored as strings.
        auto: ``{site: {"image": (n, S, S) float16, "mask": (n, S, S) uint8, "affine": (n, 2, 3)
            float64, "inside": (n,) float32}}``, written in this order.
        manual: ``{site: {"image": (m, C, C) float16, "mask": (m, C, C) uint8, "affine": (m, 2, 3)
            float64, "inside": (m,) float32, "row": (m,) int32}}`` for every site of ``auto``;
            ``C - S`` must be even (the 128 patch is the centre crop).
        points_source: ``{"auto": text, "manual": text}``: what made each group's patches.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: naming the array when a ``rows``/``auto`` array is not ``n`` long, a
            ``manual`` array is not ``m`` long, or a site of ``auto`` has no ``manual`` group.
    """
    n = len(next(iter(rows.values()))) if rows else 0
    for where, arrays, length in (
        [("rows", rows, n)]
        + [(f"auto/{site}", a, n) for site, a in auto.items()]
        + [(f"manual/{site}", a, len(a.get("row", ()))) for site, a in manual.items()]
    ):
        for name, data in arrays.items():
            if len(data) != length:
                raise ValueError(f"{path}: {where}/{name} has {len(data)} rows, expected {length}")
    missing = sorted(set(auto) - set(manual))
    if missing:
        raise ValueError(f"{path}: no manual/ arrays for sites {missing}")
    from hipoa.atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        _write_groups(tmp, attrs, rows, auto, manual, points_source)
        seal_store(tmp)  # the completion marker, written last: readers refuse a store without it
    return path


# --------------------------------------------------------------------------------------------
# reading


def _open(store: str | Path) -> Any:
    import zarr

    path = check_store(store)
    return zarr.open_group(str(path), mode="r")


def store_attrs(store: str | Path) -> dict[str, Any]:
    """The store's root attributes (hipoa_version, side, shard, patch_size, context_size, sites, ...)."""
    return dict(_open(store).attrs)


def _rows_from_group(group: Any, store: str | Path) -> pd.DataFrame:
    order = list(group.attrs.get("columns", [])) or sorted(group.array_keys())
    missing = [c for c in order if c not in group]
    if missing:
        raise KeyError(f"{store}: rows/ lacks arrays {missing}")
    columns: dict[str, Any] = {}
    for name in order:
        values = np.asarray(group[name][:])
        if values.dtype.kind in "USTO" or name in _STRING_COLUMNS:
            # zarr returns numpy's StringDType; plain Python str objects are what pandas users expect
            columns[name] = np.array([str(v) for v in values.tolist()], dtype=object)
        else:
            columns[name] = values
    return pd.DataFrame(columns)


def read_rows(store: str | Path) -> pd.DataFrame:
    """The per-row table of one store, in manifest order.

    Args:
        store: A ``shard-KKKK.zarr`` directory.

    Returns:
        One row per manifest row of the shard: ``eid``, ``side``, ``qc_reason`` (str, ``""`` when
        fine), ``instance`` (int16), ``annotated`` (bool), ``reference_length_mm``,
        ``spacing_row_mm``, ``spacing_col_mm`` (float64, NaN if unknown), ``rows``, ``cols``
        (int32, 0 if unknown) and ``{site}_true_area_mm2`` (float64, NaN when not annotated).
    """
    root = _open(store)
    if "rows" not in root:
        raise KeyError(f"{store}: not a patch store (no rows/ group)")
    return _rows_from_group(root["rows"], store)


@dataclass
class PatchSet:
    """Patches of one site from one or more stores, concatenated in store order.

    Attributes:
        rows: One row per patch: every ``rows/`` column (see :func:`read_rows`) plus ``store``
            (str path), ``index`` (int, row within that store's ``rows/``), ``points_source``
            (``"auto"`` or ``"manual"``: which points made the patch) and ``inside`` (float32,
            fraction of the 128 patch inside the image; NaN where unknown). Index 0..n-1.
        image: ``(n, S, S)`` float16 Dask array, normalised patches (S = 128 for ``auto``, the
            context size, default 176, for ``manual``, whose centre crop is the 128 patch).
        mask: ``(n, S, S)`` uint8 Dask array, 1 where the site's label is, else 0.
        affine: ``(n, 2, 3)`` float64, patch pixel ``(u, v, 1)`` -> stored-image pixel ``(x, y)``;
            NaN for rows whose points could not be used.
        patch_size: S.
        core_offset: Offset of the 128 patch in the S patch (0 for ``auto``, 24 for a 176 context).
    """

    rows: pd.DataFrame
    image: Any
    mask: Any
    affine: np.ndarray
    patch_size: int = 128
    core_offset: int = 0

    @property
    def inside(self) -> np.ndarray:
        """``(n,)`` float32: fraction of each 128 patch inside its image."""
        return self.rows["inside"].to_numpy(dtype=np.float32)

    def __len__(self) -> int:
        return len(self.rows)


def open_patches(stores: list[Path] | list[str] | str | Path, site: str, source: str = "auto") -> PatchSet:
    """Open one site's patches of several shard stores as one lazy dataset.

    Args:
        stores: Store directories, concatenated in this order (a single path is accepted too).
        site: Site key, e.g. ``"lateral_acetabulum"``.
        source: ``"auto"`` (one patch per row of every store, from automatic points) or
            ``"manual"`` (annotated rows with manual points only, context-sized).

    Returns:
        A :class:`PatchSet`; only ``rows`` and ``affine`` are read now.

    Raises:
        ValueError: on an unknown source, or stores with different patch sizes.
        KeyError: if a store has no patches for ``site``.
        FileNotFoundError: if a store does not exist.
        StoreError: (a ValueError) naming a store that is incomplete or damaged (:func:`check_store`).
    """
    import dask.array as da

    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if isinstance(stores, (str, Path)):
        stores = [stores]
    if not stores:
        raise ValueError("open_patches: no stores given")
    frames, images, masks, affines = [], [], [], []
    size: int | None = None
    offset = 0
    for store in stores:
        root = _open(store)
        key = f"{source}/{site}"
        if key not in root:
            raise KeyError(f"{store}: no patches for site {site!r} ({key}/)")
        group = root[key]
        rows = _rows_from_group(root["rows"], store)
        rows["store"] = str(store)
        rows["index"] = np.arange(len(rows), dtype=np.int64)
        if source == "manual":
            rows = rows.iloc[np.asarray(group["row"][:], dtype=np.int64)].reset_index(drop=True)
        rows["points_source"] = source
        if "inside" in group:
            rows["inside"] = np.asarray(group["inside"][:], dtype=np.float32)
        else:
            rows["inside"] = np.full(len(rows), np.nan, np.float32)
        if "points_z" in group:  # auto/ only (hipoa.patches.points_scores); NaN: not checked
            rows["points_z"] = np.asarray(group["points_z"][:], dtype=np.float32)
        else:
            rows["points_z"] = np.full(len(rows), np.nan, np.float32)
        image, mask = group["image"], group["mask"]
        s = int(image.shape[-1])
        if size is not None and s != size:
            raise ValueError(f"{store}: {key}/image patches are {s} px, earlier stores have {size} px")
        size = s
        offset = int(group.attrs.get("core_offset", (s - 128) // 2))
        frames.append(rows)
        images.append(da.from_array(image, chunks=image.chunks, asarray=True))
        masks.append(da.from_array(mask, chunks=mask.chunks, asarray=True))
        affines.append(np.asarray(group["affine"][:], dtype=np.float64).reshape(-1, 2, 3))
    return PatchSet(
        rows=pd.concat(frames, ignore_index=True),
        image=da.concatenate(images, axis=0),
        mask=da.concatenate(masks, axis=0),
        affine=np.concatenate(affines, axis=0),
        patch_size=int(size or 128),
        core_offset=offset,
    )


# --------------------------------------------------------------------------------------------
# QC montage (hipoa show-patches)

SITE_COLOURS = {
    "inferior_femoral_head": (0.2, 0.45, 1.0),  # blue, as in the paper's Figure 1(d)
    "superior_femoral_head": (1.0, 0.2, 0.2),  # red
    "lateral_acetabulum": (0.2, 0.85, 0.3),  # green
}


def pick_patches(stores: list[Path], site: str, source: str, n: int) -> tuple[PatchSet, np.ndarray]:
    """Up to ``n`` passing patches of ``site``, those with an osteophyte first, in store order."""
    ps = open_patches(stores, site, source)
    ok = ps.rows["qc_reason"].astype(str).eq("").to_numpy()
    # Only annotated rows can have a mask; the others' are zero and never read. So a side of
    # 40,000 images with few or no annotations costs a read of the rows tables, not of every
    # mask chunk (benchmarks/rehearsal.sh).
    annotated = ok & ps.rows["annotated"].to_numpy(dtype=bool)
    annotated_after = np.cumsum(annotated[::-1])[::-1]  # annotated passing rows from i on
    chosen: list[int] = []
    fallback: list[int] = []
    start = 0
    # scan chunk by chunk and stop as soon as there are n positives, or n patches and no
    # annotated row further on
    for chunk in ps.mask.chunks[0]:
        stop = start + chunk
        if annotated[start:stop].any():
            area = ps.mask[start:stop].sum(axis=(1, 2)).compute()
        else:
            area = np.zeros(stop - start, dtype=np.int64)
        for j, a in enumerate(area):
            i = start + j
            if not ok[i]:
                continue
            (chosen if a > 0 else fallback).append(i)
        start = stop
        if len(chosen) >= n:
            break
        if start >= len(ok) or (annotated_after[start] == 0 and len(chosen) + len(fallback) >= n):
            break
    picked = (chosen + fallback)[:n]
    return ps, np.asarray(picked, dtype=np.int64)


def save_montage(*, stores: list[Path], out: Path, n: int = 8, source: str = "auto", sites: list[str] | None = None,
                 show_eids: bool = False) -> Path:
    """Write a QC montage like the paper's Figure 2: per site, patches and their masks.

    For each site two rows of ``n`` tiles: the normalised patches (grey, -3..3 sd) and below them
    the same patches with the mask overlaid in the site's colour. Patches with an osteophyte are
    preferred, then other passing rows. For ``manual`` context patches a square marks the 128 core.

    Args:
        stores: Patch stores to draw from.
        out: PNG to write.
        n: Patches per site.
        source: ``"auto"`` or ``"manual"``.
        sites: Site keys; default all sites in the first store's attrs.

    Returns:
        ``out``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from hipoa.atomic import save_figure

    stores = [Path(s) for s in stores]
    attrs = store_attrs(stores[0])
    names = sites or list(attrs.get("sites", {}))
    if not names:
        raise ValueError(f"{stores[0]}: store attrs list no sites")
    fig, axes = plt.subplots(2 * len(names), n, figsize=(1.6 * n, 3.4 * len(names)), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for k, site in enumerate(names):
        ps, picked = pick_patches(stores, site, source, n)
        colour = SITE_COLOURS.get(site, (1.0, 0.8, 0.0))
        images = ps.image[picked].compute().astype(np.float32) if len(picked) else np.zeros((0, 1, 1))
        masks = ps.mask[picked].compute() if len(picked) else np.zeros((0, 1, 1))
        for j, i in enumerate(picked):
            img, m = images[j], masks[j]
            top, bottom = axes[2 * k, j], axes[2 * k + 1, j]
            top.imshow(img, cmap="gray", vmin=-3, vmax=3, interpolation="nearest")
            bottom.imshow(img, cmap="gray", vmin=-3, vmax=3, interpolation="nearest")
            overlay = np.zeros(m.shape + (4,), np.float32)
            overlay[m > 0] = (*colour, 0.55)
            bottom.imshow(overlay, interpolation="nearest")
            if ps.core_offset:
                o, s = ps.core_offset - 0.5, 128
                for ax in (top, bottom):
                    ax.add_patch(Rectangle((o, o), s, s, fill=False, lw=0.6, ec="yellow", ls="--"))
            r = ps.rows.iloc[int(i)]
            # the row of the concatenated stores, not the eid, unless asked (a shared report names no one)
            top.set_title(f"{r['eid']}_{r['instance']}_{r['side']}" if show_eids else f"row {int(i)}", fontsize=6)
            bottom.set_title(f"{int(m.sum())} px" if r["annotated"] else "not annotated", fontsize=6)
        axes[2 * k, 0].text(
            -0.08, 0.5, site.replace("_", "\n"), transform=axes[2 * k, 0].transAxes,
            ha="right", va="center", fontsize=8, color=colour,
        )
        if not len(picked):
            axes[2 * k, 0].text(0.5, 0.5, "no passing patches", ha="center", va="center", fontsize=7)
    fig.suptitle(f"{source} patches: top image, bottom mask overlay ({len(stores)} store(s))", fontsize=9)
    fig.tight_layout()
    out = save_figure(fig, out, dpi=110)
    log.info("wrote %s", out)
    return out
