"""Tests for hipoa.modelio: a model file is checked before Keras reads it, with one-line errors.

Bad ``.keras`` files are made by rewriting a real saved model's zip (test_predict.make_model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hipoa import modelio
from hipoa.cli import main

from hipoa_fixtures import SITES, example_shard, make_model  # noqa: E402  (tests/unit is on sys.path)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy the .keras zip ``src`` to ``dst`` with ``config.json`` replaced by ``edit(config)``."""
    with zipfile.ZipFile(src) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    members["config.json"] = json.dumps(edit(json.loads(members["config.json"]))).encode()
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    dst.with_suffix(".json").write_bytes(src.with_suffix(".json").read_bytes())
    return dst


@pytest.fixture()
def good(tmp_path) -> Path:
    return make_model(tmp_path / "good" / "unet.keras")


def _predict_argv(tmp_path: Path, model: Path) -> list[str]:
    store, _, _ = example_shard(tmp_path)
    return ["predict-masks", "--stores", str(store), "--out", str(tmp_path / "p.parquet"),
            "--masks-out", str(tmp_path / "m.zarr"), "--precision", "float32", "--model", f"{SITES[0]}={model}"]


def test_a_real_model_passes(good):
    config = modelio.check_model_file(good)
    assert config["class_name"] == "Functional"
    model = modelio.load_model(good)
    assert tuple(model.output_shape[1:]) == (128, 128, 2)


def test_real_unet_config_is_allowed(tmp_path):
    from hipoa.modelio import write_model
    from hipoa.unet import build_unet

    path = tmp_path / "unet.keras"
    write_model(build_unet(depth=1, base_filters=2, dropout=0.1), path)
    assert not list(tmp_path.glob("*.tmp*"))  # write_model wrote through a temporary path
    assert modelio.load_model(path, "mixed_bfloat16") is not None


def test_disallowed_module_is_refused_before_any_code_runs(tmp_path, good):
    pwned = tmp_path / "pwned"

    def evil(config):
        layer = next(l for l in config["config"]["layers"] if l["class_name"] == "Conv2D")
        layer["config"]["kernel_initializer"] = {
            "module": "os", "class_name": "system", "config": f"touch {pwned}", "registered_name": None,
        }
        return config

    (tmp_path / "bad").mkdir()
    bad = _rewrite(good, tmp_path / "bad" / "unet.keras", evil)
    argv = _predict_argv(tmp_path, bad)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-m", "hipoa.cli", *argv], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, r.stderr
    assert str(bad) in errors[0] and "disallowed" in errors[0] and "'os'" in errors[0]
    assert not pwned.exists()  # nothing from the file ran
    assert not (tmp_path / "p.parquet").exists() and not (tmp_path / "m.zarr").exists()
    assert not list(tmp_path.glob("*.tmp"))  # refused before anything was written


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: {**c, "module": "builtins", "class_name": "eval"}, "disallowed module 'builtins'"),
        (lambda c: {"module": "keras.layers", "class_name": "Lambda", "config": {"function": {"class_name": "__lambda__"}}},
         "disallowed class 'Lambda'"),
        (lambda c: {**c, "class_name": "NoSuchModel"}, "unknown class keras.src.models.functional.NoSuchModel"),
        (lambda c: {**c, "registered_name": "Evil>Layer"}, "unknown class 'Evil>Layer'"),
    ],
)
def test_config_checks(tmp_path, good, edit, message):
    bad = _rewrite(good, tmp_path / "x.keras", edit)
    with pytest.raises(modelio.ModelError, match=message):
        modelio.load_model(bad)


def _error_line(capsys) -> str:
    """The one ERROR line the CLI logged to stderr (setup_logging replaces pytest's log handler)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if " ERROR " in line]
    return line


def test_truncated_model_is_named_as_such(tmp_path, good, capsys):
    cut = tmp_path / "cut" / "unet.keras"
    cut.parent.mkdir()
    data = good.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    cut.with_suffix(".json").write_bytes(good.with_suffix(".json").read_bytes())
    assert main(_predict_argv(tmp_path, cut)) == 2
    text = _error_line(capsys)
    assert str(cut) in text and "truncated" in text and "not a zip" in text and "not found" not in text


def test_corrupt_member_is_named(tmp_path, good):
    bad = tmp_path / "crc.keras"
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as z:
        info = z.getinfo("model.weights.h5")
    at = info.header_offset + 30 + len(info.filename) + len(info.extra) + 10  # inside the member's data
    data[at] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(modelio.ModelError, match=r"truncated or corrupt"):
        modelio.check_model_file(bad)


def test_missing_member_and_not_json(tmp_path, good):
    no_weights = tmp_path / "nw.keras"
    with zipfile.ZipFile(good) as z, zipfile.ZipFile(no_weights, "w") as out:
        out.writestr("config.json", z.read("config.json"))
    with pytest.raises(modelio.ModelError, match="lacks model.weights.h5"):
        modelio.check_model_file(no_weights)
    garbled = tmp_path / "g.keras"
    with zipfile.ZipFile(good) as z, zipfile.ZipFile(garbled, "w") as out:
        out.writestr("config.json", b"{not json")
        out.writestr("model.weights.h5", z.read("model.weights.h5"))
    with pytest.raises(modelio.ModelError, match="config.json is not valid JSON"):
        modelio.check_model_file(garbled)


def test_directory_named_unet_keras(tmp_path, good, capsys):
    d = tmp_path / "dir" / "unet.keras"
    d.mkdir(parents=True)
    d.with_suffix(".json").write_bytes(good.with_suffix(".json").read_bytes())
    assert main(_predict_argv(tmp_path, d)) == 2
    assert _error_line(capsys).endswith(f"ERROR hipoa: {d}: model is a directory, expected a .keras file")
    with pytest.raises(FileNotFoundError, match="model not found"):
        modelio.load_model(tmp_path / "none.keras")


def test_model_card_checks(tmp_path, good):
    card = good.with_suffix(".json")
    card.write_text("{broken")
    with pytest.raises(modelio.ModelError, match=rf"{card}: model settings JSON is not valid JSON"):
        modelio.read_model_card(good)
    card.write_text("[1, 2]")
    with pytest.raises(modelio.ModelError, match="must be an object"):
        modelio.read_presence_rule(good)
    card.write_text(json.dumps({"presence": {"pixel_threshold": "high", "min_area_px": 3}}))
    with pytest.raises(modelio.ModelError, match="must be numbers"):
        modelio.read_presence_rule(good)
    card.unlink()
    card.mkdir()
    with pytest.raises(modelio.ModelError, match="not a regular file"):
        modelio.read_model_card(good)


def test_cli_maps_oserror_to_exit_2(tmp_path, capsys, monkeypatch):
    from hipoa import phenotypes

    def gather(**kw):
        raise IsADirectoryError(21, "Is a directory", str(tmp_path / "manifest.parquet"))

    monkeypatch.setattr(phenotypes, "gather", gather)
    argv = ["phenotypes", "--manifest", str(tmp_path / "manifest.parquet"), "--predictions", "p.parquet",
            "--side", "L", "--out", str(tmp_path / "o.parquet"), "--model", f"{SITES[0]}=m.keras"]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "Is a directory" in line and str(tmp_path / "manifest.parquet") in line


# ---- the model card (ModelCard) and train-unet --load (install_model) ----------------------------


def _tiny_unet(path: Path, presence=None) -> Path:
    from hipoa.unet import build_unet

    path.parent.mkdir(parents=True, exist_ok=True)
    build_unet(depth=1, base_filters=2).save(path)
    if presence is not False:
        path.with_suffix(".json").write_text(json.dumps({"presence": presence or {"pixel_threshold": 0.5, "min_area_px": 7}}))
    return path


def test_model_card_round_trip_keeps_the_json_layout(tmp_path):
    presence = {"pixel_threshold": 0.5, "prevalence": 0.2, "prevalence_source": "config",
                "candidates": {"0.9": {"min_area_px": 12}}, "detect_threshold": 0.9, "min_area_px": 12, "rule": "r"}
    card = modelio.ModelCard(site="lateral_acetabulum", hipoa_version="0.3", created="2024-01-01T00:00:00+00:00",
                             settings={"epochs": 3}, architecture={"depth": 1}, data={"counts": {"train": {"n": 4}}},
                             training={"best_val_loss": float("nan")}, validation={"sensitivity": 1.0},
                             presence=presence)
    assert card.presence == modelio.PresenceRule(0.5, 12, 0.9)
    assert card.presence_info["prevalence"] == 0.2 and card["presence"] == presence
    model = tmp_path / "m" / "unet.keras"
    path = modelio.write_model_card(model, card)
    assert path == model.with_suffix(".json") and not list(path.parent.glob("*.tmp*"))
    on_disk = json.loads(path.read_text())
    assert list(on_disk) == ["site", "hipoa_version", "created", "settings", "architecture", "data", "training",
                             "validation", "presence"]
    assert on_disk["training"]["best_val_loss"] is None  # NaN -> null
    assert on_disk["presence"] == presence
    back = modelio.read_model_card(model)
    assert back.presence == card.presence and back.data == card.data and back.training == {"best_val_loss": None}
    # a dict in the card's layout is accepted (and validated) as well
    modelio.write_model_card(model, {**on_disk, "extra_key": [1, 2]})
    assert modelio.read_model_card(model).extra == {"extra_key": [1, 2]}
    with pytest.raises(modelio.ModelError, match="min_area_px"):
        modelio.write_model_card(model, {"presence": {"pixel_threshold": 0.5}})
    assert modelio.json_safe({"a": (1.0, float("inf"))}) == {"a": [1.0, None]}


def test_old_model_card_without_detect_threshold_reads(tmp_path):
    model = tmp_path / "unet.keras"
    model.with_suffix(".json").write_text(json.dumps({"presence": {"pixel_threshold": 0.4, "min_area_px": 7},
                                                      "epochs": 3}))
    card = modelio.read_model_card(model)
    assert card.presence == modelio.PresenceRule(0.4, 7, 0.4) and card.extra == {"epochs": 3}
    assert card.site is None and "site" not in card.to_dict()


def test_install_model_copies_model_and_card(tmp_path):
    import keras

    site = SITES[0]
    src = _tiny_unet(tmp_path / "old" / "unet.keras")
    out = tmp_path / "results" / "models" / site / "unet.keras"
    card = modelio.install_model(src, out)
    assert card.presence.min_area_px == 7 and card.loaded_from == str(src)
    assert out.read_bytes() == src.read_bytes()
    on_disk = json.loads(out.with_suffix(".json").read_text())
    assert on_disk["presence"]["min_area_px"] == 7 and on_disk["loaded_from"] == str(src)
    assert (out.parent / "history.csv").exists()
    keras.saving.load_model(out)

    out2 = tmp_path / "cli" / "unet.keras"
    assert main(["train-unet", "--site", site, "--out", str(out2), "--load", str(src)]) == 0
    assert out2.exists() and out2.with_suffix(".json").exists()
    assert main(["train-unet", "--site", site, "--out", str(out2)]) == 2  # neither data nor --load


def test_install_model_rejects_missing_card_and_wrong_shapes(tmp_path):
    from hipoa.unet import build_unet

    no_json = _tiny_unet(tmp_path / "a" / "unet.keras", presence=False)
    with pytest.raises(FileNotFoundError, match="unet.json"):
        modelio.install_model(no_json, tmp_path / "out" / "unet.keras")
    wrong = tmp_path / "b" / "unet.keras"
    wrong.parent.mkdir()
    build_unet(size=64, depth=1, base_filters=2).save(wrong)
    wrong.with_suffix(".json").write_text(json.dumps({"presence": {"pixel_threshold": 0.5, "min_area_px": 1}}))
    with pytest.raises(ValueError, match="expected input"):
        modelio.install_model(wrong, tmp_path / "out" / "unet.keras")
    assert not (tmp_path / "out").exists()  # nothing written for a model that does not fit
