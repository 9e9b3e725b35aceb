"""The version locks (requirements/*.txt), the conda envs and the environment the tests run in agree."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
# Conda envs pin the CPU-only or CUDA flavour of TensorFlow; the locks name the package.
ENV_ALIASES = {"tensorflow-cpu": "tensorflow"}


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(name: str) -> dict[str, str]:
    """Package -> version of requirements/NAME."""
    pins = {}
    for line in (REPO / "requirements" / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            package, _, pinned = line.partition("==")
            assert pinned, f"requirements/{name}: {line!r} is not pinned with =="
            pins[canonical(package)] = pinned.strip()
    return pins


def requirement_name(spec: str) -> str:
    return canonical(re.split(r"[\[<>=!~; ]", spec, maxsplit=1)[0])


@pytest.mark.parametrize(("env", "lock"), [("cpu.yaml", "cpu.txt"), ("gpu.yaml", "gpu.txt")])
def test_conda_env_pins_are_the_locked_versions(env, lock):
    pins = read_lock(lock)
    spec = yaml.safe_load((REPO / "envs" / env).read_text())
    pip_lists = [entry["pip"] for entry in spec["dependencies"] if isinstance(entry, dict)]
    assert len(pip_lists) == 1
    checked = 0
    for line in pip_lists[0]:
        package, _, pinned = line.partition("==")
        name = requirement_name(package)
        name = ENV_ALIASES.get(name, name)
        assert name in pins, f"envs/{env}: {name} is not in requirements/{lock}"
        assert pinned == pins[name], f"envs/{env}: {line}, requirements/{lock}: {pins[name]}"
        checked += 1
    assert checked >= 15


def test_locks_cover_every_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    cpu, gpu = read_lock("cpu.txt"), read_lock("gpu.txt")
    for spec in project["dependencies"]:
        assert requirement_name(spec) in cpu and requirement_name(spec) in gpu, spec
    for spec in project["optional-dependencies"]["test"]:
        assert requirement_name(spec) in cpu, spec
    assert any(name.startswith("nvidia-cudnn") for name in gpu)
    assert not any(name.startswith("nvidia-") for name in cpu)
    # Both locks agree on every package they share.
    assert {n: v for n, v in cpu.items() if n in gpu} == {n: v for n, v in gpu.items() if n in cpu}


def test_this_environment_has_the_locked_versions():
    """The tests run with the CPU lock's versions (CI installs them first, .ci/run); after an
    upgrade that passes the tests, requirements/lock.sh writes the new lock."""
    wrong = {}
    for name, pinned in read_lock("cpu.txt").items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        if installed != pinned:
            wrong[name] = (pinned, installed)
    assert not wrong, f"locked vs installed (rerun requirements/lock.sh or pip install -r requirements/cpu.txt): {wrong}"
