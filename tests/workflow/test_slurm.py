"""The whole workflow on a real (throwaway, one-node) SLURM cluster: tests/slurm/run_slurm_demo.sh.

The script installs Debian's SLURM, munge, slurmdbd and MariaDB when missing, starts the
daemons on localhost with two fake GPUs, and runs the demo with the users' command,
`snakemake --profile slurm`, twice: (a) with a generic `slurm` profile in a temporary HOME,
(b) with hipoa's profile installed there by `hipoa install-profile slurm`. It checks in the
accounting database that train_unet, evaluate_unet and predict_masks ran as GPU jobs on the GPU
partition, that the local rules were no SLURM job and that job arrays were used, reruns the
demo with profiles/local and compares the phenotype Parquet files of both SLURM runs with it.
It needs root; it is skipped (with the reason) only where it cannot run at all: not root, not
Debian, or the packages cannot be installed.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "slurm" / "run_slurm_demo.sh"
# Seconds for the whole script; each snakemake run inside has its own, shorter limit.
TIMEOUT_S = int(os.environ.get("HIPOA_SLURM_TEST_TIMEOUT", "3600"))
SNAKEMAKE_TIMEOUT_S = TIMEOUT_S // 2 - 120
# Exit status of the script when the Debian packages are missing and cannot be installed.
EXIT_NO_PACKAGES = 3


def _run(args: list[str], timeout_s: int) -> tuple[int, str]:
    """Run the script; on timeout stop it with SIGTERM so that its trap stops the daemons.

    Args:
        args: Arguments after the script's path.
        timeout_s: Seconds before the script is sent SIGTERM (then SIGKILL 180 s later).

    Returns:
        (exit status, combined stdout and stderr); the status is -15/-9 after a timeout.
    """
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log.error("%s ran past %d s; sending SIGTERM to pid %d", SCRIPT.name, timeout_s, proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        out += f"\n[test] timed out after {timeout_s} s\n"
    return proc.returncode, out


def _skip_reason() -> str | None:
    """Why this machine cannot run the script at all, or None when it can."""
    if os.geteuid() != 0:
        return f"needs root to install and start SLURM daemons (euid {os.geteuid()})"
    if shutil.which("dpkg-query") is None or shutil.which("apt-get") is None:
        return "needs Debian's dpkg-query and apt-get to install SLURM"
    return None


@pytest.mark.slow
def test_demo_on_real_slurm_matches_local_run():
    reason = _skip_reason()
    if reason:
        print(f"skipping the real-SLURM test: {reason}")
        pytest.skip(reason)
    status, out = _run(["--install-only"], timeout_s=900)
    if status == EXIT_NO_PACKAGES:
        reason = "the Debian packages for SLURM cannot be installed:\n" + out[-2000:]
        print(f"skipping the real-SLURM test: {reason}")
        pytest.skip(reason)
    assert status == 0, out

    status, out = _run(["--timeout", str(SNAKEMAKE_TIMEOUT_S)], timeout_s=TIMEOUT_S)
    print(out)  # sbatch lines, job ids, sacct table, Parquet comparison (shown with -s / -rP)
    assert status == 0, out[-12000:]
    assert "PASSED" in out
    for case in ("generic", "installed"):
        # The users' command, as typed, found the profile named slurm in the temporary HOME.
        assert f"snakemake ({case}) in " in out and ": snakemake --profile slurm " in out
        calls = re.search(rf"SBATCH CALLS \({case}\): (\d+) sbatch calls for (\d+) jobs "
                          rf"\((\d+) job arrays holding (\d+) jobs", out)
        assert calls, case
        n_calls, n_jobs, n_arrays, n_tasks = map(int, calls.groups())
        # crop_patches (4 shards) and predict_masks (2 groups) each go as one array at least
        assert n_arrays >= 2 and n_tasks >= 2 * n_arrays and n_calls < n_jobs, calls.group(0)
    # The GPU rules ran as SLURM jobs holding a GPU, on the GPU partition.
    assert out.count("GPU jobs (gres/gpu in AllocTRES, partition gpu): train_unet: ") == 2
    assert "evaluate_unet: " in out and "predict_masks: " in out
    gpu_lines = [line for line in out.splitlines()
                 if re.search(r"\|rule_(train_unet|evaluate_unet|predict_masks)", line)]
    assert gpu_lines and all("gres/gpu=1" in line and "|gpu|" in line for line in gpu_lines)
    assert all("--gpus=1" in line for line in out.splitlines()
               if "sbatch call:" in line and "rule_train_unet" in line)
    assert not [line for line in out.splitlines()
                if re.search(r"\|rule_(show_patches|split_data|report_figures)", line)]
    assert out.count("PARQUET COMPARISON OK") == 2
    # Every daemon the script started was stopped again, by its PID.
    started = re.findall(r"\] started (\w+) \(pid (\d+)\)", out)
    stopped = re.findall(r"\] stopped (\w+) \(pid (\d+)\)", out)
    assert len(started) >= 5 and sorted(started) == sorted(stopped)
