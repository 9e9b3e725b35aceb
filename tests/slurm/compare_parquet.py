"""Compare the phenotype Parquet files of two workflow runs (SLURM run vs local run).

Usage: python tests/slurm/compare_parquet.py RUN_A RUN_B [--glob results/phenotypes/*.parquet]

Every file matching the glob under RUN_A must exist under RUN_B with the same relative path
and vice versa. Tables are compared with ``pandas.testing.assert_frame_equal`` (columns, dtypes,
values, index) and their key-value metadata must be equal except for the key ``created`` (at
the top level of the Parquet key-value metadata, or inside a JSON object stored there), which
holds the time of writing. Exits 1 with the first difference, 0 when all files are equal.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

log = logging.getLogger("compare_parquet")

IGNORED_KEY = "created"


def _strip_created(value: object) -> object:
    """Drop the key ``created`` from a (nested) JSON-like value.

    Args:
        value: A decoded JSON value (dict, list or scalar).

    Returns:
        The same value with every ``created`` key of every nested dict removed.
    """
    if isinstance(value, dict):
        return {k: _strip_created(v) for k, v in value.items() if k != IGNORED_KEY}
    if isinstance(value, list):
        return [_strip_created(v) for v in value]
    return value


def comparable_metadata(path: Path) -> dict[str, object]:
    """Read a Parquet file's key-value metadata without the ``created`` key.

    Args:
        path: Parquet file.

    Returns:
        Mapping key -> value (JSON values decoded) without ``created`` entries; the pandas
        schema entry is left out because assert_frame_equal already compares the frame.
    """
    raw = pq.read_schema(path).metadata or {}
    out: dict[str, object] = {}
    for key_b, value_b in raw.items():
        key = key_b.decode("utf-8", "replace")
        if key in (IGNORED_KEY, "pandas"):
            continue
        text = value_b.decode("utf-8", "replace")
        try:
            out[key] = _strip_created(json.loads(text))
        except json.JSONDecodeError:
            out[key] = text
    return out


def compare_runs(run_a: Path, run_b: Path, pattern: str) -> int:
    """Compare the Parquet files matching ``pattern`` under two run directories.

    Args:
        run_a: First run directory (e.g. the SLURM run).
        run_b: Second run directory (e.g. the local run).
        pattern: Glob relative to the run directories.

    Returns:
        Number of files compared (all equal).

    Raises:
        AssertionError: naming the file and the difference, when anything differs or no
            file matches.
    """
    files_a = sorted(p.relative_to(run_a) for p in run_a.glob(pattern))
    files_b = sorted(p.relative_to(run_b) for p in run_b.glob(pattern))
    if not files_a:
        raise AssertionError(f"no file matches {pattern!r} under {run_a}")
    if files_a != files_b:
        raise AssertionError(
            f"different Parquet files: {run_a}: {[str(f) for f in files_a]} vs "
            f"{run_b}: {[str(f) for f in files_b]}"
        )
    for rel in files_a:
        fa, fb = run_a / rel, run_b / rel
        df_a, df_b = pd.read_parquet(fa), pd.read_parquet(fb)
        try:
            pd.testing.assert_frame_equal(df_a, df_b)
        except AssertionError as exc:
            raise AssertionError(f"{rel}: tables differ: {exc}") from exc
        meta_a, meta_b = comparable_metadata(fa), comparable_metadata(fb)
        if meta_a != meta_b:
            diff = {
                k: (meta_a.get(k), meta_b.get(k))
                for k in sorted(set(meta_a) | set(meta_b))
                if meta_a.get(k) != meta_b.get(k)
            }
            raise AssertionError(
                f"{rel}: the tables are equal but their metadata differs (ignoring "
                f"{IGNORED_KEY!r}), key: (run A, run B): {diff}"
            )
        exact = df_a.equals(df_b)
        log.info(
            "EQUAL %s: %d rows x %d columns, assert_frame_equal passed, "
            "bitwise-equal values: %s, metadata keys compared: %s",
            rel, df_a.shape[0], df_a.shape[1], exact, sorted(meta_a),
        )
    return len(files_a)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--glob", default="results/phenotypes/*.parquet")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)
    try:
        n = compare_runs(args.run_a, args.run_b, args.glob)
    except AssertionError as exc:
        log.error("Parquet comparison failed: %s", exc)
        return 1
    log.info("PARQUET COMPARISON OK: %d file(s) equal between %s and %s", n, args.run_a, args.run_b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
