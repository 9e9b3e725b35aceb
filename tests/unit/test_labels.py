"""Label PNGs (hipoa.labels): the values stay the labels, the palette shows them in colour."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hipoa.ingest import check_mask
from hipoa.labels import PALETTE, write_label_png


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
    # hipoa's own mask check reads it as the labels it holds
    assert check_mask(str(path), (6, 8), (1, 2, 3)) == ("", "")


def test_label_png_refuses_what_is_not_a_label_mask(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_label_png(tmp_path / "m.png", np.zeros((4, 4), np.int32))
    with pytest.raises(ValueError, match=r"\(rows, cols\)"):
        write_label_png(tmp_path / "m.png", np.zeros((4, 4, 3), np.uint8))
