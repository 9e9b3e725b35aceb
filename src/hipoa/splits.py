"""Per-site data splits by participant (Ebsim et al., section 4.1), and finding split rows in patch stores.

Splits (:func:`make_splits`) are by participant and seeded. Training and validation learn from
patches cropped at manual points (the store's ``manual/`` context patches); the test split is
evaluated on patches cropped at automatic points, as the model is used (the paper's test sets).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from hipoa.store import PatchSet, open_patches

log = logging.getLogger(__name__)

KEY = ["eid", "instance", "side"]
SPLITS = ("train", "val", "test", "unused")


# ---- data selection --------------------------------------------------------------------------


def open_site_patches(stores: Sequence[str | Path] | str | Path, site: str, source: str) -> PatchSet:
    """:func:`hipoa.store.open_patches` for one path or several."""
    if isinstance(stores, (str, Path)):
        stores = [stores]
    return open_patches([Path(s) for s in stores], site, source)


def _keys(rows: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "eid": rows["eid"].astype(str).to_numpy(),
            "instance": rows["instance"].astype(np.int64).to_numpy(),
            "side": rows["side"].astype(str).to_numpy(),
        }
    )


def patch_indices(rows: pd.DataFrame, wanted: pd.DataFrame, what: str = "patch store") -> np.ndarray:
    """Positions in ``rows`` (a PatchSet's table) of the ``(eid, instance, side)`` keys of ``wanted``.

    Returns:
        ``(len(wanted),)`` int64 indices, in ``wanted``'s order.

    Raises:
        KeyError: naming the first missing key(s).
    """
    have = _keys(rows)
    have["_pos"] = np.arange(len(have))
    want = _keys(wanted)
    merged = want.merge(have, on=KEY, how="left", validate="many_to_one")
    missing = merged["_pos"].isna()
    if missing.any():
        first = merged.loc[missing, KEY].head(3).to_dict("records")
        raise KeyError(f"{int(missing.sum())} split rows have no patch in the {what}, e.g. {first}")
    return merged["_pos"].to_numpy(np.int64)


def _candidates(stores: Sequence[str | Path], site: str) -> pd.DataFrame:
    """Annotated rows without a qc_reason: keys, ``positive`` and ``has_manual``, sorted by key."""
    rows = open_site_patches(stores, site, "auto").rows
    area_col = f"{site}_true_area_mm2"
    if area_col not in rows:
        raise KeyError(f"patch stores have no column {area_col!r}; is {site!r} one of their sites?")
    qc = rows["qc_reason"].fillna("").astype(str)
    area = rows[area_col].astype(float)
    candidate = rows["annotated"].astype(bool).to_numpy() & (qc == "").to_numpy() & area.notna().to_numpy()
    cand = _keys(rows)[candidate].reset_index(drop=True)
    if cand.empty:
        raise ValueError(f"no annotated images without qc_reason for site {site!r} in {len(rows)} rows of {stores}")
    cand["positive"] = (area[candidate] > 0).to_numpy()
    manual = _keys(open_site_patches(stores, site, "manual").rows)
    manual["has_manual"] = True
    cand = cand.merge(manual.drop_duplicates(KEY), on=KEY, how="left")
    cand["has_manual"] = cand["has_manual"].fillna(False).astype(bool)
    return cand.sort_values(KEY, kind="stable").reset_index(drop=True)


def _participant_splits(
    cand: pd.DataFrame, rng: np.random.Generator, val_fraction: float, test_fraction: float
) -> dict[str, str]:
    """``{eid: split}``: participants with and without a positive image shuffled and cut separately."""
    by_eid = cand.groupby("eid")["positive"].any()
    split_of: dict[str, str] = {}
    for stratum in (True, False):
        eids = np.array(sorted(by_eid.index[by_eid == stratum]))
        eids = eids[rng.permutation(len(eids))]
        n_test = int(round(test_fraction * len(eids)))
        n_val = int(round(val_fraction * len(eids)))
        for i, e in enumerate(eids):
            split_of[e] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return split_of


def _balance(cand: pd.DataFrame, name: str, rng: np.random.Generator, site: str) -> None:
    """In split ``name``, mark images without a manual patch and the larger class's surplus ``unused``."""
    in_split = cand["split"] == name
    cand.loc[in_split & ~cand["has_manual"], "split"] = "unused"
    usable = in_split & cand["has_manual"]
    pos = np.flatnonzero(usable & cand["positive"])
    neg = np.flatnonzero(usable & ~cand["positive"])
    # Balance by sampling the larger class down to the smaller (negatives, in UKB's 10 % prevalence).
    larger, smaller = (neg, pos) if len(neg) >= len(pos) else (pos, neg)
    if len(larger) > len(smaller):
        keep = rng.choice(larger, size=len(smaller), replace=False)
        cand.loc[np.setdiff1d(larger, keep), "split"] = "unused"
        if larger is pos:
            log.warning("%s %s: more positives (%d) than negatives (%d); %d positives unused to balance",
                        site, name, len(pos), len(neg), len(pos) - len(neg))


def make_splits(
    *,
    stores: Sequence[str | Path],
    site: str,
    seed: int,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
) -> pd.DataFrame:
    """Split a site's annotated images into train / val / test by participant.

    Candidates are annotated rows without a ``qc_reason``; positive means
    ``{site}_true_area_mm2 > 0``. Participants (all their images, instances and sides) are
    shuffled with ``seed`` separately among those with and without any positive image (so small
    cohorts still get positives everywhere) and cut into test, val and train by the fractions.
    In train and val, only images with a manual-point patch are usable, and negatives are sampled
    to match the positives (the paper's Table 1; if negatives are the fewer, positives are sampled
    to match them); the rest become ``unused``. The test split keeps
    every candidate image of its participants, with its natural balance, and is evaluated on
    automatic-point patches.

    Args:
        stores: Patch stores (Zarr) of one or more shards and sides.
        site: Site key.
        seed: Seed of the participant shuffle and the negative sampling.
        val_fraction: Fraction of participants for validation.
        test_fraction: Fraction of participants for testing.

    Returns:
        DataFrame with columns ``eid`` (str), ``instance`` (int16), ``side`` (str), ``split``
        (one of ``train``, ``val``, ``test``, ``unused``), ``positive`` (bool), sorted by key.

    Raises:
        ValueError: on bad fractions or when the stores hold no annotated image for the site.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"need 0 <= val, test fractions and val + test < 1, got {val_fraction}, {test_fraction}")
    cand = _candidates(stores, site)
    rng = np.random.default_rng(seed)
    cand["split"] = cand["eid"].map(_participant_splits(cand, rng, val_fraction, test_fraction))
    for name in ("train", "val"):
        _balance(cand, name, rng, site)

    out = cand[KEY + ["split", "positive"]].copy()
    out["instance"] = out["instance"].astype(np.int16)
    counts = out.groupby(["split", "positive"]).size().unstack(fill_value=0)
    log.info("splits for %s (seed %d), images by split x positive:\n%s", site, seed, counts.to_string())
    return out


def write_splits(splits: pd.DataFrame, out: str | Path) -> Path:
    """Write a split table (:func:`make_splits`) as Parquet at ``out``, complete or not at all
    (:func:`hipoa.atomic.atomic_path`); its folder is made."""
    from hipoa.atomic import atomic_path

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        splits.to_parquet(tmp, index=False)
    log.info("%s: %d images of %d participants", out, len(splits), splits["eid"].nunique())
    return out


def describe_counts(splits: pd.DataFrame) -> str:
    """``train N (P positive), val ..., test ...``: the split table's images per split."""
    return ", ".join(f"{k} {v['n']} ({v['positive']} positive)" for k, v in split_counts(splits).items())


def read_splits(splits: str | Path | pd.DataFrame) -> pd.DataFrame:
    """Read a split table (Parquet path or DataFrame) and check its columns."""
    df = splits if isinstance(splits, pd.DataFrame) else pd.read_parquet(splits)
    missing = {*KEY, "split", "positive"} - set(df.columns)
    if missing:
        where = "DataFrame" if isinstance(splits, pd.DataFrame) else str(splits)
        raise ValueError(f"split table {where} lacks columns {sorted(missing)}")
    bad = set(df["split"].unique()) - set(SPLITS)
    if bad:
        raise ValueError(f"split table has unknown split names {sorted(bad)}; expected {SPLITS}")
    return df


def split_counts(splits: pd.DataFrame) -> dict[str, dict[str, int]]:
    """``{split: {"n": images, "positive": positive images}}``."""
    out = {}
    for name in SPLITS:
        s = splits[splits["split"] == name]
        out[name] = {"n": int(len(s)), "positive": int(s["positive"].sum())}
    return out
