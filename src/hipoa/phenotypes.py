"""Gather per-shard predictions into the phenotype tables a genetic analyst loads.

Writes, for one side (see the data contract, "Outputs"):

- ``osteophytes_{side}.parquet``: one row per ingested image (every manifest row exactly once,
  QC failures included), nullable dtypes (NA = not measurable, never a sentinel number), and
  key-value schema metadata (``hipoa_version``, ``config_hash``, ``model_sha256:{site}``,
  ``presence_threshold:{site}``, ``probability_calibration:{site}``, ``created``) written through pyarrow so pandas, polars, duckdb
  and R's arrow all see it. Only ``created`` differs between two runs on the same inputs (nothing
  does when ``SOURCE_DATE_EPOCH`` is set: it is then ``created``).
- the GWAS files of the side (:mod:`hipoa.release`): ``osteophytes_{side}.bt.tsv`` (presence
  0/1/NA), ``.qt.tsv`` (areas and their rank-based inverse-normal transforms), ``.covar.tsv``
  and ``.remove.txt``, one line per participant at the instance the policy chooses.
- ``osteophytes_{side}.dict.tsv``: ``FIELD FILES TYPE DESCRIPTION UNITS`` for every column of
  the Parquet and of the GWAS files.

and optionally (:func:`write_masks`) the predicted label masks back in each image's space.
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pandas as pd

from hipoa import __version__, qc
from hipoa.atomic import atomic_path
from hipoa.geometry import paste_patch_mask
from hipoa.labels import write_label_png
from hipoa.calibration import describe as describe_calibration
from hipoa.modelio import read_model_card
from hipoa.progress import Progress
from hipoa.release import (
    parse_instance_policy,
    release_path,
    side_dictionary,
    side_release,
    write_dictionary,
    write_gwas_files,
)
from hipoa.provenance import provenance_json
from hipoa.store import check_store
from hipoa.tables import (
    AREA,
    KEY,
    PRESENT,
    SITE_DTYPES,
    combine_sites,
    created_timestamp,
    eid_column,
    site_columns,
    write_parquet,
)

log = logging.getLogger(__name__)

TRAINING_SPLITS = ("train", "val", "validation")
"""Split labels whose participants count as ``used_in_training`` (validation chose thresholds)."""

def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_table(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    if path.suffix.lower() == ".csv":
        return pd.read_csv(path, dtype={"eid": str}, keep_default_na=False)
    return pd.read_parquet(path)


def training_eids(splits: list[Path]) -> set[str]:
    """Participants (as strings) in a train or validation split of any site.

    Each split table has ``eid`` and ``split`` (or ``subset``) columns; labels are compared
    case-insensitively with :data:`TRAINING_SPLITS`.
    """
    eids: set[str] = set()
    for path in splits:
        t = _read_table(Path(path))
        col = "split" if "split" in t.columns else "subset" if "subset" in t.columns else None
        if "eid" not in t.columns or col is None:
            raise ValueError(f"{path}: a splits table needs columns eid and split, got {list(t.columns)}")
        used = t[col].astype(str).str.lower().isin(TRAINING_SPLITS)
        eids.update(t.loc[used, "eid"].astype(str).str.strip())
    return eids


def gather(
    *,
    manifest: Path,
    predictions: list[Path],
    models: dict[str, Path],
    side: str,
    out: Path,
    splits: list[Path] = (),
    config_hash: str = "",
    masks_dir: Path | None = None,
    mask_stores: list[Path] = (),
    instance_policy: str | int = "first_passing",
) -> pd.DataFrame:
    """Build and write the phenotype tables of one side.

    Args:
        manifest: ``results/manifest/{side}.parquet`` (eid, instance, side, qc_reason, annotated).
        predictions: Per-shard Parquets from :func:`hipoa.predict.predict_shard`.
        models: Site -> ``.keras`` model (for its SHA-256 and its presence rule), in column order.
        side: ``"L"`` or ``"R"``.
        out: ``.../osteophytes_{side}.parquet``; the GWAS files and ``.dict.tsv`` go beside it.
        splits: Split tables (eid, split) of the sites' training, for ``used_in_training``.
        config_hash: Hash of the workflow config, recorded in the metadata.
        masks_dir: When given with ``mask_stores``, write label PNGs there (:func:`write_masks`).
        mask_stores: Predicted-mask Zarrs from ``predict_shard(masks_out=...)``.
        instance_policy: Which instance of a participant the GWAS files hold
            (:data:`hipoa.release.INSTANCE_POLICIES` or an instance number).

    Returns:
        The table written, contract columns and dtypes.

    Raises:
        ValueError: when a manifest image has no prediction (a shard failed or is missing), when
            an image is predicted twice or not in the manifest, or a site's columns are missing.
    """
    out = Path(out)
    if side not in ("L", "R"):
        raise ValueError(f"side must be 'L' or 'R', got {side!r}")
    sites = list(models)
    if not sites:
        raise ValueError("gather: no models given (expected SITE=MODEL.keras)")
    if not predictions:
        raise ValueError("gather: no prediction files given")
    policy = parse_instance_policy(instance_policy)
    manifest_table = _read_table(Path(manifest))  # read once: keys here, covariates below
    man = _read_manifest(manifest_table, Path(manifest), side)
    pred = _read_predictions(predictions, sites, side)
    merged = _merge(man, pred, Path(manifest), side)
    df = _table(merged, sites, training_eids(list(splits)), side)
    metadata = _metadata(sites, models, config_hash, side)
    withdrawn = _withdrawn(Path(manifest))
    metadata["withdrawn_participants"] = withdrawn
    metadata["instance_policy"] = str(policy)
    side_rows = manifest_table[manifest_table["side"].astype(str) == side]
    gwas = side_release(df, side_rows, sites, out.with_suffix(""), policy)
    _write_outputs(df, out, metadata, sites, gwas, masks_dir=masks_dir, mask_stores=list(mask_stores), side=side)
    df.attrs["withdrawn_participants"] = withdrawn
    return df


def _withdrawn(manifest: Path) -> str:
    """Participants ingest removed as withdrawn (the manifest's metadata), "0" when none."""
    import pyarrow.parquet as pq

    if manifest.suffix.lower() != ".parquet":
        return "0"
    meta = pq.read_schema(manifest).metadata or {}
    return meta.get(b"withdrawn_participants", b"0").decode()


def _read_manifest(table: pd.DataFrame, manifest: Path, side: str) -> pd.DataFrame:
    """The manifest ``table``'s rows of ``side`` (``manifest`` names it in errors): keys,
    ``qc_reason``, ``annotated`` and ``_dup`` (repeat number)."""
    man = table
    missing = {"eid", "instance", "side"} - set(man.columns)
    if missing:
        raise ValueError(f"{manifest}: manifest lacks columns {sorted(missing)}")
    man = man[man["side"].astype(str) == side].copy()
    man["eid"] = man["eid"].astype(str).str.strip()
    man["instance"] = man["instance"].astype(np.int16)
    man["side"] = man["side"].astype(str)
    man["qc_reason"] = man["qc_reason"].fillna("").astype(str) if "qc_reason" in man else ""
    man["annotated"] = man["annotated"].fillna(False).astype(bool) if "annotated" in man else False
    # Ingest keeps repeated (eid, instance, side) rows (the later ones flagged duplicate_image);
    # they are told apart by their order, which the shard stores and predictions keep.
    man["_dup"] = man.groupby(KEY, sort=False).cumcount()
    return man


def _read_predictions(predictions: list[Path], sites: list[str], side: str) -> pd.DataFrame:
    """Every per-shard prediction of ``side``, with ``_source`` (its file) and ``_dup``.

    Raises:
        ValueError: naming the file when one is given twice or lacks a column, or an image
            predicted in two files.
    """
    repeated = sorted({str(p) for p in predictions if list(map(str, predictions)).count(str(p)) > 1})
    if repeated:
        raise ValueError(f"prediction files given more than once: {repeated}")
    parts = []
    for p in predictions:
        t = pd.read_parquet(p)
        need = ["eid", "instance", "side", "qc_reason", "reference_length_mm"]
        need += [c for s in sites for c in site_columns(s)]
        lacking = [c for c in need if c not in t.columns]
        if lacking:
            raise ValueError(f"{p}: prediction lacks columns {lacking}")
        parts.append(t[need].assign(_source=str(p)))
    pred = pd.concat(parts, ignore_index=True)
    pred["eid"] = pred["eid"].astype(str).str.strip()
    pred["instance"] = pred["instance"].astype(np.int16)
    pred["side"] = pred["side"].astype(str)
    pred = pred[pred["side"] == side]
    sources = pred.groupby(KEY, sort=False)["_source"].transform("nunique")
    if (sources > 1).any():
        first = pred.loc[sources > 1].iloc[0]
        raise ValueError(
            f"image {first['eid']}_{first['instance']}_{side} predicted more than once "
            f"({sorted(set(pred.loc[sources > 1, '_source']))})"
        )
    pred["_dup"] = pred.groupby(KEY, sort=False).cumcount()
    return pred


def _merge(man: pd.DataFrame, pred: pd.DataFrame, manifest: Path, side: str) -> pd.DataFrame:
    """Manifest rows joined to their predictions, exactly one each (ValueError naming an example)."""
    merged = man[KEY + ["_dup", "qc_reason", "annotated"]].merge(
        pred.rename(columns={"qc_reason": "_pred_reason"}), on=KEY + ["_dup"], how="outer", indicator=True
    )
    not_predicted = merged[merged["_merge"] == "left_only"]
    if len(not_predicted):
        ex = not_predicted.iloc[0]
        raise ValueError(
            f"{len(not_predicted)} of {len(man)} images of side {side} in {manifest} have no prediction "
            f"(a shard failed or is missing), e.g. {ex['eid']}_{ex['instance']}_{side}"
        )
    stale = merged[merged["_merge"] == "right_only"]
    if len(stale):
        ex = stale.iloc[0]
        raise ValueError(
            f"{len(stale)} predicted images are not in {manifest} (stale predictions?), "
            f"e.g. {ex['eid']}_{ex['instance']}_{side} from {ex['_source']}"
        )
    return merged


def _table(merged: pd.DataFrame, sites: list[str], used: set[str], side: str) -> pd.DataFrame:
    """The phenotype table (contract columns and dtypes), sorted by eid, instance, repeat."""
    reason = merged["qc_reason"].fillna("").astype(str)
    reason = reason.where(reason != "", merged["_pred_reason"].fillna("").astype(str))
    site_na = pd.concat([merged[c].isna() for s in sites for c in (f"{s}{PRESENT}", f"{s}{AREA}")], axis=1).any(axis=1)
    # Belt and braces: an image with any NA site is never reported as passing QC.
    reason = reason.where(~((reason == "") & site_na), qc.NOT_MEASURED)
    qc.check_reasons(reason, f"phenotypes {side}")
    df = pd.DataFrame(
        {
            "eid": eid_column(merged["eid"]),
            "instance": merged["instance"].to_numpy(dtype=np.int16),
            "side": pd.array(merged["side"], dtype="string"),
            "qc_pass": (reason == "").to_numpy(dtype=bool),
            "qc_reason": pd.array(reason, dtype="string"),
            "reference_length_mm": merged["reference_length_mm"].to_numpy(dtype=np.float64),
        }
    )
    for s in sites:
        for suffix, dtype in SITE_DTYPES.items():
            df[f"{s}{suffix}"] = merged[f"{s}{suffix}"].astype(dtype).array
    df = combine_sites(df, sites)
    df["annotated"] = merged["annotated"].to_numpy(dtype=bool)
    df["used_in_training"] = merged["eid"].isin(used).to_numpy(dtype=bool)
    df["_dup"] = merged["_dup"].to_numpy()
    return df.sort_values(["eid", "instance", "_dup"]).drop(columns="_dup").reset_index(drop=True)


def _metadata(sites: list[str], models: dict[str, Path], config_hash: str, side: str) -> dict[str, str]:
    """The Parquet's key-value metadata: version, config hash, each model's SHA-256, rule and
    probability calibration (:func:`hipoa.calibration.describe`), time."""
    metadata = {
        "hipoa_version": __version__,
        "config_hash": config_hash,
        "side": side,
        "sites": json.dumps(sites),
    }
    for s in sites:
        metadata[f"model_sha256:{s}"] = sha256_file(Path(models[s]))
        card = read_model_card(Path(models[s]))
        metadata[f"presence_threshold:{s}"] = json.dumps(card.presence.to_dict(), sort_keys=True)
        metadata[f"probability_calibration:{s}"] = json.dumps(
            describe_calibration(card.presence_info.get("calibration")), sort_keys=True)
    metadata["provenance"] = provenance_json()
    metadata["created"] = created_timestamp()
    return metadata


def _write_outputs(
    df: pd.DataFrame, out: Path, metadata: dict[str, str], sites: list[str], gwas: dict[str, pd.DataFrame], *,
    masks_dir: Path | None, mask_stores: list[Path], side: str,
) -> None:
    """Write the Parquet, the GWAS files, the dictionary and (optionally) the mask PNGs.

    Every output is written to a temporary path and all are renamed only once all are complete
    (hipoa.atomic), so a killed job leaves none of them behind.
    """
    with ExitStack() as outputs:
        masks_tmp = None
        if masks_dir is not None and mask_stores:
            for store in mask_stores:  # refuse an incomplete mask store before writing anything
                check_store(store, "predicted-mask store")
            masks_tmp = outputs.enter_context(atomic_path(Path(masks_dir)))
        dict_tmp = outputs.enter_context(atomic_path(out_tsv_path(out, "dict")))
        out_tmp = outputs.enter_context(atomic_path(out))
        write_parquet(df, out_tmp, metadata)
        write_gwas_files(gwas, out.with_suffix(""), outputs)
        write_dictionary(dict_tmp, side_dictionary(df, gwas, sites))
        if masks_tmp is not None:
            write_masks(mask_stores=mask_stores, out_dir=masks_tmp, side=side)


def out_tsv_path(out: Path, kind: str) -> Path:
    """``osteophytes_L.parquet`` -> ``osteophytes_L.{kind}.tsv`` beside it (:func:`hipoa.release.release_path`)."""
    return release_path(Path(out).with_suffix(""), kind)


def _strings(array) -> np.ndarray:
    """A Zarr string array (fixed or variable length) as a NumPy ``str`` array."""
    return np.asarray(array[:]).astype(object).astype(str)


def write_masks(*, mask_stores: list[Path], out_dir: Path, side: str | None = None) -> list[Path]:
    """Write predicted label masks in each original image's space, for visual QC.

    One PNG per image with at least one measured site, ``{out_dir}/{eid}_{instance}_{side}.png``:
    single channel uint8 with a palette (:func:`hipoa.labels.write_label_png`: the values are the
    labels, shown in colour), the stored image's rows x columns and orientation (right hips are
    not mirrored: the patch affines already map to stored-image pixels), 0 background and each
    site's label (from the store's site table) where that site's predicted mask falls, like the
    input masks. A site that could not be measured contributes nothing.

    Args:
        mask_stores: Zarrs written by ``predict_shard(masks_out=...)``.
        out_dir: Directory for the PNGs (e.g. ``results/masks/L``).
        side: Only write images of this side (None: all).

    Returns:
        The PNG paths written, in store and row order. Each PNG appears complete (written to a
        temporary name and renamed); :func:`gather` also writes the whole folder that way.

    Raises:
        FileNotFoundError: naming a mask store that does not exist.
        hipoa.store.StoreError: (a ValueError) naming a mask store that is incomplete (no
            completion marker) or has a chunk missing or truncated.
    """
    import zarr

    out_dir = Path(out_dir)
    for store in mask_stores:  # every store is checked before the first PNG is written
        check_store(store, "predicted-mask store")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for store in mask_stores:
        root = zarr.open_group(str(store), mode="r")
        labels = {name: int(entry["label"]) for name, entry in root.attrs.get("sites", {}).items()}
        r = root["rows"]
        eid, inst, sd = _strings(r["eid"]), r["instance"][:], _strings(r["side"])
        nrows, ncols = r["rows"][:], r["cols"][:]
        # Sites predicted = those of the site table with a group (no group listing: Snakemake puts
        # a .snakemake_timestamp file in directory outputs, which zarr warns about).
        sites = sorted((s for s in labels if s in root), key=lambda s: labels[s])
        if not sites:
            raise ValueError(f"{store}: no predicted sites (site table {sorted(labels)})")
        measured = {s: root[f"{s}/measured"][:] for s in sites}
        affines = {s: root[f"{s}/affine"][:] for s in sites}
        # a shard's uint8 patch masks are small (200 images: 3 MiB per site); read each chunk once
        masks = {s: root[f"{s}/mask"][:] for s in sites}
        idx = [i for i in range(len(eid)) if (side is None or sd[i] == side) and any(measured[s][i] for s in sites)]
        progress = Progress(len(idx), f"masks {Path(store).name}", log, unit="images")
        for i in idx:
            label = np.zeros((int(nrows[i]), int(ncols[i])), dtype=np.uint8)
            for s in sites:
                if not measured[s][i]:
                    continue
                placed = paste_patch_mask(masks[s][i], affines[s][i], label.shape)
                if placed is not None:
                    window, fg = placed
                    label[window][fg] = labels[s]
            path = out_dir / f"{eid[i]}_{int(inst[i])}_{sd[i]}.png"
            with atomic_path(path) as tmp:
                write_label_png(tmp, label)
            written.append(path)
            progress.update()
        progress.close()
    return written


def summary(df: pd.DataFrame, sites: list[str]) -> str:
    """Short human summary: counts, QC failures by reason, prevalence and mean area per site."""
    lines = [
        f"images: {len(df)}  participants: {df['eid'].nunique()}  qc_pass: {int(df['qc_pass'].sum())}"
        f"  annotated: {int(df['annotated'].sum())}  used_in_training: {int(df['used_in_training'].sum())}"
    ]
    if "withdrawn_participants" in df.attrs:
        lines.append(f"withdrawn participants removed at ingest: {df.attrs['withdrawn_participants']}")
    reasons = df.loc[~df["qc_pass"], "qc_reason"].value_counts()
    lines.append("qc failures: " + (", ".join(f"{k}={v}" for k, v in reasons.items()) if len(reasons) else "none"))
    for s in sites + ["any"]:
        p = df[f"{s}{PRESENT}"].dropna()
        a = df.loc[df[f"{s}{PRESENT}"] == 1, f"{s}{AREA}" if s != "any" else "total_area_mm2"]
        prev = f"{100 * p.mean():.1f}%" if len(p) else "n/a"
        mean_area = f"{a.mean():.2f} mm^2" if len(a) else "n/a"
        lines.append(f"{s}: measured {len(p)}, present {int(p.sum())} ({prev}), mean area when present {mean_area}")
    return "\n".join(lines)
