"""hipoa's Snakemake profiles, copied to where Snakemake looks a profile name up.

``snakemake --profile slurm`` treats ``slurm`` as a path first, then as a folder name in
Snakemake's user configuration directory (``$XDG_CONFIG_HOME/snakemake``, usually
``~/.config/snakemake``) and in its site directory (``/etc/xdg/snakemake``). hipoa's profiles
live in the checkout's ``profiles/``; :func:`install_profile` copies one of them into the user
directory, so that the name alone finds it. An existing profile is never overwritten: a
cluster's own generic ``slurm`` profile works as it is (the workflow profile
``profiles/default`` adds hipoa's workflow settings to it).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

PROFILES = ("slurm", "local")
PROFILE_FILE = "config.yaml"


def user_profile_root() -> Path:
    """Snakemake's user configuration directory, where ``--profile NAME`` finds NAME/."""
    from platformdirs import AppDirs

    # The same directories as snakemake.common.get_appdirs().
    return Path(AppDirs("snakemake", "snakemake").user_config_dir)


def default_checkout() -> Path:
    """The hipoa checkout to copy profiles from: the working directory when it is one (where
    users run Snakemake), else the checkout this package runs from (an editable install)."""
    here = Path(".")
    if (here / "Snakefile").is_file() and (here / "profiles").is_dir():
        return here
    return Path(__file__).resolve().parents[2]


def install_profile(
    name: str,
    workflow_dir: Path | None = None,
    root: Path | None = None,
    install_as: str | None = None,
) -> Path:
    """Copy the checkout's ``profiles/NAME/config.yaml`` to ``root/INSTALL_AS/config.yaml``.

    Args:
        name: One of :data:`PROFILES`.
        workflow_dir: The hipoa checkout (holds ``Snakefile`` and ``profiles/``); default
            :func:`default_checkout`.
        root: Where profiles are looked up by name; default :func:`user_profile_root`.
        install_as: Name of the installed profile; default ``name``.

    Returns:
        The installed profile's folder.

    Raises:
        ValueError: ``name`` is not one of hipoa's profiles, or ``install_as`` is not a plain name.
        FileNotFoundError: ``workflow_dir`` is not a hipoa checkout.
        FileExistsError: a profile of that name exists already (it is left as it is).
    """
    if name not in PROFILES:
        raise ValueError(f"profile {name!r}: hipoa ships {', '.join(PROFILES)}")
    workflow_dir = Path(workflow_dir) if workflow_dir is not None else default_checkout()
    install_as = install_as or name
    if not install_as or Path(install_as).name != install_as or install_as.startswith("."):
        raise ValueError(f"--as {install_as!r}: give a plain folder name, e.g. hipoa-{name}")
    source = Path(workflow_dir) / "profiles" / name / PROFILE_FILE
    if not source.is_file() or not (Path(workflow_dir) / "Snakefile").is_file():
        raise FileNotFoundError(
            f"{source}: not found; run `hipoa install-profile` in the hipoa checkout or give "
            "--workflow DIR"
        )
    root = Path(root) if root is not None else user_profile_root()
    target = root / install_as
    if target.exists() or target.is_symlink():
        raise FileExistsError(
            f"{target} exists; hipoa does not overwrite a profile. Use it as it is "
            f"(`snakemake --profile {install_as}`; hipoa's profiles/default adds the "
            "workflow's settings to it), remove it, or install under another name with --as"
        )
    root.mkdir(parents=True, exist_ok=True)
    try:
        target.mkdir()  # exclusive: fails if the folder appeared meanwhile, replaces nothing
    except FileExistsError:
        raise FileExistsError(f"{target} exists; hipoa does not overwrite a profile") from None
    # The folder holds a complete config.yaml or is removed again.
    try:
        staging = target / f".{PROFILE_FILE}.tmp"
        shutil.copyfile(source, staging)
        os.replace(staging, target / PROFILE_FILE)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    log.info("installed hipoa's %s profile as %s", name, target)
    return target


GPU_PARTITION_VARIABLE = "HIPOA_SLURM_GPU_PARTITION"


def gpu_partition_resources() -> dict[str, str]:
    """``{"slurm_partition": NAME}`` for the GPU rules (train_unet, evaluate_unet, predict_masks)
    when ``HIPOA_SLURM_GPU_PARTITION`` is set in the environment that starts Snakemake, else
    ``{}`` (the partition every job gets from the user's profile). The workflow adds it to those
    rules' resources, so a user's own ``set-resources`` merge with it per rule and key."""
    name = os.environ.get(GPU_PARTITION_VARIABLE, "").strip()
    return {"slurm_partition": name} if name else {}
