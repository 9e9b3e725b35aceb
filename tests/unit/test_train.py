"""Splits, sample streaming and training (hipoa.train) on tiny patch stores."""

from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import pytest
from tiny_patch_store import write_tiny_store

from hipoa.augment import AugmentSettings
from hipoa.cli import main
from hipoa.store import open_patches
from hipoa.splits import make_splits
from hipoa.train import SampleStream, load_existing
from hipoa.unet import build_unet

SITE = "lateral_acetabulum"


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two shards: 40 one-image participants, and 30 participants with two instances and QC failures."""
    root = tmp_path_factory.mktemp("stores")
    eids = [str(2_000_000 + 7 * i) for i in range(70)]
    a = write_tiny_store(root / "shard-0000.zarr", eids=eids[:40], seed=1, annotated_fraction=0.9)
    b = write_tiny_store(root / "shard-0001.zarr", eids=eids[40:], seed=2, instances_per_eid=2, qc_fail_every=9, shard=1)
    return [a, b]


def test_splits_by_participant_balanced_and_seeded(stores):
    sp = make_splits(stores=stores, site=SITE, seed=11)
    rows = open_patches(stores, SITE, "auto").rows
    area = rows[f"{SITE}_true_area_mm2"]
    candidates = rows[rows["annotated"] & (rows["qc_reason"] == "") & area.notna()]
    # exactly the annotated, QC-passing images, once each
    assert len(sp) == len(candidates)
    assert not sp.duplicated(["eid", "instance", "side"]).any()
    assert set(sp["split"]) <= {"train", "val", "test", "unused"}
    # positive follows the true area
    merged = sp.merge(candidates.assign(instance=candidates["instance"].astype(np.int16)), on=["eid", "instance", "side"])
    np.testing.assert_array_equal(merged["positive"], merged[f"{SITE}_true_area_mm2"] > 0)
    # one participant, one split (unused rows belong to their participant's train/val)
    used = sp[sp["split"] != "unused"]
    assert (used.groupby("eid")["split"].nunique() == 1).all()
    # train and val balanced, and the test split is not subsampled
    for name in ("train", "val"):
        s = sp[sp["split"] == name]
        assert s["positive"].sum() == (~s["positive"]).sum() > 0
    test_eids = set(sp.loc[sp["split"] == "test", "eid"])
    assert (sp.loc[sp["eid"].isin(test_eids), "split"] == "test").all()
    assert 0.1 < len(test_eids) / sp["eid"].nunique() < 0.3
    # seeded
    pd.testing.assert_frame_equal(sp, make_splits(stores=stores, site=SITE, seed=11))
    assert not sp["split"].equals(make_splits(stores=stores, site=SITE, seed=12)["split"])


def test_split_data_cli_writes_parquet(stores, tmp_path):
    out = tmp_path / "splits" / f"{SITE}.parquet"
    argv = ["split-data", "--stores", *map(str, stores), "--site", SITE, "--seed", "3", "--out", str(out)]
    assert main(argv) == 0
    sp = pd.read_parquet(out)
    assert list(sp.columns) == ["eid", "instance", "side", "split", "positive"]
    assert sp["instance"].dtype == np.int16 and sp["positive"].dtype == bool
    with pytest.raises(SystemExit):
        main(["split-data", "--stores", str(stores[0]), "--site", SITE])  # --seed and --out are required


class Recorder:
    """A NumPy array that records how many rows each read asks for."""

    def __init__(self, a):
        self.a, self.reads = a, []
        self.shape = a.shape

    def __getitem__(self, idx):
        self.reads.append(len(np.atleast_1d(idx)))
        return self.a[idx]


def test_sample_stream_centre_crops_fixed_val_and_bounded_reads():
    rng = np.random.default_rng(0)
    n, c = 40, 176
    image = Recorder(rng.normal(size=(n, c, c)).astype(np.float16))
    mask = Recorder((rng.random((n, c, c)) > 0.5).astype(np.uint8))
    idx = np.arange(0, n, 2)  # 20 images
    settings = AugmentSettings(0.1, 0.1, 0.05)
    kw = dict(n_augment=3, settings=settings, batch_size=16, block_samples=64, group=4)
    val = SampleStream(image, mask, idx, seed=5, fixed=True, **kw)
    assert val.n_samples == 80 and len(val) == 5
    first = list(val())
    sizes = [len(x) for x, _ in first]
    assert sizes == [16] * 5 and first[0][0].shape == (16, 128, 128, 1) and first[0][1].dtype == np.uint8
    for (x1, y1), (x2, y2) in zip(first, val()):  # the validation set is the same every epoch
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    # fixed streams keep image order: sample 0 of each image is its centre crop
    x_all = np.concatenate([x for x, _ in first])[..., 0]
    np.testing.assert_array_equal(x_all[0], image.a[0, 24:152, 24:152].astype(np.float32))
    np.testing.assert_array_equal(x_all[4], image.a[2, 24:152, 24:152].astype(np.float32))
    # memory is bounded by the block, not the set: no read asks for more than a block of images
    assert max(image.reads) <= max(1, 64 // (4 * 4)) * 4 < len(idx)

    train = SampleStream(image, mask, idx, seed=5, fixed=False, **kw)
    e1 = np.concatenate([x for x, _ in train()])
    e2 = np.concatenate([x for x, _ in train()])
    assert e1.shape == e2.shape == (80, 128, 128, 1)
    assert not np.array_equal(e1, e2)  # new transforms and order each epoch
    # ... and the same sequence from the same seed
    again = SampleStream(image, mask, idx, seed=5, fixed=False, **kw)
    np.testing.assert_array_equal(np.concatenate([x for x, _ in again()]), e1)


def test_training_learns_and_evaluates(tmp_path):
    """A tiny U-Net trained for a few epochs beats empty and constant predictions by far."""
    eids = [str(3_000_000 + i) for i in range(60)]
    store = write_tiny_store(tmp_path / "shard-0000.zarr", eids=eids, seed=4)
    splits = tmp_path / "splits.parquet"
    model = tmp_path / "models" / SITE / "unet.keras"
    evaluation = tmp_path / "evaluation" / f"{SITE}.json"
    assert main(["split-data", "--stores", str(store), "--site", SITE, "--seed", "1",
                 "--val-fraction", "0.2", "--test-fraction", "0.3", "--out", str(splits)]) == 0
    assert main(["train-unet", "--site", SITE, "--stores", str(store), "--splits", str(splits), "--out", str(model),
                 "--epochs", "4", "--batch-size", "2", "--depth", "2", "--base-filters", "16", "--n-augment", "1",
                 "--displacement", "0.05", "--seed", "2"]) == 0
    info = json.loads(model.with_suffix(".json").read_text())
    assert info["presence"]["pixel_threshold"] == 0.5 and info["presence"]["min_area_px"] >= 1
    assert info["data"]["counts"]["train"]["n"] == 2 * info["data"]["counts"]["train"]["positive"]
    assert info["data"]["samples_per_epoch"]["train"] == 2 * info["data"]["counts"]["train"]["n"]
    assert info["settings"]["displacement"] == 0.05 and info["hipoa_version"]
    history = pd.read_csv(model.parent / "history.csv")
    assert list(history["epoch"]) == list(range(1, 5)) and {"loss", "val_loss", "seconds"} <= set(history.columns)
    assert info["training"]["best_val_loss"] == pytest.approx(history["val_loss"].min())
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]

    assert main(["evaluate", "--site", SITE, "--model", str(model), "--stores", str(store),
                 "--splits", str(splits), "--out", str(evaluation)]) == 0
    r = json.loads(evaluation.read_text())

    # baselines on the same test patches: an empty prediction, and a constant all-osteophyte one
    sp = pd.read_parquet(splits)
    test = sp[sp["split"] == "test"]
    auto = open_patches([store], SITE, "auto")
    key = auto.rows.assign(instance=auto.rows["instance"].astype(np.int16)).reset_index()
    idx = test.merge(key, on=["eid", "instance", "side"])["index"].to_numpy()
    truth = auto.mask[np.sort(idx)].compute() > 0
    pos = truth.reshape(len(truth), -1).any(axis=1)
    area = truth.reshape(len(truth), -1).sum(axis=1)
    empty_dice = 0.0  # an empty prediction on a positive scores 0
    constant_dice = float(np.mean(2 * area[pos] / (area[pos] + 128 * 128)))
    assert r["n"] == len(test) and r["n_positive"] == int(test["positive"].sum())
    assert r["dice_mean"] > max(empty_dice, constant_dice) + 0.3, (r, constant_dice)
    assert r["sensitivity"] > 0.7 and r["specificity"] > 0.7
    assert (evaluation.parent / f"{SITE}_confusion.png").stat().st_size > 1000
    assert (evaluation.parent / f"{SITE}_overlay.png").stat().st_size > 1000


def _tiny_model(path, presence=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    build_unet(depth=1, base_filters=2).save(path)
    if presence is not False:
        path.with_suffix(".json").write_text(json.dumps({"presence": presence or {"pixel_threshold": 0.5, "min_area_px": 7}}))
    return path


def test_load_existing_copies_model_and_json(tmp_path):
    src = _tiny_model(tmp_path / "old" / "unet.keras")
    out = tmp_path / "results" / "models" / SITE / "unet.keras"
    info = load_existing(model=src, out=out)
    assert info["presence"]["min_area_px"] == 7 and info["loaded_from"] == str(src)
    assert out.read_bytes() == src.read_bytes()
    assert json.loads(out.with_suffix(".json").read_text())["presence"]["min_area_px"] == 7
    assert (out.parent / "history.csv").exists()
    keras.saving.load_model(out)

    out2 = tmp_path / "cli" / "unet.keras"
    assert main(["train-unet", "--site", SITE, "--out", str(out2), "--load", str(src)]) == 0
    assert out2.exists() and out2.with_suffix(".json").exists()
    assert main(["train-unet", "--site", SITE, "--out", str(out2)]) == 2  # neither data nor --load


def test_load_existing_rejects_missing_json_and_wrong_shapes(tmp_path):
    no_json = _tiny_model(tmp_path / "a" / "unet.keras", presence=False)
    with pytest.raises(FileNotFoundError, match="unet.json"):
        load_existing(model=no_json, out=tmp_path / "out" / "unet.keras")
    wrong = tmp_path / "b" / "unet.keras"
    wrong.parent.mkdir()
    build_unet(size=64, depth=1, base_filters=2).save(wrong)
    wrong.with_suffix(".json").write_text(json.dumps({"presence": {"pixel_threshold": 0.5, "min_area_px": 1}}))
    with pytest.raises(ValueError, match="expected input"):
        load_existing(model=wrong, out=tmp_path / "out" / "unet.keras")


def _bright_pixel_model(threshold: float = 2.0, gain: float = 6.0):
    """A fixed 'U-Net': per pixel, P(osteophyte) = sigmoid(gain * (x - threshold)), two-class softmax.

    The tiny store's osteophytes are bright disks on a normalised patch, so this model finds them
    (and, like a real one, a few bright noise pixels), deterministically and without training.
    """
    inp = keras.Input((128, 128, 1))
    conv = keras.layers.Conv2D(2, 1, activation="softmax")
    out = conv(inp)
    conv.set_weights([np.array([0.0, gain], np.float32).reshape(1, 1, 1, 2),
                      np.array([0.0, -gain * threshold], np.float32)])
    return keras.Model(inp, out)


def test_presence_rule_follows_the_prevalence(tmp_path):
    from hipoa.metrics import choose_min_area, predicted_area_px
    from hipoa.infer import predict_probability
    from hipoa.presence import choose_presence_rule
    from hipoa.splits import open_site_patches, patch_indices

    eids = [str(4_000_000 + i) for i in range(90)]
    # Half the images annotated (half of those positive); the unannotated ones have no osteophyte,
    # so the cohort outside train and val has a prevalence well below the balanced splits' 0.5.
    store = write_tiny_store(tmp_path / "shard-0000.zarr", eids=eids, seed=6, annotated_fraction=0.5, qc_fail_every=11)
    splits = make_splits(stores=[store], site=SITE, seed=1, val_fraction=0.3, test_fraction=0.2)
    model = _bright_pixel_model()

    auto = open_site_patches([store], SITE, "auto")
    val = splits[splits["split"] == "val"]
    count = predicted_area_px(predict_probability(model, auto.image, patch_indices(auto.rows, val)), 0.9)
    truth = val["positive"].to_numpy(bool)

    kw = dict(stores=[store], splits=splits, site=SITE)
    fixed, scores = choose_presence_rule(model, **kw, prevalence=0.5, detect_threshold=0.9)
    assert fixed["prevalence_source"] == "config" and fixed["detect_threshold"] == 0.9
    assert fixed["min_area_px"] == choose_min_area(count, truth, 0.5)[0]
    assert scores["n"] == len(val) and 0.0 <= scores["dice_mean_positive"] <= 1.0
    rare, _ = choose_presence_rule(model, **kw, prevalence=0.02, detect_threshold=0.9)
    assert rare["min_area_px"] == choose_min_area(count, truth, 0.02)[0] >= fixed["min_area_px"]
    # detect_threshold auto: the candidate with the best weighted accuracy, ties to the higher
    chosen, _ = choose_presence_rule(model, **kw, prevalence=0.3)
    cands = chosen["candidates"]
    assert set(cands) == {"0.5", "0.7", "0.9"}
    best = max(c["weighted_accuracy"] for c in cands.values())
    assert chosen["detect_threshold"] == max(float(t) for t, c in cands.items() if c["weighted_accuracy"] == best)
    assert chosen["min_area_px"] == cands[str(chosen["detect_threshold"])]["min_area_px"]

    auto_rule, _ = choose_presence_rule(model, **kw, prevalence="auto")
    est = auto_rule["prevalence_estimate"]
    # the estimate uses every measurable image of participants in no train or val split
    fitted = set(splits.loc[splits["split"].isin(["train", "val"]), "eid"])
    outside = auto.rows[(auto.rows["qc_reason"] == "") & ~auto.rows["eid"].isin(fitted)]
    assert auto_rule["prevalence_source"] == "estimated" and est["n_images"] == len(outside) > 20
    true_prevalence = (outside[f"{SITE}_true_area_mm2"].fillna(0) > 0).mean()
    assert true_prevalence < 0.3
    assert auto_rule["prevalence"] == pytest.approx(true_prevalence, abs=0.1)
    with pytest.raises(ValueError, match="prevalence"):
        choose_presence_rule(model, **kw, prevalence=1.5)
    with pytest.raises(ValueError, match="detect_threshold"):
        choose_presence_rule(model, **kw, detect_threshold=0.3)
    # a model that calls every image separates nothing: no estimate, prevalence 0.5, said why
    blind, _ = choose_presence_rule(_bright_pixel_model(threshold=1.0), **kw)
    assert blind["prevalence"] == 0.5 and "Youden" in blind["prevalence_source"]
    assert "prevalence_estimate" not in blind


@pytest.mark.parametrize("flag, value", [("--prevalence", "1.5"), ("--prevalence", "0"), ("--prevalence", "many"),
                                         ("--detect-threshold", "0.3"), ("--detect-threshold", "1.1")])
def test_train_unet_cli_rejects_out_of_range_rule_settings(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train-unet", "--site", SITE, "--out", str(tmp_path / "unet.keras"), flag, value])
    assert exc.value.code == 2 and f"got '{value}'" in capsys.readouterr().err
