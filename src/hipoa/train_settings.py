"""The training settings of one site's U-Net, each written once: type, default, range and help.

:class:`TrainSettings` is the one list. Everything else is made from it: the ``hipoa train-unet``
options (:func:`add_arguments`, :meth:`TrainSettings.from_args`), the command line the Snakemake
rule writes (:meth:`TrainSettings.command_line`), the augmentation of :mod:`hipoa.augment`
(:meth:`TrainSettings.augment`) and the model card's ``settings`` (:meth:`TrainSettings.to_dict`).
The workflow schema's defaults and ranges are tested equal to these (``tests/unit/test_train_settings.py``),
as :class:`hipoa.qc.Limits` is tested against its schema.

A light module (no TensorFlow), so the workflow and the CLI's parser import it freely.
"""

from __future__ import annotations

import argparse
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from hipoa.augment import MAX_APPEARANCE, AugmentSettings

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
"""``precision`` values (:func:`hipoa.precision.choose_policy`)."""


@dataclass(frozen=True)
class Range:
    """Where a number may lie: ``low`` and ``high`` (None: unbounded), each included unless open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or math.isnan(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"


def _setting(default: Any, help: str, *, range: Range | None = None, choices: tuple[str, ...] = (),
             auto: bool = False, augment: bool = False) -> Any:
    """A :class:`TrainSettings` field: its default and, in the field's metadata, what it means.

    Args:
        default: The default (also the CLI's).
        help: One line for ``--help`` and the docs.
        range: Where a number may lie.
        choices: The values a string may take.
        auto: ``"auto"`` is accepted besides a number in ``range``.
        augment: A per-site augmentation setting (config ``training.augment.<site>``, the schema's
            ``$defs/augment``), else a ``training`` key.
    """
    return field(default=default, metadata={"help": help, "range": range, "choices": choices, "auto": auto,
                                            "augment": augment})


@dataclass(frozen=True)
class TrainSettings:
    """How one site's U-Net is trained (:func:`hipoa.train.train_site`); invalid values raise a
    ``ValueError`` naming the setting, its value and its range."""

    epochs: int = _setting(15, "training epochs (15, the paper)", range=Range(1))
    batch_size: int = _setting(32, "batch size (32)", range=Range(1))
    depth: int = _setting(4, "U-Net poolings (4, the original)", range=Range(1, 7))
    base_filters: int = _setting(64, "filters of the first level (64, the original)", range=Range(1))
    dropout: float = _setting(0.3, "dropout rate (0.3, the paper)", range=Range(0.0, 1.0, high_open=True))
    n_augment: int = _setting(7, "extra augmented samples per image (7; 19 acetabulum)", range=Range(0),
                              augment=True)
    rotation: float = _setting(0.1, "max rotation, radians (0.1)", range=Range(0.0), augment=True)
    scale: float = _setting(0.1, "max relative scaling (0.1)", range=Range(0.0, 1.0, high_open=True),
                             augment=True)
    displacement: float = _setting(0.0, "max centre shift, fraction of patch width (0; 0.05 acetabulum)",
                                   range=Range(0.0), augment=True)
    appearance: float = _setting(
        1.0, "strength of the scanner appearance augmentation of training samples: contrast, soft-tissue "
             "ramp, pixel grid, blur/sharpening, noise, banding, tone (0 off; 1, the ranges of hipoa.augment)",
        range=Range(0.0, MAX_APPEARANCE), augment=True)
    boundary_weight: float = _setting(
        0.5, "loss weight of pixels within 1 px of the mask boundary, where annotators differ "
             "(0.5; 1 = the paper's plain cross-entropy)", range=Range(0.0, 1.0))
    seed: int = _setting(1, "seed of weights, dropout and augmentation (1)", range=Range(0))
    precision: str = _setting("auto", "compute precision (auto: bfloat16 where the CPU/GPU has it)",
                              choices=PRECISIONS)
    prevalence: float | str = _setting(
        "auto", "expected share of images with an osteophyte, for the presence rule: 'auto' (estimated on "
                "the cohort outside train and val) or a number in (0, 1)",
        range=Range(0.0, 1.0, low_open=True, high_open=True), auto=True)
    detect_threshold: float | str = _setting(
        "auto", "pixel probability counted towards the presence rule's min_area_px: 'auto' (0.5, 0.7 or "
                "0.9, chosen on validation) or a number in [0.5, 1]", range=Range(0.5, 1.0), auto=True)

    def __post_init__(self) -> None:
        for f in fields(self):
            problem = _problem(f, getattr(self, f.name))
            if problem:
                raise ValueError(f"training setting {f.name}: {problem}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TrainSettings:
        """From the workflow's config (``training`` keys plus a site's ``augment`` entry); keys that
        are not settings (``side``, ``val_fraction``, ...) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainSettings:
        """From the options :func:`add_arguments` added."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def augment(self) -> AugmentSettings:
        """The augmentation these settings ask for."""
        return AugmentSettings(rotation=self.rotation, scale=self.scale, displacement=self.displacement,
                               appearance=self.appearance)

    def to_dict(self) -> dict[str, Any]:
        """Every setting by name, in the order of the class (the model card's ``settings``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def command_line(self) -> str:
        """The ``hipoa train-unet`` options that give these settings (the Snakemake rule's)."""
        return " ".join(f"{option(f.name)} {getattr(self, f.name)}" for f in fields(self))


def option(name: str) -> str:
    """The command-line option of a setting: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def augment_names() -> tuple[str, ...]:
    """The per-site augmentation settings (the schema's ``$defs/augment``)."""
    return tuple(f.name for f in fields(TrainSettings) if f.metadata["augment"])


def training_names() -> tuple[str, ...]:
    """The settings of the config's ``training`` section (the others are per site)."""
    return tuple(f.name for f in fields(TrainSettings) if not f.metadata["augment"])


def auto_or_number(valid: Range) -> Callable[[str], str | float]:
    """An argparse type: ``auto`` or a number in ``valid``."""

    def parse(text: str) -> str | float:
        if text == "auto":
            return text
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if value not in valid:
            raise argparse.ArgumentTypeError(f"expected 'auto' or a number in {valid}, got {text!r}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one option per setting, with its type, default, choices and help."""
    for f in fields(TrainSettings):
        meta = f.metadata
        kind: Any
        if meta["auto"]:
            kind = auto_or_number(meta["range"])
        elif meta["choices"]:
            kind = str
        else:
            kind = type(f.default)
        parser.add_argument(option(f.name), dest=f.name, type=kind, default=f.default,
                            choices=meta["choices"] or None, help=meta["help"])


def _problem(f, value: Any) -> str:
    """Why ``value`` is not valid for the setting ``f`` ('' when it is)."""
    meta = f.metadata
    if meta["choices"]:
        return "" if value in meta["choices"] else f"expected one of {list(meta['choices'])}, got {value!r}"
    if meta["auto"] and value == "auto":
        return ""
    kind = type(f.default) if not meta["auto"] else float
    if kind is int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        return f"expected an integer in {meta['range']}, got {value!r}"
    if value not in meta["range"]:
        what = "'auto' or a number" if meta["auto"] else ("an integer" if kind is int else "a number")
        return f"expected {what} in {meta['range']}, got {value!r}"
    return ""
