"""Splits and training (hipoa.train) on tiny patch stores."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
from tiny_patch_store import write_tiny_store

from hipoa.cli import main
from hipoa.splits import make_splits
from hipoa.store import open_patches

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


def _count_synced_logs(monkeypatch) -> list[int]:
    """Counts the logs Keras's CallbackList converts from tensors to floats (each one a host sync)."""
    from keras.src import backend
    from keras.src.callbacks import callback_list

    calls: list[int] = []
    real = callback_list.python_utils.pythonify_logs

    def counting(logs):
        if any(backend.is_tensor(v) for v in (logs or {}).values()):
            calls.append(1)
        return real(logs)

    monkeypatch.setattr(callback_list.python_utils, "pythonify_logs", counting)
    return calls


def test_progress_logging_reads_no_batch_logs(monkeypatch, caplog):
    """Keras 3.15 on TF converts every batch's logs (a sync per step); our container converts per epoch only."""
    import keras
    import tensorflow as tf

    from hipoa.train import callback_container, training_callbacks

    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1))
    model = keras.Model(inp, keras.layers.Conv2D(2, 1, activation="softmax")(inp))
    model.compile(optimizer=keras.optimizers.Adam(), loss=keras.losses.SparseCategoricalCrossentropy())
    rng = np.random.default_rng(0)
    ds = tf.data.Dataset.from_tensors((rng.normal(size=(4, 8, 8, 1)).astype(np.float32),
                                       (rng.random((4, 8, 8)) > 0.5).astype(np.uint8))).repeat()
    steps, epochs = 6, 3
    fit = {"steps_per_epoch": steps, "validation_data": ds, "validation_steps": 2, "epochs": epochs, "verbose": 0,
           "shuffle": False}
    synced = _count_synced_logs(monkeypatch)

    model.fit(ds, callbacks=list(training_callbacks("s", epochs, steps, 24)), **fit)
    assert len(synced) >= epochs * (steps + 2)  # Keras's own container: every train and val batch

    synced.clear()
    caplog.set_level(logging.INFO, logger="hipoa.train")
    epoch_log, keep_best = training_callbacks("s", epochs, steps, 24, every_s=0.0)  # a progress line per batch
    history = model.fit(ds, callbacks=callback_container([epoch_log, keep_best], model=model, epochs=epochs, steps=steps),
                        **fit)
    assert 1 <= len(synced) <= 2 * epochs  # the epoch logs only
    lines = [r.getMessage() for r in caplog.records if "batches/s" in r.getMessage()]
    assert len(lines) >= epochs * steps and all("ETA" in line or "done" in line for line in lines)
    assert any(f"epoch {epochs}/{epochs}, loss" in r.getMessage() for r in caplog.records)
    # the container still records history and feeds the epoch hooks
    assert len(history.history["loss"]) == epochs and len(epoch_log.seconds) == epochs
    assert keep_best.best == pytest.approx(min(history.history["val_loss"]))


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
    assert {"git_commit", "python", "tensorflow", "keras", "snakemake"} <= set(info["provenance"])  # the card's too
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


@pytest.mark.parametrize("flag, value", [("--prevalence", "1.5"), ("--prevalence", "0"), ("--prevalence", "many"),
                                         ("--detect-threshold", "0.3"), ("--detect-threshold", "1.1")])
def test_train_unet_cli_rejects_out_of_range_rule_settings(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train-unet", "--site", SITE, "--out", str(tmp_path / "unet.keras"), flag, value])
    assert exc.value.code == 2 and f"got '{value}'" in capsys.readouterr().err
