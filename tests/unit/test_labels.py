"""Label PNGs (hipoa.labels): the values stay the labels, the palette shows them in colour, and one
reader refuses every mask that is not one, with its problem code."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hipoa.labels import MASK_PROBLEMS, PALETTE, MaskError, mask_problem, read_label_png, write_label_png


def test_label_png_keeps_values_and_shows_each_site_in_colour(tmp_path):
    labels = np.zeros((6, 8), np.uint8)
    labels[1:3, 1:4], labels[3, 5], labels[5, :2] = 1, 2, 3
    path = tmp_path / "m.png"
    write_label_png(path, labels)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "P"
        np.testing.assert_array_equal(np.asarray(im), labels)  # what every reader of values sees
        rgb = np.asarray(im.convert("RGB"))
    assert tuple(rgb[0, 0]) == (0, 0, 0)  # background stays black
    colours = {tuple(rgb[1, 1]), tuple(rgb[3, 5]), tuple(rgb[5, 0])}
    assert len(colours) == 3 and (0, 0, 0) not in colours  # three sites, three visible colours
    assert len(set(PALETTE[1:4])) == 3
    # hipoa's own reader reads it as the labels it holds
    assert mask_problem(str(path), (6, 8), (1, 2, 3)) == ("", "")
    read = read_label_png(path, (6, 8), (1, 2, 3))
    assert read.dtype == np.uint8
    np.testing.assert_array_equal(read, labels)


def test_label_png_refuses_what_is_not_a_label_mask(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_label_png(tmp_path / "m.png", np.zeros((4, 4), np.int32))
    with pytest.raises(ValueError, match=r"\(rows, cols\)"):
        write_label_png(tmp_path / "m.png", np.zeros((4, 4, 3), np.uint8))


def _grey(path, array, mode="L"):
    Image.fromarray(array).convert(mode).save(path, format="PNG")
    return path


@pytest.mark.parametrize(("make", "problem", "words"), [
    (lambda d: _grey(d / "m.png", np.zeros((5, 8), np.uint8)), "mask_wrong_size", "mask is 5 x 8 (rows x cols)"),
    (lambda d: _grey(d / "m.png", np.full((6, 8), 7, np.uint8)), "mask_bad_labels", "values [7] are not 0"),
    (lambda d: _grey(d / "m.png", np.zeros((6, 8), np.uint8), "RGB"), "mask_wrong_mode", "PNG mode 'RGB'"),
    (lambda d: (Image.fromarray(np.zeros((6, 8), np.uint8)).save(d / "m.png", format="JPEG"), d / "m.png")[1],
     "mask_not_png", "no PNG signature"),
    (lambda d: (d / "m.png").mkdir() or d / "m.png", "mask_not_a_file", "expected a PNG file"),
    (lambda d: ((d / "m.png").write_bytes(_png_head(d)[:40]), d / "m.png")[1], "mask_not_png", "cannot be decoded"),
])
def test_the_reader_names_the_file_and_the_problem(tmp_path, make, problem, words):
    path = make(tmp_path)
    with pytest.raises(MaskError) as caught:
        read_label_png(path, (6, 8), (1, 2, 3))
    assert caught.value.problem == problem and problem in MASK_PROBLEMS
    assert str(path) in str(caught.value) and words in str(caught.value)
    assert mask_problem(path, (6, 8), (1, 2, 3)) == (problem, str(caught.value))


def _png_head(d):
    """A PNG's bytes (its head: signature and IHDR intact, the data cut off by the caller)."""
    _grey(d / "whole.png", np.zeros((6, 8), np.uint8))
    return (d / "whole.png").read_bytes()


def test_without_shape_or_labels_the_reader_checks_neither(tmp_path):
    path = _grey(tmp_path / "m.png", np.full((5, 8), 7, np.uint8))
    assert read_label_png(path).shape == (5, 8)
