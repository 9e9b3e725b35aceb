"""Test-session settings: the suite runs on up to four pytest-xdist workers (``-n auto`` in
pyproject.toml), one test file per worker at a time (``--dist loadfile``, so a module's
fixtures are built once), the longest files first, so that the real-SLURM run does not start
last and set the wall time alone."""

from __future__ import annotations

import os

# The files that take minutes (a real SLURM cluster, the CI-sized rehearsal, whole workflow
# runs): started first; every other file keeps its place.
SLOW_FIRST = ("tests/workflow/test_slurm.py", "tests/workflow/test_rehearsal.py", "tests/workflow/test_workflow.py")


def pytest_xdist_auto_num_workers(config) -> int:
    """At most four workers: each may start TensorFlow and Snakemake, and a 64-core login node
    should not start 64 of them."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


def pytest_collection_modifyitems(session, config, items) -> None:
    def rank(item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return SLOW_FIRST.index(path) if path in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: the order within each file, and of the other files, is kept
