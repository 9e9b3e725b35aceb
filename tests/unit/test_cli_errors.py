"""The command line's leftovers of issue 22 item 7: a missing input is named as the user gave it,
a shard outside the manifest is refused before anything is written, huge numbers are printed
compactly. Every case runs ``hipoa.cli.main`` with argv, as the workflow does; none loads
TensorFlow (the checks come first)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_ingest import good_points, ukb_members, write_zip  # noqa: E402  (tests/unit is on sys.path)

from hipoa.cli import main  # noqa: E402
from hipoa.points import write_pts  # noqa: E402

IMAGES = "ukb/{eid}_20158_{instance}_{array}.zip"
AUTO = "pts/{eid}_{instance}_{side}.pts"


def _error(capsys) -> str:
    lines = [x for x in capsys.readouterr().err.splitlines() if "ERROR" in x]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("command, option", [
    (["crop-patches", "--shard", "0", "--out", "{tmp}/s.zarr", "--manifest"], "manifest"),
    (["predict-masks", "--stores", "{tmp}/s.zarr", "--out", "{tmp}/p.parquet", "--model"],
     "--model lateral_acetabulum="),
    (["evaluate", "--site", "lateral_acetabulum", "--stores", "{tmp}/s.zarr", "--splits", "{tmp}/s.parquet",
      "--out", "{tmp}/e.json", "--model"], "--model "),
    (["train-unet", "--site", "lateral_acetabulum", "--out", "{tmp}/m/unet.keras", "--load"], "--load "),
    (["release", "--manifests", "{tmp}/m.parquet", "--out", "{tmp}/r.parquet", "--phenotypes"], "--phenotypes "),
    (["report-figures", "--evaluation", "{tmp}/e.html", "--qc", "{tmp}/q.html", "--areas", "{tmp}/a.png",
      "--prevalence", "{tmp}/p.png", "--phenotypes"], "--phenotypes "),
])
def test_a_missing_input_is_named_as_given(tmp_path, capsys, command, option):
    given = tmp_path / "missing" / "input"  # no suffix: a derived name (input.json, input.parquet) would show
    value = f"lateral_acetabulum={given}" if option.endswith("=") else str(given)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in command] + [value]
    assert main(argv) == 2
    line = _error(capsys)
    assert f"{given}: no such file" in line and option.strip() in line
    assert not re.search(re.escape(str(given)) + r"\.\w", line)  # never input.json / input.parquet
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


@pytest.fixture(scope="module")
def one_shard_manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    (root / "pts").mkdir()
    for eid in (9000001, 9000002):
        write_zip(root / "ukb" / f"{eid}_20158_2_0.zip", ukb_members(eid))
        write_pts(root / "pts" / f"{eid}_2_L.pts", good_points(eid % 7))
    out = root / "L.parquet"
    assert main(["ingest", "--images", str(root / IMAGES), "--points-auto", str(root / AUTO), "--side", "L",
                 "--shards", "1", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("shard", ["5", "1", "-1"])
def test_a_shard_outside_the_manifest_is_refused_before_anything_is_written(one_shard_manifest, tmp_path, capsys,
                                                                            shard):
    capsys.readouterr()
    store = tmp_path / f"shard-{shard}.zarr"
    assert main(["crop-patches", "--manifest", str(one_shard_manifest), "--shard", shard, "--out", str(store)]) == 2
    line = _error(capsys)
    assert f"{one_shard_manifest}: --shard {shard} is outside the manifest's shards 0..0" in line
    assert list(tmp_path.iterdir()) == []  # no store, no temporary one


def test_huge_coordinates_are_logged_compactly(tmp_path, capsys):
    """A coordinate of 1e308 (written in 309 digits) and one too large for a float (400 digits):
    both named, neither printed in full."""
    pts = tmp_path / "pts"
    pts.mkdir()
    for eid in (9000001, 9000002):
        write_zip(tmp_path / "ukb" / f"{eid}_20158_2_0.zip", ukb_members(eid))
    write_pts(pts / "good.pts", good_points(1))
    text = (pts / "good.pts").read_text().splitlines()
    first = text.index("{") + 1
    text[first + 4] = f"{10 ** 308} 3.0"  # 1e308 as a 309-digit integer: a finite float
    (pts / "9000001_2_L.pts").write_text("\n".join(text) + "\n")
    text[first + 4] = f"{10 ** 399} 3.0"  # beyond a float: infinite
    (pts / "9000002_2_L.pts").write_text("\n".join(text) + "\n")
    out = tmp_path / "L.parquet"
    assert main(["-v", "ingest", "--images", str(tmp_path / IMAGES), "--points-auto", str(tmp_path / AUTO),
                 "--side", "L", "--shards", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "first point 4 at (1e+308, 3)" in err  # points_outside_image, compact
    assert "non-finite coordinate '1000000000" in err and "(404 characters)" in err  # the line, cut
    assert not re.search(r"[0-9]{80}", err)  # no number printed in full
