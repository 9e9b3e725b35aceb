"""The phenotype tables' one definition: columns, dtypes, how sites and hips combine, the writer.

Every table hipoa writes for an analyst is made of these: a side's ``osteophytes_{side}.parquet``
(:mod:`hipoa.phenotypes`, from the per-shard predictions of :mod:`hipoa.predict`) and the
participant table and GWAS files (:mod:`hipoa.release`). Here are the per-site column suffixes and
their nullable dtypes (NA = not measurable), the non-nullable columns, the eid's type, the
combination rules (:func:`kleene_any` for presence, :func:`strict_sum` / :func:`strict_max` for
areas), the dictionary of a side's columns, the ``created`` stamp and the Parquet writer.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from hipoa import qc
from hipoa.atomic import atomic_path
from hipoa.calibration import MIN_CLASS_ISOTONIC

log = logging.getLogger(__name__)

PRESENT = "_present"
AREA = "_area_mm2"
PROBABILITY = "_probability"
N_COMPONENTS = "_n_components"
LARGEST_AREA = "_largest_area_mm2"
SITE_DTYPES = {PRESENT: "Int8", AREA: "Float64", PROBABILITY: "Float32", N_COMPONENTS: "Int16", LARGEST_AREA: "Float64"}
"""Per-site column suffix -> pandas nullable dtype (NA = not measurable)."""

def site_columns(site: str) -> list[str]:
    """The phenotype columns of ``site``: presence, area (mm^2), probability, number of regions and
    the largest region's area (mm^2), in :data:`SITE_DTYPES` order."""
    return [f"{site}{suffix}" for suffix in SITE_DTYPES]


KEY = ["eid", "instance", "side"]
REQUIRED = ("eid", "instance", "side", "qc_pass", "qc_reason", "annotated", "used_in_training")
"""Columns declared non-nullable in the Parquet schema (never missing)."""


_CANONICAL_INT = r"-?[1-9]\d{0,17}|0"


def eid_column(eids: pd.Series) -> pd.Series:
    """``eid`` as int64 when every eid is a canonical integer, else as the strings given (contract).

    UK Biobank's eids are always canonical integers, so every UKB table (an empty one, one with
    every image failed, one side or both) has an int64 eid and joins UK Biobank's main dataset
    on it as it ships (``eid`` read as an integer). Canonical: digits with no leading zero, sign
    or space (``123``, not ``0123`` or ``+123``), so that no two different eids can become one
    number; ``0123`` and ``123`` stay two strings, as any id that is not an integer (a later
    cohort's ``p7``) makes the column a string one.

    Raises:
        ValueError: naming both, if two different eids would still map to one key.
    """
    text = eids.astype(str)
    if text.str.fullmatch(_CANONICAL_INT).all():  # an empty table too: int64 whatever the data
        numbers = text.astype(np.int64)
        pairs = pd.DataFrame({"text": text.to_numpy(), "number": numbers.to_numpy()}).drop_duplicates()
        clash = pairs[pairs.duplicated("number", keep=False)]
        if len(clash):
            raise ValueError(f"eids {sorted(clash['text'])[:2]} would both become {clash['number'].iloc[0]}")
        return numbers
    return pd.Series(pd.array(text, dtype="string"), index=eids.index)


def kleene_any(frame: pd.DataFrame) -> pd.Series:
    """Row-wise "any" in Kleene's three-valued logic: 1 if any column is 1; 0 if every column is
    0; else NA (Int8). The rule of every combined presence (sites of a hip, hips of a person)."""
    one = (frame == 1).any(axis=1).to_numpy()
    unknown = frame.isna().any(axis=1).to_numpy()
    out = pd.array(np.where(one, 1, 0), dtype="Int8")
    out[~one & unknown] = pd.NA
    return pd.Series(out, index=frame.index)


def _strict(frame: pd.DataFrame, how: str) -> pd.Series:
    values = frame.astype("Float64")
    result = values.fillna(0.0).sum(axis=1) if how == "sum" else values.max(axis=1, skipna=True)
    out = pd.array(result.to_numpy(dtype=np.float64), dtype="Float64")
    out[values.isna().any(axis=1).to_numpy()] = pd.NA
    return pd.Series(out, index=frame.index)


def strict_sum(frame: pd.DataFrame) -> pd.Series:
    """Row sum, NA when any value is NA (Float64): an area summed over sites or hips."""
    return _strict(frame, "sum")


def strict_max(frame: pd.DataFrame) -> pd.Series:
    """Row maximum, NA when any value is NA (Float64)."""
    return _strict(frame, "max")


def combine_sites(df: pd.DataFrame, sites: list[str]) -> pd.DataFrame:
    """Add ``any_present`` and ``total_area_mm2`` to a side's table (:func:`kleene_any` of the
    sites' presence, :func:`strict_sum` of their areas)."""
    df["any_present"] = kleene_any(df[[f"{s}{PRESENT}" for s in sites]])
    df["total_area_mm2"] = strict_sum(df[[f"{s}{AREA}" for s in sites]])
    return df


def dictionary_entries(sites: list[str]) -> dict[str, tuple[str, str]]:
    """FIELD -> (DESCRIPTION, UNITS) of every column of a side's Parquet."""
    return {field: (description, units) for field, description, units in _dictionary(sites)}


def _dictionary(sites: list[str]) -> list[tuple[str, str, str]]:
    """(FIELD, DESCRIPTION, UNITS) of every Parquet column, in column order."""
    rows = [
        ("eid", "UK Biobank participant ID (string when some IDs are not numeric)", ""),
        ("instance", "UK Biobank assessment visit instance of the scan", ""),
        ("side", "hip: L (left) or R (right)", ""),
        ("qc_pass", "true when every site could be measured", ""),
        ("qc_reason", "empty when qc_pass; else the first reason the image could not be fully measured, one of: "
         + "; ".join(f"{k} ({v})" for k, v in qc.REASONS.items()), ""),
        ("reference_length_mm", "distance between the two reference points of the automatic outline", "mm"),
    ]
    for s in sites:
        rows += [
            (f"{s}{PRESENT}", f"{s}: osteophyte predicted present (1) or absent (0); NA not measurable", ""),
            (f"{s}{AREA}", f"{s}: predicted osteophyte area; 0 when absent; NA not measurable", "mm^2"),
            (
                f"{s}{PROBABILITY}",
                f"{s}: calibrated probability that an osteophyte is present: the presence rule's score (the "
                "probability its min_area_px most confident pixels reach) mapped by isotonic regression fitted "
                f"on the validation split (Platt scaling when it has fewer than {MIN_CLASS_ISOTONIC} images of a "
                "class; the raw score when that map does not beat it left out one image at a time), shifted from "
                "the validation split's prevalence to the cohort's estimated prevalence; the "
                "raw score for an uncalibrated model (see probability_calibration in the Parquet metadata); "
                "NA not measurable",
                "",
            ),
            (f"{s}{N_COMPONENTS}", f"{s}: number of separate predicted osteophyte regions (8-connected) in the "
             "patch; 0 when absent; NA not measurable", ""),
            (f"{s}{LARGEST_AREA}", f"{s}: area of the largest predicted osteophyte region; 0 when absent; "
             "NA not measurable", "mm^2"),
        ]
    rows += [
        ("any_present", "1 if any site present; 0 if all sites 0; NA if none is 1 and any is NA", ""),
        ("total_area_mm2", "sum of the site areas; NA if any site is NA", "mm^2"),
        ("annotated", "the image has a manual osteophyte mask", ""),
        ("used_in_training", "participant is in a train or validation split of any site's U-Net", ""),
    ]
    return rows


def created_timestamp() -> str:
    """``created`` of the metadata: now (UTC, seconds), or ``SOURCE_DATE_EPOCH`` when set.

    ``SOURCE_DATE_EPOCH`` (seconds since 1970, the reproducible-builds convention) makes two
    runs on the same inputs write byte-identical Parquets.

    Raises:
        ValueError: when ``SOURCE_DATE_EPOCH`` is set but not a whole number of seconds.
    """
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if epoch:
        try:
            when = _dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc)
        except (ValueError, OverflowError, OSError):
            raise ValueError(f"SOURCE_DATE_EPOCH must be whole seconds since 1970, got {epoch!r}") from None
    else:
        when = _dt.datetime.now(_dt.timezone.utc)
    return when.replace(microsecond=0).isoformat()


def write_parquet(df: pd.DataFrame, out: Path, metadata: dict[str, str]) -> None:
    """Write ``df`` with ``metadata`` merged into the Arrow schema's key-value metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    fields = []
    for f in table.schema:
        # pandas' string dtype arrives as large_string; plain string is what every reader expects.
        if pa.types.is_large_string(f.type):
            f = f.with_type(pa.string())
        if f.name in REQUIRED:
            if table.column(f.name).null_count:
                raise ValueError(f"{out}: column {f.name} has {table.column(f.name).null_count} missing values")
            f = f.with_nullable(False)
        fields.append(f)
    table = table.cast(pa.schema(fields, metadata=table.schema.metadata))
    meta = dict(table.schema.metadata or {})
    meta.update({k.encode(): str(v).encode() for k, v in metadata.items()})
    with atomic_path(out) as tmp:
        pq.write_table(table.replace_schema_metadata(meta), tmp)
    log.info("%s: %d rows, %d columns", out, len(df), df.shape[1])
