"""Per-image patterns must tell images apart (hipoa.patterns.check_image_patterns), at ingest too."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hipoa.patterns import check_image_patterns

sys.path.insert(0, str(Path(__file__).parent))
from test_ingest import IMAGES  # noqa: E402

ZIPS = "ukb/{eid}_20158_{instance}_{array}.zip"


@pytest.mark.parametrize(("pattern", "sides", "lacks"), [
    ("pts/one.pts", ["L"], "{eid}"),
    ("pts/{eid}_{instance}.pts", ["L", "R"], "{side}"),
    ("pts/{eid}_{side}.pts", ["L"], "{instance}"),
    ("pts/{side}.pts", ["L", "R"], "{eid}, {instance}"),
])
def test_a_pattern_that_cannot_tell_images_apart_is_refused(pattern, sides, lacks):
    with pytest.raises(ValueError) as info:
        check_image_patterns(ZIPS, {"inputs.points_auto": pattern, "inputs.masks": ""}, sides)
    assert str(info.value).startswith(f"inputs.points_auto {pattern!r} lacks {lacks}")


def test_patterns_that_tell_images_apart_pass():
    check_image_patterns(ZIPS, {"a": "p/{eid}_{instance}_{side}.pts", "b": ""}, ["L", "R"])
    check_image_patterns(ZIPS, {"a": "p/{eid}_{instance}.pts"}, ["R"])  # one side: no {side} needed
    check_image_patterns("ukb/{eid}.zip", {"a": "p/{eid}.pts"}, ["L"])  # no instance in the images either


def test_ingest_refuses_one_points_file_for_every_image(tmp_path):
    from test_ingest import make_layout

    from hipoa.cli import main

    layout = make_layout(tmp_path / "layout")
    one = layout / "points" / "auto" / "one.pts"
    one.parent.mkdir(parents=True, exist_ok=True)
    one.write_text("")
    assert main(["ingest", "--images", str(layout / IMAGES), "--points-auto", str(one), "--side", "L", "--shards", "1",
                 "--out", str(tmp_path / "L.parquet")]) == 2
    assert not (tmp_path / "L.parquet").exists()


def test_a_manifest_giving_two_images_one_points_file_is_refused(tmp_path):
    import pandas as pd
    from test_ingest import good_points, hip_dicom

    from hipoa.ingest import build_manifest
    from hipoa.points import write_pts

    for name in ("a", "b"):
        (tmp_path / f"{name}.dcm").write_bytes(hip_dicom("Left Femur", seed=1))
    write_pts(tmp_path / "a.pts", good_points(1))
    pd.DataFrame({"eid": ["9000001", "9000002"], "instance": ["2", "2"], "side": ["L", "L"],
                  "image": ["a.dcm", "b.dcm"], "points_auto": ["a.pts", "a.pts"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ValueError, match=r"column points_auto: one file, .*a\.pts, is looked up for 2 images"):
        build_manifest(manifest=tmp_path / "m.csv", side="L", n_shards=1)
