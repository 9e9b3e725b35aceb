"""One list of training settings (hipoa.train_settings): the schema, the CLI, the rule's command
line and the augmentation all agree with it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from hipoa.cli import build_parser
from hipoa.train_settings import TrainSettings, augment_names, option, training_names

REPO = Path(__file__).resolve().parents[2]
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())


def _schema_entry(name: str) -> dict:
    if name in augment_names():
        return SCHEMA["$defs"]["augment"]["properties"][name]
    return SCHEMA["properties"]["training"]["properties"][name]


def _number_branch(entry: dict) -> dict:
    """The number part of an entry ('auto' or a number: its oneOf's number branch)."""
    if "oneOf" in entry:
        (branch,) = [b for b in entry["oneOf"] if b.get("type") == "number"]
        return branch
    return entry


@pytest.mark.parametrize("f", dataclasses.fields(TrainSettings), ids=lambda f: f.name)
def test_schema_default_and_range_equal_the_settings(f):
    entry = _schema_entry(f.name)
    assert entry["default"] == f.default
    meta = f.metadata
    if meta["choices"]:
        assert tuple(entry["enum"]) == meta["choices"]
        return
    branch, valid = _number_branch(entry), meta["range"]
    low = branch.get("exclusiveMinimum", branch.get("minimum"))
    high = branch.get("exclusiveMaximum", branch.get("maximum"))
    assert (low, high) == (valid.low, valid.high)
    assert ("exclusiveMinimum" in branch, "exclusiveMaximum" in branch) == (valid.low_open, valid.high_open)
    assert branch["type"] == ("integer" if type(f.default) is int else "number")


def test_every_schema_training_key_is_a_setting_or_not_one_of_train_unet():
    training = set(SCHEMA["properties"]["training"]["properties"])
    # the split's fractions, the side and the per-site table are the workflow's, not train-unet's
    assert training - set(training_names()) == {"side", "val_fraction", "test_fraction", "augment"}
    assert set(SCHEMA["$defs"]["augment"]["properties"]) == set(augment_names())


def test_the_papers_per_site_augmentation_is_valid():
    for site, entry in SCHEMA["properties"]["training"]["properties"]["augment"]["default"].items():
        s = TrainSettings.from_mapping(entry)
        assert {k: getattr(s, k) for k in entry} == entry, site


def _parse(*argv: str) -> TrainSettings:
    args = build_parser().parse_args(["train-unet", "--site", "x", "--out", "m.keras", *argv])
    return TrainSettings.from_args(args)


def test_cli_defaults_are_the_settings_defaults():
    assert _parse() == TrainSettings()


def test_command_line_round_trips_through_the_cli():
    s = TrainSettings(epochs=3, batch_size=8, n_augment=19, displacement=0.05, appearance=0.0,
                      boundary_weight=1.0, seed=7, precision="float32", prevalence=0.2, detect_threshold=0.7)
    assert _parse(*s.command_line().split()) == s
    assert "--n-augment 19 " in s.command_line() and "--detect-threshold 0.7" in s.command_line()


def test_from_mapping_ignores_the_workflows_other_keys():
    s = TrainSettings.from_mapping({"epochs": 2, "side": "L", "val_fraction": 0.15, "augment": {}})
    assert s == TrainSettings(epochs=2)


@pytest.mark.parametrize(("name", "value", "message"), [
    ("epochs", 0, r"epochs: expected an integer in \[1, inf\), got 0"),
    ("epochs", 2.5, "epochs: expected an integer"),
    ("dropout", 1.0, r"dropout: expected a number in \[0, 1\), got 1.0"),
    ("scale", 1.0, "scale"),
    ("appearance", 3.0, r"appearance: expected a number in \[0, 2.5\]"),
    ("boundary_weight", -0.1, "boundary_weight"),
    ("precision", "fp8", r"precision: expected one of \['auto'"),
    ("prevalence", 0.0, r"prevalence: expected 'auto' or a number in \(0, 1\), got 0.0"),
    ("detect_threshold", 0.4, "detect_threshold"),
    ("seed", True, "seed: expected an integer"),
])
def test_an_invalid_setting_names_itself_its_value_and_its_range(name, value, message):
    with pytest.raises(ValueError, match=message):
        TrainSettings(**{name: value})


def test_the_cli_refuses_a_value_out_of_range(capsys):
    with pytest.raises(SystemExit):
        _parse("--prevalence", "1")
    assert "expected 'auto' or a number in (0, 1), got '1'" in capsys.readouterr().err


def test_numpy_numbers_are_numbers():
    import numpy as np

    s = TrainSettings(epochs=np.int64(3), dropout=np.float32(0.25))
    assert s.epochs == 3 and abs(s.dropout - 0.25) < 1e-7
    with pytest.raises(ValueError, match="epochs: expected an integer"):
        TrainSettings(epochs=np.float64(3.0))


def test_augment_carries_every_augmentation_setting():
    s = TrainSettings(rotation=0.2, scale=0.05, displacement=0.05, appearance=0.5)
    a = s.augment()
    assert (a.rotation, a.scale, a.displacement, a.appearance) == (0.2, 0.05, 0.05, 0.5)
    assert option("batch_size") == "--batch-size"
