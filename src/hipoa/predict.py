"""Predict osteophyte masks for one shard of patches, and measure presence and area per site.

For every site, the site's U-Net is run on the patches cropped from the automatic points
(``auto/{site}/`` of the shard's patch store, see docs/DESIGN.md). Patches are streamed from the
Zarr store through Dask one batch at a time, so memory is set by ``batch_size``, not by the shard;
the next batch is read while the current one is on the accelerator.

Per image and site:

- *presence* by the model's stored rule (``unet.json``: ``{"presence": {"pixel_threshold",
  "detect_threshold", "min_area_px"}}``), through :func:`hipoa.metrics.presence_from_probability`;
- *area* in mm^2: predicted mask pixels times the area of one patch pixel in the stored image,
  ``|det(affine[:, :2])|`` image pixels, times the DICOM pixel area ``spacing_row_mm *
  spacing_col_mm``. The patch pixel size depends on each image's reference length, so the patch
  pixel count alone is not an area. 0.0 when absent;
- *probability*: the model's confidence that an osteophyte is present (as defined by
  ``presence_from_probability``).

Images that cannot be measured get NA, not a number: rows with a ``qc_reason`` from an earlier
stage, rows whose patch for the site lies less than the store's ``min_inside_fraction`` inside the
image (reason ``patch_outside_image``), rows without a usable affine (``points_invalid``) and rows
with an unknown pixel spacing (``pixel_spacing_unknown``). No model is run on them. A site that
cannot be measured is NA for that site only; ``qc_reason`` keeps the first reason.

Predicted-mask store (``predict_shard(masks_out=...)``, read by
:func:`hipoa.phenotypes.write_masks`)::

    attrs: hipoa_version, side, shard, patch_size, sites {name: {centre, reference, dp, label}}, source
    rows/    eid, side (str), instance (int16), rows, cols (int32)  one entry per row of the shard
    {site}/  mask (n, 128, 128) uint8 (1 = predicted osteophyte; 0 where absent or not measured)
             affine (n, 2, 3) float64 (patch (u, v, 1) -> stored-image pixel (x, y), as in the patch store)
             measured (n,) bool
    hipoa_complete.json  the completion marker (:func:`hipoa.store.seal_store`), written last

Both outputs are written to temporary paths beside them and renamed when complete
(:mod:`hipoa.atomic`), and every model is checked and loaded (:mod:`hipoa.modelio`) before
anything is written.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from hipoa import __version__, qc
# The model card (unet.json) is read in one place, hipoa.modelio; its names stay importable from here.
from hipoa.modelio import PresenceRule, model_json_path, read_presence_rule  # noqa: F401
from hipoa.progress import Progress
from hipoa.sites import PATCH_SIZE

log = logging.getLogger(__name__)

PRESENT = "_present"
AREA = "_area_mm2"
PROBABILITY = "_probability"
SITE_DTYPES = {PRESENT: "Int8", AREA: "Float64", PROBABILITY: "Float32"}
"""Per-site column suffix -> pandas nullable dtype (NA = not measurable)."""

REASON_OUTSIDE = qc.PATCH_OUTSIDE_IMAGE
REASON_SPACING = qc.PIXEL_SPACING_UNKNOWN
REASON_POINTS = qc.POINTS_INVALID


def site_columns(site: str) -> list[str]:
    """The three phenotype columns of ``site``: presence, area (mm^2) and probability."""
    return [f"{site}{suffix}" for suffix in SITE_DTYPES]


def patch_pixel_area_mm2(affine: np.ndarray, spacing_row_mm: np.ndarray, spacing_col_mm: np.ndarray) -> np.ndarray:
    """Area of one patch pixel in mm^2.

    Args:
        affine: ``(n, 2, 3)`` float64, patch ``(u, v, 1)`` -> stored-image pixel ``(x, y)``.
        spacing_row_mm: ``(n,)`` DICOM row spacing (pixel height) in mm.
        spacing_col_mm: ``(n,)`` DICOM column spacing (pixel width) in mm.

    Returns:
        ``(n,)`` float64: ``|det(affine[:, :, :2])| * spacing_row_mm * spacing_col_mm``; mirroring
        flips the determinant's sign, not the area.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.ndim != 3 or affine.shape[1:] != (2, 3):
        raise ValueError(f"affine must have shape (n, 2, 3), got {affine.shape}")
    det = np.full(len(affine), np.nan)
    finite = np.isfinite(affine).all(axis=(1, 2))  # rows without usable points have NaN affines
    det[finite] = np.abs(np.linalg.det(affine[finite, :, :2]))
    return det * np.asarray(spacing_row_mm, dtype=np.float64) * np.asarray(spacing_col_mm, dtype=np.float64)


def _presence_from_probability(prob: np.ndarray, rule: PresenceRule):
    """Presence, mask, mask area (patch pixels) and probability from ``(n, H, W)`` class-1 maps."""
    from hipoa.metrics import presence_from_probability

    present, mask, area_px, probability = presence_from_probability(
        prob, pixel_threshold=rule.pixel_threshold, min_area_px=rule.min_area_px, detect_threshold=rule.detect
    )
    present = np.asarray(present).astype(bool)
    mask = np.asarray(mask).astype(np.uint8)
    # An absent call has area 0.0 (contract) and, for the masks written back, no pixels.
    mask[~present] = 0
    return present, mask, np.asarray(area_px), np.asarray(probability, dtype=np.float32)


def load_model(path: Path, policy: str = "float32"):
    """Load a site's ``.keras`` U-Net for inference under the Keras dtype ``policy``.

    The file is checked before Keras reads it (:func:`hipoa.modelio.load_model`).

    Raises:
        FileNotFoundError: naming the model when it is missing.
        hipoa.modelio.ModelError: (a ValueError) naming the model and what is wrong with it.
    """
    from hipoa import modelio

    return modelio.load_model(Path(path), policy)


def class1_probability(output: np.ndarray) -> np.ndarray:
    """``(n, H, W)`` float32 osteophyte probability from a model output ``(n, H, W, C)``.

    Two-class softmax: channel 1; a single sigmoid channel: channel 0.
    """
    output = np.asarray(output)
    channel = 1 if output.shape[-1] >= 2 else 0
    return output[..., channel].astype(np.float32)


def predict_padded(model, x: np.ndarray, n: int) -> np.ndarray:
    """``model.predict_on_batch(x)`` with ``x`` zero-padded to ``n`` patches, padding dropped.

    The traced graph (and oneDNN's primitives) depend on the batch's shape: a shard's last,
    shorter batch would trace the model a second time, which costs as much as predicting ~100
    patches on a CPU. Padding keeps one shape per shard.
    """
    k = len(x)
    if k < n:
        x = np.concatenate([x, np.zeros((n - k, *x.shape[1:]), dtype=x.dtype)])
    return np.asarray(model.predict_on_batch(x))[:k]


def _as_index_or_slice(idx: np.ndarray):
    """A slice when ``idx`` is a contiguous run (cheaper reads), else the index array."""
    if len(idx) and idx[-1] - idx[0] + 1 == len(idx):
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def iter_batches(image, idx: np.ndarray, batch_size: int):
    """Yield ``(indices, patches)`` batches of ``image[indices]`` as float32 ``(b, H, W, 1)``.

    Reads one batch ahead in a background thread, so reading and decompressing the Zarr chunks
    overlaps the model's work on the previous batch. Memory: two batches.

    Args:
        image: ``(n, H, W)`` Dask (or NumPy) array of patches.
        idx: Sorted row indices to read.
        batch_size: Patches per batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]

    def read(b: np.ndarray) -> np.ndarray:
        part = image[_as_index_or_slice(b)]
        if hasattr(part, "compute"):
            part = part.compute(scheduler="synchronous")
        return np.asarray(part, dtype=np.float32)[..., None]

    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(read, batches[0]) if batches else None
        for k, b in enumerate(batches):
            x = future.result()
            if k + 1 < len(batches):
                future = pool.submit(read, batches[k + 1])
            yield b, x


def measurable(
    rows: pd.DataFrame, inside: np.ndarray, min_inside_fraction: float, affine: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Which rows can be measured for one site, and the reason of those that cannot.

    Args:
        rows: The store's ``rows/`` table (``qc_reason``, ``spacing_row_mm``, ``spacing_col_mm``).
        inside: ``(n,)`` fraction of each patch inside the image.
        min_inside_fraction: The store's threshold.
        affine: ``(n, 2, 3)`` patch affines; a row without a finite one (no usable points) is
            not measurable (``points_invalid``).

    Returns:
        ``(ok, reason)``: ``(n,)`` bool, and ``(n,)`` object array of reasons ("" where ok).
    """
    reason = rows["qc_reason"].fillna("").astype(str).to_numpy(dtype=object)
    spacing_ok = np.isfinite(rows["spacing_row_mm"].to_numpy(dtype=np.float64)) & np.isfinite(
        rows["spacing_col_mm"].to_numpy(dtype=np.float64)
    )
    inside_ok = np.nan_to_num(np.asarray(inside, dtype=np.float64), nan=0.0) >= min_inside_fraction
    reason = reason.copy()
    fine = reason == ""
    if affine is not None:
        finite = np.isfinite(np.asarray(affine, dtype=np.float64)).all(axis=(1, 2))
        reason[fine & ~finite] = REASON_POINTS
        fine = reason == ""
    reason[fine & ~inside_ok] = REASON_OUTSIDE
    reason[fine & inside_ok & ~spacing_ok] = REASON_SPACING
    return reason == "", reason


def _write_mask_store_header(masks_out: Path, rows: pd.DataFrame, attrs: dict[str, Any], store: Path):
    import zarr

    root = zarr.open_group(str(masks_out), mode="w")
    root.attrs.update(
        {
            "hipoa_version": __version__,
            "side": attrs.get("side"),
            "shard": attrs.get("shard"),
            "patch_size": PATCH_SIZE,
            "sites": attrs.get("sites", {}),
            "source": str(store),
            "description": "predicted patch masks per site; affine maps patch (u, v, 1) -> stored-image (x, y)",
        }
    )
    n = len(rows)
    g = root.create_group("rows")
    for col in ("eid", "side"):
        a = g.create_array(col, shape=(n,), dtype=str)
        if n:
            a[:] = rows[col].astype(str).to_numpy()
    for col, dtype in (("instance", "int16"), ("rows", "int32"), ("cols", "int32")):
        a = g.create_array(col, shape=(n,), dtype=dtype)
        if n:
            a[:] = rows[col].to_numpy(dtype=dtype)
    return root


def predict_shard(
    *,
    store: Path,
    models: dict[str, Path],
    out: Path,
    masks_out: Path | None = None,
    batch_size: int = 64,
    precision: str = "auto",
) -> pd.DataFrame:
    """Predict presence, area and probability per site for every image of one shard.

    Args:
        store: The shard's patch store (``results/patches/{side}/shard-{k:04d}.zarr``).
        models: Site name -> ``.keras`` model; the presence rule is read from the ``.json``
            beside it.
        out: Per-shard Parquet to write.
        masks_out: Optional Zarr of predicted patch masks: ``{site}/mask`` ``(n, 128, 128)`` uint8
            (1 = osteophyte), ``{site}/affine`` ``(n, 2, 3)`` float64 (patch -> stored-image
            pixels), ``{site}/measured`` ``(n,)`` bool, ``rows/`` (eid, instance, side, rows, cols)
            and the store's site table in the attributes, for :func:`hipoa.phenotypes.write_masks`.
        batch_size: Patches per model call.
        precision: ``"auto"``, ``"float32"``, ``"mixed_bfloat16"`` or ``"mixed_float16"``
            (:func:`hipoa.precision.choose_policy`).

    Returns:
        One row per store row (manifest order): ``eid``, ``instance`` (int16), ``side``,
        ``qc_reason`` (string; "" when every site was measured), ``reference_length_mm``
        (float64), ``annotated`` (bool) and per site ``{site}_present`` (Int8),
        ``{site}_area_mm2`` (Float64, mm^2), ``{site}_probability`` (Float32); NA where not
        measurable.

    Raises:
        KeyError: naming the store and site when the store has no patches for a site.
        ValueError: naming the store when the sites' rows disagree, or a model is unusable.
        FileNotFoundError: naming the store, a model or its JSON when missing.
    """
    from hipoa.atomic import atomic_path
    from hipoa.precision import choose_policy
    from hipoa.store import open_patches, seal_store, store_attrs

    store, out = Path(store), Path(out)
    if not models:
        raise ValueError("predict_shard: no models given (expected SITE=MODEL.keras)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    attrs = store_attrs(store)
    min_inside = float(attrs.get("min_inside_fraction", 0.0))
    policy = choose_policy(precision)
    # Every model card and model is checked and loaded before anything is written: a bad model
    # fails the job at once, naming the file, not after the first sites' masks.
    rules = {site: read_presence_rule(Path(m)) for site, m in models.items()}
    nets = {site: load_model(Path(m), policy) for site, m in models.items()}
    log.info("%s: %d sites, precision %s, batch %d", store, len(models), policy, batch_size)

    table: pd.DataFrame | None = None
    reasons: np.ndarray | None = None
    site_frames: dict[str, pd.DataFrame] = {}
    root = None
    with ExitStack() as outputs:
        # Both outputs are written to temporary paths and renamed when complete (hipoa.atomic):
        # the masks first, then the Parquet.
        out_tmp = outputs.enter_context(atomic_path(out))
        masks_tmp = outputs.enter_context(atomic_path(Path(masks_out))) if masks_out is not None else None
        for site in models:
            data = open_patches([store], site, source="auto")
            rows = data.rows
            affine = np.asarray(data.affine, dtype=np.float64)
            n = len(rows)
            if table is None:
                table = rows
                reasons = rows["qc_reason"].fillna("").astype(str).to_numpy(dtype=object).copy()
                if masks_tmp is not None:
                    root = _write_mask_store_header(masks_tmp, rows, attrs, store)
            elif len(rows) != len(table) or not (rows["eid"].astype(str).values == table["eid"].astype(str).values).all():
                raise ValueError(f"{store}: rows of site {site!r} differ from those of {next(iter(models))!r}")
            ok, site_reason = measurable(rows, data.inside, min_inside, affine)
            # The first reason of an image is its reason (earlier stages' reasons are kept as they are).
            reasons = np.where(reasons == "", site_reason, reasons)
            idx = np.flatnonzero(ok)
            px_area = patch_pixel_area_mm2(affine, rows["spacing_row_mm"], rows["spacing_col_mm"])

            present = pd.array([pd.NA] * n, dtype="Int8")
            area = pd.array([pd.NA] * n, dtype="Float64")
            prob = pd.array([pd.NA] * n, dtype="Float32")
            if root is not None:
                g = root.create_group(site)
                chunk = max(1, min(batch_size, n))
                mask_arr = g.create_array(
                    "mask", shape=(n, PATCH_SIZE, PATCH_SIZE), chunks=(chunk, PATCH_SIZE, PATCH_SIZE), dtype="uint8"
                )
                g.create_array("affine", shape=(n, 2, 3), dtype="float64")[...] = affine
                g.create_array("measured", shape=(n,), dtype="bool")[...] = ok
            log.info("%s: %d/%d images measurable, %d not (%s)", site, len(idx), n, n - len(idx),
                     {str(k): int(v) for k, v in pd.Series(site_reason[~ok]).value_counts().items()})
            model = nets.pop(site)  # dropped after its site: one model's activations at a time
            if len(idx):
                progress = Progress(len(idx), f"predict {site}", log, unit="patches")
                steady = min(batch_size, len(idx))
                for b, x in iter_batches(data.image, idx, batch_size):
                    p = class1_probability(predict_padded(model, x, steady))
                    is_present, mask, area_px, probability = _presence_from_probability(p, rules[site])
                    area_b = np.where(is_present, np.asarray(area_px, dtype=np.float64) * px_area[b], 0.0)
                    present[b] = is_present.astype(np.int8)
                    area[b] = area_b
                    prob[b] = probability
                    if root is not None:
                        mask_arr.oindex[b] = mask
                    progress.update(len(b))
                progress.close()
            del model
            site_frames[site] = pd.DataFrame(
                {f"{site}{PRESENT}": present, f"{site}{AREA}": area, f"{site}{PROBABILITY}": prob}
            )

        assert table is not None and reasons is not None
        df = pd.DataFrame(
            {
                "eid": pd.array(table["eid"].astype(str), dtype="string"),
                "instance": table["instance"].to_numpy(dtype=np.int16),
                "side": pd.array(table["side"].astype(str), dtype="string"),
                "qc_reason": pd.array(reasons.astype(str), dtype="string"),
                "reference_length_mm": table["reference_length_mm"].to_numpy(dtype=np.float64),
                "annotated": table["annotated"].to_numpy(dtype=bool),
            }
        )
        df = pd.concat([df] + [site_frames[s] for s in models], axis=1)
        # A site that could not be measured is NA for that site only; the others keep their values,
        # while qc_reason (qc_pass false) records that not every site could be measured.
        failed = df["qc_reason"] != ""
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), out_tmp)
        if masks_tmp is not None:
            seal_store(masks_tmp)
    log.info("%s: wrote %d rows (%d pass QC)", out, len(df), int((~failed).sum()))
    return df
