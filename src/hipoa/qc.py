"""The QC vocabulary: every ``qc_reason`` an image can get, and the limits behind them.

An image that cannot be measured keeps its row in every table, with NA phenotypes and the
*first* reason that applies, in the order of :data:`REASONS` (the order the checks run: ingest,
then crop, then predict, then gather). Every module takes its reason strings from here; writers
call :func:`check_reasons`, so no other string can reach a table.

:class:`Limits` holds the plausibility ranges (pixel spacing, image size, reference length) and
the resource caps (bytes per zip member, pixels per image, members per zip) that guard
measurement and memory. Their defaults fit hip DXA; the workflow passes config ``qc`` to the
``hipoa ingest`` and ``hipoa crop-patches`` commands as ``--limits JSON``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

NOT_A_FILE = "not_a_file"
UNREADABLE_ZIP = "unreadable_zip"
IMAGE_TOO_LARGE = "image_too_large"
NO_HIP_DICOM = "no_hip_dicom"
AMBIGUOUS_HIP_DICOM = "ambiguous_hip_dicom"
UNREADABLE_DICOM = "unreadable_dicom"
IMPLAUSIBLE_IMAGE_SIZE = "implausible_image_size"
IMPLAUSIBLE_SPACING = "implausible_spacing"
SPACING_INCONSISTENT = "spacing_inconsistent"
PIXEL_DATA_INCONSISTENT = "pixel_data_inconsistent"
POINTS_MISSING = "points_missing"
POINTS_INVALID = "points_invalid"
POINTS_OUTSIDE_IMAGE = "points_outside_image"
IMPLAUSIBLE_REFERENCE_LENGTH = "implausible_reference_length"
DUPLICATE_IMAGE = "duplicate_image"
HEAD_OUT_OF_VIEW = "head_out_of_view"
PATCH_OUTSIDE_IMAGE = "patch_outside_image"
IMPLAUSIBLE_PIXELS = "implausible_pixels"
IMPLANT = "implant"
MOTION = "motion"
POINTS_IMPLAUSIBLE = "points_implausible"
PIXEL_SPACING_UNKNOWN = "pixel_spacing_unknown"
CROP_FAILED = "crop_failed"
NOT_MEASURED = "not_measured"

REASONS: dict[str, str] = {
    NOT_A_FILE: "the image path is not a regular file (a directory, FIFO, device or broken link); never opened",
    UNREADABLE_ZIP: "the zip is missing or cannot be opened, or a member cannot be read (bad zip, CRC error, truncated download)",
    IMAGE_TOO_LARGE: "over a resource cap (qc.max_member_mb, qc.max_image_pixels, qc.max_zip_members); not decoded",
    NO_HIP_DICOM: "no DICOM in the zip has this side's (0018,1030) Protocol Name (Left Femur / Right Femur)",
    AMBIGUOUS_HIP_DICOM: "two or more DICOMs in the zip have this side's protocol; none is picked",
    UNREADABLE_DICOM: "the hip DICOM is missing, or its header or pixel data cannot be used (missing tags, colour, truncated, undecodable)",
    IMPLAUSIBLE_IMAGE_SIZE: "Rows or Columns outside qc.image_size_px",
    IMPLAUSIBLE_SPACING: "pixel spacing outside qc.spacing_mm, or row and column spacing differ by more than qc.max_spacing_anisotropy",
    SPACING_INCONSISTENT: "the header's spacing sources (Pixel Spacing, Imager Pixel Spacing, Exposed Area over the matrix) "
    "differ by more than qc.spacing_agreement",
    PIXEL_DATA_INCONSISTENT: "the stored pixels contradict the header: Pixel Data longer than the matrix needs, "
    "values outside the range Bits Stored and Pixel Representation allow, or nearly every pixel one value",
    POINTS_MISSING: "no automatic .pts file",
    POINTS_INVALID: "the automatic .pts file is malformed, not a regular file, or has the wrong number of points",
    POINTS_OUTSIDE_IMAGE: "an automatic point lies outside the image",
    IMPLAUSIBLE_REFERENCE_LENGTH: "the reference length (mm, between the sites' reference points) is outside "
    "qc.reference_length_mm, or more than qc.reference_length_max_z robust SDs from the shard's median (log scale)",
    DUPLICATE_IMAGE: "another image of the same (eid, instance, side) passed QC first and is kept",
    HEAD_OUT_OF_VIEW: "the femoral head or acetabulum is cut by the image edge: an outline point within "
    "qc.edge_margin_mm of it, or the head's fitted circle beyond it",
    PATCH_OUTSIDE_IMAGE: "a site's patch lies less than patches.min_inside_fraction inside the image",
    IMPLAUSIBLE_PIXELS: "the decoded image is no hip DXA: bone not brighter than the soft tissue around the femur "
    "outline (an inverted image), or a noise-like texture filling the pixel range",
    IMPLANT: "a metal hip prosthesis: at least qc.implant_min_area_mm2 of connected pixels at the top of the image's "
    "own range (>= qc.implant_level of the way from soft tissue to the brightest mm^2) inside the hip outline",
    MOTION: "patient motion: the image repeated at a 2.5-10 mm shift (whitened autocorrelation peak >= qc.motion_score)",
    POINTS_IMPLAUSIBLE: "a site's automatic points are far from the local outline shape of the shard's other hips "
    "(robust Mahalanobis score > qc.points_max_z); that site is NA, the others are measured",
    PIXEL_SPACING_UNKNOWN: "the patch store has no pixel spacing for the image, so no area can be computed",
    CROP_FAILED: "cropping raised an unexpected error (logged with its traceback); please report it",
    NOT_MEASURED: "a site has no measurement although no earlier stage gave a reason (a safeguard; please report it)",
}
"""Every ``qc_reason``, in the order the checks apply, with its one-line meaning."""

UNFIT = (HEAD_OUT_OF_VIEW, IMPLANT, MOTION)
"""Reasons of images readable but unfit to measure (:mod:`hipoa.fitness`); the report shows them."""

SAFEGUARDS = frozenset({CROP_FAILED, NOT_MEASURED, PIXEL_SPACING_UNKNOWN})
"""Reasons no valid input is expected to reach: they catch bugs and hand-edited intermediates."""


def check_reasons(values: Iterable[object], where: str) -> None:
    """Raise ValueError naming ``where`` if any value is neither ``""`` nor in :data:`REASONS`."""
    unknown = sorted({str(v) for v in values if v not in ("", None) and str(v) not in REASONS})
    if unknown:
        raise ValueError(f"{where}: qc_reason(s) {unknown} are not in hipoa.qc.REASONS")


@dataclass(frozen=True)
class Limits:
    """Plausibility ranges and resource caps (config ``qc``; see config/README.md).

    Attributes:
        spacing_mm: ``[low, high]`` pixel spacing in mm, each axis (DXA: about 0.1-0.5).
        max_spacing_anisotropy: Largest ``|dy - dx| / min(dy, dx)`` (DXA pixels are square).
        image_size_px: ``[low, high]`` for Rows and for Columns.
        spacing_agreement: Largest relative difference ``|a - b| / min(a, b)`` between the spacing
            sources a header carries (Pixel Spacing, Imager Pixel Spacing, Exposed Area over the
            matrix), each axis; above it, ``spacing_inconsistent``.
        reference_length_mm: ``[low, high]`` of the reference length in mm (adult hips: ~45-80;
            the synthetic cohorts 55-70).
        reference_length_max_z: Largest robust z of ``log(reference length)`` against the shard's
            other images (median, 1.4826 x MAD); above it, ``implausible_reference_length``.
            Checked when the shard has at least ``points_min_images`` images with a length.
        max_member_mb: Largest size of one DICOM (zip member, declared and inflated, or file) in MiB.
        max_image_pixels: Largest Rows x Columns x Samples per Pixel.
        max_zip_members: Most members one zip may hold (UKB's hold under 10).
        edge_margin_mm: A head or acetabulum outline point nearer the image edge than this is
            ``head_out_of_view`` (an automatic search keeps cut-off points on the edge).
        implant_level: Fraction of the way from the hip region's soft tissue (its 5th
            percentile) to its brightest mm^2 at and above which a pixel counts as metal (implant
            check, :func:`hipoa.fitness.metal_level`: the image's own intensities, not Bits Stored).
        implant_min_area_mm2: Smallest connected metal area inside the hip outline that is an
            ``implant`` (a femoral stem covers thousands of mm^2).
        points_max_z: A site whose local outline (the 11 points around its centre, in the patch's
            frame) scores above this against the shard's other hips is ``points_implausible``
            (:func:`hipoa.patches.points_scores`: RMS robust z, about 1 for a typical hip).
        points_min_images: Fewest measurable images a shard needs for that model and for the
            reference-length outlier test; fewer: not checked.
        motion_score: Peak of the whitened autocorrelation at a 2.5-10 mm shift, in robust
            standard deviations of that autocorrelation, above which an image is ``motion``
            (:func:`hipoa.fitness.motion_score`; under 5 for 8,999 of 9,000 still synthetic hips
            over the nine test scanner textures, 5.09 or more for every one of 3,600 doubled ones;
            benchmarks/fitness.py).
    """

    spacing_mm: tuple[float, float] = (0.05, 1.0)
    max_spacing_anisotropy: float = 0.05
    image_size_px: tuple[int, int] = (32, 8192)
    spacing_agreement: float = 0.10
    reference_length_mm: tuple[float, float] = (40.0, 100.0)
    reference_length_max_z: float = 5.0
    max_member_mb: float = 64.0
    max_image_pixels: int = 4096 * 4096
    max_zip_members: int = 64
    edge_margin_mm: float = 1.5
    implant_level: float = 0.97
    implant_min_area_mm2: float = 100.0
    motion_score: float = 5.0
    points_max_z: float = 2.5
    points_min_images: int = 40

    def __post_init__(self) -> None:
        for name in ("spacing_mm", "image_size_px", "reference_length_mm"):
            value = getattr(self, name)
            try:
                low, high = (float(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"qc.{name}: expected [low, high], got {value!r}") from None
            if not (math.isfinite(low) and math.isfinite(high) and 0 < low < high):
                raise ValueError(f"qc.{name}: expected 0 < low < high, got {list(value)}")
            object.__setattr__(self, name, tuple(type(value[0])(v) for v in value))
        for name in ("max_spacing_anisotropy", "spacing_agreement", "reference_length_max_z", "max_member_mb", "max_image_pixels", "max_zip_members",
                     "edge_margin_mm", "implant_level", "implant_min_area_mm2", "motion_score", "points_max_z",
                     "points_min_images"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"qc.{name}: expected a positive number, got {value!r}")
        if self.implant_level > 1:
            raise ValueError(f"qc.implant_level: expected a fraction in (0, 1], got {self.implant_level!r}")

    @property
    def max_member_bytes(self) -> int:
        return int(self.max_member_mb * 2**20)

    def spacing_problem(self, spacing_mm: tuple[float, float]) -> str:
        """``""`` when ``(dy, dx)`` is plausible, else what is wrong (for the log)."""
        dy, dx = (float(v) for v in spacing_mm)
        low, high = self.spacing_mm
        if not all(math.isfinite(v) and low <= v <= high for v in (dy, dx)):
            return f"pixel spacing (dy, dx) = ({dy:g}, {dx:g}) mm is outside qc.spacing_mm [{low:g}, {high:g}]"
        anisotropy = abs(dy - dx) / min(dy, dx)
        if anisotropy > self.max_spacing_anisotropy:
            return (
                f"pixel spacing (dy, dx) = ({dy:g}, {dx:g}) mm differs by {100 * anisotropy:.1f} % "
                f"(> qc.max_spacing_anisotropy {100 * self.max_spacing_anisotropy:g} %)"
            )
        return ""

    def size_problem(self, rows: int, cols: int) -> str:
        """``""`` when the image size is plausible, else what is wrong."""
        low, high = self.image_size_px
        if not (low <= rows <= high and low <= cols <= high):
            return f"image is {rows} x {cols} pixels (rows x columns), outside qc.image_size_px [{low}, {high}]"
        return ""

    def reference_length_problem(self, length_mm: float) -> str:
        """``""`` when the reference length is plausible, else what is wrong."""
        low, high = self.reference_length_mm
        if not (math.isfinite(length_mm) and low <= length_mm <= high):
            return f"reference length {length_mm:.3f} mm is outside qc.reference_length_mm [{low:g}, {high:g}]"
        return ""

    def to_json(self) -> str:
        return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}, sort_keys=True)


LIMIT_KEYS = tuple(f.name for f in fields(Limits))


def load_limits(value: str | Path | Mapping[str, Any] | None) -> Limits:
    """:class:`Limits` from ``None`` (defaults), a mapping, a JSON string or a JSON/YAML file.

    Raises:
        ValueError: an unknown key or a bad value, naming it.
    """
    if value is None or value == "":
        return Limits()
    if isinstance(value, Mapping):
        data = dict(value)
    else:
        text = str(value)
        if text.lstrip().startswith("{"):
            data = json.loads(text)
        else:
            import yaml

            path = Path(text)
            if not path.is_file():
                raise ValueError(f"--limits: {path} is neither a JSON object nor a file")
            data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"qc limits: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(LIMIT_KEYS))
    if unknown:
        raise ValueError(f"qc: unknown key(s) {unknown}; known: {list(LIMIT_KEYS)}")
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return Limits(**data)
