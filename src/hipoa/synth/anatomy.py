"""Synthetic hip DXA anatomy: geometry, the 85-point outline, osteophytes and rendering.

Used by :mod:`hipoa.synth` to make a cohort that looks like UK Biobank's GE Lunar iDXA hip scans.
Everything is drawn for a LEFT hip (pelvis on the image's left, greater trochanter on its right);
right hips are the mirror image (``x' = cols - 1 - x``), see :func:`mirror_hip`.

Geometry is built in millimetres relative to the femoral head centre ``H`` (x lateral, y down),
then rotated, scaled to pixels and placed. Pixel coordinates follow the ``.pts`` convention: x to
the right, y down, (0, 0) at the centre of the top-left pixel.

The 85-point outline (0-based), as the contract's sites need it:

======= ======================================================================
0-11    medial femoral shaft, from distal up to the lesser trochanter
12      apex of the lesser trochanter (reference length 12-39, ~55-70 mm)
13-14   inferior femoral neck
15      inferior femoral head-neck junction (site ``inferior_femoral_head``)
16-29   femoral head, inferior -> medial -> superior
30      superior femoral head-neck junction (site ``superior_femoral_head``)
31-38   superior neck, trochanteric fossa, medial slope of the greater trochanter
39      tip of the greater trochanter
40-44   lateral greater trochanter and lateral shaft, down
45-52   lateral border of the ischium, from the tuberosity up to the acetabular notch
53-58   teardrop (lateral limb, floor, medial limb)
59-78   acetabular fossa and roof (sourcil) over the head; 78 = lateral acetabular margin
        (site ``lateral_acetabulum``)
79-84   lateral border of the ilium above the acetabulum, up
======= ======================================================================

Rendering works on projected "bone density" maps (arbitrary units, ~1 for the thickest bone):
femur and pelvis each get a smooth thickness ramp plus a brighter cortical rim, the femoral head
a sphere's chord profile, the shaft a hollow tube's; then trabecular texture, a log-like detector
response, blur and scan noise, quantised to 8 bits (MONOCHROME2: bright = bone).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage as ndi

from hipoa.points import FEMUR_POINTS, N_POINTS, PELVIS_POINTS
from hipoa.sites import DEFAULT_SITES

FEMUR = slice(int(FEMUR_POINTS[0]), int(FEMUR_POINTS[-1]) + 1)
PELVIS = slice(int(PELVIS_POINTS[0]), int(PELVIS_POINTS[-1]) + 1)
SITE_POINTS = {site.label: site.centre for site in DEFAULT_SITES}
"""Mask label -> outline point the osteophyte grows from (the contract's site table)."""

_BG_DENSITY = 0.015  # air beside the thigh


# ---------------------------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------------------------


def _catmull_rom(ctrl: np.ndarray, per_mm: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Dense centripetal Catmull-Rom curve through ``ctrl`` (all segments at once).

    Args:
        ctrl: ``(k, 2)`` control points (any unit), k >= 2.
        per_mm: Samples per unit of chord length (at least 4 per segment).

    Returns:
        ``(m, 2)`` dense curve and ``(k,)`` int indices of the control points in it.
    """
    p = np.asarray(ctrl, dtype=np.float64)
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    chord = np.maximum(np.linalg.norm(np.diff(ext, axis=0), axis=1), 1e-6)
    knots = np.concatenate([[0.0], np.cumsum(np.sqrt(chord))])
    seg_len = chord[1:-1]
    n = np.maximum(4, np.ceil(seg_len * per_mm).astype(int))
    seg = np.repeat(np.arange(len(p) - 1), n)  # segment of each sample: between p[i] and p[i+1]
    start = np.concatenate([[0], np.cumsum(n)[:-1]])
    frac = (np.arange(n.sum()) - np.repeat(start, n)) / np.repeat(n, n)
    i = seg + 1  # index of p[i] in ext
    t0, t1, t2, t3 = knots[i - 1], knots[i], knots[i + 1], knots[i + 2]
    t = (t1 + frac * (t2 - t1))[:, None]
    t0, t1, t2, t3 = t0[:, None], t1[:, None], t2[:, None], t3[:, None]
    p0, p1, p2, p3 = ext[i - 1], ext[i], ext[i + 1], ext[i + 2]
    a1 = (t1 - t) / (t1 - t0) * p0 + (t - t0) / (t1 - t0) * p1
    a2 = (t2 - t) / (t2 - t1) * p1 + (t - t1) / (t2 - t1) * p2
    a3 = (t3 - t) / (t3 - t2) * p2 + (t - t2) / (t3 - t2) * p3
    b1 = (t2 - t) / (t2 - t0) * a1 + (t - t0) / (t2 - t0) * a2
    b2 = (t3 - t) / (t3 - t1) * a2 + (t - t1) / (t3 - t1) * a3
    c = (t2 - t) / (t2 - t1) * b1 + (t - t1) / (t2 - t1) * b2
    return np.vstack([c, p[-1:]]), np.concatenate([start, [n.sum()]])


def _label_points(dense: np.ndarray, anchors: dict[int, int], first: int, last: int) -> dict[int, np.ndarray]:
    """Numbered points along ``dense``: anchors where given, the others evenly by arc length.

    Args:
        dense: ``(m, 2)`` curve.
        anchors: point number -> index into ``dense``; must include ``first`` and ``last``.
        first, last: the range of point numbers to place.
    """
    seg = np.linalg.norm(np.diff(dense, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    keys = sorted(anchors)
    pts: dict[int, np.ndarray] = {}
    for a, b in zip(keys[:-1], keys[1:]):
        sa, sb = arc[anchors[a]], arc[anchors[b]]
        for j in range(a, b + 1):
            sj = sa + (sb - sa) * (j - a) / (b - a)
            pts[j] = np.array([np.interp(sj, arc, dense[:, 0]), np.interp(sj, arc, dense[:, 1])])
    missing = set(range(first, last + 1)) - set(pts)
    if missing:  # pragma: no cover - programming error
        raise ValueError(f"points {sorted(missing)} not placed")
    return pts


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _rot(deg: float) -> np.ndarray:
    r = np.deg2rad(deg)
    return np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]])


def _fill(shape: tuple[int, int], poly: np.ndarray) -> np.ndarray:
    """Boolean ``shape`` mask of the polygon ``(k, 2)`` (x, y pixels); scan-line fill by Pillow."""
    img = Image.new("1", (shape[1], shape[0]), 0)
    p = np.clip(poly, -4 * max(shape), 4 * max(shape))
    ImageDraw.Draw(img).polygon(p.ravel().tolist(), fill=1, outline=1)
    return np.asarray(img, dtype=bool)


def _stroke(shape: tuple[int, int], line: np.ndarray, width_px: float) -> np.ndarray:
    """float32 ``shape`` map, 1 on a thick polyline ``(k, 2)`` (x, y pixels)."""
    img = Image.new("L", (shape[1], shape[0]), 0)
    line = np.asarray(line)
    if len(line) > 40:  # round joints are drawn per vertex: keep ~40
        line = line[np.unique(np.linspace(0, len(line) - 1, 40).round().astype(int))]
    ImageDraw.Draw(img).line(np.asarray(line, dtype=np.float64).ravel().tolist(), fill=255,
                             width=max(1, int(round(width_px))), joint="curve")
    return np.asarray(img, dtype=np.float32) / 255.0


def _blur(a: np.ndarray, sigma_px: float | tuple[float, float]) -> np.ndarray:
    """Gaussian blur, float32; wide isotropic ones as three box passes (same variance, O(1) per pixel)."""
    a = a.astype(np.float32, copy=False)
    if not isinstance(sigma_px, tuple) and sigma_px >= 5.0:
        w = int(round(np.sqrt(4.0 * sigma_px ** 2 + 1.0))) | 1
        for _ in range(3):
            a = ndi.uniform_filter(a, w)
        return a
    return ndi.gaussian_filter(a, sigma_px, truncate=3.0)


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Participant:
    """Traits shared by both hips of one participant."""

    scale: float  # overall size factor (head radius / 24 mm)
    density: float  # bone mineral density factor
    soft: float  # soft tissue thickness factor
    gain: float  # detector response


def draw_participant(rng: np.random.Generator) -> Participant:
    return Participant(
        scale=float(rng.uniform(22.0, 26.0) / 24.0),
        density=float(np.clip(rng.normal(1.0, 0.12), 0.7, 1.3)),
        soft=float(rng.uniform(0.7, 1.3)),
        gain=float(rng.uniform(1.15, 1.4)),
    )


@dataclass
class HipGeometry:
    """A left hip's geometry in pixels of the stored image (see the module docstring)."""

    rows: int
    cols: int
    spacing_mm: float
    head_centre: np.ndarray  # (2,) px
    head_radius: float  # px
    socket_radius: float  # px
    points: np.ndarray  # (85, 2) px, true outline
    femur_poly: np.ndarray  # closed polygon (k, 2) px, reaches below the image
    pelvis_upper_poly: np.ndarray
    pelvis_lower_poly: np.ndarray
    obturator_poly: np.ndarray
    inlet_poly: np.ndarray
    roof_line: np.ndarray  # (k, 2) px, sourcil
    teardrop_line: np.ndarray
    femur_curve: np.ndarray  # dense outline of points 0-44
    pelvis_curve: np.ndarray  # dense outline of points 45-84
    shaft_origin: np.ndarray  # (2,) px, neck/shaft axes crossing
    shaft_dir: np.ndarray  # (2,) unit, down the shaft
    shaft_halfwidth: float  # px
    lt_along: float  # px along the shaft from shaft_origin to the lesser trochanter
    wall_normal: np.ndarray  # (2,) unit: socket overlap where (p-H).n < wall_offset
    wall_offset: float  # px
    skin_x: np.ndarray  # (rows,) px, lateral skin edge
    extras: dict = field(default_factory=dict)


def draw_geometry(rng: np.random.Generator, who: Participant, rows: int, cols: int,
                  spacing_mm: float) -> HipGeometry:
    """Sample a left hip and build its curves, polygons and the true 85 points.

    Sizes are in mm (x lateral, y down, origin at the head centre) until the final placement.
    """
    k = who.scale * float(rng.uniform(0.97, 1.03))
    R = 24.0 * k  # femoral head radius (mm)
    nsa = rng.uniform(121.0, 136.0)  # neck-shaft angle (deg)
    tilt = rng.uniform(-3.0, 5.0)  # shaft adduction from vertical (deg)
    js = rng.uniform(2.5, 5.0)  # joint space (mm)
    ce = rng.uniform(28.0, 42.0)  # centre-edge angle (deg): where the lateral margin sits
    w = R * rng.uniform(0.66, 0.76)  # neck half-width at its narrowest
    neck_len = R * rng.uniform(2.25, 2.5)  # head centre -> axes crossing
    hw = 14.0 * k * rng.uniform(0.92, 1.08)  # shaft half-width
    Rs = R + js
    # Placement in the image (applied at the end): rotation about the head centre, position.
    # The head sits ~63 mm from the top: room above the acetabulum for the lateral_acetabulum
    # patch (128 px x 0.01 x reference length, ~80 mm wide) and below for the lesser trochanter.
    rho = rng.uniform(-5.0, 5.0)
    head_dx_mm = rng.uniform(-5.0, 5.0)
    head_y_mm = 63.0 + (rows * spacing_mm - 150.0) / 2.0 + rng.uniform(-2.5, 2.5)

    # Shaft and neck axes: the neck points at nsa degrees from the shaft's downward direction.
    d_ang = np.deg2rad(90.0 + tilt)
    d = np.array([np.cos(d_ang), np.sin(d_ang)])  # down the shaft (slightly medial)
    head_dir = np.array([np.cos(d_ang + np.deg2rad(nsa)), np.sin(d_ang + np.deg2rad(nsa))])
    n = -head_dir  # along the neck, lateral-down
    n_inf = np.array([-n[1], n[0]])  # perpendicular, towards the inferior neck
    u = np.array([np.cos(np.deg2rad(tilt)), np.sin(np.deg2rad(tilt))])  # lateral, across the shaft
    v = -d  # up the shaft
    P = neck_len * n  # axes crossing

    def S(a: float, b: float) -> np.ndarray:  # shaft frame (lateral, up) from P
        return P + a * u + b * v

    def N(s: float, off: float) -> np.ndarray:  # neck frame from H: along the neck, towards inferior
        return s * n + off * n_inf

    beta = np.arcsin(w / R)
    sj = R * np.cos(beta)
    v_lt = 26.0 * k * rng.uniform(0.9, 1.1)  # lesser trochanter below the axes crossing
    lt_out = 9.0 * k * rng.uniform(0.8, 1.2)
    v_gt = 29.0 * k * rng.uniform(0.93, 1.07)  # greater trochanter tip above the crossing
    gt_u = 7.0 * k * rng.uniform(0.5, 1.1)
    # The shaft's outline (points 0 and 44) goes 12 mm below the lesser trochanter, or less when
    # the image ends sooner (9 mm margin, allowing for the placement's rotation).
    room = rows * spacing_mm - 9.0 - head_y_mm
    v_bot = float(np.clip((room - P[1]) / max(d[1], 0.5), v_lt + 4.0 * k, v_lt + 12.0 * k))

    # Femur outline, medial distal -> head -> lateral distal; extensions leave the image.
    ctrl: list[tuple[np.ndarray, int | None]] = [
        (S(-hw, -v_bot - 200.0), None),
        (S(-hw, -v_bot), 0),
        (S(-hw - 0.3 * k, -v_lt - 8 * k), None),
        (S(-hw - 2.0 * k, -v_lt - 5.0 * k), None),
        (S(-hw - lt_out, -v_lt - 0.5 * k), 12),
        (S(-hw - 0.45 * lt_out, -v_lt + 4.5 * k), None),
    ]
    # Inferior neck: the calcar curves from above the lesser trochanter up to the head.
    ctrl += [
        (N(sj + 0.70 * (neck_len - sj), w + 3.0 * k), None),
        (N(sj + 0.38 * (neck_len - sj), w + 0.3 * k), None),
        (N(sj + 4.0 * k, w), None),
    ]
    a0 = np.arctan2(n[1], n[0])
    arc = np.linspace(a0 + beta, a0 - beta + 2 * np.pi, 19)
    for j, a in enumerate(arc):
        ctrl.append((R * np.array([np.cos(a), np.sin(a)]), 15 if j == 0 else (30 if j == len(arc) - 1 else None)))
    fossa = N(sj + 0.68 * (neck_len - sj), -(w + 0.5 * k))
    ctrl += [
        (N(sj + 4.0 * k, -w), None),
        (fossa, None),
        (S(gt_u * 0.3, v_gt - 6.0 * k), None),
        (S(gt_u, v_gt), 39),
        (S(gt_u + 7.0 * k, v_gt - 2.5 * k), None),
        (S(hw + 6.0 * k, v_gt - 12.0 * k), None),
        (S(hw + 4.5 * k, 2.0 * k), None),
        (S(hw + 0.5 * k, -v_lt), None),
        (S(hw, -v_bot), 44),
        (S(hw, -v_bot - 200.0), None),
    ]
    cp = np.array([c for c, _ in ctrl])
    dense, idx = _catmull_rom(cp, per_mm=3.0)
    anchors = {lab: int(idx[i]) for i, (_, lab) in enumerate(ctrl) if lab is not None}
    fem_pts = _label_points(dense, anchors, 0, 44)
    femur_poly = dense
    femur_curve = dense[anchors[0]: anchors[44] + 1]

    # Pelvis, lower part to upper: ischium, teardrop, fossa and roof, ilium.
    kp = k * rng.uniform(0.95, 1.05)
    isch_x = -rng.uniform(10.0, 15.0) * kp
    ctrl_p: list[tuple[np.ndarray, int | None]] = [
        (np.array([isch_x - 24 * kp, R + 64.0 * kp]), None),
        (np.array([isch_x - 13 * kp, R + 60.0 * kp]), None),
        (np.array([isch_x - 9 * kp, R + 50.0 * kp]), 45),
        (np.array([isch_x - 2 * kp, R + 36.0 * kp]), None),
        (np.array([isch_x + 1 * kp, R + 20.0 * kp]), None),
        (np.array([isch_x, R + 8.0 * kp]), 52),
    ]
    td_x = -(R + rng.uniform(4.0, 8.0) * kp)
    td_y = R * 0.95 + rng.uniform(-2, 3) * kp
    ctrl_p += [
        (np.array([td_x + 5.0 * kp, td_y - 1.5 * kp]), 53),
        (np.array([td_x + 2.0 * kp, td_y + 1.5 * kp]), None),
        (np.array([td_x - 2.0 * kp, td_y + 1.8 * kp]), 55),
        (np.array([td_x - 5.0 * kp, td_y - 1.0 * kp]), None),
        (np.array([td_x - 6.0 * kp, td_y - 9.0 * kp]), 57),
        (np.array([td_x - 5.5 * kp, td_y - 17.0 * kp]), 58),
    ]
    a78 = np.deg2rad(-90.0 + ce)
    a_start = np.deg2rad(168.0)
    alphas = np.linspace(a_start, a78 + 2 * np.pi, 20)
    for j, a in enumerate(alphas):
        deg = np.rad2deg(a)
        r = Rs + 4.5 * kp * np.clip((235.0 - deg) / 55.0, 0.0, 1.0)
        ctrl_p.append((r * np.array([np.cos(a), np.sin(a)]), 59 if j == 0 else (78 if j == len(alphas) - 1 else None)))
    il = ctrl_p[-1][0]  # the ilium's lateral border rises from the lateral margin, 78
    aiis = rng.uniform(3.0, 7.0) * kp
    ctrl_p += [
        (il + np.array([2.0, -4.0]) * kp, None),
        (il + np.array([2.5 + aiis * 0.5, -9.0 * kp]), None),
        (il + np.array([1.0 + aiis, -13.0 * kp]), None),
        (il + np.array([0.5 + aiis * 0.4, -17.0 * kp]), None),
        (il + np.array([1.5 + aiis * 0.8, -22.0 * kp]), 84),
        (il + np.array([3.0 + aiis, -150.0]), None),
    ]
    cpp = np.array([c for c, _ in ctrl_p])
    pdense, pidx = _catmull_rom(cpp, per_mm=3.0)
    panch = {lab: int(pidx[i]) for i, (_, lab) in enumerate(ctrl_p) if lab is not None}
    pel_pts = _label_points(pdense, panch, 45, 84)
    i55, i57, i59, i78 = (panch[j] for j in (55, 57, 59, 78))

    far = 200.0
    ramus_y = td_y + rng.uniform(2.0, 6.0) * kp
    upper = np.vstack([
        pdense[i57:],
        [[-far, -far], [-far, ramus_y + 8.0]],
        [[td_x - 8 * kp, ramus_y + 6.0]],
    ])
    lower_y = R + rng.uniform(56.0, 62.0) * kp
    lower = np.vstack([
        pdense[: i55 + 1],
        [[td_x - 10 * kp, ramus_y + 1.0], [-far, ramus_y + 2.0], [-far, lower_y - 4.0],
         [isch_x - 36 * kp, lower_y + 3.0 * kp]],
    ])
    ob_c = np.array([isch_x - 20.0 * kp, R + rng.uniform(27.0, 32.0) * kp])
    t = np.linspace(0, 2 * np.pi, 60, endpoint=False)
    ob_a, ob_b = rng.uniform(10.0, 13.0) * kp, rng.uniform(15.0, 19.0) * kp
    ob = np.stack([ob_a * np.cos(t), ob_b * np.sin(t)], axis=1) @ _rot(rng.uniform(-25, -10)).T + ob_c
    inlet_c = np.array([-(R + rng.uniform(62.0, 75.0) * kp), -rng.uniform(35.0, 50.0)])
    inlet = np.stack([rng.uniform(30, 38) * kp * np.cos(t), 50 * np.sin(t)], axis=1) + inlet_c
    # the sourcil: from the top of the fossa to the lateral margin
    roof_start = i59 + int(0.25 * (i78 - i59))
    roof_line = pdense[roof_start: i78 + 1]
    teardrop_line = pdense[panch[53]: i59 + 1]

    # Place: rotate about the head centre, scale to pixels, position in the image.
    sp = spacing_mm
    Rm = _rot(rho)
    H_mm = np.array([0.40 * cols * sp + head_dx_mm, head_y_mm])

    def place(a: np.ndarray) -> np.ndarray:
        return ((np.asarray(a, dtype=np.float64) @ Rm.T) + H_mm) / sp - 0.5

    pts = np.zeros((N_POINTS, 2))
    for j, p in {**fem_pts, **pel_pts}.items():
        pts[j] = place(p)
    shaft_dir = Rm @ d
    e_wall = _unit(Rm @ np.array([np.cos(np.deg2rad(35)), np.sin(np.deg2rad(35))]))

    y = np.arange(rows) * sp
    skin_c = 0.40 * cols * sp + rng.uniform(78.0, 100.0) * who.soft ** 0.3
    skin_x = (skin_c + 0.06 * (y - 60.0) + 0.0006 * (y - 60.0) ** 2 + rng.uniform(-3, 3)) / sp
    extras = {
        "ward": place(N(sj + 0.8 * (neck_len - sj), -0.1 * w)),
        "ward_r": 7.0 * k / sp,
        "gt": place(S(gt_u + 2.0 * k, v_gt - 11.0 * k)),
        "gt_r": 11.0 * k / sp,
        "calcar": place(dense[anchors[12]: anchors[15] + 1]),
        "compressive": place(np.array([R * 0.8 * np.array([np.cos(a0 - 1.2), np.sin(a0 - 1.2)]),
                                       N(sj + 0.45 * (neck_len - sj), w * 0.8)])),
    }
    return HipGeometry(
        rows=rows, cols=cols, spacing_mm=sp, extras=extras,
        head_centre=place(np.zeros(2)), head_radius=R / sp, socket_radius=Rs / sp, points=pts,
        femur_poly=place(femur_poly), pelvis_upper_poly=place(upper), pelvis_lower_poly=place(lower),
        obturator_poly=place(ob), inlet_poly=place(inlet), roof_line=place(roof_line),
        teardrop_line=place(teardrop_line), femur_curve=place(femur_curve),
        pelvis_curve=place(pdense[panch[45]: panch[84] + 1]),
        shaft_origin=place(P), shaft_dir=shaft_dir, shaft_halfwidth=hw / sp, lt_along=v_lt / sp,
        wall_normal=e_wall, wall_offset=R * rng.uniform(0.15, 0.45) / sp, skin_x=skin_x,
    )


# ---------------------------------------------------------------------------------------------
# Osteophytes
# ---------------------------------------------------------------------------------------------


def _normal_at(curve: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit tangent (in curve direction) and left normal of ``curve`` at the sample nearest ``p``."""
    i = int(np.argmin(np.sum((curve - p) ** 2, axis=1)))
    a, b = curve[max(i - 3, 0)], curve[min(i + 3, len(curve) - 1)]
    t = _unit(b - a)
    return t, np.array([t[1], -t[0]])


def spur_polygon(rng: np.random.Generator, attach: np.ndarray, direction: np.ndarray, area_px: float,
                 bend: float, embed_px: float, root: np.ndarray | None = None,
                 aspect_range: tuple[float, float] = (0.5, 1.9), max_half_base_px: float = 28.0) -> np.ndarray:
    """A bony spur: a tapering, possibly curved horn or lip grown from ``attach``.

    Args:
        attach: ``(2,)`` px, where it joins the bone contour.
        direction: ``(2,)`` unit vector it grows along.
        area_px: Target area in pixels (of the horn outside the bone; roughly).
        bend: Curvature, fraction of the length the tip deviates sideways (signed).
        embed_px: How far the base is sunk into the bone so it joins smoothly.
        root: Where the base starts inside the bone; default ``attach - embed_px * direction``.
        aspect_range: Range of length / base width (lumps ~0.5, beaks ~2).
        max_half_base_px: Cap on the half-width of the base; larger spurs grow longer instead.

    Returns:
        ``(k, 2)`` closed polygon, px.
    """
    aspect = rng.uniform(*aspect_range)
    half_base = np.sqrt(area_px / (3.0 * aspect))
    if half_base > max_half_base_px:
        half_base = max_half_base_px
        aspect = area_px / (3.0 * half_base ** 2)
    length = 2.0 * half_base * aspect + embed_px
    perp = np.array([-direction[1], direction[0]])
    uu = np.linspace(0.0, 1.0, 32)
    if root is None:
        root = attach - embed_px * direction
    centre = root[None] + ((uu * length)[:, None] * direction[None]
                           + (bend * length * uu ** 2)[:, None] * perp[None])
    tang = np.gradient(centre, axis=0)
    tang /= np.linalg.norm(tang, axis=1, keepdims=True)
    nrm = np.stack([-tang[:, 1], tang[:, 0]], axis=1)
    # (1 - u^a)^b: a=2, b=0.5 is a half ellipse (a rounded lip); small b, large a a blunt lump;
    # b near 1 a tapering beak. The base flares where it meets the bone.
    a_exp, b_exp = rng.uniform(1.3, 3.0), rng.uniform(0.35, 1.0)
    prof = half_base * (1.0 - uu ** a_exp) ** b_exp
    prof *= 1.0 + 0.5 * np.exp(-((uu * length) / max(embed_px, 1.0)) ** 2)
    wobble = ndi.gaussian_filter1d(rng.normal(0.0, 0.3, (2, uu.size)), 2.5, axis=1)
    left = centre + (prof * (1 + wobble[0]))[:, None] * nrm
    right = centre - (prof * (1 + wobble[1]))[:, None] * nrm
    return np.vstack([left, right[::-1]])


@dataclass
class Osteophyte:
    label: int
    poly: np.ndarray  # (k, 2) px
    density: float


def draw_osteophytes(rng: np.random.Generator, geo: HipGeometry, present: dict[int, bool]) -> list[Osteophyte]:
    """Spurs for the labels in ``present`` that are True, grown from points 15, 30 and 78.

    Sizes are log-uniform, a few mm^2 to ~150 mm^2 (site 3 a little smaller and fainter: the
    acetabular lip overlaps the femoral head, the hardest site in the paper).
    """
    s = 1.0 / geo.spacing_mm
    out = []
    for label in (1, 2, 3):
        if not present.get(label, False):
            continue
        p = geo.points[SITE_POINTS[label]]
        if label in (1, 2):
            t, nl = _normal_at(geo.femur_curve, p)
            # femur curve runs anticlockwise on screen around the head -> outward is the right normal
            outward = -nl
            if np.dot(outward, p - geo.head_centre) < 0:
                outward = -outward
            toward_head = t if label == 1 else -t
            ang = rng.uniform(0.0, 55.0) if label == 1 else rng.uniform(-55.0, 20.0)
            dvec = _unit(np.cos(np.deg2rad(ang)) * outward + np.sin(np.deg2rad(ang)) * toward_head)
            area = np.exp(rng.uniform(np.log(4.0), np.log(260.0))) * s * s
            bend = rng.uniform(-0.35, 0.35)
            dens = rng.uniform(0.75, 1.0)
        else:
            # the lateral acetabular lip continues the roof laterally and down over the head
            t = _unit(geo.roof_line[-1] - geo.roof_line[-8])  # the roof's direction at its margin
            radial = _unit(p - geo.head_centre)
            dvec = _unit(t + radial * rng.uniform(-0.45, 0.25))
            area = np.exp(rng.uniform(np.log(4.0), np.log(200.0))) * s * s
            # curve towards the head (clockwise on screen for a left hip)
            bend = rng.uniform(0.1, 0.45)
            perp = np.array([-dvec[1], dvec[0]])
            if np.dot(perp, geo.head_centre - p) < 0:
                bend = -bend
            dens = rng.uniform(0.6, 0.9)
        embed = rng.uniform(1.0, 2.0) * s
        root = None
        if label == 3:
            # the lip's base is sunk into the pelvis (between the roof, 77, and the ilium, 79),
            # not back along the roof into the joint space
            into = _unit(_unit(geo.points[77] - p) + _unit(geo.points[79] - p))
            root = p + embed * into
        poly = spur_polygon(rng, p, dvec, area, bend, embed, root,
                            aspect_range=(0.5, 1.9) if label != 3 else (1.1, 2.4),
                            max_half_base_px=(7.0 if label != 3 else 4.5) * s)
        out.append(Osteophyte(label, poly, float(dens)))
    return out


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scanner:
    """How a scanner and its software turn projected density into pixels.

    The defaults are the first scanner (UKB's GE Lunar iDXA exports as hipoa's demo draws them);
    :data:`SECOND_SCANNER` is another centre's scanner or software version: a coarser pixel grid,
    more noise and banding, a softer detector, another response curve and thicker soft tissue.

    Attributes:
        name: Written to the truth table.
        spacing_mm: Pixel size.
        noise: Standard deviation of the per-pixel scan noise (8-bit units).
        banding: Standard deviation of the line-to-line offsets (8-bit units).
        blur_mm: Detector blur (Gaussian sigma in mm on the half-resolution grid).
        gamma: Response curve ``255 * (v / 255) ** gamma`` after the log-like detector response.
        soft: Soft-tissue thickness factor (on top of the participant's).
        contrast: Detector gain factor (on top of the participant's).
        banding_mm: Correlation of the line offsets across lines (Gaussian sigma in mm; 0: each
            line its own offset, as both shipped scanners).
        stripes: Amplitude (8-bit units) of a periodic stripe pattern (a rounded square wave,
            ``tanh(2 sin) / tanh(2)``: a line at the period and its odd harmonics), e.g. a
            detector's element gain pattern or a grid; 0: none.
        stripe_period_mm: ``(low, high)`` period of the stripes, drawn per image uniformly.
        stripe_angle_deg: ``(low, high)`` direction of the stripes' wave vector from the x axis
            (0: vertical stripes, the value varying along x; 90: horizontal, along y), drawn per
            image.
        grain: Standard deviation (8-bit units) of a correlated noise on top of ``noise``: a
            coarser grain (a detector with larger effective elements, or noise filtered by the
            scanner's software); 0: none.
        grain_mm: Correlation of that noise (Gaussian sigma in mm).

    The texture fields (``banding_mm`` to ``grain_mm``) draw from the image's generator only when
    they are set, so a scanner without them renders the same bytes as before they existed.
    """

    name: str = "A"
    spacing_mm: float = 0.25
    noise: float = 2.0
    banding: float = 0.9
    blur_mm: float = 0.22
    gamma: float = 1.0
    soft: float = 1.0
    contrast: float = 1.0
    banding_mm: float = 0.0
    stripes: float = 0.0
    stripe_period_mm: tuple[float, float] = (4.0, 4.0)
    stripe_angle_deg: tuple[float, float] = (0.0, 0.0)
    grain: float = 0.0
    grain_mm: float = 0.5


FIRST_SCANNER = Scanner()
SECOND_SCANNER = Scanner(name="B", spacing_mm=0.30, noise=3.5, banding=2.2, blur_mm=0.34, gamma=0.8, soft=1.3,
                         contrast=0.9)
"""The synthetic "second scanner" (``hipoa synth --second-scanner``): 0.30 mm pixels, noisier."""

TEST_SCANNERS: tuple[Scanner, ...] = (
    FIRST_SCANNER,
    SECOND_SCANNER,
    Scanner(name="C-banding", noise=2.5, banding=5.0),
    Scanner(name="D-smooth-banding", spacing_mm=0.30, noise=3.0, banding=4.0, banding_mm=0.8, blur_mm=0.30),
    Scanner(name="E-stripes-3mm", stripes=4.0, stripe_period_mm=(3.0, 3.0)),
    Scanner(name="F-stripes-7mm-oblique", spacing_mm=0.30, noise=3.0, banding=1.5, stripes=4.0,
            stripe_period_mm=(7.0, 7.0), stripe_angle_deg=(30.0, 30.0)),
    Scanner(name="G-stripes-any", stripes=5.0, stripe_period_mm=(1.5, 12.0), stripe_angle_deg=(0.0, 180.0)),
    Scanner(name="H-grain", noise=2.0, grain=4.0, grain_mm=0.5),
    Scanner(name="I-coarse-grain", spacing_mm=0.30, noise=3.5, banding=2.2, grain=5.0, grain_mm=1.0, gamma=0.8,
            soft=1.3, contrast=0.9),
)
"""Scanner textures the image-fitness benchmark renders hips with (benchmarks/fitness.py): the two
shipped scanners, strong line banding (independent lines, and correlated over ~1 mm), periodic
stripes at 3 mm, at 7 mm oblique and at any period (1.5-12 mm) and direction, and correlated noise
grain (0.5 and 1 mm). None is used by ``hipoa synth``."""


@dataclass
class HipRender:
    """One rendered hip as stored (left orientation unless mirrored)."""

    image: np.ndarray  # (rows, cols) uint8, MONOCHROME2
    labels: np.ndarray  # (rows, cols) uint8, 0 background, 1/2/3 osteophyte sites
    points: np.ndarray  # (85, 2) float64 px, true outline
    spacing_mm: float


def _spur_region(spur: np.ndarray, host: np.ndarray, radius_px: float) -> np.ndarray:
    """Pixels a spur adds to its bone: the spur outside the host, with the notches where its
    outline meets the bone's filled in (a morphological closing near the spur), as new bone
    blends into the cortex.

    Args:
        spur: (rows, cols) bool, the spur polygon.
        host: (rows, cols) bool, the bone it grows from.
        radius_px: Closing radius, px.
    """
    r = int(np.ceil(radius_px))
    sl = _bbox(spur, pad=3 * r + 2)
    local_spur, local_host = spur[sl], host[sl]
    yy, xx = np.mgrid[-r: r + 1, -r: r + 1]
    disk = xx ** 2 + yy ** 2 <= radius_px ** 2
    closed = ndi.binary_closing(local_spur | local_host, structure=disk)
    near = ndi.binary_dilation(local_spur, structure=disk)
    out = np.zeros_like(spur)
    out[sl] = ((closed & near) | local_spur) & ~local_host
    return out


def _down(a: np.ndarray) -> np.ndarray:
    """2x2 block mean, float32: (rows, cols) -> (rows // 2, cols // 2)."""
    a = a.astype(np.float32, copy=False)
    return 0.25 * (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2])


def _up2(a: np.ndarray, axis: int) -> np.ndarray:
    """Bilinear 2x upsampling along ``axis``, pixel centres aligned with :func:`_down`.

    Half-resolution pixel i is centred on full-resolution coordinate 2i + 0.5, so full pixel 2i
    is 0.25 a[i-1] + 0.75 a[i] and 2i+1 is 0.75 a[i] + 0.25 a[i+1] (edges repeated).
    """
    a = np.moveaxis(a, axis, 0)
    prev = np.concatenate([a[:1], a[:-1]])
    nxt = np.concatenate([a[1:], a[-1:]])
    out = np.empty((2 * a.shape[0],) + a.shape[1:], dtype=a.dtype)
    out[0::2] = 0.75 * a + 0.25 * prev
    out[1::2] = 0.75 * a + 0.25 * nxt
    return np.moveaxis(out, 0, axis)


def _bone(cover: np.ndarray, s: float, ramp_mm: float, rim_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Projected thickness of a bone from its coverage map (0..1): body and cortical shell.

    A Gaussian blur turned into a depth ramp (``2 * blur - 1``: 0 at the outline, 1 about two
    sigmas deep) stands in for the distance to the outline; a solid's projected thickness grows
    like the square root of that depth, and a cortical shell peaks just inside the outline.

    Args:
        cover: (r, c) float32 coverage, 0..1.
        s: Map pixels per mm.
        ramp_mm: Sigma of the body ramp, mm (about half the depth at which thickness levels off).
        rim_mm: Sigma of the shell ramp, mm (the shell peaks about ``rim_mm / 2`` inside).

    Returns:
        body, rim: (r, c) float32 in 0..1.
    """
    deep = np.clip(2.0 * _blur(cover, ramp_mm * s) - 1.0, 0.0, 1.0)
    body = np.sqrt(deep)
    shallow = np.clip(2.0 * _blur(cover, rim_mm * s) - 1.0, 0.0, 1.0)
    rim = 4.0 * shallow * (1.0 - shallow)
    return body, rim


def _lowfreq(rng: np.random.Generator, shape: tuple[int, int], cell: int, sigma: float) -> np.ndarray:
    """Smooth random field, unit standard deviation, (shape) float32; ``cell`` px blocks blurred."""
    coarse = rng.standard_normal((-(-shape[0] // cell), -(-shape[1] // cell))).astype(np.float32)
    coarse = _blur(coarse, sigma)
    coarse *= 1.0 / (coarse.std() + 1e-6)
    return np.kron(coarse, np.ones((cell, cell), np.float32))[: shape[0], : shape[1]]


def _bbox(mask: np.ndarray, pad: int) -> tuple[slice, slice]:
    """Row and column slices of the bounding box of ``mask``, grown by ``pad`` and clipped."""
    r = np.flatnonzero(mask.any(axis=1))
    c = np.flatnonzero(mask.any(axis=0))
    if r.size == 0:
        return slice(0, 1), slice(0, 1)
    return (slice(max(r[0] - pad, 0), min(r[-1] + pad + 1, mask.shape[0])),
            slice(max(c[0] - pad, 0), min(c[-1] + pad + 1, mask.shape[1])))


def _blob(xx: np.ndarray, yy: np.ndarray, c: np.ndarray, r: float) -> np.ndarray:
    return np.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / (2.0 * r * r))


def render_hip(rng: np.random.Generator, who: Participant, geo: HipGeometry,
               spurs: list[Osteophyte], scanner: Scanner = FIRST_SCANNER, noise: bool = True) -> HipRender:
    """Render a left hip: image and osteophyte label mask with the same spur pixels.

    Shapes are filled at full resolution (the label mask is exact), the smooth projected density
    is computed on a half-resolution grid from the 2x2 coverage of those shapes (anti-aliased,
    4x cheaper) and brought back to full size before the detector blur and noise.

    Args:
        noise: False: stop before the scanner's noise, banding and textures (:func:`scan_noise`
            adds them later, e.g. after :func:`double_image`: a patient who moves doubles the
            anatomy, not the detector's noise).

    Returns:
        :class:`HipRender` with ``image`` (rows, cols) uint8 (float32 in 8-bit units, unrounded,
        when ``noise`` is False) and ``labels`` (rows, cols) uint8.
    """
    rows, cols, sp = geo.rows, geo.cols, geo.spacing_mm
    shape = (rows, cols)
    ex = geo.extras

    femur0 = _fill(shape, geo.femur_poly)
    pelvis0 = (_fill(shape, geo.pelvis_upper_poly) | _fill(shape, geo.pelvis_lower_poly))
    pelvis0 &= ~_fill(shape, geo.obturator_poly)
    pelvis0 &= ~_fill(shape, geo.inlet_poly)
    labels = np.zeros(shape, np.uint8)
    femur = femur0.copy()
    pelvis = pelvis0.copy()
    spur3 = np.zeros(shape, bool)
    spur3_density = 1.0
    for o in spurs:
        host = femur0 if o.label in (1, 2) else pelvis0
        region = _spur_region(_fill(shape, o.poly), host, radius_px=1.2 / sp)
        if o.label in (1, 2):
            femur |= region
        else:
            pelvis |= region
            spur3 |= region
            spur3_density = o.density
        labels[region] = o.label

    # Half-resolution grid; coordinates below stay in full-resolution pixels. Coordinates are a
    # row and a column vector, so expressions in them broadcast instead of filling whole images.
    hshape = (rows // 2, cols // 2)
    s = 0.5 / sp  # grid pixels per mm
    to_half = lambda line: (np.asarray(line) + 0.5) / 2.0 - 0.5  # noqa: E731
    fem = _down(femur)
    pel = _down(pelvis)

    # Femur: ramp + cortex, sphere chord in the head, hollow tube down the shaft, the calcar and
    # the principal compressive trabeculae brighter, Ward's triangle and the greater trochanter
    # (sparser trabecular bone) darker. Computed in the femur's bounding box only.
    fr, fc = _bbox(fem > 0, pad=int(np.ceil(13.0 * s)))
    F = fem[fr, fc]
    x = 2.0 * np.arange(fc.start, fc.stop, dtype=np.float32)[None, :] + 0.5
    y = 2.0 * np.arange(fr.start, fr.stop, dtype=np.float32)[:, None] + 0.5
    body, rim = _bone(F, s, 4.0, 1.6)
    hx, hy = geo.head_centre
    r2 = (x - hx) ** 2 * (1.0 / geo.head_radius ** 2) + (y - hy) ** 2 * (1.0 / geo.head_radius ** 2)
    sphere = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
    ox, oy = geo.shaft_origin
    dx, dy = geo.shaft_dir
    along = (x - ox) * dx + (y - oy) * dy
    across = np.abs((x - ox) * (-dy) + (y - oy) * dx)
    ro = geo.shaft_halfwidth
    ri = ro * np.clip(0.80 - 0.3 * (along - geo.lt_along) * (sp / 40.0), 0.5, 0.8)
    tube = (np.sqrt(np.clip(ro ** 2 - across ** 2, 0, None)) - np.sqrt(np.clip(ri ** 2 - across ** 2, 0, None))) / ro
    w_shaft = np.clip((along - geo.lt_along + 2.0 / sp) * (sp / 16.0), 0.0, 1.0)
    lines = (_stroke(hshape, to_half(ex["calcar"]), 2.5 * s)
             + 0.5 * _stroke(hshape, to_half(ex["compressive"]), 9.0 * s))[fr, fc]
    lines = _blur(lines, 1.5 * s)
    darker = 1.0 - 0.3 * _blob(x, y, ex["ward"], ex["ward_r"]) - 0.3 * _blob(x, y, ex["gt"], ex["gt_r"])
    prox = (0.36 * body + 0.26 * rim + 0.22 * sphere + 0.16 * lines) * darker
    dist = 0.25 * body + 0.70 * tube + 0.2 * rim
    femur_d = np.zeros(hshape, np.float32)
    femur_d[fr, fc] = (prox + (dist - prox) * w_shaft) * np.minimum(F * 4.0, 1.0)

    # Pelvis: thinner plate, brighter sourcil, teardrop and walls over the head.
    x = 2.0 * np.arange(hshape[1], dtype=np.float32)[None, :] + 0.5
    y = 2.0 * np.arange(hshape[0], dtype=np.float32)[:, None] + 0.5
    pbody, prim = _bone(pel, s, 4.0, 1.4)
    ilium_thin = np.clip(1.05 - 0.5 * (sp / 70.0) * np.sqrt((x - hx) ** 2 + (y - hy) ** 2), 0.45, 1.0)
    lf = _lowfreq(rng, hshape, 8, 1.5)
    pelvis_d = (0.25 * pbody + 0.2 * prim) * ilium_thin * (1.0 + 0.12 * lf)
    if spur3_density != 1.0:
        pelvis_d *= 1.0 - (1.0 - spur3_density) * _down(spur3)
    strokes = (0.30 * _stroke(hshape, to_half(geo.roof_line), 2.2 * s)
               + 0.20 * _stroke(hshape, to_half(geo.teardrop_line), 1.6 * s))
    rs2 = geo.socket_radius ** 2
    in_socket = ((x - hx) ** 2 + (y - hy) ** 2) < rs2
    wx, wy = geo.wall_normal
    wall = in_socket & (((x - hx) * wx + (y - hy) * wy) < geo.wall_offset)
    pelvis_d += _blur(strokes + 0.2 * wall, 0.7 * s)

    # Trabecular texture: fine isotropic grain plus streaks along the compressive trabeculae.
    g1 = rng.standard_normal(hshape, dtype=np.float32)
    tex = _blur(g1, 0.4 * s)
    tex *= 1.0 / (tex.std() + 1e-6)
    # a coarser criss-cross: the trabecular network seen through the whole bone
    g2 = _blur(g1[::-1, :], (1.4 * s, 0.5 * s)) + _blur(g1[:, ::-1], (0.5 * s, 1.4 * s))
    g2 *= 1.0 / (g2.std() + 1e-6)
    bone = (femur_d + pelvis_d) * (1.0 + 0.06 * tex + 0.07 * g2) * who.density

    # Soft tissue: thick, smooth, thinning towards the lateral skin edge; air beyond it.
    skin = geo.skin_x[0::2, None]
    depth = np.clip((skin - x) * (sp / 25.0), 0.0, 1.0)
    lowfreq = _lowfreq(rng, hshape, 4, 3.0)
    soft = who.soft * 0.17 * np.sqrt(depth) * (1.0 + 0.07 * lowfreq)
    if scanner.soft != 1.0:
        soft = soft * scanner.soft
    dens = bone + soft + _BG_DENSITY

    img = 255.0 * (1.0 - np.exp(-who.gain * scanner.contrast * dens))
    if scanner.gamma != 1.0:
        img = 255.0 * (img * (1.0 / 255.0)) ** scanner.gamma
    img = _blur(img, scanner.blur_mm * s)  # detector blur, ~0.3 mm with the upsampling below
    img = _up2(_up2(img, axis=0), axis=1)
    image = scan_noise(rng, img, scanner) if noise else img
    return HipRender(image=image, labels=labels, points=geo.points.copy(), spacing_mm=sp)


def scan_noise(rng: np.random.Generator, img: np.ndarray, scanner: Scanner) -> np.ndarray:
    """The detector's part of an image: scan noise, the DXA fan beam's line-to-line banding and
    the scanner's optional textures on ``(rows, cols)`` float32 (8-bit units), rounded to uint8."""
    rows = img.shape[0]
    img = img + scanner.noise * rng.standard_normal(img.shape, dtype=np.float32)
    img += scanner.banding * rng.standard_normal((rows, 1), dtype=np.float32)
    img = _texture(rng, img, scanner)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _texture(rng: np.random.Generator, img: np.ndarray, scanner: Scanner) -> np.ndarray:
    """Add the scanner's optional textures (:class:`Scanner` ``banding_mm`` to ``grain_mm``) to a
    full-resolution image ``(rows, cols)`` float32 in 8-bit units; unchanged (no draw) without them."""
    rows, cols = img.shape
    sp = scanner.spacing_mm
    if scanner.banding_mm > 0.0:
        lines = ndi.gaussian_filter1d(rng.standard_normal(rows), scanner.banding_mm / sp)
        img = img + (scanner.banding / (lines.std() + 1e-9) * lines).astype(np.float32)[:, None]
    if scanner.stripes > 0.0:
        period = rng.uniform(*scanner.stripe_period_mm) / sp
        ang = np.deg2rad(rng.uniform(*scanner.stripe_angle_deg))
        phase = rng.uniform(0.0, 2.0 * np.pi)
        yy = np.arange(rows, dtype=np.float32)[:, None]
        xx = np.arange(cols, dtype=np.float32)[None, :]
        wave = np.sin((2.0 * np.pi / period) * (xx * np.cos(ang) + yy * np.sin(ang)) + phase)
        img = img + (scanner.stripes / np.tanh(2.0)) * np.tanh(2.0 * wave)
    if scanner.grain > 0.0:
        g = ndi.gaussian_filter(rng.standard_normal((rows, cols), dtype=np.float32), scanner.grain_mm / sp)
        img = img + (scanner.grain / (g.std() + 1e-9)) * g
    return img.astype(np.float32, copy=False)


def mirror_hip(h: HipRender) -> HipRender:
    """Mirror a left hip into a right one: image, labels and points with ``x' = cols - 1 - x``."""
    cols = h.image.shape[1]
    pts = h.points.copy()
    pts[:, 0] = cols - 1 - pts[:, 0]
    return HipRender(image=np.ascontiguousarray(h.image[:, ::-1]), labels=np.ascontiguousarray(h.labels[:, ::-1]),
                     points=pts, spacing_mm=h.spacing_mm)


def render_other_scan(rng: np.random.Generator, protocol: str) -> np.ndarray:
    """A small, cheap stand-in for a non-hip scan (``AP Spine`` or ``Total Body``), uint8."""
    if protocol == "AP Spine":
        rows, cols = 320, 200
        yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
        dens = np.full((rows, cols), 0.2, np.float32)
        cx = cols / 2 + rng.uniform(-8, 8)
        for j in range(4):
            cy = 45 + j * 72 + rng.uniform(-4, 4)
            dens += 0.5 * ((np.abs(xx - cx) < 34) & (np.abs(yy - cy) < 28))
        dens += 0.25 * ((np.abs(xx - cx) < 8))
    else:
        rows, cols = 360, 150
        yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
        body = ((xx - cols / 2) / 40) ** 2 + ((yy - 200) / 150) ** 2 < 1
        head = ((xx - cols / 2) / 16) ** 2 + ((yy - 28) / 20) ** 2 < 1
        dens = 0.02 + 0.25 * (body | head) + 0.35 * (np.abs(xx - cols / 2) < 5) * body
    img = 255.0 * (1.0 - np.exp(-1.4 * _blur(dens, 1.5)))
    img += rng.normal(0, 2.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Images unfit to measure (hipoa synth --unfit)
# ---------------------------------------------------------------------------------------------


def add_implant(rng: np.random.Generator, hip: HipRender, geo: HipGeometry) -> HipRender:
    """A metal hip prosthesis on a left hip: femoral stem and ball, and in 60 % an acetabular cup.

    Metal stops the beam: its pixels sit at the top of the 8-bit range (250-255, a little noise),
    with a sub-millimetre edge blur. Labels and points are unchanged (the image is not measured).
    """
    rows, cols = hip.image.shape
    sp = geo.spacing_mm
    h = geo.head_centre
    r_ball = geo.head_radius * rng.uniform(0.55, 0.75)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    dist = np.sqrt((xx - h[0]) ** 2 + (yy - h[1]) ** 2)
    metal = dist <= r_ball
    stem_line = np.array([h, geo.shaft_origin, geo.shaft_origin + geo.shaft_dir * (200.0 / sp)])
    metal |= _stroke(hip.image.shape, stem_line, rng.uniform(9.0, 13.0) / sp) > 0.5
    if rng.random() < 0.6:
        inner = r_ball + rng.uniform(0.5, 1.5) / sp
        up_medial = _unit(np.array([-0.55, -0.85]))
        facing = ((xx - h[0]) * up_medial[0] + (yy - h[1]) * up_medial[1]) > -0.2 * inner
        metal |= (dist >= inner) & (dist <= inner + rng.uniform(2.5, 4.0) / sp) & facing
    level = rng.uniform(251.0, 255.0)
    m = _blur(metal.astype(np.float32), 0.25 / sp)
    img = hip.image.astype(np.float32) * (1.0 - m) + level * m
    img += 0.8 * rng.standard_normal(img.shape, dtype=np.float32)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return HipRender(image=image, labels=hip.labels, points=hip.points, spacing_mm=hip.spacing_mm)


def crop_view(rng: np.random.Generator, hip: HipRender, geo: HipGeometry) -> HipRender:
    """Move the field of view so that its top or left (medial) edge cuts through the femoral head.

    The head centre ends between 0.3 radii inside and 0.6 radii outside the edge; the rows or
    columns that come in at the opposite edge repeat the last ones. Labels and points move with
    the image (points may leave it; :func:`hipoa.synth.auto_points` keeps them on its edge, as an
    automatic search does).
    """
    h, r = geo.head_centre, geo.head_radius
    t = rng.uniform(-0.3, 0.6)
    axis = int(rng.integers(0, 2))  # 0: the top edge cuts the head, 1: the left edge
    shift = int(round(h[1 - axis] + t * r))
    shift = max(1, min(shift, hip.image.shape[axis] - 1))

    def move(a: np.ndarray, pad_edge: bool) -> np.ndarray:
        kept = a[shift:] if axis == 0 else a[:, shift:]
        width = [(0, shift), (0, 0)] if axis == 0 else [(0, 0), (0, shift)]
        return np.pad(kept, width, mode="edge" if pad_edge else "constant")

    pts = hip.points.copy()
    pts[:, 1 - axis] -= shift
    return HipRender(image=move(hip.image, True), labels=move(hip.labels, False), points=pts,
                     spacing_mm=hip.spacing_mm)


def add_motion(rng: np.random.Generator, hip: HipRender, shift_mm: tuple[float, float] = (3.0, 8.0),
               weight: tuple[float, float] = (0.3, 0.5)) -> HipRender:
    """Patient motion during the scan: a second, fainter copy of the image shifted by 3-8 mm.

    ``(1 - a) * image + a * shifted`` with ``a`` in ``weight`` ([0.3, 0.5]), shifted by a distance
    drawn in ``shift_mm`` in a random direction, then fresh scan noise. Labels and points are
    those of the first copy.
    """
    img = double_image(rng, hip.image.astype(np.float32), hip.spacing_mm, shift_mm, weight)
    img += 1.5 * rng.standard_normal(img.shape, dtype=np.float32)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return HipRender(image=image, labels=hip.labels, points=hip.points, spacing_mm=hip.spacing_mm)


def double_image(rng: np.random.Generator, img: np.ndarray, spacing_mm: float,
                 shift_mm: tuple[float, float] = (3.0, 8.0), weight: tuple[float, float] = (0.3, 0.5)) -> np.ndarray:
    """``(1 - a) * img + a * shifted`` (float32, ``(rows, cols)``): the second copy of
    :func:`add_motion`, with ``a`` drawn in ``weight`` and a shift drawn in ``shift_mm`` (mm) in a
    random direction."""
    d = rng.uniform(*shift_mm) / spacing_mm
    ang = rng.uniform(0.0, 2.0 * np.pi)
    a = rng.uniform(*weight)
    ghost = ndi.shift(img, (d * np.sin(ang), d * np.cos(ang)), order=1, mode="nearest")
    return (1.0 - a) * img + a * ghost
