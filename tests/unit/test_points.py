"""ISBE / BoneFinder .pts reading and writing (hipoa.points)."""

from __future__ import annotations

import numpy as np
import pytest

from hipoa.points import N_POINTS, PointsError, read_pts, write_pts


def _pts_text(points: list[tuple[float, float]], declared: int | None = None) -> str:
    n = len(points) if declared is None else declared
    body = "\n".join(f"{x} {y}" for x, y in points)
    return f"version: 1\nn_points: {n}\n{{\n{body}\n}}\n"


def test_round_trip_85_points(tmp_path):
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 600, size=(N_POINTS, 2)).round(3)
    path = tmp_path / "a.pts"
    write_pts(path, pts)
    back = read_pts(path)
    assert back.shape == (85, 2) and back.dtype == np.float64
    np.testing.assert_allclose(back, pts, atol=5e-4)
    assert path.read_text().startswith("version: 1\nn_points: 85\n{\n")


def test_reads_bonefinder_text_by_hand(tmp_path):
    path = tmp_path / "b.pts"
    path.write_text("version: 1\r\nn_points:  3\r\n{\r\n316.069 201.255\r\n  1 2\r\n-0.5 0\r\n}\r\n")
    pts = read_pts(path, n_points=3)
    np.testing.assert_array_equal(pts, [[316.069, 201.255], [1.0, 2.0], [-0.5, 0.0]])
    # columns are x then y
    assert pts[0, 0] == 316.069 and pts[0, 1] == 201.255


def test_any_count_when_n_points_none(tmp_path):
    path = tmp_path / "c.pts"
    path.write_text(_pts_text([(1, 2), (3, 4)]))
    assert read_pts(path, n_points=None).shape == (2, 2)


@pytest.mark.parametrize(
    ("text", "line", "value"),
    [
        ("version: 2\nn_points: 1\n{\n1 2\n}\n", 1, "'2'"),
        ("version: 1\nn_points: many\n{\n1 2\n}\n", 2, "'many'"),
        ("version: 1\nnonsense\n{\n1 2\n}\n", 2, "'nonsense'"),
        ("version: 1\nn_points: 2\n{\n1 2\n3 y\n}\n", 5, "'3 y'"),
        ("version: 1\nn_points: 2\n{\n1 2\n3\n}\n", 5, "'3'"),
        ("version: 1\nn_points: 2\n{\n1 2\n3 4 5\n}\n", 5, "'3 4 5'"),
        ("version: 1\nn_points: 2\n{\n1 2\nnan 4\n}\n", 5, "'nan 4'"),
        ("version: 1\nn_points: 2\n{\n1 2\n3 4\n", 5, "'3 4'"),  # truncated: no closing brace
        ("version: 1\nn_points: 3\n{\n1 2\n3 4\n}\n", 2, "n_points: 3"),  # header/list disagree
        ("version: 1\n{\n1 2\n}\n", 2, "n_points"),  # no n_points before '{'
        ("version: 1\nn_points: 1\n", 2, "'n_points: 1'"),  # no '{'
    ],
)
def test_errors_name_file_line_and_value(tmp_path, text, line, value):
    path = tmp_path / "bad.pts"
    path.write_text(text)
    with pytest.raises(PointsError) as exc:
        read_pts(path, n_points=None)
    msg = str(exc.value)
    assert str(path) in msg
    assert f"line {line}:" in msg
    assert value in msg


def test_wrong_count_names_file_line_and_counts(tmp_path):
    path = tmp_path / "short.pts"
    path.write_text(_pts_text([(1.0, 2.0)] * 84))
    with pytest.raises(PointsError) as exc:
        read_pts(path)  # 85 expected
    msg = str(exc.value)
    assert str(path) in msg and "line 2:" in msg and "85" in msg and "84" in msg


def test_binary_file_is_points_error(tmp_path):
    path = tmp_path / "bin.pts"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PointsError, match="bin.pts"):
        read_pts(path)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_pts(tmp_path / "nope.pts")


def test_write_rejects_bad_shapes_and_values(tmp_path):
    with pytest.raises(ValueError, match=r"x.pts.*\(3,\)"):
        write_pts(tmp_path / "x.pts", np.zeros(3))
    with pytest.raises(ValueError, match=r"y.pts.*\[1\].*nan"):
        write_pts(tmp_path / "y.pts", np.array([[0.0, 1.0], [np.nan, 2.0]]))
