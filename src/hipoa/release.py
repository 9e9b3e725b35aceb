"""The GWAS release: the files a genetic analyst hands to plink2 and regenie without writing a line.

For each side (beside ``osteophytes_{side}.parquet``) and for the participant table
``osteophytes.parquet`` (both sides side by side, :func:`participant_table`), with ``STEM`` the
Parquet's name without ``.parquet``:

- ``STEM.bt.tsv``: ``FID IID`` and the binary traits (presence), ``0``/``1``/``NA``: regenie
  ``--bt`` reads every column of a phenotype file as binary, so nothing else is in it.
- ``STEM.qt.tsv``: ``FID IID`` and the quantitative traits: each area in mm² and its rank-based
  inverse-normal transform (``_rint``, :func:`rank_inverse_normal`).
- ``STEM.covar.tsv``: ``FID IID``, the imaging instance, reference lengths, pixel spacing, image
  size, the number of sides measured, and the scanner and software identifiers from the DICOM
  header (device data, never a person's). Text values have their whitespace replaced by ``_``;
  these categorical columns are never ``NA``: an unknown value is ``NONE`` (:data:`MISSING_CATEGORY`).
- ``STEM.remove.txt``: ``FID IID`` (no header) of the participants in a train or validation
  split, for ``--remove``: their phenotypes were seen by the models.
- ``STEM.dict.tsv`` (participant table only; the per-side one is written by
  :mod:`hipoa.phenotypes`): ``FIELD FILES TYPE DESCRIPTION UNITS`` for every column of every
  file above.

One line per participant (GWAS tools need unique IIDs), at the instance the policy chooses
(:func:`choose_instances`), recorded in the covariates. FID = IID = eid. ``NA`` marks a missing
value everywhere but in the categorical covariates (``NONE``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import ndtri

from hipoa import qc
from hipoa.atomic import atomic_path
from hipoa.tables import (
    AREA,
    PRESENT,
    created_timestamp,
    dictionary_entries,
    eid_column,
    kleene_any,
    strict_max,
    strict_sum,
    write_parquet,
)

log = logging.getLogger(__name__)

RINT = "_rint"
INSTANCE_POLICIES = ("first_passing", "first")
"""``first_passing``: each participant's lowest instance that passes QC (any side for the
participant table), else the lowest; ``first``: the lowest instance. An integer instead keeps
only that instance (participants without it are left out)."""
# Scanner and software identifiers copied from the manifest (DICOM header) into the covariates,
# each written with a prefix that begins with a letter, so that plink2 and regenie read them as
# categories (plink2 takes an all-digit serial number for a quantity, and refuses a value such as
# "12.30.008" that starts like a number).
DEVICE_COLUMNS = ("manufacturer", "manufacturer_model", "device_serial", "software_versions")
DEVICE_PREFIX = {"manufacturer": "maker_", "manufacturer_model": "model_", "device_serial": "serial_",
                 "software_versions": "software_"}
BLOM_OFFSET = 3.0 / 8.0


def rank_inverse_normal(values: pd.Series) -> pd.Series:
    """Rank-based inverse-normal transform of the values that are not NA (NA stays NA).

    ``z = Phi^-1((r - 3/8) / (n + 1/4))`` (Blom), ``r`` the rank among the ``n`` non-NA values,
    ties sharing their mean rank, so the many zero areas of people without osteophytes all get
    one value (the lowest) and the rest spread above it.
    """
    values = pd.Series(values, dtype="Float64")
    known = values.notna().to_numpy()
    out = pd.array(np.full(len(values), np.nan), dtype="Float64")
    n = int(known.sum())
    if n:
        ranks = values[known].rank(method="average").to_numpy(dtype=np.float64)
        out[known] = ndtri((ranks - BLOM_OFFSET) / (n + 1.0 - 2.0 * BLOM_OFFSET))
    out[~known] = pd.NA
    return pd.Series(out, index=values.index)


def parse_instance_policy(policy: str | int) -> str | int:
    """``first_passing``, ``first`` or an instance number >= 0 (ValueError naming the choices)."""
    if isinstance(policy, bool):
        raise ValueError(f"instance policy {policy!r}: use one of {', '.join(INSTANCE_POLICIES)} or an instance number")
    if isinstance(policy, int) and policy >= 0 or isinstance(policy, str) and policy.strip().isdigit():
        return int(policy)
    if policy in INSTANCE_POLICIES:
        return str(policy)
    raise ValueError(f"instance policy {policy!r}: use one of {', '.join(INSTANCE_POLICIES)} or an instance number")


def choose_instances(df: pd.DataFrame, policy: str | int, passing: pd.Series) -> pd.DataFrame:
    """One row per eid, chosen by ``policy`` (see :data:`INSTANCE_POLICIES`).

    Args:
        df: Rows of (eid, instance), possibly several per eid.
        policy: ``first_passing``, ``first`` or an instance number.
        passing: Boolean per row of ``df``: the row counts as passing QC.
    """
    policy = parse_instance_policy(policy)
    order = df.assign(_fail=~passing.to_numpy(dtype=bool))
    if isinstance(policy, int):
        order = order[order["instance"] == policy]
    # Within an instance a repeated image that passes QC goes first, whatever the policy.
    keys = ["eid", "_fail", "instance"] if policy == "first_passing" else ["eid", "instance", "_fail"]
    order = order.sort_values(keys, kind="stable")
    return order.drop_duplicates("eid", keep="first").drop(columns="_fail")


def _ids(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """``FID`` and ``IID`` (= eid), refusing an eid that would break whitespace-separated files."""
    eid = df["eid"].astype(str)
    bad = eid[~eid.str.fullmatch(r"[^\s#]\S*")]
    if len(bad):
        raise ValueError(f"{path}: eid {bad.iloc[0]!r} would break the whitespace-separated FID/IID columns")
    if eid.duplicated().any():
        rows = np.flatnonzero(eid.duplicated(keep=False).to_numpy())[:2].tolist()
        raise ValueError(f"{path}: rows {rows} hold one eid twice")  # rows, not the eid: logs name no participant
    return pd.DataFrame({"FID": eid.to_numpy(), "IID": eid.to_numpy()})


def _write_tsv(table: pd.DataFrame, path: Path, *, header: bool = True) -> None:
    """Write ``table`` as tab-separated text, NA as ``NA`` (callers give a temporary path)."""
    table.to_csv(path, sep="\t", index=False, header=header, na_rep="NA", lineterminator="\n")


MISSING_CATEGORY = "NONE"
"""The level of a categorical covariate whose value is unknown (no readable image, or the tag
absent). Never ``NA``: plink2 refuses NA in a categorical column, and reads ``NONE`` as missing
(its ``--missing-catname`` default); regenie takes it as one more level."""


def text_covariate(values: pd.Series, prefix: str = "") -> pd.Series:
    """Text as one whitespace-free token after ``prefix`` (:data:`MISSING_CATEGORY` when missing
    or empty), so TSV columns never shift and a categorical value never reads as a number."""
    text = pd.Series(values, dtype="string").str.strip()
    text = text.str.replace(r"\s+", "_", regex=True)
    return (prefix + text).mask(text.isna() | (text == ""), MISSING_CATEGORY)


def gwas_tables(
    one: pd.DataFrame, binary: list[str], quantitative: list[str], covariates: list[str], path_stem: Path
) -> dict[str, pd.DataFrame]:
    """The bt, qt, covar and remove tables of one-row-per-participant ``one``."""
    ids = _ids(one, path_stem)
    one = one.reset_index(drop=True)
    bt = pd.concat([ids, one[binary].astype("Int8")], axis=1)
    qt_columns = {}
    for column in quantitative:
        qt_columns[column] = one[column].astype("Float64")
        qt_columns[f"{column}{RINT}"] = rank_inverse_normal(one[column])
    qt = pd.concat([ids, pd.DataFrame(qt_columns)], axis=1)
    covar = {}
    for column in covariates:
        values = one[column]
        if column in DEVICE_COLUMNS or pd.api.types.is_string_dtype(values.dtype) and column != "eid":
            covar[column] = text_covariate(values, DEVICE_PREFIX.get(column, ""))
        else:
            covar[column] = values
    covar = pd.concat([ids, pd.DataFrame(covar)], axis=1)
    remove = ids[one["used_in_training"].fillna(False).to_numpy(dtype=bool)]
    return {"bt": bt, "qt": qt, "covar": covar, "remove": remove}


def release_path(stem: Path, kind: str) -> Path:
    """``results/phenotypes/osteophytes_L`` + ``bt`` -> ``.../osteophytes_L.bt.tsv`` (``remove``: ``.txt``)."""
    stem = Path(stem)
    return stem.with_name(f"{stem.name}.{kind}.txt" if kind == "remove" else f"{stem.name}.{kind}.tsv")


def write_gwas_files(tables: dict[str, pd.DataFrame], stem: Path, stack: ExitStack) -> None:
    """Write the tables of :func:`gwas_tables` beside ``stem``, each renamed into place only when
    the whole ``stack`` of outputs succeeds."""
    for kind, table in tables.items():
        tmp = stack.enter_context(atomic_path(release_path(stem, kind)))
        _write_tsv(table, tmp, header=kind != "remove")
    log.info("%s.{bt,qt,covar}.tsv: %d participants (%d to --remove)", stem, len(tables["bt"]), len(tables["remove"]))


# ---- per side ----------------------------------------------------------------------------------


def side_covariates(table: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """``table`` (one side's phenotypes) with the image's size, spacing and device columns of its
    manifest row (first row of each eid, instance, side)."""
    wanted = ["rows", "cols", "spacing_row_mm", *DEVICE_COLUMNS]
    out = table.copy()
    man = manifest.copy()
    for column in wanted:
        if column not in man.columns:
            man[column] = pd.NA
    man["eid"] = man["eid"].astype(str).str.strip()
    man["instance"] = man["instance"].astype(np.int16)
    man = man.drop_duplicates(["eid", "instance", "side"], keep="first")[["eid", "instance", "side", *wanted]]
    key = out["eid"].astype(str)
    merged = pd.DataFrame({"eid": key, "instance": out["instance"].astype(np.int16), "side": out["side"].astype(str)})
    merged = merged.merge(man.astype({"side": str}), on=["eid", "instance", "side"], how="left")
    for column in wanted:
        out[column] = merged[column].to_numpy()
    out["spacing_mm"] = pd.array(pd.to_numeric(merged["spacing_row_mm"], errors="coerce"), dtype="Float64")
    out["rows"] = pd.array(pd.to_numeric(merged["rows"], errors="coerce"), dtype="Int32")
    out["cols"] = pd.array(pd.to_numeric(merged["cols"], errors="coerce"), dtype="Int32")
    return out.drop(columns=["spacing_row_mm"])


def side_traits(sites: list[str]) -> tuple[list[str], list[str]]:
    """(binary, quantitative) columns of one side's GWAS files."""
    binary = [f"{s}{PRESENT}" for s in sites] + ["any_present"]
    quantitative = [f"{s}{AREA}" for s in sites] + ["total_area_mm2"]
    return binary, quantitative


SIDE_COVARIATES = ["instance", "reference_length_mm", "spacing_mm", "rows", "cols", *DEVICE_COLUMNS]


def side_release(
    table: pd.DataFrame, manifest: pd.DataFrame, sites: list[str], stem: Path, policy: str | int = "first_passing"
) -> dict[str, pd.DataFrame]:
    """The GWAS tables of one side's phenotype table (one line per participant)."""
    with_covariates = side_covariates(table, manifest)
    one = choose_instances(with_covariates, policy, with_covariates["qc_pass"])
    if len(one) < len(table):
        log.info("%s: %d images -> %d participants (instance policy %s)", stem, len(table), len(one), policy)
    binary, quantitative = side_traits(sites)
    return gwas_tables(one, binary, quantitative, SIDE_COVARIATES, stem)


# ---- both sides ----------------------------------------------------------------------------------

SIDE_FIELDS_SKIPPED = ("eid", "instance", "side")


def _collapse(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (eid, instance) of one side: a repeated image keeps its row that passes QC."""
    order = table.assign(_fail=~table["qc_pass"].to_numpy(dtype=bool)).sort_values(
        ["eid", "instance", "_fail"], kind="stable"
    )
    return order.drop_duplicates(["eid", "instance"], keep="first").drop(columns="_fail")


def participant_table(tables: dict[str, pd.DataFrame], sites: list[str]) -> pd.DataFrame:
    """Both sides side by side: one row per (eid, instance) imaged on any side.

    Every column of a side's table (but the keys) appears with the suffix ``_L`` or ``_R``; a
    side without an image at that visit is NA throughout (``qc_pass_{side}`` too). Combined:

    - ``{site}_present_any``: 1 if the site is present on any side, 0 if it is measured absent
      on every side, else NA; ``any_present``: the same over every site and side.
    - ``{site}_area_sum_mm2`` and ``{site}_area_max_mm2``: sum and larger of the sides' areas;
      NA unless every side is measured (a sum over one hip is not comparable with one over two).
      ``total_area_mm2``: the sum over sites and sides, NA unless all are measured.
    - ``n_sides_measured``: sides that pass QC; ``annotated`` / ``used_in_training``: on any side.
    """
    if not tables:
        raise ValueError("participant table: no side tables given")
    sides = sorted(tables)
    wide = None
    for side in sides:
        part = _collapse(tables[side].copy())
        part["eid"] = part["eid"].astype(str)
        renamed = {c: f"{c}_{side}" for c in part.columns if c not in SIDE_FIELDS_SKIPPED}
        part = part.drop(columns=["side"]).rename(columns=renamed)
        wide = part if wide is None else wide.merge(part, on=["eid", "instance"], how="outer")
    wide = wide.sort_values(["eid", "instance"], kind="stable").reset_index(drop=True)
    for side in sides:
        wide[f"qc_pass_{side}"] = pd.array(wide[f"qc_pass_{side}"], dtype="boolean")
        for flag in ("annotated", "used_in_training"):
            wide[f"{flag}_{side}"] = pd.array(wide[f"{flag}_{side}"], dtype="boolean")
    for s in sites:
        wide[f"{s}{PRESENT}_any"] = kleene_any(wide[[f"{s}{PRESENT}_{side}" for side in sides]])
        areas = wide[[f"{s}{AREA}_{side}" for side in sides]]
        wide[f"{s}_area_sum_mm2"] = strict_sum(areas)
        wide[f"{s}_area_max_mm2"] = strict_max(areas)
    wide["any_present"] = kleene_any(wide[[f"{s}{PRESENT}_{side}" for s in sites for side in sides]])
    wide["total_area_mm2"] = strict_sum(wide[[f"{s}_area_sum_mm2" for s in sites]])
    wide["n_sides_measured"] = pd.array(
        sum(wide[f"qc_pass_{side}"].fillna(False).to_numpy(dtype=np.int8) for side in sides), dtype="Int8"
    )
    wide["annotated"] = np.logical_or.reduce([wide[f"annotated_{side}"].fillna(False).to_numpy(dtype=bool) for side in sides])
    wide["used_in_training"] = np.logical_or.reduce(
        [wide[f"used_in_training_{side}"].fillna(False).to_numpy(dtype=bool) for side in sides]
    )
    wide["eid"] = eid_column(wide["eid"])
    return wide


def participant_traits(sites: list[str], sides: list[str]) -> tuple[list[str], list[str]]:
    """(binary, quantitative) columns of the participant GWAS files."""
    binary = [f"{s}{PRESENT}_{side}" for s in sites for side in sides]
    binary += [f"{s}{PRESENT}_any" for s in sites] + ["any_present"]
    quantitative = [f"{s}{AREA}_{side}" for s in sites for side in sides]
    quantitative += [f"{s}_area_{how}_mm2" for s in sites for how in ("sum", "max")] + ["total_area_mm2"]
    return binary, quantitative


def participant_covariates(wide: pd.DataFrame, covariates: dict[str, pd.DataFrame], sides: list[str]) -> pd.DataFrame:
    """``wide`` with per side the covariates of :func:`side_covariates` (suffixed) and the device
    columns once (the first side's value that is known)."""
    out = wide.copy()
    key = out["eid"].astype(str) + "\t" + out["instance"].astype(str)
    for side in sides:
        cov = _collapse(covariates[side])
        cov_key = cov["eid"].astype(str) + "\t" + cov["instance"].astype(str)
        cov = cov.set_index(cov_key)
        for column in ("spacing_mm", "rows", "cols"):
            out[f"{column}_{side}"] = cov[column].reindex(key).to_numpy()
        for column in DEVICE_COLUMNS:
            values = pd.Series(cov[column].reindex(key).to_numpy(), index=out.index, dtype="string")
            out[column] = values if column not in out else out[column].fillna(values)
    # One reference length for traits of both hips: the mean over the hips that pass QC.
    lengths = pd.concat(
        [out[f"reference_length_mm_{side}"].astype("Float64").where(out[f"qc_pass_{side}"].fillna(False))
         for side in sides], axis=1)
    out["reference_length_mm"] = lengths.mean(axis=1, skipna=True).astype("Float64")
    for side in sides:
        out[f"spacing_mm_{side}"] = pd.array(out[f"spacing_mm_{side}"], dtype="Float64")
        out[f"rows_{side}"] = pd.array(out[f"rows_{side}"], dtype="Int32")
        out[f"cols_{side}"] = pd.array(out[f"cols_{side}"], dtype="Int32")
    return out


def participant_covariate_columns(sides: list[str]) -> list[str]:
    per_side = [f"{c}_{side}" for side in sides for c in ("reference_length_mm", "spacing_mm", "rows", "cols")]
    return ["instance", "n_sides_measured", "reference_length_mm", *per_side, *DEVICE_COLUMNS]


def release_both_sides(
    *,
    phenotypes: dict[str, Path],
    manifests: dict[str, Path],
    out: Path,
    policy: str | int = "first_passing",
) -> pd.DataFrame:
    """Write the participant table ``out`` (``osteophytes.parquet``) and its GWAS files.

    Args:
        phenotypes: Side -> ``osteophytes_{side}.parquet``.
        manifests: Side -> ``results/manifest/{side}.parquet`` (image size, spacing, device).
        out: The participant table; the TSVs and the dictionary go beside it.
        policy: Instance policy of the GWAS files (:data:`INSTANCE_POLICIES` or a number).

    Returns:
        The participant table written.
    """
    import pyarrow.parquet as pq

    policy = parse_instance_policy(policy)
    if len(phenotypes) == 1:
        log.warning("participant table of one side only (%s): its combined traits are that hip's; run "
                    "`hipoa release` with both sides' tables for the two-hip traits", ", ".join(phenotypes))
    if sorted(phenotypes) != sorted(manifests):
        raise ValueError(f"sides of --phenotypes {sorted(phenotypes)} and --manifests {sorted(manifests)} differ")
    sides = sorted(phenotypes)
    tables, covariates, metadata = {}, {}, {}
    sites = None
    for side in sides:
        path = Path(phenotypes[side])
        table = pd.read_parquet(path)
        meta = {k.decode(): v.decode() for k, v in (pq.read_schema(path).metadata or {}).items()}
        these = [c[: -len(PRESENT)] for c in table.columns if c.endswith(PRESENT) and c != "any_present"]
        if sites is not None and these != sites:
            raise ValueError(f"{path}: sites {these} differ from the other side's {sites}")
        sites = these
        if set(table["side"].astype(str)) - {side}:
            raise ValueError(f"{path}: holds rows of side(s) {sorted(set(table['side'].astype(str)) - {side})}, not only {side}")
        tables[side] = table
        covariates[side] = side_covariates(table, pd.read_parquet(manifests[side]))
        for key in ("hipoa_version", "config_hash", "sites", "withdrawn_participants"):
            if key in meta:
                metadata[f"{key}:{side}" if key == "withdrawn_participants" else key] = meta[key]
        for key, value in meta.items():
            if key.startswith(("model_sha256:", "presence_threshold:", "probability_calibration:")):
                metadata[key] = value
    wide = participant_covariates(participant_table(tables, sites), covariates, sides)
    qc.check_reasons(
        pd.concat([wide[f"qc_reason_{side}"].dropna() for side in sides]).astype(str), "participant table"
    )
    from hipoa.provenance import provenance_json

    metadata.update({"sides": ",".join(sides), "instance_policy": str(policy), "provenance": provenance_json(),
                     "created": created_timestamp()})
    passing = wide["n_sides_measured"].fillna(0).to_numpy() > 0
    one = choose_instances(wide, policy, pd.Series(passing, index=wide.index))
    binary, quantitative = participant_traits(sites, sides)
    stem = Path(out).with_suffix("")
    gwas = gwas_tables(one, binary, quantitative, participant_covariate_columns(sides), stem)
    table = wide.drop(columns=[c for c in wide.columns if c.startswith(("spacing_mm_", "rows_", "cols_"))]
                      + ["reference_length_mm", *DEVICE_COLUMNS])
    with ExitStack() as stack:
        out_tmp = stack.enter_context(atomic_path(Path(out)))
        write_parquet(table, out_tmp, metadata)
        write_gwas_files(gwas, stem, stack)
        dict_tmp = stack.enter_context(atomic_path(release_path(stem, "dict")))
        write_dictionary(dict_tmp, participant_dictionary(table, gwas, sites, sides))
    return table


# ---- dictionaries ------------------------------------------------------------------------------


_CAT = f"categorical, {MISSING_CATEGORY} when unknown (plink2 reads {MISSING_CATEGORY} as missing)"


def covariate_descriptions() -> dict[str, tuple[str, str]]:
    """Description and units of the covariates (without a side suffix)."""
    return {
        "instance": ("UK Biobank imaging instance (visit) of the phenotypes on this line (instance policy)", ""),
        "n_sides_measured": ("hips of this participant and instance that pass QC", ""),
        "reference_length_mm": ("distance between the reference points of the automatic outline", "mm"),
        "spacing_mm": ("pixel spacing of the image (rows), from PixelSpacing, ImagerPixelSpacing or ExposedArea", "mm"),
        "rows": ("image rows (DICOM Rows)", "pixels"),
        "cols": ("image columns (DICOM Columns)", "pixels"),
        "manufacturer": (f"scanner manufacturer, DICOM (0008,0070), as maker_VALUE (whitespace as _): {_CAT}", ""),
        "manufacturer_model": (f"scanner model, DICOM (0008,1090), as model_VALUE (whitespace as _): {_CAT}", ""),
        "device_serial": (f"scanner serial number, DICOM (0018,1000), as serial_VALUE: {_CAT}", ""),
        "software_versions": ("scanner software versions, DICOM (0018,1020), values joined by \\, as "
                              f"software_VALUE (whitespace as _): {_CAT}", ""),
    }


def dictionary_rows(fields: Iterable[tuple[str, str, str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(list(fields), columns=["FIELD", "FILES", "TYPE", "DESCRIPTION", "UNITS"])


def write_dictionary(path: Path, table: pd.DataFrame) -> None:
    """Write a dictionary of :func:`dictionary_rows` (callers give a temporary path)."""
    table.to_csv(path, sep="\t", index=False, lineterminator="\n")


def _gwas_file_rows(gwas: dict[str, pd.DataFrame], describe) -> list[tuple[str, str, str, str, str]]:
    """Rows for the columns of the bt, qt and covar files (FID and IID once)."""
    rows = [
        ("FID", "bt,qt,covar,remove", "string", "family ID = the UK Biobank eid", ""),
        ("IID", "bt,qt,covar,remove", "string", "individual ID = the UK Biobank eid", ""),
    ]
    for kind in ("bt", "qt", "covar"):
        for column in gwas[kind].columns[2:]:
            categorical = kind == "covar" and pd.api.types.is_string_dtype(gwas[kind][column].dtype)
            rows.append((column, kind, "categorical" if categorical else str(gwas[kind][column].dtype),
                         *describe(column)))
    return rows


def categorical_covariates(covar: pd.DataFrame) -> list[str]:
    """The covariate file's categorical columns (text; ``TYPE categorical`` in the ``.dict.tsv``):
    the ones to pass to regenie's ``--catCovarList`` when the whole file is used."""
    return [c for c in covar.columns[2:] if pd.api.types.is_string_dtype(covar[c].dtype)]


def describe_gwas_column(column: str, parquet_descriptions: dict[str, tuple[str, str]]) -> tuple[str, str]:
    """Description and units of a GWAS file column from the Parquet's and the covariates'."""
    if column.endswith(RINT):
        base = column[: -len(RINT)]
        return (f"rank-based inverse-normal transform of {base} among the participants of this file with it "
                "measured, those in the .remove.txt included (Blom: Phi^-1((rank - 3/8) / (n + 1/4)), ties "
                "share their mean rank)", "")
    if column in parquet_descriptions:
        return parquet_descriptions[column]
    covariates = covariate_descriptions()
    match = re.fullmatch(r"(.+)_([LR])", column)
    if match and match.group(1) in covariates:
        description, units = covariates[match.group(1)]
        return f"{description}; {'left' if match.group(2) == 'L' else 'right'} hip", units
    if column in covariates:
        return covariates[column]
    raise ValueError(f"no dictionary entry for {column!r}")


def participant_dictionary(table: pd.DataFrame, gwas: dict[str, pd.DataFrame], sites: list[str],
                           sides: list[str]) -> pd.DataFrame:
    """``FIELD FILES TYPE DESCRIPTION UNITS`` of the participant table and its GWAS files."""
    per_side = dictionary_entries(sites)
    descriptions: dict[str, tuple[str, str]] = {}
    for column in table.columns:
        match = re.fullmatch(r"(.+)_([LR])", column)
        if match and match.group(1) in per_side:
            description, units = per_side[match.group(1)]
            hip = "left" if match.group(2) == "L" else "right"
            descriptions[column] = (f"{hip} hip: {description}; NA when that hip has no image at this visit", units)
    for s in sites:
        descriptions[f"{s}{PRESENT}_any"] = (
            f"{s}: 1 if present on any hip, 0 if measured absent on every hip ({', '.join(sides)}), else NA", "")
        descriptions[f"{s}_area_sum_mm2"] = (f"{s}: sum of the hips' areas; NA unless every hip is measured", "mm^2")
        descriptions[f"{s}_area_max_mm2"] = (f"{s}: larger of the hips' areas; NA unless every hip is measured", "mm^2")
    descriptions.update({
        "eid": per_side["eid"],
        "instance": per_side["instance"],
        "any_present": ("1 if any site is present on any hip; 0 if every site is measured absent on every hip; "
                        "else NA", ""),
        "total_area_mm2": ("sum of every site's area over every hip; NA unless all are measured", "mm^2"),
        "n_sides_measured": covariate_descriptions()["n_sides_measured"],
        "reference_length_mm": ("mean reference length of the hips that pass QC (one covariate for traits "
                                "of both hips)", "mm"),
        "annotated": ("a hip of this participant and instance has a manual osteophyte mask", ""),
        "used_in_training": ("participant is in a train or validation split of any site's U-Net (listed in "
                             "osteophytes.remove.txt)", ""),
    })
    return _dictionary(table, gwas, descriptions)


def side_dictionary(table: pd.DataFrame, gwas: dict[str, pd.DataFrame], sites: list[str]) -> pd.DataFrame:
    """``FIELD FILES TYPE DESCRIPTION UNITS`` of one side's Parquet and its GWAS files."""
    return _dictionary(table, gwas, dictionary_entries(sites))


def _dictionary(table: pd.DataFrame, gwas: dict[str, pd.DataFrame],
                descriptions: dict[str, tuple[str, str]]) -> pd.DataFrame:
    """The rows of the Parquet's columns (``descriptions``), then those of the GWAS files."""
    missing = [c for c in table.columns if c not in descriptions]
    if missing:
        raise ValueError(f"no dictionary entry for columns {missing}")
    rows = [(c, "parquet", str(table[c].dtype), *descriptions[c]) for c in table.columns]
    rows += _gwas_file_rows(gwas, lambda c: describe_gwas_column(c, descriptions))
    return dictionary_rows(rows)
