"""Image fitness (hipoa.fitness): implants, cut-off heads and motion are flagged, normal hips are not.

The cohort tests run synthetic cohorts with every unfit kind (``make_cohort(unfit=...)``, both
scanners) through ingest, crop, predict and gather: each unfit hip gets its own reason and no
phenotype, and the demo cohort's normal hips are counted for false flags.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hipoa import fitness, qc
from hipoa.dicom import find_hip_member, read_image
from hipoa.ingest import build_manifest
from hipoa.patches import crop_shard
from hipoa.phenotypes import gather
from hipoa.points import read_pts
from hipoa.predict import predict_shard
from hipoa.tables import AREA, PRESENT, PROBABILITY
from hipoa.sites import DEFAULT_SITES
from hipoa.synth import UNFIT, image_stem, make_cohort, zip_name

sys.path.insert(0, str(Path(__file__).parent))
from hipoa_fixtures import make_model  # noqa: E402

SITES = [s.name for s in DEFAULT_SITES]
SP = (0.25, 0.25)


# ---------------------------------------------------------------------------------------------
# The checks on their own
# ---------------------------------------------------------------------------------------------


def test_fit_circle_recovers_a_circle():
    a = np.linspace(0.3, 4.0, 14)
    centre, radius = fitness.fit_circle(np.column_stack([300 + 96 * np.cos(a), 250 + 96 * np.sin(a)]))
    np.testing.assert_allclose(centre, [300, 250], atol=1e-6)
    assert radius == pytest.approx(96, abs=1e-6)


def _outline(shape=(600, 680)) -> np.ndarray:
    """An 85-point outline with a head of radius 90 px at (400, 280), the rest spread around it."""
    pts = np.column_stack([np.linspace(150, 600, 85), np.linspace(120, 560, 85)])
    a = np.linspace(-2.0, 2.6, 14)
    pts[16:30] = np.column_stack([400 + 90 * np.cos(a), 280 + 90 * np.sin(a)])
    return pts


def test_head_out_of_view_needs_a_point_on_the_edge_or_the_head_beyond_it():
    pts = _outline()
    assert fitness.head_out_of_view(pts, (600, 680), SP, 1.5) == ""
    edge = pts.copy()
    edge[70] = [340.0, 2.0]  # an acetabulum point kept on the top edge, 0.5 mm from it
    assert "acetabulum outline point 70" in fitness.head_out_of_view(edge, (600, 680), SP, 1.5)
    inside = pts.copy()
    inside[70] = [340.0, 8.0]  # 2 mm from the edge
    assert fitness.head_out_of_view(inside, (600, 680), SP, 1.5) == ""
    # a head arc point beyond the edge: the outline branch names it
    assert fitness.head_out_of_view(pts, (600, 440), SP, 1.5).startswith("femoral head outline point")


def test_head_out_of_view_when_only_the_circle_leaves_the_image():
    """Every head and acetabulum point in view, but the circle through the head's arc (the medial
    half only: the lateral half was cut off) reaches 50 px beyond the right edge."""
    pts = _outline()
    a = np.linspace(1.9, 4.4, 14)
    pts[16:30] = np.column_stack([400 + 90 * np.cos(a), 280 + 90 * np.sin(a)])  # x <= 372, circle to 490
    pts[59:79] = np.column_stack([np.linspace(250, 300, 20), np.linspace(100, 150, 20)])
    problem = fitness.head_out_of_view(pts, (600, 440), SP, 1.5)
    assert problem.startswith("the circle fitted to the femoral head leaves the image by"), problem
    assert abs(float(problem.split(" by ")[1].split()[0]) - (490 - 439.5) * SP[1]) < 0.2
    assert fitness.head_out_of_view(pts, (600, 700), SP, 1.5) == ""  # the whole circle in view


def test_implant_area_counts_connected_metal_inside_the_outline():
    pts = _outline()
    image = np.full((600, 680), 120.0, np.float32)
    yy, xx = np.mgrid[0:600, 0:680]
    image[(xx - 400) ** 2 + (yy - 280) ** 2 <= 40 ** 2] = 255.0  # a 28 mm ball on the head
    area = fitness.implant_area_mm2(image, pts, SP, 0.97, 255.0, 100.0)
    assert area == pytest.approx(np.pi * 40 ** 2 * 0.0625, rel=0.02)
    # the level is the image's own: an export that scales the values, or stores 12 bits in 16, or
    # says nothing of its range, finds the same metal (Bits Stored's top is not used)
    for scaled, top in ((image * 0.8, 255.0), (image * 16.0, 65535.0), (image, float("nan"))):
        assert fitness.implant_area_mm2(scaled, pts, SP, 0.97, top, 100.0) == pytest.approx(area)
    # the brightest bone is not metal: a plateau thinner than the opening's disc (a 2 mm cortex)
    cortex = np.full((600, 680), 120.0, np.float32)
    cortex[(np.abs(np.hypot(xx - 400, yy - 280) - 60) <= 4)] = 255.0
    assert fitness.implant_area_mm2(cortex, pts, SP, 0.97, 255.0, 100.0) < 100.0
    # scattered bright pixels: too little to look at
    speckle = np.full((600, 680), 120.0, np.float32)
    speckle[::50, ::50] = 255.0
    assert fitness.implant_area_mm2(speckle, pts, SP, 0.97, 255.0, 100.0) < 100.0
    # metal outside the hip (a calibration marker in a corner) is not an implant
    corner = np.full((600, 680), 120.0, np.float32)
    corner[:60, :60] = 255.0
    assert fitness.implant_area_mm2(corner, pts, SP, 0.97, 255.0, 100.0) == 0.0


def _textured(seed: int = 0) -> np.ndarray:
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    image = 120.0 + 25.0 * ndi.gaussian_filter(rng.standard_normal((600, 680)), 1.5) / 0.19
    yy, xx = np.mgrid[0:600, 0:680]
    image += 60.0 * ((xx - 400) ** 2 + (yy - 280) ** 2 <= 90 ** 2)  # a bright head with a sharp edge
    return image.astype(np.float32)


def test_motion_score_finds_a_doubled_image_and_its_shift():
    image, pts = _textured(), _outline()
    still, _ = fitness.motion_score(image, pts, SP)
    ghost = np.roll(image, (0, 24), axis=(0, 1))  # 6 mm to the right
    moved, shift = fitness.motion_score(0.6 * image + 0.4 * ghost, pts, SP)
    assert still < qc.Limits().motion_score < moved
    assert abs(abs(shift[0]) - 6.0) <= 0.5 and abs(shift[1]) <= 0.5


def _decoded(h):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hip.dcm"
        path.write_bytes(h.dicom)
        return read_image(path)


@pytest.mark.parametrize("export", ["", "scaled", "12in16", "windowed", "windowed_bone"])
def test_implant_caught_in_every_export_and_normal_hips_not(export):
    """Metal that does not reach the top of Bits Stored (scaled 8-bit, 12 bits in 16) or that a
    window clips together with the brightest bone is still metal; the same exports of normal hips
    are not flagged."""
    from hipoa.synth.anatomy import FIRST_SCANNER, SECOND_SCANNER
    from hipoa.synth import fitness_hip

    limits = qc.Limits()
    for i, scanner in enumerate((FIRST_SCANNER, SECOND_SCANNER)):
        for unfit in ("implant", ""):
            h = fitness_hip(3, 2 * i + (unfit == ""), scanner, unfit, export)
            img = _decoded(h)
            got = fitness.check_image(img.pixels, h.points, img.spacing_mm, limits, img.max_value)
            assert got.reason == (qc.IMPLANT if unfit else ""), (export, scanner.name, unfit, got.detail)


def test_motion_caught_and_scanner_textures_not_flagged():
    """On every test scanner texture (line banding, periodic stripes at 1.5-12 mm in any direction,
    coarse noise grain): a still hip is fit, the same anatomy doubled at 2.5-10 mm is motion."""
    from hipoa.synth.anatomy import TEST_SCANNERS
    from hipoa.synth import fitness_hip

    limits = qc.Limits()
    for j, scanner in enumerate(TEST_SCANNERS):
        for unfit in ("", "motion"):
            h = fitness_hip(4, 2 * j + (unfit == "motion"), scanner, unfit)
            img = _decoded(h)
            got = fitness.check_image(img.pixels, h.points, img.spacing_mm, limits, img.max_value)
            assert got.reason == (qc.MOTION if unfit else ""), (scanner.name, unfit, got.motion_score)


@pytest.mark.parametrize(("scanner_name", "index"), [("B", 200266), ("B", 200226), ("H-grain", 200187),
                                                   ("H-grain", 200167), ("H-grain", 200200)])
def test_short_and_grainy_doublings_are_motion(scanner_name, index):
    """Doubled hips the check used to miss (scores 2.7-4.8 < 5): shifts of 2.5-2.9 mm on the
    second scanner's 0.30 mm grid, where a 1 mm step or the half shift lands on the zero shift's
    own peak, and doublings under a 0.5 mm noise grain, whose fringes stand clear only above 1
    cycle/mm (a grid of whole pixels, not 0.5 mm)."""
    from hipoa.synth.anatomy import TEST_SCANNERS
    from hipoa.synth import fitness_hip

    scanner = next(s for s in TEST_SCANNERS if s.name == scanner_name)
    h = fitness_hip(22, index, scanner, "motion")
    img = _decoded(h)
    got = fitness.check_image(img.pixels, h.points, img.spacing_mm, qc.Limits(), img.max_value)
    assert got.reason == qc.MOTION, (scanner_name, index, got.motion_score)


def test_check_image_reports_the_first_reason():
    pts, image = _outline(), _textured()
    limits = qc.Limits()
    assert fitness.check_image(image, pts, SP, limits, 255.0).reason == ""
    cut = pts.copy()
    cut[20] = [400.0, 1.0]
    metal = image.copy()
    metal[200:360, 330:470] = 255.0
    assert fitness.check_image(metal, cut, SP, limits, 255.0).reason == qc.HEAD_OUT_OF_VIEW
    assert fitness.check_image(metal, pts, SP, limits, 255.0).reason == qc.IMPLANT
    # a larger level than any pixel: no implant, and the doubled image is motion
    ghost = np.roll(image, (16, 16), axis=(0, 1))
    res = fitness.check_image(0.6 * image + 0.4 * ghost, pts, SP, limits, 255.0)
    assert res.reason == qc.MOTION and res.motion_score >= limits.motion_score


def test_limits_check_the_fitness_thresholds():
    with pytest.raises(ValueError, match="implant_level"):
        qc.Limits(implant_level=1.5)
    with pytest.raises(ValueError, match="motion_score"):
        qc.Limits(motion_score=0)
    assert qc.load_limits({"edge_margin_mm": 3}).edge_margin_mm == 3


# ---------------------------------------------------------------------------------------------
# Synthetic cohorts with every unfit kind
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unfit_run(tmp_path_factory):
    """24 participants, 12 with an unfit left hip (4 of each kind), half on the second scanner,
    through ingest, crop, predict (tiny models) and gather."""
    root = tmp_path_factory.mktemp("unfit")
    cohort = root / "cohort"
    truth = make_cohort(out=cohort, participants=24, seed=21, annotated_fraction=0.0, unfit=12, second_scanner=0.5,
                        workers=2)
    manifest = root / "manifest.parquet"
    build_manifest(images=str(cohort / "ukb/20158/{eid}_20158_{instance}_{array}.zip"),
                   points_auto=str(cohort / "points/auto/{eid}_{instance}_{side}.pts"),
                   side="L", n_shards=1).to_parquet(manifest)
    store = root / "shard-0000.zarr"
    counts = crop_shard(manifest=manifest, shard=0, out=store, sites=list(DEFAULT_SITES))
    models = {s: make_model(root / "models" / s / "unet.keras") for s in SITES}
    predictions = root / "shard-0000.parquet"
    predict_shard(store=store, models=models, out=predictions, precision="float32")
    table = gather(manifest=manifest, predictions=[predictions], models=models, side="L",
                   out=root / "phenotypes" / "osteophytes_L.parquet")
    return {"truth": truth[truth["side"] == "L"], "table": table, "counts": counts, "manifest": manifest,
            "root": root}


@pytest.mark.slow
def test_the_cohort_has_every_kind_on_both_scanners(unfit_run):
    truth = unfit_run["truth"]
    assert truth["unfit"].sum() == 12
    assert (truth.loc[truth["unfit"], "fault"].value_counts() == 4).all()
    assert set(truth.loc[truth["unfit"], "fault"]) == set(UNFIT)
    assert set(truth["scanner"]) == {"A", "B"}


@pytest.mark.slow
def test_each_unfit_hip_is_flagged_with_its_reason_and_no_phenotype(unfit_run):
    truth = unfit_run["truth"].assign(eid=lambda d: d["eid"].astype(str)).set_index("eid")
    table = unfit_run["table"].assign(eid=lambda d: d["eid"].astype(str)).set_index("eid")
    assert len(table) == len(truth)
    for eid, row in truth.iterrows():
        got = table.loc[eid]
        assert got["qc_reason"] == row["expected_reason"], (eid, row["fault"], row["scanner"], got["qc_reason"])
        if row["unfit"]:
            assert not got["qc_pass"]
            for s in SITES:
                for suffix in (PRESENT, AREA, PROBABILITY):
                    assert pd.isna(got[f"{s}{suffix}"]), (eid, s, suffix)
            assert pd.isna(got["any_present"]) and pd.isna(got["total_area_mm2"])
        else:
            assert got["qc_pass"], (eid, got["qc_reason"])
    reasons = unfit_run["counts"]["reasons"]
    assert reasons == {reason: 4 for reason in UNFIT.values()}


@pytest.mark.slow
def test_the_summary_counts_the_unfit_reasons(unfit_run):
    from hipoa.phenotypes import summary

    text = summary(unfit_run["table"], SITES)
    for reason in UNFIT.values():
        assert f"{reason}=4" in text


@pytest.mark.slow
def test_the_report_shows_the_flagged_images(unfit_run):
    from PIL import Image

    from hipoa.report import plot_unfit

    out = unfit_run["root"] / "report" / "unfit.png"
    out.parent.mkdir()
    assert plot_unfit(unfit_run["table"], [unfit_run["manifest"]], out, per_reason=2) == 6
    assert Image.open(out).size[0] > 600
    clean = unfit_run["table"][unfit_run["table"]["qc_pass"]]
    assert plot_unfit(clean, [unfit_run["manifest"]], out) == 0


@pytest.mark.slow
def test_no_normal_demo_hip_is_flagged(tmp_path):
    """The demo cohort (config/demo.yaml: 100 participants, seed 7): false flags <= 0.5 %."""
    cohort = tmp_path / "demo"
    truth = make_cohort(out=cohort, participants=100, seed=7, annotated_fraction=0.6, faults=0, workers=2)
    limits = qc.Limits()
    flagged = []
    for r in truth.itertuples(index=False):
        z = cohort / "ukb" / "20158" / zip_name(r.eid)
        hip = read_image(z, find_hip_member(z, r.side))
        pts = read_pts(cohort / "points" / "auto" / f"{image_stem(r.eid, r.side)}.pts", n_points=85)
        result = fitness.check_image(hip.pixels, pts, hip.spacing_mm, limits, hip.max_value)
        if result.reason:
            flagged.append((r.eid, r.side, result.reason, result.detail))
    assert len(truth) == 200
    assert len(flagged) / len(truth) <= 0.005, flagged


# ---------------------------------------------------------------------------------------------
# Implausible points (hipoa.patches.points_scores, per site at predict)
# ---------------------------------------------------------------------------------------------


def _windows(n: int, seed: int = 0) -> np.ndarray:
    """Local outlines of ``n`` hips: an arc of 11 points, each hip scaled a little, plus noise."""
    rng = np.random.default_rng(seed)
    a = np.linspace(-0.8, 0.8, 11)
    arc = np.column_stack([50 * np.sin(a), 50 * (1 - np.cos(a))])
    return np.stack([arc * rng.uniform(0.93, 1.07) + rng.normal(0, 1.2, arc.shape) for _ in range(n)])


def test_points_scores_single_out_a_displaced_run():
    from hipoa.patches import points_scores

    w = _windows(200)
    clean = points_scores(w, 40)
    assert np.median(clean) == pytest.approx(1.0, abs=0.05)
    assert clean.max() < qc.Limits().points_max_z
    w[7, 2:6] += [0.0, 10.0]  # four points 10 patch pixels off their neighbours
    scores = points_scores(w, 40)
    assert int(np.argmax(scores)) == 7 and scores[7] > qc.Limits().points_max_z
    # a NaN row (not measurable) gets no score; too few rows, none at all
    w[3] = np.nan
    assert np.isnan(points_scores(w, 40)[3])
    assert np.isnan(points_scores(w[:20], 40)).all()


def test_local_outline_is_the_patch_frame():
    from hipoa.geometry import patch_affine
    from hipoa.patches import local_outline

    pts = _outline()
    site = next(s for s in DEFAULT_SITES if s.name == "superior_femoral_head")
    a = patch_affine(pts, site, SP, 680, "L")
    w = local_outline(pts, site.centre, a)
    np.testing.assert_allclose(w[5], [63.5, 63.5], atol=1e-9)  # the centre point is the patch centre
    moved = pts + [37.0, -12.0]  # the whole outline moves: the patch moves with it
    np.testing.assert_allclose(local_outline(moved, site.centre, patch_affine(moved, site, SP, 680, "L")), w,
                               atol=1e-9)
