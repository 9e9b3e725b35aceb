"""Outputs that are complete or absent: write to a temporary path beside the output, then rename.

A job killed part-way (``kill -9``, a cluster's time limit, a full disk) must not leave a file at
its output path that looks finished: Snakemake and every later stage would take it as complete.
:func:`atomic_path` hands out a temporary path in the same folder (``name + ".tmp"``, so the
rename is within one file system and atomic), and renames it onto the output only when the
``with`` block finishes without an exception. A stale temporary path from an earlier, interrupted
run is removed first; on an exception the temporary path is removed.

Example::

    with atomic_path(out) as tmp:
        table.to_parquet(tmp)          # out appears only now, complete

Directories (Zarr stores, folders of PNGs) work the same way; a directory already at the output
path is replaced. For Zarr stores see also :func:`hipoa.store.seal_store`, which records which
chunk files a complete store has.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"


def tmp_path_for(path: str | Path, suffix: str = "") -> Path:
    """The temporary path :func:`atomic_path` uses for ``path``: ``name + ".tmp" + suffix`` beside it."""
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX + suffix)


def remove_path(path: str | Path) -> None:
    """Remove a file, link or directory tree at ``path``; nothing when there is none."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_path(path: str | Path, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; rename it onto ``path`` on success.

    Args:
        path: The final output (a file or a directory). Its folder is created.
        suffix: Appended to the temporary name, for writers that insist on an extension
            (Keras saves only to ``*.keras``; ``suffix=".keras"`` gives ``unet.keras.tmp.keras``).

    Yields:
        The temporary path (``name + ".tmp" + suffix`` in ``path``'s folder), which does not
        exist: the caller creates it as a file or a directory.

    Raises:
        FileNotFoundError: naming ``path`` when the block finished without writing the
            temporary path.
        Whatever the block raised, after removing the temporary path.
    """
    path = Path(path)
    tmp = tmp_path_for(path, suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_path(tmp)  # left by an interrupted run
    try:
        yield tmp
        if not (tmp.exists() or tmp.is_symlink()):
            raise FileNotFoundError(f"{path}: nothing was written to its temporary path {tmp}")
        if tmp.is_dir() and not tmp.is_symlink():
            # os.replace cannot replace a non-empty directory: remove the old one first (a crash
            # in between leaves the output absent, never half-written).
            remove_path(path)
        elif path.is_dir() and not path.is_symlink():
            remove_path(path)
        os.replace(tmp, path)
    except BaseException:
        try:
            remove_path(tmp)
        except OSError as exc:  # pragma: no cover - keep the original error
            log.warning("%s: could not remove %s: %s", path, tmp, exc)
        raise


def save_figure(fig, path: str | Path, *, dpi: float | str = "figure") -> Path:
    """Save a matplotlib figure as PNG at ``path``, complete or not at all (:func:`atomic_path`),
    and close it (whether or not the save succeeds). ``dpi``: as ``Figure.savefig``'s."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return path
