"""Predict osteophyte masks for one shard of patches, and measure presence and area per site.

For every site, the site's U-Net is run on the patches cropped from the automatic points
(``auto/{site}/`` of the shard's patch store, see docs/DESIGN.md) through the one inference path,
:class:`hipoa.infer.SiteModel`: batches are read from the Zarr store by reader threads while the
model works, and presence, probability and area are computed on the device beside the model
call; only the present images' masks come back to the host. :func:`predict_shards` loads the
models once and predicts many shards in one call (a job per group of shards on a GPU node).

Per image and site:

- *presence* by the model's stored rule (``unet.json``: ``{"presence": {"pixel_threshold",
  "detect_threshold", "min_area_px"}}``), through :func:`hipoa.metrics.presence_from_probability`;
- *area* in mm^2: predicted mask pixels times the area of one patch pixel in the stored image,
  ``|det(affine[:, :2])|`` image pixels, times the DICOM pixel area ``spacing_row_mm *
  spacing_col_mm``. The patch pixel size depends on each image's reference length, so the patch
  pixel count alone is not an area. 0.0 when absent;
- *probability*: the probability that an osteophyte is present in the cohort: the rule's raw
  score (``presence_from_probability``'s ``k``-th largest pixel probability) through the
  calibration in the model card (``presence.calibration``, :meth:`hipoa.calibration.Calibration.apply`:
  fitted on the validation split, shifted to the cohort's prevalence), on the host; presence is
  decided on the raw score, so calibration changes no call. A card without a calibration (older
  models) gives the raw score, and the log says so;
- *regions*: ``n_components``, the number of 8-connected regions of the predicted mask
  (:func:`hipoa.metrics.mask_components`, scikit-image), and ``largest_area_mm2``, the largest
  region's area in mm^2 (its pixels times the patch pixel area). 0 and 0.0 when absent.

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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from hipoa import __version__, qc
from hipoa.calibration import describe
from hipoa.geometry import patch_pixel_area_mm2
from hipoa.infer import SiteModel
from hipoa.metrics import mask_components
from hipoa.sites import PATCH_SIZE
from hipoa.store import PatchSet
from hipoa.tables import AREA, LARGEST_AREA, N_COMPONENTS, PRESENT, PROBABILITY, SITE_DTYPES

log = logging.getLogger(__name__)

REASON_OUTSIDE = qc.PATCH_OUTSIDE_IMAGE
REASON_SPACING = qc.PIXEL_SPACING_UNKNOWN
REASON_POINTS = qc.POINTS_INVALID
REASON_IMPLAUSIBLE = qc.POINTS_IMPLAUSIBLE


def measurable(
    rows: pd.DataFrame, inside: np.ndarray, min_inside_fraction: float, affine: np.ndarray | None = None,
    points_max_z: float = float("inf"),
) -> tuple[np.ndarray, np.ndarray]:
    """Which rows can be measured for one site, and the reason of those that cannot.

    Args:
        rows: The store's ``rows/`` table (``qc_reason``, ``spacing_row_mm``, ``spacing_col_mm``).
        inside: ``(n,)`` fraction of each patch inside the image.
        min_inside_fraction: The store's threshold.
        affine: ``(n, 2, 3)`` patch affines; a row without a finite one (no usable points) is
            not measurable (``points_invalid``).
        points_max_z: A row whose ``points_z`` (the site's local-outline score, when ``rows`` has
            it) is above this is ``points_implausible``.

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
    if "points_z" in rows:
        implausible = np.nan_to_num(rows["points_z"].to_numpy(dtype=np.float64), nan=0.0) > points_max_z
        reason[fine & inside_ok & implausible] = REASON_IMPLAUSIBLE
        fine = reason == ""
    reason[fine & inside_ok & ~spacing_ok] = REASON_SPACING
    return reason == "", reason


_EVERY_CHUNK = {"write_empty_chunks": True}  # every chunk on disk: check_store can tell a lost one


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
        a = g.create_array(col, shape=(n,), dtype=str, config=_EVERY_CHUNK)
        if n:
            a[:] = rows[col].astype(str).to_numpy()
    for col, dtype in (("instance", "int16"), ("rows", "int32"), ("cols", "int32")):
        a = g.create_array(col, shape=(n,), dtype=dtype, config=_EVERY_CHUNK)
        if n:
            a[:] = rows[col].to_numpy(dtype=dtype)
    return root


def _site_results(n: int) -> dict[str, Any]:
    """All-NA per-site columns for ``n`` rows (filled where measured)."""
    return {suffix: pd.array([pd.NA] * n, dtype=dtype) for suffix, dtype in SITE_DTYPES.items()}


def _predict_site(
    engine: SiteModel, data: PatchSet, idx: np.ndarray, px_area: np.ndarray, *, batch_size: int, keep_masks: bool,
    site: str,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Run ``engine`` on rows ``idx`` of ``data``; the site's columns and (optionally) its masks.

    Args:
        engine: The site's model.
        data: The store's ``auto/{site}`` patches.
        idx: ``(m,)`` measurable rows.
        px_area: ``(n,)`` float64 mm^2 per patch pixel.
        batch_size: Patches per model call.
        keep_masks: Return the ``(n, 128, 128)`` uint8 masks (0 where absent or not measured).
        site: For the progress log.

    Returns:
        ``(columns, masks)``: suffix -> ``(n,)`` nullable array (NA where not measured), and the
        masks or None.
    """
    n = len(data)
    cols = _site_results(n)
    calibration = engine.card.calibration if engine.card is not None else None
    full = np.zeros((n, PATCH_SIZE, PATCH_SIZE), np.uint8) if keep_masks else None
    labelled = []
    # Connected components need the masks on the host; they run in a thread beside the model,
    # on the present images only (an absent image has none).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hipoa-label") as pool:
        for r in engine.run(data.image, idx, batch_size=batch_size, masks="present", progress=f"predict {site}"):
            b = r.indices
            cols[PRESENT][b] = r.present.astype(np.int8)
            cols[AREA][b] = np.where(r.present, r.area_px * px_area[b], 0.0)
            # Calibrated on the host (a knot lookup per image); presence above stays the raw rule's.
            cols[PROBABILITY][b] = (r.probability if calibration is None
                                    else calibration.apply(r.probability, prior="cohort").astype(np.float32))
            hit = np.flatnonzero(r.present)
            if full is not None and hit.size:
                full[b[hit]] = r.mask[hit]
            labelled.append((b, pool.submit(mask_components, r.mask[hit]), hit))
        for b, future, hit in labelled:
            count, largest_px = future.result()
            n_comp, largest = np.zeros(len(b), np.int16), np.zeros(len(b), np.float64)
            n_comp[hit], largest[hit] = count, largest_px * px_area[b[hit]]
            cols[N_COMPONENTS][b] = n_comp
            cols[LARGEST_AREA][b] = largest
    return cols, full


def load_site_models(models: dict[str, Path], precision: str = "auto") -> dict[str, SiteModel]:
    """Every site's model, loaded once (:meth:`hipoa.infer.SiteModel.load`), all cards first.

    Every card and model is checked and loaded before anything is written: a bad model fails
    the job at once, naming the file, not after the first sites' masks.

    Raises:
        ValueError: when ``models`` is empty; FileNotFoundError / hipoa.modelio.ModelError
            naming a model or card that is missing or unusable.
    """
    from hipoa.modelio import read_model_card
    from hipoa.precision import choose_policy

    if not models:
        raise ValueError("predict_shard: no models given (expected SITE=MODEL.keras)")
    for m in models.values():
        read_model_card(Path(m))
    policy = choose_policy(precision)
    engines = {site: SiteModel.load(Path(m), policy=policy) for site, m in models.items()}
    for site, engine in engines.items():
        log.info("%s: %s", site, _calibration_note(engine.card))
    return engines


def _calibration_note(card) -> str:
    """One line on what a model's probability column is: calibrated how and for which prevalence,
    or the raw presence score (a card without a calibration)."""
    d = describe(card.presence_info.get("calibration") if card is not None else None)
    if d["method"] == "none":
        return f"uncalibrated ({d['reason']}): the probability column is the presence rule's raw score"
    target = "not shifted" if d["target_prevalence"] is None else f"shifted to prevalence {d['target_prevalence']:.4g}"
    return (f"calibrated: {d['method']} on the validation split ({d['n']} images, prevalence "
            f"{d['val_prevalence']:.4g}), {target}")


def _store_frame(table: pd.DataFrame, reasons: np.ndarray, site_cols: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """The per-shard table: the row keys, then each site's columns in :data:`SITE_DTYPES` order."""
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
    sites = [pd.DataFrame({f"{site}{suffix}": values for suffix, values in cols.items()})
             for site, cols in site_cols.items()]
    # A site that could not be measured is NA for that site only; the others keep their values,
    # while qc_reason (qc_pass false) records that not every site could be measured.
    return pd.concat([df, *sites], axis=1)


def predict_store(
    store: Path, engines: dict[str, SiteModel], out: Path, masks_out: Path | None, batch_size: int
) -> pd.DataFrame:
    """Predict one shard store with loaded models and write its outputs (see :func:`predict_shard`)."""
    from hipoa.atomic import atomic_path
    from hipoa.store import open_patches, seal_store, store_attrs

    attrs = store_attrs(store)
    min_inside = float(attrs.get("min_inside_fraction", 0.0))
    points_max_z = float(attrs.get("qc_limits", {}).get("points_max_z", float("inf")))
    first = next(iter(engines))
    table: pd.DataFrame | None = None
    reasons: np.ndarray | None = None
    site_cols: dict[str, dict[str, Any]] = {}
    with ExitStack() as outputs:
        # Both outputs are written to temporary paths and renamed when complete (hipoa.atomic):
        # the masks first, then the Parquet.
        out_tmp = outputs.enter_context(atomic_path(out))
        masks_tmp = outputs.enter_context(atomic_path(Path(masks_out))) if masks_out is not None else None
        root = None
        for site, engine in engines.items():
            data = open_patches([store], site, source="auto")
            rows, affine = data.rows, np.asarray(data.affine, dtype=np.float64)
            if table is None:
                table = rows
                reasons = rows["qc_reason"].fillna("").astype(str).to_numpy(dtype=object).copy()
                root = _write_mask_store_header(masks_tmp, rows, attrs, store) if masks_tmp is not None else None
            elif len(rows) != len(table) or not (rows["eid"].astype(str).values == table["eid"].astype(str).values).all():
                raise ValueError(f"{store}: rows of site {site!r} differ from those of {first!r}")
            ok, site_reason = measurable(rows, data.inside, min_inside, affine, points_max_z)
            # The first reason of an image is its reason (earlier stages' reasons are kept as they are).
            reasons = np.where(reasons == "", site_reason, reasons)
            idx = np.flatnonzero(ok)
            log.info("%s: %d/%d images measurable, %d not (%s)", site, len(idx), len(rows), len(rows) - len(idx),
                     {str(k): int(v) for k, v in pd.Series(site_reason[~ok]).value_counts().items()})
            px_area = patch_pixel_area_mm2(affine, rows["spacing_row_mm"], rows["spacing_col_mm"])
            site_cols[site], masks = _predict_site(engine, data, idx, px_area, batch_size=batch_size,
                                                   keep_masks=root is not None, site=site)
            if root is not None:
                _write_site_masks(root, site, masks, affine, ok, batch_size)
        assert table is not None and reasons is not None
        df = _store_frame(table, reasons, site_cols)
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), out_tmp)
        if masks_tmp is not None:
            seal_store(masks_tmp)
    log.info("%s: wrote %d rows (%d pass QC)", out, len(df), int((df["qc_reason"] == "").sum()))
    return df


def _write_site_masks(root, site: str, masks: np.ndarray, affine: np.ndarray, ok: np.ndarray, batch_size: int) -> None:
    """``{site}/mask``, ``affine`` and ``measured`` of the predicted-mask store."""
    n = len(masks)
    g = root.create_group(site)
    chunk = max(1, min(batch_size, n))
    g.create_array("mask", shape=(n, PATCH_SIZE, PATCH_SIZE), chunks=(chunk, PATCH_SIZE, PATCH_SIZE),
                   dtype="uint8", config=_EVERY_CHUNK)[...] = masks
    g.create_array("affine", shape=(n, 2, 3), dtype="float64", config=_EVERY_CHUNK)[...] = affine
    g.create_array("measured", shape=(n,), dtype="bool", config=_EVERY_CHUNK)[...] = ok


def predict_shards(
    *,
    stores: Sequence[Path],
    models: dict[str, Path],
    outs: Sequence[Path],
    masks_outs: Sequence[Path] | None = None,
    batch_size: int = 64,
    precision: str = "auto",
) -> list[pd.DataFrame]:
    """:func:`predict_shard` for several shards, with every site's model loaded once.

    Args:
        stores: Patch stores, one per shard.
        models: Site name -> ``.keras`` model (its card beside it).
        outs: Per-shard Parquets, one per store.
        masks_outs: Predicted-mask Zarrs, one per store, or None.
        batch_size, precision: As for :func:`predict_shard`.

    Returns:
        The tables written, in ``stores`` order.

    Raises:
        ValueError: when the lists' lengths differ, a path is given twice, or as for
            :func:`predict_shard`.
    """
    stores, outs = [Path(s) for s in stores], [Path(o) for o in outs]
    masks = [Path(m) for m in masks_outs] if masks_outs is not None else [None] * len(stores)
    if not stores or len(outs) != len(stores) or len(masks) != len(stores):
        raise ValueError(f"predict_shards: need one out (and masks out) per store, got {len(stores)} stores, "
                         f"{len(outs)} outs, {len(masks)} masks outs")
    written = [str(p) for p in outs + [m for m in masks if m is not None]]
    if len(set(written)) != len(written):
        raise ValueError(f"predict_shards: an output path is given twice: {sorted(written)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    engines = load_site_models(models, precision)
    log.info("%d stores, %d sites, precision %s, batch %d", len(stores), len(engines),
             next(iter(engines.values())).policy, batch_size)
    return [predict_store(s, engines, o, m, batch_size) for s, o, m in zip(stores, outs, masks)]


def predict_shard(
    *,
    store: Path,
    models: dict[str, Path],
    out: Path,
    masks_out: Path | None = None,
    batch_size: int = 64,
    precision: str = "auto",
) -> pd.DataFrame:
    """Predict presence, area, probability and regions per site for every image of one shard.

    Args:
        store: The shard's patch store (``results/patches/{side}/shard-{k:04d}.zarr``).
        models: Site name -> ``.keras`` model; the presence rule is read from the ``.json``
            beside it.
        out: Per-shard Parquet to write.
        masks_out: Optional Zarr of predicted patch masks: ``{site}/mask`` ``(n, 128, 128)`` uint8
            (1 = osteophyte), ``{site}/affine`` ``(n, 2, 3)`` float64 (patch -> stored-image
            pixels), ``{site}/measured`` ``(n,)`` bool, ``rows/`` (eid, instance, side, rows, cols)
            and the store's site table in the attributes, for :func:`hipoa.phenotypes.write_masks`.
        batch_size: Patches per model call (memory: a few batches of patches and masks, plus,
            with ``masks_out``, 16 KiB per image of the shard for the site's masks).
        precision: ``"auto"``, ``"float32"``, ``"mixed_bfloat16"`` or ``"mixed_float16"``
            (:func:`hipoa.precision.choose_policy`).

    Returns:
        One row per store row (manifest order): ``eid``, ``instance`` (int16), ``side``,
        ``qc_reason`` (string; "" when every site was measured), ``reference_length_mm``
        (float64), ``annotated`` (bool) and per site ``{site}_present`` (Int8),
        ``{site}_area_mm2`` (Float64, mm^2), ``{site}_probability`` (Float32),
        ``{site}_n_components`` (Int16) and ``{site}_largest_area_mm2`` (Float64, mm^2); NA
        where not measurable.

    Raises:
        KeyError: naming the store and site when the store has no patches for a site.
        ValueError: naming the store when the sites' rows disagree, or a model is unusable.
        FileNotFoundError: naming the store, a model or its JSON when missing.
    """
    return predict_shards(stores=[store], models=models, outs=[out],
                          masks_outs=None if masks_out is None else [masks_out],
                          batch_size=batch_size, precision=precision)[0]
