"""`hipoa install-profile`: hipoa's profiles copied where Snakemake looks a name up, never over one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hipoa.profiles import PROFILES, install_profile, user_profile_root

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", PROFILES)
def test_installed_profile_is_the_checkouts(tmp_path, name):
    target = install_profile(name, workflow_dir=REPO, root=tmp_path)
    assert target == tmp_path / name
    assert (target / "config.yaml").read_bytes() == (REPO / "profiles" / name / "config.yaml").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no staging folder left


def test_an_existing_profile_is_never_overwritten(tmp_path):
    mine = tmp_path / "slurm" / "config.yaml"
    mine.parent.mkdir()
    mine.write_text("executor: slurm\n")
    with pytest.raises(FileExistsError, match="does not overwrite a profile"):
        install_profile("slurm", workflow_dir=REPO, root=tmp_path)
    assert mine.read_text() == "executor: slurm\n"
    other = install_profile("slurm", workflow_dir=REPO, root=tmp_path, install_as="hipoa-slurm")
    assert (other / "config.yaml").is_file() and mine.read_text() == "executor: slurm\n"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": "pbs"}, ValueError, "hipoa ships slurm, local"),
        ({"name": "slurm", "install_as": "../x"}, ValueError, "plain folder name"),
        ({"name": "slurm", "workflow_dir": Path("/")}, FileNotFoundError, "run `hipoa install-profile` in the hipoa checkout"),
    ],
)
def test_bad_requests_are_refused(tmp_path, kwargs, error, match):
    kwargs.setdefault("workflow_dir", REPO)
    with pytest.raises(error, match=match):
        install_profile(root=tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_default_root_is_snakemakes_user_folder(tmp_path, monkeypatch):
    from snakemake.common import get_appdirs

    assert user_profile_root() == Path(get_appdirs().user_config_dir)


def test_command_installs_once_then_refuses(tmp_path):
    cmd = [sys.executable, "-m", "hipoa", "install-profile", "slurm", "--dir", str(tmp_path)]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert f"installed {tmp_path / 'slurm'}" in first.stdout
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 2
    assert "exists; hipoa does not overwrite a profile" in again.stderr
    assert "Traceback" not in again.stderr


def test_command_outside_the_checkout_copies_the_checkout_hipoa_runs_from(tmp_path):
    """Run elsewhere, `hipoa install-profile` copies from the checkout of the running hipoa."""
    done = subprocess.run([sys.executable, "-m", "hipoa", "install-profile", "local", "--dir", str(tmp_path / "p")],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "p" / "local" / "config.yaml").read_bytes() == (
        REPO / "profiles" / "local" / "config.yaml").read_bytes()
