"""Label masks as PNG files that keep their label values and show in colour.

A mask is ``(rows, cols)`` uint8: 0 background, then each site's label (the data contract's 1, 2,
3). Written as an 8-bit grey PNG, labels 1-3 look black in any viewer. :func:`write_label_png`
writes a palette ("P" mode) PNG instead: the pixel values are still the labels (readers that take
the PNG's values, ``numpy.asarray(PIL.Image.open(path))``, hipoa's own included, see the same
numbers), and the palette gives each label a colour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_COLOURS = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (245, 130, 48), (210, 245, 60), (250, 190, 190),
)
"""Label 1, 2, 3, ... in turn (red, green, blue for the contract's three sites; then repeating)."""

PALETTE: tuple[tuple[int, int, int], ...] = ((0, 0, 0),) + tuple(_COLOURS[(v - 1) % len(_COLOURS)] for v in range(1, 256))
"""RGB of every value 0..255: 0 black (background), labels coloured."""


def write_label_png(path: str | Path, labels: np.ndarray) -> None:
    """Write a label mask as a palette PNG whose pixel values are the labels.

    Args:
        path: The ``.png`` to write (an open binary file works too).
        labels: ``(rows, cols)`` uint8, 0 background, site labels elsewhere.

    Raises:
        ValueError: naming the shape or dtype when ``labels`` is not a 2-D uint8 array.
    """
    from PIL import Image

    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"a label mask must be (rows, cols) uint8, got {labels.shape} {labels.dtype}")
    image = Image.fromarray(labels, mode="L").convert("P")  # "L" -> "P" keeps the values as indices
    image.putpalette([c for rgb in PALETTE for c in rgb])
    image.save(path, format="PNG", compress_level=6)
