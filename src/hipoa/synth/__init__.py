"""A synthetic UK Biobank hip-DXA cohort, deterministic by seed (``hipoa synth``).

No real UKB data can ship with hipoa, so the demo, the tests and the benchmarks run on this
generator. It writes the contract's UKB bulk layout under ``out``::

    ukb/20158/{eid}_20158_2_0.zip        Left Femur + Right Femur DICOMs, 1-2 other scans, manifest.cvs
    points/auto/{eid}_2_{side}.pts       automatic 85-point outline, every image
    points/manual/{eid}_2_{side}.pts     manual outline, annotated images only
    masks/{eid}_2_{side}.png             osteophyte labels 1/2/3, annotated images only
    truth.parquet, truth.csv             one row per (eid, instance, side) image

The DICOMs follow the header profile of UKB's GE Lunar iDXA exports: SOP class CR Image Storage,
Modality ``CR``, Implicit VR Little Endian, 8-bit MONOCHROME2, about 600 x 680 pixels, no
``(0028,0030) Pixel Spacing`` but ``(0040,0303) Exposed Area`` [width_mm, height_mm] giving
0.25 mm pixels, and the scan named only by ``(0018,1030) Protocol Name`` (and
``(0040,0254) Performed Procedure Step Description``). Member names are UIDs that do not reveal
the scan. Patient identity is a placeholder (``ANON^SYNTH``, a random non-eid ``PatientID``, no
birth date).

Anatomy, points and osteophytes are drawn by :mod:`hipoa.synth.anatomy`. ``faults`` plants the broken
inputs ingest must flag (see :data:`FAULTS`), one per participant, cycling through the kinds.

Every participant ``i`` draws from its own ``numpy.random.default_rng([seed, i])``, so the
number of worker processes never changes a byte of the output.

Synthetic eids lie in :data:`SYNTHETIC_EIDS` (9000000-9999999), a block UK Biobank does not
issue (its eids are 7-digit numbers below 7,000,000), so no audit of a repository, a log or a
figure can mistake a synthetic participant for a real one (``tests/unit/test_no_eids.py`` refuses
any other 7-digit number in a tracked file). They are placed by :func:`synthetic_eids` so that a
cohort of a given seed keeps the order and the shards its participants had under the draw of
earlier releases, and with them every split, QC flag and model of the demo.
"""

from __future__ import annotations

import io
import logging
import multiprocessing as mp
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from scipy import ndimage as ndi
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from hipoa import __version__
from hipoa.synth import anatomy
from hipoa.ingest import shard_of
from hipoa.atomic import save_figure
from hipoa.labels import read_label_png, write_label_png
from hipoa.points import write_pts
from hipoa.progress import Progress
from hipoa.sites import DEFAULT_SITES

log = logging.getLogger(__name__)

#: The eids the generator issues: 7 digits, never issued by UK Biobank (see the module doc).
SYNTHETIC_EIDS = range(9_000_000, 10_000_000)
#: Synthetic eids keep their participant's shard for every shard count that divides this.
SHARD_PERIOD = 8
#: Most participants a cohort may have (:func:`synthetic_eids` then runs at most a few hundred
#: numbers past its 900,000 places, of a slack of 100,000).
MAX_PARTICIPANTS = 100_000

INSTANCE = 2
"""UKB visit instance of the imaging visit; every synthetic image belongs to it."""
ARRAY = 0
FIELD = 20158
SPACING_MM = 0.25
"""Pixel size of the hip scans (ExposedArea / matrix size), mm."""
SIZES: tuple[tuple[int, int], ...] = ((600, 680), (608, 672), (624, 704), (640, 680))
"""Hip matrix sizes (rows, cols); UKB's sample Left Femur is 600 x 680. Multiples of 4 so the
Exposed Area is a whole number of mm."""
SIZE_WEIGHTS = (0.55, 0.15, 0.15, 0.15)

FAULTS: dict[str, str] = {
    "corrupt_zip": "unreadable_zip",
    "truncated_dicom": "unreadable_dicom",
    "wrong_point_count": "points_invalid",
    "missing_points": "points_missing",
    "no_hip_scan": "no_hip_dicom",
    "points_off_image": "points_outside_image",
}
"""Plantable fault -> the ``qc_reason`` ingest (or crop) must give that image."""
ZIP_WIDE_FAULTS = frozenset({"corrupt_zip"})
"""Faults that hit both hips of the participant; the others hit the left hip only."""

UNFIT: dict[str, str] = {
    "implant": "implant",
    "cropped_view": "head_out_of_view",
    "motion": "motion",
}
"""Images readable but unfit to measure (``unfit``), left hips only -> the ``qc_reason`` crop must
give them: a metal prosthesis, a field of view whose edge cuts the femoral head, patient motion
(:func:`hipoa.synth.anatomy.add_implant`, :func:`~hipoa.synth.anatomy.crop_view`, :func:`~hipoa.synth.anatomy.add_motion`)."""

SECOND_SIZES: tuple[tuple[int, int], ...] = ((500, 570), (510, 560), (520, 590), (530, 570))
"""Hip matrix sizes of the second scanner (0.30 mm pixels: about the same field in mm), each a whole
number of mm."""
SMALL_MISSED_MM2 = 10.0
"""A second annotator misses half of the osteophytes smaller than this (``annotators=2``)."""

PROTOCOLS = {"L": "Left Femur", "R": "Right Femur"}
OTHER_SCANS = ("AP Spine", "Total Body")
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's root for generated UIDs
IMPLEMENTATION_UID = generate_uid(entropy_srcs=["hipoa synthetic UK Biobank DXA"])
_ZIP_DATE = (2016, 1, 1, 0, 0, 0)  # fixed, so zips are byte-identical between runs

SITE_LABELS = {s.name: s.label for s in DEFAULT_SITES}


@dataclass(frozen=True)
class _Task:
    index: int
    eid: int
    annotated: bool
    fault: str
    unfit: str = ""
    second_scanner: bool = False


@dataclass(frozen=True)
class _Settings:
    out: str
    seed: int
    enriched_prevalence: float
    prevalence: float
    annotate_sides: str
    annotators: int = 1


def zip_name(eid: int | str) -> str:
    return f"{eid}_{FIELD}_{INSTANCE}_{ARRAY}.zip"


def image_stem(eid: int | str, side: str) -> str:
    return f"{eid}_{INSTANCE}_{side}"


# ---------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------


def dicom_bytes(pixels: np.ndarray, protocol: str, *, sop_uid: str, study_uid: str, series_uid: str,
                patient_id: str, study_date: str, series_number: int, spacing_mm: float = SPACING_MM,
                scanner: str = "A", bits_stored: int = 8) -> bytes:
    """Encode an 8-bit image as a UKB-iDXA-like CR DICOM file (Implicit VR Little Endian).

    Args:
        pixels: (rows, cols) uint8, MONOCHROME2 (bright = bone); uint16 when ``bits_stored`` is
            over 8 (another export, :func:`export_pixels`).
        protocol: ``(0018,1030) Protocol Name``, also written to ``(0040,0254)``.
        sop_uid, study_uid, series_uid: UIDs.
        patient_id: Placeholder ``(0010,0020) Patient ID`` (never the eid).
        study_date: ``YYYYMMDD``, used for every date attribute.
        series_number: ``(0020,0011)``.
        spacing_mm: Pixel size; written only as ``(0040,0303) Exposed Area`` = [width, height] mm.
        scanner: ``"A"`` (the first scanner) or another name: device serial and software differ.
        bits_stored: ``(0028,0101) Bits Stored``: 8 (UKB's exports: Bits Allocated 8), or 9-16
            (Bits Allocated 16, High Bit ``bits_stored - 1``).

    Returns:
        The DICOM Part 10 file (preamble, ``DICM``, file meta, data set).
    """
    dtype = np.uint8 if bits_stored == 8 else np.uint16
    if not 8 <= bits_stored <= 16 or pixels.dtype != dtype or pixels.ndim != 2:
        raise ValueError(f"{protocol}: pixels must be 2-D uint8 (Bits Stored 8) or uint16 (9-16), got "
                         f"{pixels.dtype} {pixels.shape} with Bits Stored {bits_stored}")
    if bits_stored > 8 and int(pixels.max(initial=0)) >= 2 ** bits_stored:
        raise ValueError(f"{protocol}: a pixel value {int(pixels.max())} does not fit Bits Stored {bits_stored}")
    rows, cols = pixels.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = "HIPOA_SYNTH"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
    ds.StudyTime = "101500"
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = f"10{15 + series_number:02d}00"
    ds.AccessionNumber = ""
    ds.Modality = "CR"
    ds.Manufacturer = "GE Healthcare"
    ds.InstitutionName = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = ""
    ds.SeriesDescription = ""
    ds.ManufacturerModelName = "Lunar iDXA"
    ds.PatientName = "ANON^SYNTH"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.BodyPartExamined = ""
    ds.DeviceSerialNumber = "SYNTH0001" if scanner == "A" else f"SYNTH{scanner}"
    ds.SoftwareVersions = f"hipoa {__version__} synth" + ("" if scanner == "A" else f" scanner {scanner}")
    ds.ProtocolName = protocol
    ds.ViewPosition = ""
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    # Type 2C in General Series: dciodvfy wants it present; empty (not "L"/"R") like UKB's exports,
    # so nothing but ProtocolName tells the hips apart.
    ds.Laterality = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 8 if bits_stored == 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PerformedProcedureStepDescription = protocol
    ds.ExposedArea = [int(round(cols * spacing_mm)), int(round(rows * spacing_mm))]
    ds.PixelData = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<")).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _manifest_cvs(members: Sequence[tuple[str, int]]) -> bytes:
    lines = ["File Name,File Size"] + [f"{name},{size}" for name, size in members]
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def _zip_bytes(members: Sequence[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data, compresslevel=1)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Points
# ---------------------------------------------------------------------------------------------


def manual_points(rng: np.random.Generator, true: np.ndarray) -> np.ndarray:
    """Manual placement: the true outline plus ~1 px of independent noise. (85, 2) px."""
    return true + rng.normal(0.0, 0.9, true.shape)


def auto_points(rng: np.random.Generator, true: np.ndarray, rows: int, cols: int,
                gross_rate: float = 0.04, spacing_mm: float = SPACING_MM, gross: list | None = None) -> np.ndarray:
    """Automatic placement (BoneFinder-like) of the outline.

    The true outline gets a small random similarity transform (rotation ~1.2 deg, scale ~1.5 %,
    shift ~2 px), a smooth deformation along each bone's contour (~1.5 px), independent noise
    (~2 px) and, in ``gross_rate`` of images, a gross error: a run of 6-16 consecutive points
    displaced by 3-7 mm. Points stay at least 2 px inside the image. ``gross``, when given, gets
    the first and last index of that run appended.

    Returns:
        (85, 2) float64 px.
    """
    c = true.mean(axis=0)
    ang = np.deg2rad(rng.normal(0.0, 1.2))
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    pts = (true - c) @ rot.T * (1.0 + rng.normal(0.0, 0.015)) + c + rng.normal(0.0, 2.0, 2)
    smooth = np.zeros_like(true)
    for part in (anatomy.FEMUR, anatomy.PELVIS):
        n = part.stop - part.start
        raw = rng.normal(0.0, 1.0, (n + 8, 2))
        kern = np.exp(-0.5 * (np.arange(-4, 5) / 2.0) ** 2)
        sm = np.stack([np.convolve(raw[:, j], kern / np.sqrt((kern ** 2).sum()), mode="valid") for j in (0, 1)], 1)
        smooth[part] = 1.5 * sm[:n]
    pts = pts + smooth + rng.normal(0.0, 2.0, true.shape)
    if rng.random() < gross_rate:
        run = int(rng.integers(6, 17))
        start = int(rng.integers(0, anatomy.N_POINTS - run))
        shift_mm = rng.uniform(3.0, 7.0)
        ang = rng.uniform(0.0, 2.0 * np.pi)
        taper = np.sin(np.linspace(0.0, np.pi, run + 2)[1:-1]) ** 0.5
        pts[start:start + run] += (taper[:, None] * shift_mm / spacing_mm) * np.array([np.cos(ang), np.sin(ang)])
        if gross is not None:
            gross.extend([start, start + run - 1])
    pts[:, 0] = np.clip(pts[:, 0], 2.0, cols - 3.0)
    pts[:, 1] = np.clip(pts[:, 1], 2.0, rows - 3.0)
    return pts


# ---------------------------------------------------------------------------------------------
# One participant
# ---------------------------------------------------------------------------------------------


def _hip(rng: np.random.Generator, who: anatomy.Participant, rows: int, cols: int,
         present: dict[int, bool], side: str, scanner: anatomy.Scanner = anatomy.FIRST_SCANNER,
         unfit: str = "") -> anatomy.HipRender:
    hip, geo = _normal_hip(rng, who, rows, cols, present, scanner)
    hip = _make_unfit(rng, hip, geo, unfit)
    return anatomy.mirror_hip(hip) if side == "R" else hip


def _normal_hip(rng: np.random.Generator, who: anatomy.Participant, rows: int, cols: int,
                present: dict[int, bool], scanner: anatomy.Scanner,
                noise: bool = True) -> tuple[anatomy.HipRender, anatomy.HipGeometry]:
    """A left hip as the scanner renders it (``noise`` as :func:`hipoa.synth.anatomy.render_hip`), and its
    geometry."""
    # Redraw the rare geometry whose reference length (points 12-39) leaves ~55-70 mm or whose
    # outline comes within 4 mm of the image edge.
    sp = scanner.spacing_mm
    margin = 4.0 / sp
    for _ in range(50):
        geo = anatomy.draw_geometry(rng, who, rows, cols, sp)
        ref = float(np.linalg.norm(geo.points[12] - geo.points[39])) * sp
        x, y = geo.points[:, 0], geo.points[:, 1]
        if (56.0 <= ref <= 69.0 and x.min() >= margin and y.min() >= margin
                and x.max() <= cols - 1 - margin and y.max() <= rows - 1 - margin):
            break
    spurs = anatomy.draw_osteophytes(rng, geo, present)
    return anatomy.render_hip(rng, who, geo, spurs, scanner, noise=noise), geo


def _make_unfit(rng: np.random.Generator, hip: anatomy.HipRender, geo: anatomy.HipGeometry, unfit: str,
                motion_shift_mm: tuple[float, float] = (3.0, 8.0)) -> anatomy.HipRender:
    if unfit == "implant":
        return anatomy.add_implant(rng, hip, geo)
    if unfit == "cropped_view":
        return anatomy.crop_view(rng, hip, geo)
    if unfit == "motion":
        return anatomy.add_motion(rng, hip, shift_mm=motion_shift_mm)
    return hip


def second_annotator(rng: np.random.Generator, labels: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Another annotator's mask of the same osteophytes: each outline 1 px wider or narrower (even
    odds), and half of those under :data:`SMALL_MISSED_MM2` missed altogether."""
    out = np.zeros_like(labels)
    for label in (1, 2, 3):
        region = labels == label
        if not region.any():
            continue
        if region.sum() * spacing_mm ** 2 < SMALL_MISSED_MM2 and rng.random() < 0.5:
            continue
        grown = ndi.binary_dilation(region) if rng.random() < 0.5 else ndi.binary_erosion(region)
        out[grown & ((labels == 0) | region)] = label
    return out


# ---------------------------------------------------------------------------------------------
# Other exports and scanner textures (the image-fitness benchmark and tests; not hipoa synth)
# ---------------------------------------------------------------------------------------------


EXPORTS: dict[str, str] = {
    "": "as UKB exports it: 8 bits, metal at 251-255",
    "scaled": "8 bits, every value multiplied by 0.76-0.84 (metal at ~80 % of 255)",
    "12in16": "12-bit data (0-4095) in 16-bit words, Bits Stored 16 or 12 (even odds)",
    "windowed": "8 bits through a window whose top lies between the brightest bone and the metal "
                "(the metal clipped at the top)",
    "windowed_bone": "8 bits through a window whose top lies at the 98th-99.8th percentile of the femur's "
                     "pixels (bone and metal clipped together at the top)",
}
"""Ways another site or software version may export the same hip (:func:`export_pixels`)."""


def export_pixels(rng: np.random.Generator, image: np.ndarray, kind: str,
                  bone: np.ndarray) -> tuple[np.ndarray, int]:
    """The pixels of ``image`` as the export ``kind`` (:data:`EXPORTS`) would store them.

    Args:
        image: ``(rows, cols)`` uint8 as rendered (MONOCHROME2).
        kind: A key of :data:`EXPORTS`.
        bone: The femur's pixel values in the same image without any implant (for the windows).

    Returns:
        The stored pixels (uint8, or uint16 for ``12in16``) and their Bits Stored.
    """
    v = image.astype(np.float64)
    if kind == "":
        return image, 8
    if kind == "scaled":
        return np.rint(v * rng.uniform(0.76, 0.84)).astype(np.uint8), 8
    if kind == "12in16":
        # dithered, so that the 12-bit histogram has no 8-bit comb
        out = np.clip(np.rint(v * (4095.0 / 255.0) + rng.uniform(-8.0, 8.0, v.shape)), 0, 4095).astype(np.uint16)
        return out, int(rng.choice([12, 16]))
    if kind in ("windowed", "windowed_bone"):
        if kind == "windowed":
            top = rng.uniform(float(bone.max()) + 3.0, 248.0)
        else:
            top = rng.uniform(*np.percentile(bone, [98.0, 99.8]))
        low = rng.uniform(0.0, 40.0)
        return np.rint(np.clip((v - low) / (top - low), 0.0, 1.0) * 255.0).astype(np.uint8), 8
    raise ValueError(f"export: expected one of {sorted(EXPORTS)}, got {kind!r}")


@dataclass(frozen=True)
class FitnessHip:
    """One synthetic hip for the image-fitness benchmark (:func:`fitness_hip`)."""

    dicom: bytes  # a Left Femur / Right Femur DICOM file, as :func:`dicom_bytes` writes it
    points: np.ndarray  # (85, 2) float64 px, automatic outline of the stored image
    side: str
    scanner: str
    unfit: str
    export: str


def fitness_hip(seed: int, index: int, scanner: anatomy.Scanner = anatomy.FIRST_SCANNER, unfit: str = "",
                export: str = "", motion_shift_mm: tuple[float, float] = (2.5, 10.0)) -> FitnessHip:
    """A single hip on any scanner (:data:`hipoa.synth.anatomy.TEST_SCANNERS`), normal or unfit, in any
    export (:data:`EXPORTS`), deterministic by ``(seed, index)``.

    Args:
        seed, index: Everything follows from them (and the other arguments).
        scanner: How the hip is rendered; the matrix covers about 150 x 170 mm at its spacing.
        unfit: ``""`` or a key of :data:`UNFIT`.
        export: A key of :data:`EXPORTS`.
        motion_shift_mm: Range of the second copy's shift for ``unfit="motion"`` (the whole range
            the motion check looks at; ``hipoa synth`` draws 3-8 mm). The anatomy is doubled
            (:func:`hipoa.synth.anatomy.double_image`, weight 0.3-0.5) before the scanner's noise and
            texture are added, which a doubled image does not repeat.
    """
    if unfit and unfit not in UNFIT:
        raise ValueError(f"unfit: expected '' or one of {sorted(UNFIT)}, got {unfit!r}")
    rng = np.random.default_rng([seed, 0xF17, index])
    who = anatomy.draw_participant(rng)
    sp = scanner.spacing_mm
    rows, cols = (int(round(mm / sp / 4.0)) * 4 for mm in rng.choice([[150.0, 170.0], [152.0, 168.0],
                                                                      [156.0, 176.0], [160.0, 170.0]]))
    present = {label: bool(rng.random() < 0.15) for label in (1, 2, 3)}
    hip, geo = _normal_hip(rng, who, rows, cols, present, scanner, noise=unfit != "motion")
    if unfit == "motion":
        # the patient moves, the detector does not: the anatomy is doubled, then the scanner's
        # noise, banding and texture are added once (hipoa synth doubles them too)
        doubled = anatomy.double_image(rng, hip.image, sp, motion_shift_mm)
        hip = replace(hip, image=anatomy.scan_noise(rng, doubled, scanner))
    bone = hip.image[anatomy._fill((rows, cols), geo.femur_poly)]
    hip = _make_unfit(rng, hip, geo, unfit if unfit != "motion" else "")
    side = "L" if rng.random() < 0.5 else "R"
    if side == "R":
        hip = anatomy.mirror_hip(hip)
    pixels, bits = export_pixels(rng, hip.image, export, bone)
    auto = auto_points(rng, hip.points, rows, cols, spacing_mm=sp)
    ent = [str(seed), "fitness", str(index)]
    data = dicom_bytes(pixels, PROTOCOLS[side], sop_uid=generate_uid(UID_PREFIX, ent), study_uid=generate_uid(
        UID_PREFIX, ent + ["study"]), series_uid=generate_uid(UID_PREFIX, ent + ["series"]), patient_id="SYNFITNESS",
        study_date="20160101", series_number=1, spacing_mm=sp, scanner=scanner.name, bits_stored=bits)
    return FitnessHip(dicom=data, points=auto, side=side, scanner=scanner.name, unfit=unfit, export=export)


def _participant(task: _Task, cfg: _Settings) -> list[dict]:
    """Write one participant's zip, points and masks; return its truth rows (L, R)."""
    rng = np.random.default_rng([cfg.seed, task.index])
    out = Path(cfg.out)
    eid = task.eid
    who = anatomy.draw_participant(rng)
    scanner = anatomy.SECOND_SCANNER if task.second_scanner else anatomy.FIRST_SCANNER
    sizes = SECOND_SIZES if task.second_scanner else SIZES
    rows, cols = sizes[int(rng.choice(len(sizes), p=SIZE_WEIGHTS))]
    sp = scanner.spacing_mm
    patient_id = f"SYN{int(rng.integers(0, 16 ** 10)):010X}"
    study_date = (np.datetime64("2014-04-01") + int(rng.integers(0, 6 * 365))).astype(str).replace("-", "")
    ent = [str(cfg.seed), str(task.index)]
    study_uid = generate_uid(UID_PREFIX, ent + ["study"])

    truth = []
    members: list[tuple[str, bytes]] = []
    fault = task.fault
    for series_number, side in enumerate(("L", "R"), start=1):
        annotated = task.annotated and side in cfg.annotate_sides
        p = cfg.enriched_prevalence if annotated else cfg.prevalence
        present = {label: bool(rng.random() < p) for label in (1, 2, 3)}
        unfit = task.unfit if side == "L" else ""
        hip = _hip(rng, who, rows, cols, present, side, scanner, unfit)
        stem = image_stem(eid, side)
        gross: list[int] = []
        auto = auto_points(rng, hip.points, rows, cols, spacing_mm=sp, gross=gross)
        manual = manual_points(rng, hip.points)
        side_fault = fault if (fault and (side == "L" or fault in ZIP_WIDE_FAULTS)) else ""
        annotator = 1
        mask = hip.labels
        if annotated and cfg.annotators == 2:
            annotator = 1 + int(rng.random() < 0.5)
            if annotator == 2:
                mask = second_annotator(rng, hip.labels, sp)

        if side_fault == "wrong_point_count":
            auto = np.delete(auto, int(rng.integers(0, anatomy.N_POINTS)), axis=0)
        elif side_fault == "points_off_image":
            auto = auto + np.array([2.0 * cols, 1.5 * rows])
        if side_fault != "missing_points":
            write_pts(out / "points" / "auto" / f"{stem}.pts", auto)
        if annotated:
            write_pts(out / "points" / "manual" / f"{stem}.pts", manual)
            write_label_png(out / "masks" / f"{stem}.png", mask)

        sop_uid = generate_uid(UID_PREFIX, ent + [side])
        data = dicom_bytes(hip.image, PROTOCOLS[side], sop_uid=sop_uid, study_uid=study_uid,
                           series_uid=generate_uid(UID_PREFIX, ent + [side, "series"]), patient_id=patient_id,
                           study_date=study_date, series_number=series_number, spacing_mm=sp, scanner=scanner.name)
        if side_fault == "truncated_dicom":
            data = data[: int(len(data) * rng.uniform(0.4, 0.7))]
        if side_fault != "no_hip_scan":
            members.append((f"{sop_uid}.dcm", data))

        row = {
            "eid": eid, "instance": INSTANCE, "side": side, "annotated": annotated,
            "rows": rows, "cols": cols,
        }
        for name, label in SITE_LABELS.items():
            area = float(np.count_nonzero(hip.labels == label)) * sp * sp
            row[f"{name}_present"] = area > 0.0
            row[f"{name}_area_mm2"] = area
        row["reference_length_mm"] = float(np.linalg.norm(hip.points[12] - hip.points[39])) * sp
        row["fault"] = side_fault or unfit
        row["expected_reason"] = FAULTS.get(side_fault, "") or UNFIT.get(unfit, "")
        row["unfit"] = bool(unfit)
        row["scanner"] = scanner.name
        row["annotator"] = annotator if annotated else 0
        row["auto_gross_error"] = f"{gross[0]}-{gross[1]}" if gross else ""
        truth.append(row)

    n_other = int(rng.integers(1, 3))
    for j, protocol in enumerate(rng.permutation(OTHER_SCANS)[:n_other]):
        uid = generate_uid(UID_PREFIX, ent + [str(protocol)])
        members.append((f"{uid}.dcm", dicom_bytes(
            anatomy.render_other_scan(rng, str(protocol)), str(protocol), sop_uid=uid, study_uid=study_uid,
            series_uid=generate_uid(UID_PREFIX, ent + [str(protocol), "series"]), patient_id=patient_id,
            study_date=study_date, series_number=3 + j)))
    members = [members[k] for k in rng.permutation(len(members))]
    members.append(("manifest.cvs", _manifest_cvs([(n, len(d)) for n, d in members])))
    blob = _zip_bytes(members)
    if fault == "corrupt_zip":
        # a download cut short: the central directory at the end is gone
        blob = blob[: int(len(blob) * rng.uniform(0.3, 0.8))]
    (out / "ukb" / str(FIELD) / zip_name(eid)).write_bytes(blob)
    return truth


def _run(args: tuple[_Task, _Settings]) -> list[dict]:
    return _participant(*args)


# ---------------------------------------------------------------------------------------------
# Cohort
# ---------------------------------------------------------------------------------------------


_LAYOUT = {
    Path("ukb") / str(FIELD): f"*_{FIELD}_{INSTANCE}_{ARRAY}.zip",
    Path("points") / "auto": f"*_{INSTANCE}_[LR].pts",
    Path("points") / "manual": f"*_{INSTANCE}_[LR].pts",
    Path("masks"): f"*_{INSTANCE}_[LR].png",
}


def _clear_previous(out: Path) -> None:
    """Remove the image, points and mask files of an earlier cohort in ``out`` (one with a
    ``truth.parquet``), so that no stale mask or points file outlives the new truth table."""
    if not (out / "truth.parquet").exists():
        return
    n = 0
    for sub, pattern in _LAYOUT.items():
        for f in (out / sub).glob(pattern):
            f.unlink()
            n += 1
    (out / "truth.parquet").unlink()
    (out / "truth.csv").unlink(missing_ok=True)
    log.info("synth: removed %d files of the previous cohort in %s", n, out)


def synthetic_eids(drawn: np.ndarray) -> np.ndarray:
    """Eids in :data:`SYNTHETIC_EIDS` for ascending ``drawn`` numbers (the draw of earlier releases).

    ``drawn`` (in 1,000,000-9,999,999) is scaled into the block's first 900,000 numbers (the rest
    is room for the walk below), and the ``k``-th eid is the smallest number at or above
    ``drawn[k]``'s place, and above the ``(k-1)``-th eid, whose :func:`hipoa.ingest.shard_of`
    modulo :data:`SHARD_PERIOD` is that of ``drawn[k]``. Order and
    shard (for 1, 2, 4 or 8 shards) are then those of the drawn numbers, and with them the store
    rows, the splits and the shard-level QC of a cohort; only the numbers differ. Cohorts of
    different seeds, spread over the block, rarely share an eid.

    Raises:
        ValueError: if the block runs out (not below :data:`MAX_PARTICIPANTS` participants).
    """
    out = np.empty(len(drawn), np.int64)
    candidate = SYNTHETIC_EIDS.start
    for k, number in enumerate(drawn):
        place = SYNTHETIC_EIDS.start + (int(number) - 1_000_000) // 10  # the block's first 900,000
        candidate = max(candidate, place)
        want = shard_of(int(number), SHARD_PERIOD)
        while candidate < SYNTHETIC_EIDS.stop and shard_of(candidate, SHARD_PERIOD) != want:
            candidate += 1
        if candidate >= SYNTHETIC_EIDS.stop:
            raise ValueError(f"{len(drawn)} participants do not fit the synthetic eid block "
                             f"{SYNTHETIC_EIDS.start}-{SYNTHETIC_EIDS.stop - 1}")
        out[k] = candidate
        candidate += 1
    return out


def make_cohort(out: Path, participants: int, seed: int, annotated_fraction: float = 0.3,
                enriched_prevalence: float = 0.5, prevalence: float = 0.15, faults: int = 0,
                workers: int = 1, annotate_sides: str = "L", unfit: int = 0, second_scanner: float = 0.0,
                annotators: int = 1) -> pd.DataFrame:
    """Write a synthetic UKB hip-DXA cohort under ``out`` and return its truth table.

    Args:
        out: Cohort directory (created). An earlier cohort there (one with a ``truth.parquet``)
            is replaced: its zips, points and masks are removed first.
        participants: Number of participants (two hip images each).
        seed: Everything follows from it: same seed and arguments, same bytes.
        annotated_fraction: Fraction of participants whose hips in ``annotate_sides`` have manual
            points and a mask (exactly ``round(fraction * participants)``).
        enriched_prevalence: Per-site osteophyte probability in annotated images (enriched for
            training, as in the paper).
        prevalence: Per-site osteophyte probability in the other images (~10-20 % in UKB).
        faults: Number of participants with a planted fault, cycling through :data:`FAULTS`.
        workers: Processes; does not change the output.
        annotate_sides: Sides that get annotations (``"L"``, ``"R"`` or ``"LR"``).
        unfit: Participants whose left hip is unfit to measure, cycling through :data:`UNFIT`
            (implant, cropped view, motion); drawn among those without a fault or annotations.
        second_scanner: Fraction of participants imaged on the second scanner
            (:data:`hipoa.synth.anatomy.SECOND_SCANNER`: 0.30 mm pixels, noisier; sizes
            :data:`SECOND_SIZES`).
        annotators: 1, or 2: each annotated image's mask is drawn by one of two annotators, the
            second's outlines a pixel wider or narrower and missing half the small osteophytes
            (:func:`second_annotator`). The truth table keeps the true areas.

    Returns:
        One row per (eid, instance, side) image: ``eid`` (int64), ``instance`` (int16), ``side``,
        ``annotated``, ``rows``, ``cols``, ``{site}_present`` (bool), ``{site}_area_mm2`` (float64,
        label area in the full-size mask at the DICOM spacing, 0 when absent),
        ``reference_length_mm``, ``fault`` ("" or a :data:`FAULTS` or :data:`UNFIT` key),
        ``expected_reason``, ``unfit`` (bool), ``scanner`` (``"A"`` or ``"B"``), ``annotator``
        (0 not annotated, 1 or 2) and ``auto_gross_error`` (``"first-last"``: the run of automatic
        points displaced by 3-7 mm, see :func:`auto_points`; ``""`` none).
        Also written to ``out/truth.parquet`` and ``out/truth.csv``.

    Raises:
        ValueError: naming the argument and the value when one is out of range.
    """
    if participants < 1 or participants > MAX_PARTICIPANTS:
        raise ValueError(f"participants must be 1..{MAX_PARTICIPANTS}, got {participants}")
    for name, value in (("annotated_fraction", annotated_fraction), ("enriched_prevalence", enriched_prevalence),
                        ("prevalence", prevalence)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if not 0 <= faults <= participants:
        raise ValueError(f"faults must be in 0..participants ({participants}), got {faults}")
    if not annotate_sides or set(annotate_sides) - {"L", "R"}:
        raise ValueError(f"annotate_sides must be 'L', 'R' or 'LR', got {annotate_sides!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not 0.0 <= second_scanner <= 1.0:
        raise ValueError(f"second_scanner must be in [0, 1], got {second_scanner}")
    if annotators not in (1, 2):
        raise ValueError(f"annotators must be 1 or 2, got {annotators}")

    out = Path(out)
    _clear_previous(out)
    for sub in _LAYOUT:
        (out / sub).mkdir(parents=True, exist_ok=True)

    # Cohort-level draws: an entropy list of another length than the participants' [seed, i].
    crng = np.random.default_rng([seed, 0x5EED, 0xC0407])
    eids = synthetic_eids(np.sort(crng.choice(9_000_000, size=participants, replace=False)) + 1_000_000)
    n_annot = int(round(annotated_fraction * participants))
    annotated = np.zeros(participants, bool)
    annotated[crng.permutation(participants)[:n_annot]] = True
    fault_of = [""] * participants
    kinds = list(FAULTS)
    for j, i in enumerate(crng.permutation(participants)[:faults]):
        fault_of[int(i)] = kinds[j % len(kinds)]
    # The draws of the newer options use generators of their own, so that a cohort without them
    # is byte-identical to one made before they existed.
    unfit_of = [""] * participants
    if unfit:
        urng = np.random.default_rng([seed, 0x5EED, 0xF17])
        eligible = [int(i) for i in urng.permutation(participants) if not fault_of[int(i)] and not annotated[int(i)]]
        if unfit > len(eligible):
            raise ValueError(f"unfit: {unfit} participants asked for, only {len(eligible)} have neither a fault "
                             "nor annotations")
        for j, i in enumerate(eligible[:unfit]):
            unfit_of[i] = list(UNFIT)[j % len(UNFIT)]
    on_second = np.zeros(participants, bool)
    if second_scanner > 0.0:
        srng = np.random.default_rng([seed, 0x5EED, 0x5CA])
        on_second[srng.permutation(participants)[: int(round(second_scanner * participants))]] = True

    cfg = _Settings(out=str(out), seed=int(seed), enriched_prevalence=float(enriched_prevalence),
                    prevalence=float(prevalence), annotate_sides=annotate_sides, annotators=int(annotators))
    tasks = [(_Task(i, int(eids[i]), bool(annotated[i]), fault_of[i], unfit_of[i], bool(on_second[i])), cfg)
             for i in range(participants)]
    rows: list[dict] = []
    progress = Progress(participants, "synth", log, unit="participants")
    workers = min(workers, participants)
    if workers == 1:
        for t in tasks:
            rows.extend(_run(t))
            progress.update()
    else:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(workers) as pool:
            for part in pool.imap_unordered(_run, tasks, chunksize=max(1, min(8, participants // (8 * workers)))):
                rows.extend(part)
                progress.update()
    rate = progress.close()

    truth = pd.DataFrame(rows).sort_values(["eid", "side"], kind="stable").reset_index(drop=True)
    truth["eid"] = truth["eid"].astype("int64")
    truth["instance"] = truth["instance"].astype("int16")
    truth["rows"] = truth["rows"].astype("int32")
    truth["cols"] = truth["cols"].astype("int32")
    truth.to_parquet(out / "truth.parquet", index=False)
    truth.to_csv(out / "truth.csv", index=False)
    log.info("synth: %d participants, %d images (%d annotated, %d with a planted fault, %d unfit, %d on the second "
             "scanner) in %s at %.1f participants/s", participants, len(truth), int(truth["annotated"].sum()),
             int(((truth["fault"] != "") & ~truth["unfit"]).sum()), int(truth["unfit"].sum()),
             int((truth["scanner"] != "A").sum()), out, rate)
    return truth


# ---------------------------------------------------------------------------------------------
# Preview
# ---------------------------------------------------------------------------------------------


def _read_hip(zip_path: Path, side: str) -> np.ndarray:
    """The hip image of ``side`` from a cohort zip (by ProtocolName), (rows, cols) uint8."""
    with zipfile.ZipFile(zip_path) as zf:
        for name in zf.namelist():
            if not name.endswith(".dcm"):
                continue
            ds = pydicom.dcmread(io.BytesIO(zf.read(name)))
            if str(ds.get("ProtocolName", "")) == PROTOCOLS[side]:
                return ds.pixel_array
    raise ValueError(f"{zip_path}: no {PROTOCOLS[side]!r} DICOM")


def render_preview(cohort_dir: Path, out_png: Path, n: int = 8, seed: int = 0) -> Path:
    """Montage of ``n`` hips of a cohort with automatic points and osteophyte masks overlaid.

    Prefers annotated images with osteophytes, from both sides. Masks are coloured like the
    paper's Fig. 1 (label 1 blue, 2 red, 3 green); points 12, 15, 30, 39 and 78 are highlighted
    and numbered.

    Returns:
        ``out_png``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cohort_dir = Path(cohort_dir)
    truth = pd.read_parquet(cohort_dir / "truth.parquet")
    ok = truth[truth["fault"] == ""].copy()
    present_cols = [f"{s}_present" for s in SITE_LABELS]
    ok["n_sites"] = ok[present_cols].sum(axis=1)
    rng = np.random.default_rng(seed)
    ok["r"] = rng.random(len(ok))
    ok["shown"] = ok["annotated"] & (ok["n_sites"] > 0)  # masks to overlay
    picked: list[pd.Series] = []
    for side in ("L", "R"):
        want = (n + 1) // 2 if side == "L" else n // 2
        cand = ok[ok["side"] == side].sort_values(["shown", "n_sites", "r"], ascending=False)
        picked.extend(r for _, r in cand.head(want).iterrows())
    if len(picked) < n:
        rest = ok.drop(index=[r.name for r in picked]).sort_values("r")
        picked.extend(r for _, r in rest.head(n - len(picked)).iterrows())
    if not picked:
        raise ValueError(f"{cohort_dir}: no fault-free images to preview")

    ncol = min(4, len(picked))
    nrow = -(-len(picked) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.9 * nrow), squeeze=False)
    colours = {1: (0.15, 0.35, 1.0), 2: (1.0, 0.1, 0.1), 3: (0.1, 0.9, 0.2)}
    key = (12, 15, 30, 39, 78)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, row in zip(axes.ravel(), picked):
        eid, side = int(row["eid"]), str(row["side"])
        img = _read_hip(cohort_dir / "ukb" / str(FIELD) / zip_name(eid), side)
        ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="bilinear")
        mask_path = cohort_dir / "masks" / f"{image_stem(eid, side)}.png"
        if mask_path.exists():
            labels = read_label_png(mask_path)
            over = np.zeros(labels.shape + (4,), np.float32)
            for lab, c in colours.items():
                over[labels == lab] = (*c, 0.55)
            ax.imshow(over, interpolation="nearest")
        pts_path = cohort_dir / "points" / "auto" / f"{image_stem(eid, side)}.pts"
        if pts_path.exists():
            from hipoa.points import read_pts

            pts = read_pts(pts_path)
            ax.plot(pts[:, 0], pts[:, 1], ".", ms=2.0, color=(1.0, 0.85, 0.1))
            ax.plot(pts[list(key), 0], pts[list(key), 1], "o", ms=3.5, mfc="none", mec="magenta", mew=1.0)
            for j in key:
                ax.annotate(str(j), pts[j], xytext=(4, -4), textcoords="offset points", color="magenta", fontsize=7)
        sites = ", ".join(f"{lab}:{row[f'{name}_area_mm2']:.0f}" for name, lab in SITE_LABELS.items()
                          if row[f"{name}_present"])
        ax.set_title(f"{eid} {side}{' annotated' if row['annotated'] else ''}  mm2 {sites or '-'}", fontsize=8)
    fig.suptitle("hipoa synth: auto points (12/15/30/39/78 numbered), osteophyte masks "
                 "(1 blue inferior, 2 red superior femoral head, 3 green lateral acetabulum)", fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, out_png, dpi=110)
    log.info("synth: preview of %d hips -> %s", len(picked), out_png)
    return out_png
