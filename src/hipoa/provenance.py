"""What made an output: the code's commit and the versions of the tools, recorded in its metadata.

:func:`provenance` is written into every Parquet hipoa writes (key ``provenance``, a JSON
object), every model card (section ``provenance``) and the report's QC table, so two releases
can be told apart and a result traced to the code that produced it:

- ``git_commit``: ``git rev-parse HEAD`` of the checkout hipoa runs from, with ``-dirty`` when
  tracked files differ from it; ``none (not a git checkout)`` for an installed package;
  ``HIPOA_GIT_COMMIT`` in the environment overrides both (a container built from a commit);
- ``python``, ``hipoa``, ``tensorflow``, ``keras``, ``snakemake``,
  ``snakemake_executor_plugin_slurm``: the installed versions (``not installed`` when absent),
  read from the package metadata, so nothing heavy is imported.

Light on purpose (standard library only); computed once per process.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from hipoa import __version__

PACKAGES = {
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tf-nightly"),
    "keras": ("keras",),
    "snakemake": ("snakemake",),
    "snakemake_executor_plugin_slurm": ("snakemake-executor-plugin-slurm",),
}
"""Provenance key -> the distributions that provide it (the first installed one counts)."""


def _version(distributions: tuple[str, ...]) -> str:
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def git_commit(path: Path | None = None) -> str:
    """The commit of the checkout holding ``path`` (default: this package), ``-dirty`` if changed."""
    given = os.environ.get("HIPOA_GIT_COMMIT", "").strip()
    if given:
        return given
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return "none (not a git checkout)"
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "none (git not available)"
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


@functools.lru_cache(maxsize=1)
def provenance() -> dict[str, str]:
    """``{git_commit, python, hipoa, tensorflow, keras, snakemake, snakemake_executor_plugin_slurm}``."""
    out = {"git_commit": git_commit(), "python": platform.python_version(), "hipoa": __version__}
    out.update({key: _version(names) for key, names in PACKAGES.items()})
    return out


def provenance_json() -> str:
    """:func:`provenance` as one JSON object (keys sorted), for key-value metadata."""
    return json.dumps(provenance(), sort_keys=True)
