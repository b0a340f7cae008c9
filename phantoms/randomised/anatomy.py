"""The randomised chest: body, lungs, heart, great vessels, a pulmonary arterial tree to segmental
level and beyond, veins, bronchi, lymph nodes, bones, table, and the clots, all drawn from a seed.

Everything is in patient millimetres (LPS: x to the patient's left, y posterior, z to the head),
body centre at x = y = 0 and the carina at ``carina_z``. Sizes, positions, angles, calibres and
attenuations are drawn per series so that no single layout, shape or intensity identifies a clot:
only "a dark defect inside a bright artery" does. The scene is a list of layers painted in order
(a later layer covers an earlier one by its partial-volume fraction).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from phantoms.randomised.shapes import Box, Column, Ellipsoid, Hit, Rib, RibCage, Table, Tube
from phantoms.randomised.spec import CLOT_HU, ClotSpec, RandomisedPhantomError, RandomisedSpec

Point3 = tuple[float, float, float]

#: Arterial calibres (radius, mm) by level, before the per-series scale.
_LOBAR_RADIUS = (3.6, 5.5)
_SEGMENTAL_RADIUS = (2.0, 3.2)
_SUBSEGMENTAL_RADIUS = (1.0, 1.8)


@dataclass(frozen=True)
class ClotShape:
    """A clot: the part of an ellipsoid inside the lumen of the tubes it sits in."""

    ellipsoid: Ellipsoid
    lumen: tuple[Tube, ...]

    @property
    def z_range(self) -> tuple[float, float]:
        return self.ellipsoid.z_range

    def draw(self, x: np.ndarray, y: np.ndarray, z: float, pixel_mm: float) -> Hit | None:
        hit = self.ellipsoid.draw(x, y, z, pixel_mm)
        if hit is None:
            return None
        box, fraction = hit
        px, py = x[box[1]][None, :], y[box[0]][:, None]
        inside = np.max([np.clip(t.signed_distance(px, py, z) / pixel_mm + 0.5, 0.0, 1.0) for t in self.lumen], axis=0)
        fraction = np.minimum(fraction, inside.astype(np.float32))
        return (box, fraction) if fraction.any() else None


Shape = Tube | Ellipsoid | Column | RibCage | Table | ClotShape


@dataclass(frozen=True)
class Layer:
    """One painted structure: its shape, attenuation (HU), texture amplitude (HU) and role."""

    shape: Shape
    hu: float
    texture_hu: float = 0.0
    role: str = "anatomy"  # "anatomy" | "artery" | "clot" | "calcification"


@dataclass(frozen=True)
class Vessel:
    """An arterial branch: its tubes (proximal -> distal), level and side."""

    tubes: tuple[Tube, ...]
    level: str  # trunk | main | lobar | segmental | subsegmental
    side: str  # central | left | right


@dataclass(frozen=True)
class PlacedClot:
    """A clot as drawn: its spec, centre of mass (patient mm), size, attenuation and RSNA sides."""

    spec: ClotSpec
    centre_patient_mm: Point3
    radius_mm: float
    hu: float
    shape: ClotShape

    @property
    def location(self) -> str:
        return self.spec.sides[0]

    @property
    def sides(self) -> tuple[str, ...]:
        return self.spec.sides

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def form(self) -> str:
        return self.spec.form

    @property
    def chronic(self) -> bool:
        return self.spec.chronic


@dataclass(frozen=True)
class StreakSource:
    """A dense object that throws streaks: centre (x, y) mm, over ``z_range``, relative strength."""

    x: float
    y: float
    z_range: tuple[float, float]
    strength: float


@dataclass
class Scene:
    """The whole randomised chest, ready to render."""

    layers: list[Layer]
    clots: list[PlacedClot]
    vessels: list[Vessel]
    streak_sources: list[StreakSource]
    heart_z: tuple[float, float]
    lung_z: tuple[float, float]
    landmarks: dict[str, Point3]
    rv_lv_measured: float
    hu: dict[str, float] = field(default_factory=dict)


def _unit(v: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    n = float(np.linalg.norm(a))
    return a / n if n > 0 else np.array([0.0, 0.0, 1.0])


def _perpendicular(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random unit vector perpendicular to ``d``."""
    r = rng.standard_normal(3)
    r -= (r @ d) * d
    if np.linalg.norm(r) < 1e-6:
        r = np.cross(d, [1.0, 0.0, 0.0])
    return _unit(r)


def _frame(d: np.ndarray, u: np.ndarray) -> tuple[tuple[float, float, float], ...]:
    """Rotation whose columns are (u, d x u, d): axis 0 toward the wall, axis 2 along the vessel."""
    v = np.cross(d, u)
    m = np.stack([u, v, d], axis=1)
    return tuple((float(row[0]), float(row[1]), float(row[2])) for row in m)


def _p(v: np.ndarray | Sequence[float]) -> Point3:
    return (float(v[0]), float(v[1]), float(v[2]))


def _jitter(rng: np.random.Generator, point: Sequence[float], mm: float) -> np.ndarray:
    return np.asarray(point, dtype=np.float64) + rng.uniform(-mm, mm, 3)


def _bent_tubes(rng: np.random.Generator, start: np.ndarray, end: np.ndarray, r0: float, r1: float,
                bend: float) -> tuple[Tube, ...]:
    """Two tubes from ``start`` to ``end`` through a middle point pushed sideways by ``bend`` x length."""
    d = end - start
    length = float(np.linalg.norm(d))
    if length < 1e-6:
        return (Tube(_p(start), _p(end), r0, r1),)
    mid = start + 0.5 * d + _perpendicular(d / length, rng) * bend * length * rng.uniform(0.0, 1.0)
    rm = 0.5 * (r0 + r1)
    return (Tube(_p(start), _p(mid), r0, rm), Tube(_p(mid), _p(end), rm, r1))


class _Lungs:
    """Two lung ellipsoids, to keep branches inside them."""

    def __init__(self, right: Ellipsoid, left: Ellipsoid) -> None:
        self.right, self.left = right, left

    def inside(self, side: str, point: np.ndarray, margin: float = 0.92) -> bool:
        e = self.right if side == "right" else self.left
        return float(e.normalised_radius(point[0], point[1], point[2])) <= margin


def build_scene(spec: RandomisedSpec, scan_z: tuple[float, float]) -> Scene:
    """Draw the chest of ``spec`` (from its seed) for a scan covering ``scan_z`` (mm, ascending)."""
    rng = np.random.default_rng([spec.seed, 11])
    layers: list[Layer] = []
    streaks: list[StreakSource] = []
    # -- patient size and placement along z ------------------------------------------------------
    a = float(rng.uniform(125.0, 185.0))  # half width (mm)
    b = float(rng.uniform(0.68, 0.82)) * a  # half depth
    sz = float(rng.uniform(0.85, 1.12))  # craniocaudal scale
    fat = float(rng.uniform(4.0, 30.0)) * a / 155.0
    muscle = float(rng.uniform(7.0, 16.0))
    a_in, b_in = a - fat - muscle, b - fat - muscle
    sx, sy = a_in / 130.0, b_in / 92.0
    apex_above = float(rng.uniform(95.0, 130.0)) * sz
    base_below = float(rng.uniform(150.0, 190.0)) * sz
    lung_height = apex_above + base_below
    scan_lo, scan_hi = scan_z
    span = scan_hi - scan_lo
    if span >= lung_height + 10.0:
        # The lungs inside the scan with random margins at both ends.
        margin = span - lung_height
        carina_z = scan_lo + base_below + float(rng.uniform(0.2, 0.8)) * margin
    else:
        # A short scan: centred about the hila, where the clots are.
        carina_z = 0.5 * (scan_lo + scan_hi) + float(rng.uniform(-0.15, 0.15)) * span + 20.0 * sz
    z_top, z_bottom = carina_z + apex_above + 60.0, carina_z - base_below - 80.0

    def at(x: float, y: float, z: float, jitter: float = 0.0) -> np.ndarray:
        point = np.array([x * sx, y * sy, carina_z + z * sz])
        return point + (rng.uniform(-jitter, jitter, 3) if jitter else 0.0)

    hu_fat = float(rng.uniform(-130.0, -70.0))
    hu_soft = float(rng.uniform(25.0, 60.0))
    hu_lung = float(rng.uniform(-920.0, -760.0))
    hu_bone = float(rng.uniform(350.0, 900.0))
    hu_marrow = float(rng.uniform(150.0, 320.0))
    artery = float(spec.artery_hu)
    hu_rv = artery * float(rng.uniform(0.8, 1.15))
    hu_lv = artery * float(rng.uniform(0.35, 0.95))
    hu_aorta = artery * float(rng.uniform(0.45, 1.0))
    hu_vein = artery * float(rng.uniform(0.4, 1.0))
    hu_svc = artery * float(rng.uniform(0.9, 4.0)) if rng.random() < 0.6 else artery * float(rng.uniform(0.5, 1.0))
    hu_svc = min(hu_svc, 2500.0)
    hu_liver = float(rng.uniform(60.0, 140.0))

    # -- body, chest wall, cavity ----------------------------------------------------------------
    taper = float(rng.uniform(0.0, 0.12))
    body = Column(z_bottom, z_top, (0.0, 0.0), (float(rng.uniform(-5, 5)), float(rng.uniform(-8, 4))),
                  (a, b), (a * float(rng.uniform(0.9, 1.05)), b * float(rng.uniform(0.9, 1.05))), taper)
    inner_wall = Column(z_bottom, z_top, body.centre0, body.centre1,
                        (a - fat, b - fat), (body.axes1[0] - fat, body.axes1[1] - fat), taper)
    cavity = Column(z_bottom, z_top, body.centre0, body.centre1,
                    (a_in, b_in), (body.axes1[0] - fat - muscle, body.axes1[1] - fat - muscle), taper)
    if spec.table:
        table_top = b + float(rng.uniform(2.0, 25.0))
        layers.append(Layer(Table(table_top, float(rng.uniform(0.0, 0.0012)), float(rng.uniform(6.0, 16.0)),
                                  float(rng.uniform(200.0, 260.0))), float(rng.uniform(-300.0, 250.0))))
        layers.append(Layer(Table(table_top + 2.0, 0.0, 3.0, 180.0), float(rng.uniform(-800.0, -300.0))))
    layers.append(Layer(body, hu_fat, 6.0))
    layers.append(Layer(inner_wall, hu_soft, 8.0))
    if not spec.arms_up:
        for lateral in (-1.0, 1.0):
            ax = lateral * (a + float(rng.uniform(20.0, 45.0)))
            ay = float(rng.uniform(-0.2, 0.3)) * b
            arm_a, arm_b = float(rng.uniform(30.0, 45.0)), float(rng.uniform(35.0, 55.0))
            layers.append(Layer(Column(z_bottom, z_top, (ax, ay), (ax, ay), (arm_a, arm_b), (arm_a, arm_b)), hu_soft, 8.0))
            hr = float(rng.uniform(9.0, 14.0))
            layers.append(Layer(Column(z_bottom, z_top, (ax, ay), (ax, ay), (hr, hr), (hr, hr)),
                                float(rng.uniform(800.0, 1300.0))))
            layers.append(Layer(Column(z_bottom, z_top, (ax, ay), (ax, ay), (hr * 0.55, hr * 0.55),
                                       (hr * 0.55, hr * 0.55)), hu_marrow))
            streaks.append(StreakSource(ax, ay, (z_bottom, z_top), 0.8))
    # Below the diaphragm: liver (right) and upper abdomen.
    layers.append(Layer(cavity, hu_soft + float(rng.uniform(-10, 10)), 10.0))
    liver = Ellipsoid(_p(at(-45.0, 5.0, -175.0, 8.0)), (115.0 * sx, 85.0 * sy, 80.0 * sz))
    layers.append(Layer(liver, hu_liver, 8.0))

    # -- lungs ----------------------------------------------------------------------------------
    lung_z_mid = carina_z + 0.5 * (apex_above - base_below)
    right_drop = float(rng.uniform(0.0, 20.0))
    lungs: dict[str, Ellipsoid] = {}
    for side, sign in (("right", -1.0), ("left", 1.0)):
        cx = sign * a_in * float(rng.uniform(0.44, 0.52))
        e = Ellipsoid((cx, float(rng.uniform(-0.02, 0.12)) * b_in, lung_z_mid - (0.0 if side == "right" else right_drop) / 2.0),
                      (a_in * float(rng.uniform(0.44, 0.5)), b_in * float(rng.uniform(0.88, 0.97)),
                       lung_height / 2.0 - (0.0 if side == "right" else right_drop / 2.0)))
        lungs[side] = e
        layers.append(Layer(e, hu_lung + float(rng.uniform(-25, 25)), float(rng.uniform(12.0, 40.0))))
    lung_shape = _Lungs(lungs["right"], lungs["left"])

    # -- bones: spine, ribs, sternum ------------------------------------------------------------
    vy = b_in * float(rng.uniform(0.62, 0.72))
    vr = float(rng.uniform(14.0, 21.0)) * math.sqrt(sx * sy)
    spine = Column(z_bottom, z_top, (0.0, vy), (0.0, vy + float(rng.uniform(-6, 6))), (vr, vr * 0.9), (vr, vr * 0.9))
    layers.append(Layer(spine, hu_bone))
    layers.append(Layer(Column(z_bottom, z_top, spine.centre0, spine.centre1, (vr * 0.8, vr * 0.72),
                               (vr * 0.8, vr * 0.72)), hu_marrow, 20.0))
    canal_y = vy + vr + float(rng.uniform(6.0, 10.0))
    layers.append(Layer(Column(z_bottom, z_top, (0.0, canal_y), (0.0, canal_y), (9.0, 8.0), (9.0, 8.0)), hu_bone))
    layers.append(Layer(Column(z_bottom, z_top, (0.0, canal_y), (0.0, canal_y), (6.5, 5.5), (6.5, 5.5)), 15.0))
    streaks.append(StreakSource(0.0, vy, (z_bottom, z_top), 0.3))
    rib_gap = float(rng.uniform(22.0, 32.0)) * sz
    rib_wall = Column(z_bottom, z_top, body.centre0, body.centre1, (a - fat, b - fat),
                      (body.axes1[0] - fat, body.axes1[1] - fat), taper)
    inner = 1.0 - (muscle * 0.9) / min(a - fat, b - fat)
    z = carina_z - base_below - 20.0 + float(rng.uniform(0.0, rib_gap))
    ribs: list[Rib] = []
    while z < carina_z + apex_above + 10.0:
        ribs.append(Rib(z, float(rng.uniform(10.0, 30.0)), float(rng.uniform(7.0, 12.0)), inner,
                        inner + float(rng.uniform(0.05, 0.09)), float(rng.uniform(0.35, 0.7))))
        z += rib_gap
    layers.append(Layer(RibCage(rib_wall, tuple(ribs)), hu_bone * 0.8))
    sternum_y = -(b - fat - muscle * 0.5)
    layers.append(Layer(Column(carina_z - 150.0 * sz, carina_z + 60.0 * sz, (0.0, sternum_y), (0.0, sternum_y),
                               (float(rng.uniform(12.0, 20.0)), muscle * 0.45), (14.0, muscle * 0.45)), hu_bone * 0.7))

    # -- mediastinum ----------------------------------------------------------------------------
    med = Column(carina_z - 60.0 * sz, carina_z + apex_above + 40.0,
                 (float(rng.uniform(0.0, 12.0)) * sx, -0.25 * b_in), (0.0, -0.1 * b_in),
                 (float(rng.uniform(0.22, 0.32)) * a_in, 0.6 * b_in), (0.18 * a_in, 0.5 * b_in))
    layers.append(Layer(med, hu_fat * float(rng.uniform(0.2, 0.8)), 15.0))
    # Posterior mediastinum between the spine and the heart.
    layers.append(Layer(Column(carina_z - base_below, carina_z + 40.0, (8.0 * sx, 0.35 * b_in), (5.0 * sx, 0.3 * b_in),
                               (30.0 * sx, 20.0 * sy), (25.0 * sx, 18.0 * sy)), hu_fat * 0.5, 10.0))

    # -- heart ----------------------------------------------------------------------------------
    ratio = float(spec.rv_lv_ratio)
    lv = float(rng.uniform(17.0, 24.0)) * math.sqrt(sx * sy)
    rv = ratio * lv
    septum = float(rng.uniform(8.0, 12.0))
    wall = float(rng.uniform(6.0, 10.0))
    angle = math.radians(float(rng.uniform(15.0, 40.0)))  # RV anterior-right, LV posterior-left
    axis = np.array([math.cos(angle), math.sin(angle), 0.0])  # from RV towards LV
    heart_z = carina_z - float(rng.uniform(55.0, 85.0)) * sz
    heart_centre = np.array([float(rng.uniform(10.0, 35.0)) * sx, -0.32 * b_in, heart_z])
    rv_centre = heart_centre - axis * (septum / 2.0 + rv) + np.array([0.0, -0.0, 0.0])
    lv_centre = heart_centre + axis * (septum / 2.0 + lv)
    half_long = (2 * rv + 2 * lv + septum) / 2.0 + wall
    mid = 0.5 * ((rv_centre - axis * rv) + (lv_centre + axis * lv))
    height = float(rng.uniform(40.0, 58.0)) * sz
    depth = max(rv, lv) + wall + float(rng.uniform(4.0, 14.0))
    heart_frame = _frame(np.array([0.0, 0.0, 1.0]), axis)
    layers.append(Layer(Ellipsoid(_p(mid), (half_long + 6.0, depth + 6.0, height + 6.0), heart_frame), hu_fat, 10.0))
    layers.append(Layer(Ellipsoid(_p(mid), (half_long, depth, height), heart_frame), float(rng.uniform(30.0, 70.0)), 6.0))
    chamber_height = height * 0.72
    ry_scale = float(rng.uniform(0.8, 1.1))
    rv_shape = Ellipsoid(_p(rv_centre), (rv, rv * ry_scale * min(1.0, 1.15 / max(ratio, 1e-3)) ** 0.3,
                                          chamber_height * min(1.0, 0.8 + 0.2 * ratio)), heart_frame)
    lv_shape = Ellipsoid(_p(lv_centre), (lv, lv * ry_scale, chamber_height), heart_frame)
    layers.append(Layer(rv_shape, hu_rv, 8.0))
    layers.append(Layer(lv_shape, hu_lv, 8.0))
    la = Ellipsoid(_p(at(20.0, 10.0, -30.0, 6.0)), (30.0 * sx, 18.0 * sy, 20.0 * sz))
    layers.append(Layer(la, hu_lv, 8.0))

    # -- great vessels, airways ---------------------------------------------------------------
    aorta_r = float(rng.uniform(12.0, 17.0)) * math.sqrt(sx * sy)
    aorta_points = [at(-8.0, -25.0, -60.0, 5), at(-22.0, -35.0, 30.0, 6), at(-5.0, 5.0, 50.0, 6),
                    at(22.0, 45.0, 35.0, 4), at(24.0, 45.0, -200.0, 4)]
    for p0, p1 in zip(aorta_points[:-1], aorta_points[1:], strict=True):
        layers.append(Layer(Tube(_p(p0), _p(p1), aorta_r, aorta_r * 0.92), hu_aorta, 5.0, "artery"))
    svc_r = float(rng.uniform(8.0, 12.0))
    svc_top, svc_bottom = at(-42.0, -22.0, 130.0, 6), at(-45.0, -25.0, -40.0, 6)
    layers.append(Layer(Tube(_p(svc_top), _p(svc_bottom), svc_r, svc_r), hu_svc, 10.0))
    if hu_svc > 1.6 * artery:
        streaks.append(StreakSource(float(svc_top[0]), float(svc_top[1]), (float(svc_bottom[2]), float(svc_top[2])), 1.0))
    trachea_r = float(rng.uniform(7.5, 10.0))
    carina = at(0.0, 18.0, 0.0, 3)
    air_wall = float(rng.uniform(0.0, 40.0))
    layers.append(Layer(Tube(_p(at(0.0, 15.0, 200.0, 3)), _p(carina), trachea_r + 1.5, trachea_r + 1.5), air_wall))
    layers.append(Layer(Tube(_p(at(0.0, 15.0, 200.0, 3)), _p(carina), trachea_r, trachea_r), -1000.0))
    esophagus = Tube(_p(at(10.0, 42.0, 200.0, 4)), _p(at(15.0, 42.0, -170.0, 4)), 7.0, 7.0)
    layers.append(Layer(esophagus, hu_soft, 8.0))
    if rng.random() < 0.4:
        layers.append(Layer(Tube(esophagus.start, esophagus.end, 2.5, 2.5), -1000.0))
    hila = {"right": at(-62.0, 2.0, -4.0, 6), "left": at(55.0, 10.0, -2.0, 6)}
    bronchus_r = float(rng.uniform(5.0, 7.0))
    for side in ("right", "left"):
        end = hila[side] + np.array([0.0, 14.0, -12.0 if side == "right" else -18.0])
        layers.append(Layer(Tube(_p(carina), _p(end), bronchus_r + 1.2, bronchus_r), air_wall))
        layers.append(Layer(Tube(_p(carina), _p(end), bronchus_r, bronchus_r - 1.2), -1000.0))

    # -- pulmonary arteries -------------------------------------------------------------------
    vessels: list[Vessel] = []
    trunk_r = float(rng.uniform(11.0, 16.0)) * math.sqrt(sx * sy)
    if ratio >= 1.2 and rng.random() < 0.6:
        trunk_r *= 1.1  # pulmonary hypertension often comes with a dilated RV
    main_r = trunk_r * float(rng.uniform(0.65, 0.8))
    trunk_start = _p(0.5 * (rv_centre + mid) + np.array([8.0 * sx, -rv * 0.4, height * 0.55]))
    bifurcation = at(float(rng.uniform(0.0, 10.0)), -20.0, float(rng.uniform(-10.0, 6.0)), 4)
    trunk = Vessel((Tube(trunk_start, _p(bifurcation), trunk_r, trunk_r * 0.95),), "trunk", "central")
    vessels.append(trunk)
    rpa_mid = at(-30.0, -8.0, float(rng.uniform(-6.0, 2.0)), 5)
    lpa_mid = at(28.0, -6.0, float(rng.uniform(4.0, 14.0)), 5)
    mains = {
        "right": Vessel((Tube(_p(bifurcation), _p(rpa_mid), main_r, main_r * 0.95),
                         Tube(_p(rpa_mid), _p(hila["right"]), main_r * 0.95, main_r * 0.78)), "main", "right"),
        "left": Vessel((Tube(_p(bifurcation), _p(lpa_mid), main_r, main_r * 0.95),
                        Tube(_p(lpa_mid), _p(hila["left"]), main_r * 0.95, main_r * 0.78)), "main", "left"),
    }
    vessels.extend(mains.values())
    lobar_dirs = {
        "right": [(-0.35, -0.25, 0.9), (-0.45, -0.65, -0.45), (-0.3, 0.45, -0.85)],
        "left": [(0.35, -0.35, 0.85), (0.5, -0.6, -0.45), (0.3, 0.45, -0.85)],
    }
    level_scale = math.sqrt(sx * sy) * float(rng.uniform(0.85, 1.15))
    for side in ("right", "left"):
        hilum = np.asarray(mains[side].tubes[-1].end)
        for direction in lobar_dirs[side]:
            d = _unit(np.asarray(direction) + rng.normal(0.0, 0.18, 3))
            r0 = float(rng.uniform(*_LOBAR_RADIUS)) * level_scale
            length = float(rng.uniform(22.0, 40.0)) * sz
            end = hilum + d * length
            while not lung_shape.inside(side, end) and length > 8.0:
                length *= 0.8
                end = hilum + d * length
            lobar = Vessel(_bent_tubes(rng, hilum, end, r0 * 1.05, r0 * 0.9, 0.12), "lobar", side)
            vessels.append(lobar)
            _grow(rng, vessels, lung_shape, side, end, d, r0 * 0.9, "segmental", sz)
    arteries = [t for v in vessels for t in v.tubes]
    # Bronchi beside lobar and segmental arteries (air with a wall): dark, but outside the artery.
    for v in vessels:
        if v.level in ("lobar", "segmental") and rng.random() < 0.8:
            tube = v.tubes[0]
            d = tube.direction
            u = _perpendicular(d, rng)
            gap = tube.r0 + 0.8 * tube.r0 + 1.5
            shift = u * gap
            br = 0.8 * tube.r0
            start = np.asarray(tube.start) + shift
            end = np.asarray(v.tubes[-1].end) + shift
            layers.append(Layer(Tube(_p(start), _p(end), br + 1.0, br * 0.9 + 1.0), air_wall))
            layers.append(Layer(Tube(_p(start), _p(end), br, br * 0.9), -1000.0))
    # Pulmonary veins: a second, less dense tree draining to the left atrium.
    for side in ("right", "left"):
        for lobe_dir in ((0.0, 0.3, 0.7), (0.0, 0.35, -0.7)):
            sign = -1.0 if side == "right" else 1.0
            d = _unit(np.array([sign * 0.9, lobe_dir[1], lobe_dir[2]]) + rng.normal(0.0, 0.2, 3))
            start = np.asarray(la.centre) + np.array([sign * la.axes[0] * 0.8, 0.0, 0.0])
            length = float(rng.uniform(35.0, 55.0)) * sz
            end = start + d * length
            r = float(rng.uniform(4.5, 7.0)) * level_scale
            for t in _bent_tubes(rng, start, end, r, r * 0.8, 0.15):
                layers.append(Layer(t, hu_vein, 6.0))
            veins: list[Vessel] = []
            _grow(rng, veins, lung_shape, side, end, d, r * 0.8, "segmental", sz)
            for v in veins:
                for t in v.tubes:
                    layers.append(Layer(t, hu_vein, 6.0))
    # Peripheral vessels: short, thin, pointing away from the hilum (partial volume makes them grey).
    for side in ("right", "left"):
        e = lungs[side]
        hilum = hila[side]
        wanted = int(rng.integers(70, 180))
        tries = 0
        while wanted > 0 and tries < 1000:
            tries += 1
            q = rng.uniform(-1.0, 1.0, 3)
            if float(q @ q) > 0.8:
                continue
            start = np.asarray(e.centre) + q * np.asarray(e.axes)
            d = _unit(start - hilum + rng.normal(0.0, 15.0, 3))
            end = start + d * float(rng.uniform(8.0, 25.0))
            if not lung_shape.inside(side, end, 0.95):
                continue
            r = float(rng.uniform(0.8, 2.2))
            layers.append(Layer(Tube(_p(start), _p(end), r, r * 0.8), artery * float(rng.uniform(0.5, 1.0)), 0.0))
            wanted -= 1
    # Lymph nodes and fat at the hila: soft-tissue blobs beside the arteries (not in them).
    for _ in range(int(rng.integers(2, 7))):
        host = vessels[int(rng.integers(0, min(len(vessels), 9)))]
        tube = host.tubes[int(rng.integers(0, len(host.tubes)))]
        p = tube.point(float(rng.uniform(0.2, 0.9)))
        u = _perpendicular(tube.direction, rng)
        size = float(rng.uniform(3.0, 8.0))
        centre = p + u * (tube.radius(0.5) + size + 1.0)
        layers.append(Layer(Ellipsoid(_p(centre), (size, size * float(rng.uniform(0.6, 1.0)), size * 1.2),
                                      _frame(tube.direction, u)), float(rng.uniform(15.0, 65.0)), 6.0))
    # Arteries after everything they pass through (bronchi, nodes, fat), so their lumen stays whole.
    hu_tree_var = float(rng.uniform(0.0, 0.12))
    for v in vessels:
        level_hu = artery * (1.0 - hu_tree_var * {"trunk": 0, "main": 0.3, "lobar": 0.6, "segmental": 0.9,
                                                    "subsegmental": 1.0}[v.level])
        for t in v.tubes:
            layers.append(Layer(t, level_hu, 5.0, "artery"))

    # -- clots ------------------------------------------------------------------------------
    clots: list[PlacedClot] = []
    for clot_spec in spec.clots:
        placed = _place_clot(rng, clot_spec, vessels, (scan_lo, scan_hi), bifurcation)
        clots.append(placed)
        layers.append(Layer(placed.shape, placed.hu, float(rng.uniform(0.0, 10.0)), "clot"))
        if clot_spec.calcified:
            e = placed.shape.ellipsoid
            m = np.asarray(e.frame)
            for _ in range(int(rng.integers(1, 4))):
                along = float(rng.uniform(-0.7, 0.7)) * e.axes[2]
                spot = np.asarray(e.centre) - m[:, 0] * e.axes[0] * 0.3 + m[:, 2] * along
                radius = float(rng.uniform(0.7, 1.6))
                layers.append(Layer(Ellipsoid(_p(spot), (radius, radius, radius)),
                                    float(rng.uniform(350.0, 1000.0)), 0.0, "calcification"))

    landmarks = {
        "pulmonary_trunk": _p(trunk.tubes[0].point(0.35)),
        "right_lung": _p(np.asarray(lungs["right"].centre) + np.array([-0.5 * lungs["right"].axes[0], 0.3 * lungs["right"].axes[1], 0.3 * lungs["right"].axes[2]])),
        "left_lung": _p(np.asarray(lungs["left"].centre) + np.array([0.5 * lungs["left"].axes[0], 0.3 * lungs["left"].axes[1], 0.3 * lungs["left"].axes[2]])),
        "right_ventricle": _p(rv_centre),
        "left_ventricle": _p(lv_centre),
        "carina": _p(carina),
    }
    return Scene(
        layers=layers,
        clots=clots,
        vessels=vessels,
        streak_sources=streaks,
        heart_z=(heart_z - height, heart_z + height),
        lung_z=(carina_z - base_below, carina_z + apex_above),
        landmarks=landmarks,
        rv_lv_measured=rv / lv,
        hu={"artery": artery, "rv": hu_rv, "lv": hu_lv, "aorta": hu_aorta, "lung": hu_lung, "vein": hu_vein},
    )


def _grow(rng: np.random.Generator, out: list[Vessel], lungs: _Lungs, side: str, start: np.ndarray,
          parent: np.ndarray, parent_r: float, level: str, sz: float) -> None:
    """Segmental (then subsegmental) branches from ``start``, kept inside the lung."""
    count = int(rng.integers(2, 4)) if level == "segmental" else 2
    bounds = _SEGMENTAL_RADIUS if level == "segmental" else _SUBSEGMENTAL_RADIUS
    for _ in range(count):
        angle = math.radians(float(rng.uniform(20.0, 55.0)))
        u = _perpendicular(parent, rng)
        d = _unit(math.cos(angle) * parent + math.sin(angle) * u)
        r0 = min(float(rng.uniform(*bounds)) * parent_r / 4.5 * 1.4, parent_r * 0.85)
        r0 = max(r0, bounds[0] * 0.8)
        length = float(rng.uniform(22.0, 45.0) if level == "segmental" else rng.uniform(14.0, 30.0)) * sz
        end = start + d * length
        while not lungs.inside(side, end) and length > 6.0:
            length *= 0.75
            end = start + d * length
        if not lungs.inside(side, end, 0.98):
            continue
        out.append(Vessel(_bent_tubes(rng, start, end, r0, r0 * 0.85, 0.15), level, side))
        if level == "segmental":
            _grow(rng, out, lungs, side, end, d, r0 * 0.85, "subsegmental", sz)


def _place_clot(rng: np.random.Generator, clot: ClotSpec, vessels: list[Vessel],
                scan_z: tuple[float, float], bifurcation: np.ndarray) -> PlacedClot:
    """Put ``clot`` in a vessel of its level and side inside the scanned z-range."""
    lo, hi = scan_z
    margin = min(10.0, 0.2 * (hi - lo))
    if clot.kind == "saddle":
        lumen = tuple(t for v in vessels if v.level in ("trunk", "main") for t in v.tubes[:1])
        trunk = next(v for v in vessels if v.level == "trunk").tubes[0]
        d = trunk.direction
        lr = _unit(np.cross(d, np.cross(np.array([1.0, 0.0, 0.0]), d)))
        main_r = min(t.r0 for t in lumen)
        centre = bifurcation - d * trunk.r1 * 0.2
        radial = main_r * {"occlusive": 1.3, "eccentric": 0.8, "floating": 0.6}.get(clot.form, 0.7)
        axes = (float(rng.uniform(1.8, 3.0)) * main_r, radial * float(rng.uniform(0.8, 1.1)), radial)
        u = lr if abs(lr @ d) < 0.9 else _perpendicular(d, rng)
        u = _unit(u - (u @ d) * d)
        shape = ClotShape(Ellipsoid(_p(centre), axes, _frame(d, u)), lumen)
        return _finish(rng, clot, shape)
    wanted = {"central": ("trunk", "central"), "main": ("main", clot.side),
              "lobar": ("lobar", clot.side), "segmental": ("segmental", clot.side)}[clot.kind]
    candidates: list[tuple[Tube, float]] = []
    for v in vessels:
        if (v.level, v.side) != wanted:
            continue
        for t in v.tubes:
            for s in np.linspace(0.15, 0.85, 8):
                z = float(t.point(float(s))[2])
                if lo + margin <= z <= hi - margin:
                    candidates.append((t, float(s)))
    if not candidates:
        raise RandomisedPhantomError(
            f"no {clot.kind} artery on the {clot.side} inside the scanned range {lo:.0f}..{hi:.0f} mm: "
            "lengthen the scan (n_slices x slice spacing)")
    tube, s = candidates[int(rng.integers(0, len(candidates)))]
    s = float(np.clip(s + rng.uniform(-0.05, 0.05), 0.1, 0.9))
    axis_point = tube.point(s)
    r = tube.radius(s)
    d = tube.direction
    u = _perpendicular(d, rng)
    form = clot.form
    if form == "occlusive":
        offset, radial, across, along = 0.0, 1.35 * r, 1.35 * r, float(rng.uniform(1.5, 4.0)) * r + 3.0
    elif form == "floating":
        offset = float(rng.uniform(0.0, 0.2)) * r
        radial = across = float(rng.uniform(0.45, 0.7)) * r
        along = float(rng.uniform(1.2, 3.5)) * r + 2.0
    elif form == "eccentric":
        offset = float(rng.uniform(0.35, 0.6)) * r
        radial = float(rng.uniform(0.55, 0.85)) * r
        across = float(rng.uniform(0.6, 0.95)) * r
        along = float(rng.uniform(1.2, 3.5)) * r + 2.0
    else:  # mural (chronic): a smooth crescent against the wall
        offset = float(rng.uniform(0.9, 1.05)) * r
        radial = float(rng.uniform(0.3, 0.55)) * r + 0.8
        across = float(rng.uniform(0.8, 1.2)) * r
        along = float(rng.uniform(2.0, 5.0)) * r + 3.0
    # The voxel must be able to show it: never thinner than about 1.2 mm into the lumen.
    radial = max(radial, 1.2 + max(0.0, offset - r))
    centre = axis_point + u * offset
    shape = ClotShape(Ellipsoid(_p(centre), (radial, across, along), _frame(d, u)), (tube,))
    return _finish(rng, clot, shape)


def _finish(rng: np.random.Generator, clot: ClotSpec, shape: ClotShape) -> PlacedClot:
    """Centre of mass of the clot (Monte Carlo inside ellipsoid and lumen) and its attenuation."""
    e = shape.ellipsoid
    sample_rng = np.random.default_rng(int(rng.integers(0, 2**31 - 1)))
    unit = sample_rng.uniform(-1.0, 1.0, (6000, 3))
    unit = unit[(unit**2).sum(axis=1) <= 1.0]
    m = np.asarray(e.frame)
    points = np.asarray(e.centre)[None, :] + (unit * np.asarray(e.axes)[None, :]) @ m.T
    inside = np.zeros(len(points), dtype=bool)
    for t in shape.lumen:
        inside |= t.signed_distance(points[:, 0], points[:, 1], points[:, 2]) > 0
    kept = points[inside] if inside.any() else points
    centre = kept.mean(axis=0)
    radius = float(np.sqrt(((kept - centre) ** 2).sum(axis=1).mean()))
    low, high = CLOT_HU
    hu = float(rng.uniform(45.0, high)) if clot.chronic else float(rng.uniform(low, 70.0))
    return PlacedClot(spec=clot, centre_patient_mm=_p(np.round(centre, 3)), radius_mm=round(radius, 3), hu=hu,
                      shape=shape)


def draw_layer(layer: Layer, x: np.ndarray, y: np.ndarray, z: float, pixel_mm: float) -> Hit | None:
    """The fraction of each pixel the layer covers on plane ``z`` (None: nothing)."""
    z0, z1 = layer.shape.z_range
    if z < z0 - 2 * pixel_mm or z > z1 + 2 * pixel_mm:
        return None
    return layer.shape.draw(x, y, z, pixel_mm)


__all__ = ["Box", "ClotShape", "Layer", "PlacedClot", "Scene", "Vessel", "build_scene", "draw_layer"]
