"""Label masks as PNG files that keep their label values and show in colour.

A mask is ``(rows, cols)`` uint8: 0 background, then each site's label (the data contract's 1, 2,
3). Written as an 8-bit grey PNG, labels 1-3 look black in any viewer. :func:`write_label_png`
writes a palette ("P" mode) PNG instead: the pixel values are still the labels (readers that take
the PNG's values, ``numpy.asarray(PIL.Image.open(path))``, hipoa's own included, see the same
numbers), and the palette gives each label a colour. :func:`read_label_png` is the one reader:
ingest's check (:func:`mask_problem`), the crop and the synthetic preview all call it.
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

MASK_PROBLEMS: dict[str, str] = {
    "mask_not_a_file": "the mask path exists but is not a regular file",
    "mask_not_png": "the file is not a PNG (e.g. a JPEG renamed .png), or cannot be decoded",
    "mask_wrong_mode": "not an 8-bit single-channel PNG (grey or palette)",
    "mask_wrong_size": "rows x columns differ from the image's",
    "mask_bad_labels": "holds values other than 0 and the sites' labels",
}
"""Why a mask file is not used for training (the image is still phenotyped, ``annotated`` false)."""

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class MaskError(ValueError):
    """A label mask that cannot be used: ``problem`` is a :data:`MASK_PROBLEMS` key, the message
    names the file and what is wrong."""

    def __init__(self, problem: str, detail: str) -> None:
        super().__init__(detail)
        self.problem = problem


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


def png_size(path: str | Path) -> tuple[int, int] | None:
    """``(rows, cols)`` from a PNG's IHDR chunk, or None if the file is not a PNG."""
    with open(path, "rb") as fp:
        head = fp.read(24)
    if len(head) < 24 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")


def read_label_png(path: str | Path, shape: tuple[int, int] | None = None,
                   labels: tuple[int, ...] | None = None) -> np.ndarray:
    """Read a label mask: an 8-bit grey or palette PNG whose values are 0 and the sites' labels.

    The PNG signature and IHDR size are read before decoding, so a mask the size of a bomb is
    never decoded.

    Args:
        path: The mask file.
        shape: ``(rows, cols)`` of the image it labels, or None (not compared).
        labels: The sites' labels (any other non-zero value is a problem), or None (not checked).

    Returns:
        ``(rows, cols)`` uint8.

    Raises:
        MaskError: with its :data:`MASK_PROBLEMS` key, naming the file.
    """
    from PIL import Image

    from hipoa.dicom import regular_file_problem

    problem = regular_file_problem(path)
    if problem:
        raise MaskError("mask_not_a_file", f"{path}: {problem}, expected a PNG file")
    try:
        size = png_size(path)
    except OSError as exc:
        raise MaskError("mask_not_png", f"{path}: cannot read: {exc}") from None
    if size is None:
        raise MaskError("mask_not_png", f"{path}: no PNG signature and IHDR chunk (a JPEG or other file renamed .png?)")
    if shape is not None and size != tuple(shape):
        raise MaskError("mask_wrong_size",
                        f"{path}: mask is {size[0]} x {size[1]} (rows x cols), the image {shape[0]} x {shape[1]}")
    try:
        with Image.open(path) as im:
            if im.format != "PNG" or im.mode not in ("L", "P"):
                raise MaskError("mask_wrong_mode", f"{path}: PNG mode {im.mode!r}, expected 8-bit grey 'L' or palette 'P'")
            values = np.asarray(im)
    except MaskError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decode failure makes the mask unusable
        raise MaskError("mask_not_png", f"{path}: cannot be decoded as PNG: {type(exc).__name__}: {exc}") from None
    if labels is not None:
        bad = sorted(set(np.unique(values).tolist()) - {0, *labels})
        if bad:
            raise MaskError("mask_bad_labels", f"{path}: values {bad[:10]} are not 0 or a site label {sorted(labels)}")
    return values.astype(np.uint8, copy=False)


def mask_problem(path: str | Path, shape: tuple[int, int] | None, labels: tuple[int, ...]) -> tuple[str, str]:
    """``(problem, detail)`` of a label mask (a :data:`MASK_PROBLEMS` key), ``("", "")`` when
    :func:`read_label_png` reads it."""
    try:
        read_label_png(path, shape, labels)
    except MaskError as exc:
        return exc.problem, str(exc)
    return "", ""
