"""The held-out chest as continuous shapes in patient millimetres: superquadric body, lungs as
implicit surfaces with diaphragmatic domes, ellipsoidal heart chambers, and every vessel and airway
as a tube along a cubic spline (the pulmonary arteries as a tree from the trunk down to segmental
and subsegmental branches).

Coordinates are DICOM patient coordinates (LPS): x to the patient's left, y posterior, z to the
head. The anatomy is laid out for a reference patient (330 x 230 mm, carina at z = 0) and mapped
to the spec's body size, table height and carina position; control points are jittered from the
spec's seed so no two trees are alike. Nothing here knows about pixels: ``phantoms.heldout.render``
samples these shapes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Final

import numpy as np
from scipy.interpolate import CubicSpline

from phantoms.heldout.errors import HeldoutPlacementError
from phantoms.heldout.spec import ClotSpec, HeldoutSpec

Point3 = tuple[float, float, float]

_REF_WIDTH_MM: Final[float] = 330.0
_REF_DEPTH_MM: Final[float] = 230.0
#: Centreline sampling step of the tubes (mm).
_TUBE_STEP_MM: Final[float] = 2.0
_LV_SEMI_MM: Final[float] = 21.0


@dataclass(frozen=True, eq=False)
class Tube:
    """A vessel or airway: centreline ``points (P, 3)`` with lumen ``radii (P,)`` and cumulative
    arc length ``arc (P,)``; ``role`` picks its contents (pa, systemic, svc, vein, airway)."""

    name: str
    role: str
    level: str
    side: str
    points: np.ndarray
    radii: np.ndarray
    arc: np.ndarray

    @property
    def length_mm(self) -> float:
        return float(self.arc[-1])

    def at(self, s: float) -> tuple[np.ndarray, np.ndarray, float]:
        """Centreline point (3,), unit tangent (3,) and radius at arc length ``s``."""
        s = float(np.clip(s, 0.0, self.length_mm))
        k = int(np.clip(np.searchsorted(self.arc, s, side="right") - 1, 0, len(self.arc) - 2))
        span = self.arc[k + 1] - self.arc[k]
        t = 0.0 if span <= 0 else (s - self.arc[k]) / span
        point = self.points[k] + t * (self.points[k + 1] - self.points[k])
        tangent = self.points[k + 1] - self.points[k]
        tangent = tangent / max(float(np.linalg.norm(tangent)), 1e-9)
        radius = float(self.radii[k] + t * (self.radii[k + 1] - self.radii[k]))
        return point, tangent, radius


@dataclass(frozen=True)
class Ellipsoid:
    centre: Point3
    semi_axes: Point3

    def z_range(self) -> tuple[float, float]:
        return self.centre[2] - self.semi_axes[2], self.centre[2] + self.semi_axes[2]


@dataclass(frozen=True)
class Lung:
    """One lung: a superellipse in-plane (centre, semi-axes, exponent) between a domed base and a
    rounded apex. Its base is lowest at the lung's rim (the costophrenic recess)."""

    side: str
    centre_xy: tuple[float, float]
    semi_xy: tuple[float, float]
    exponent: float
    apex_z: float
    #: Lowest point of the base (at the rim) and the dome's rise at the lung's centre.
    base_z: float
    dome_mm: float
    #: Below this z the lung has its full width; above it narrows to the apex.
    shoulder_z: float


@dataclass(frozen=True)
class PlacedClot:
    """A clot placed in the tree: the tubes it fills, its shape parameters, and its truth."""

    spec: ClotSpec
    tube_names: tuple[str, ...]
    #: Arc-length interval [s0, s1] on the main tube (tube_names[0]).
    s0: float
    s1: float
    #: Unit vector of the wall the clot leans on (eccentric and mural), perpendicular to the axis.
    wall: np.ndarray
    #: Saddle clots: centres and radii of the spheres whose union (inside the lumen) is the clot.
    spheres: tuple[tuple[np.ndarray, float], ...]
    #: Calcified flecks: centre and radius.
    flecks: tuple[tuple[np.ndarray, float], ...]
    centre: np.ndarray
    ends: tuple[np.ndarray, np.ndarray]
    location: str
    radius_mm: float


@dataclass(frozen=True, eq=False)
class Chest:
    """The whole held-out chest of one spec, in patient mm."""

    spec: HeldoutSpec
    body_semi_xy: tuple[float, float]
    body_centre_xy: tuple[float, float]
    body_exponent: float
    fat_mm: float
    lungs: tuple[Lung, ...]
    heart: Ellipsoid
    chambers: dict[str, Ellipsoid]
    tubes: tuple[Tube, ...]
    clots: tuple[PlacedClot, ...]
    spine_centre_xy: tuple[float, float]
    spine_scale: float
    sternum: Ellipsoid
    liver: Ellipsoid
    table_y: float
    z_scale: float
    carina_z: float
    hu: dict[str, float]
    #: Ratio of the RV to LV transverse diameters drawn.
    rv_lv_ratio: float

    def tube(self, name: str) -> Tube:
        for tube in self.tubes:
            if tube.name == name:
                return tube
        raise KeyError(name)

    @property
    def lung_apex_z(self) -> float:
        return max(lung.apex_z for lung in self.lungs)

    @property
    def lung_base_z(self) -> float:
        return min(lung.base_z for lung in self.lungs)


class _Mapper:
    """Reference layout (mm) -> patient mm, with the spec's jitter."""

    def __init__(self, spec: HeldoutSpec, rng: np.random.Generator) -> None:
        self.sx = spec.body_width_mm / _REF_WIDTH_MM
        self.sy = spec.body_depth_mm / _REF_DEPTH_MM
        self.sz = float(np.clip(0.5 * (self.sx + self.sy), 0.85, 1.15) * rng.uniform(0.94, 1.06))
        self.sr = math.sqrt(0.5 * (self.sx + self.sy)) * float(rng.uniform(0.92, 1.08))
        self.y0 = spec.table_offset_mm
        self.z0 = spec.carina_z_mm
        self.rng = rng

    def point(self, p: Point3, jitter: float = 0.0) -> np.ndarray:
        q = np.asarray(p, dtype=np.float64)
        if jitter > 0:
            q = q + self.rng.normal(0.0, jitter, 3)
        return np.array([q[0] * self.sx, q[1] * self.sy + self.y0, q[2] * self.sz + self.z0])

    def radius(self, r: float) -> float:
        return r * self.sr


def _tube(name: str, role: str, level: str, side: str, control: list[np.ndarray], r0: float, r1: float) -> Tube:
    """A tube through ``control`` points (a natural cubic spline, chord-length parameter)."""
    pts = np.asarray(control, dtype=np.float64)
    chords = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    chords = np.maximum(chords, 1e-3)
    knots = np.concatenate([[0.0], np.cumsum(chords)])
    if len(pts) == 2:
        dense_t = np.linspace(0.0, knots[-1], max(2, int(math.ceil(knots[-1] / _TUBE_STEP_MM)) + 1))
        dense = pts[0] + (dense_t / knots[-1])[:, None] * (pts[1] - pts[0])
    else:
        spline = CubicSpline(knots, pts, bc_type="natural")
        dense_t = np.linspace(0.0, knots[-1], max(3, int(math.ceil(knots[-1] / _TUBE_STEP_MM)) + 1))
        dense = spline(dense_t)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(dense, axis=0), axis=1))])
    radii = r0 + (arc / max(arc[-1], 1e-9)) * (r1 - r0)
    return Tube(name=name, role=role, level=level, side=side, points=dense, radii=radii, arc=arc)


# Reference control points (x left, y posterior, z up; carina at z = 0).
_TRUNK: Final[list[Point3]] = [(8.0, -72.0, -62.0), (14.0, -56.0, -36.0), (16.0, -34.0, -16.0), (14.0, -20.0, -8.0)]
_LEFT_MAIN: Final[list[Point3]] = [(32.0, -10.0, -2.0), (48.0, 8.0, -8.0), (58.0, 25.0, -25.0)]
_RIGHT_MAIN: Final[list[Point3]] = [(-5.0, -13.0, -12.0), (-28.0, -5.0, -16.0), (-50.0, 5.0, -22.0)]
#: Lobar arteries: (name, side, origin on the main artery's path or a lobar end, control points).
_LOBAR: Final[list[tuple[str, str, list[Point3]]]] = [
    ("right_upper_lobe", "right", [(-34.0, -4.0, -17.0), (-48.0, -12.0, 10.0), (-58.0, -8.0, 42.0)]),
    ("right_interlobar", "right", [(-50.0, 5.0, -22.0), (-62.0, 15.0, -45.0)]),
    ("right_middle_lobe", "right", [(-62.0, 15.0, -45.0), (-68.0, -18.0, -58.0), (-76.0, -44.0, -68.0)]),
    ("right_lower_lobe", "right", [(-62.0, 15.0, -45.0), (-68.0, 30.0, -85.0), (-70.0, 38.0, -118.0)]),
    ("left_upper_lobe", "left", [(44.0, 4.0, -6.0), (55.0, -5.0, 20.0), (60.0, 0.0, 48.0)]),
    ("left_lingular", "left", [(58.0, 25.0, -25.0), (65.0, -8.0, -48.0), (72.0, -34.0, -64.0)]),
    ("left_lower_lobe", "left", [(58.0, 25.0, -25.0), (66.0, 40.0, -70.0), (68.0, 45.0, -114.0)]),
]
#: Segmental arteries: (parent lobar artery, name, distal target).
_SEGMENTAL: Final[list[tuple[str, str, Point3]]] = [
    ("right_upper_lobe", "apical", (-55.0, 8.0, 82.0)),
    ("right_upper_lobe", "anterior", (-95.0, -45.0, 38.0)),
    ("right_upper_lobe", "posterior", (-95.0, 38.0, 45.0)),
    ("right_middle_lobe", "lateral", (-105.0, -35.0, -78.0)),
    ("right_middle_lobe", "medial", (-52.0, -66.0, -82.0)),
    ("right_lower_lobe", "superior", (-100.0, 62.0, -58.0)),
    ("right_lower_lobe", "anterior_basal", (-95.0, -15.0, -138.0)),
    ("right_lower_lobe", "lateral_basal", (-122.0, 30.0, -132.0)),
    ("right_lower_lobe", "posterior_basal", (-75.0, 76.0, -138.0)),
    ("left_upper_lobe", "apicoposterior", (56.0, 15.0, 82.0)),
    ("left_upper_lobe", "anterior", (95.0, -42.0, 34.0)),
    ("left_lingular", "superior_lingular", (102.0, -25.0, -55.0)),
    ("left_lingular", "inferior_lingular", (80.0, -58.0, -96.0)),
    ("left_lower_lobe", "superior", (100.0, 62.0, -55.0)),
    ("left_lower_lobe", "anteromedial_basal", (78.0, -5.0, -140.0)),
    ("left_lower_lobe", "lateral_basal", (120.0, 30.0, -132.0)),
    ("left_lower_lobe", "posterior_basal", (70.0, 76.0, -140.0)),
]
_VEINS: Final[list[tuple[str, str, list[Point3]]]] = [
    ("right_superior_vein", "right", [(-72.0, -22.0, -30.0), (-45.0, -5.0, -45.0), (-10.0, 8.0, -58.0)]),
    ("right_inferior_vein", "right", [(-72.0, 48.0, -88.0), (-40.0, 28.0, -72.0), (-5.0, 15.0, -62.0)]),
    ("left_superior_vein", "left", [(72.0, -18.0, -28.0), (50.0, 0.0, -42.0), (32.0, 8.0, -55.0)]),
    ("left_inferior_vein", "left", [(74.0, 52.0, -84.0), (50.0, 30.0, -70.0), (35.0, 15.0, -62.0)]),
]


def build_chest(spec: HeldoutSpec) -> Chest:
    """Lay out the chest of ``spec`` and place its clots (reproducible from ``spec.seed``)."""
    rng = np.random.default_rng([spec.seed, 0xC4E57])
    m = _Mapper(spec, rng)
    hu_pa = spec.pulmonary_artery_hu
    hu_sys = 40.0 + (hu_pa - 40.0) * spec.systemic_fraction
    hu = {
        "air": -1000.0,
        "fat": float(rng.uniform(-115.0, -85.0)),
        "muscle": float(rng.uniform(35.0, 60.0)),
        "lung": float(rng.uniform(-885.0, -820.0)),
        "bone": float(rng.uniform(550.0, 900.0)),
        "marrow": float(rng.uniform(150.0, 300.0)),
        "myocardium": float(rng.uniform(40.0, 60.0) + 0.1 * max(hu_sys - 40.0, 0.0)),
        "pa": hu_pa,
        "rv": 40.0 + (hu_pa - 40.0) * float(rng.uniform(0.9, 1.05)),
        "ra": 40.0 + (hu_pa - 40.0) * float(rng.uniform(0.8, 1.1)),
        "systemic": hu_sys,
        "svc": float(min(40.0 + (hu_pa - 40.0) * rng.uniform(1.0, 2.5), 2000.0)),
        "vein": hu_sys,
        "airway": float(rng.uniform(-1000.0, -960.0)),
        "liver": float(rng.uniform(50.0, 65.0) + 0.15 * max(hu_sys - 40.0, 0.0)),
        "table": float(rng.uniform(-300.0, 200.0)),
        "canal": 20.0,
        "disc": 80.0,
    }

    tubes: list[Tube] = []

    def add(name: str, role: str, level: str, side: str, control: list[np.ndarray], r0: float, r1: float) -> Tube:
        tube = _tube(name, role, level, side, control, m.radius(r0), m.radius(r1))
        tubes.append(tube)
        return tube

    # Airways.
    carina = m.point((0.0, 28.0, 0.0))
    add("trachea", "airway", "airway", "", [m.point((0.0, 24.0, 160.0)), m.point((0.0, 25.0, 80.0)), carina], 9.0, 8.5)
    add("right_main_bronchus", "airway", "airway", "right",
        [carina, m.point((-25.0, 32.0, -15.0), 1.5), m.point((-46.0, 38.0, -32.0), 2.0)], 6.5, 5.0)
    add("left_main_bronchus", "airway", "airway", "left",
        [carina, m.point((25.0, 33.0, -20.0), 1.5), m.point((48.0, 40.0, -42.0), 2.0)], 6.0, 4.5)

    # Systemic vessels.
    aorta_ctrl = [(12.0, -18.0, -60.0), (5.0, -30.0, -25.0), (0.0, -22.0, 20.0), (8.0, 5.0, 40.0), (22.0, 38.0, 25.0),
                  (24.0, 48.0, -20.0), (20.0, 55.0, -120.0), (12.0, 58.0, -300.0)]
    add("aorta", "systemic", "aorta", "", [m.point(p, 2.0 if 0 < i < 7 else 0.0) for i, p in enumerate(aorta_ctrl)],
        float(rng.uniform(13.0, 17.0)), float(rng.uniform(10.0, 13.0)))
    add("superior_vena_cava", "svc", "vein", "",
        [m.point((-32.0, -22.0, 160.0)), m.point((-32.0, -22.0, 10.0), 2.0), m.point((-36.0, -28.0, -50.0))], 10.0, 11.0)
    add("inferior_vena_cava", "systemic", "vein", "",
        [m.point((-28.0, -20.0, -95.0)), m.point((-25.0, 20.0, -140.0), 2.0), m.point((-22.0, 25.0, -320.0))], 12.0, 12.0)

    # Pulmonary arteries: trunk, mains, lobar, segmental, subsegmental.
    trunk_pts = [m.point(p, 0.0 if i in (0, len(_TRUNK) - 1) else 2.0) for i, p in enumerate(_TRUNK)]
    bifurcation = trunk_pts[-1]
    add("pulmonary_trunk", "pa", "trunk", "", trunk_pts, float(rng.uniform(13.0, 15.5)), float(rng.uniform(12.0, 14.0)))
    main_r = float(rng.uniform(10.0, 12.0))
    left_main = add("left_pa", "pa", "main", "left", [bifurcation] + [m.point(p, 2.5) for p in _LEFT_MAIN], main_r, main_r * 0.8)
    right_main = add("right_pa", "pa", "main", "right", [bifurcation] + [m.point(p, 2.5) for p in _RIGHT_MAIN], main_r, main_r * 0.8)
    ends: dict[str, np.ndarray] = {"left_pa": left_main.points[-1], "right_pa": right_main.points[-1]}
    for name, side, ctrl in _LOBAR:
        start = _nearest_on(tubes, m.point(ctrl[0]), ("pa",))
        pts = [start] + [m.point(p, 3.0) for p in ctrl[1:]]
        r0 = 8.0 if name.endswith("interlobar") else float(rng.uniform(5.5, 6.5))
        tube = add(name, "pa", "lobar", side, pts, r0, r0 * 0.85 if name.endswith("interlobar") else r0 * 0.7)
        ends[name] = tube.points[-1]
    for parent, name, target in _SEGMENTAL:
        parent_tube = next(t for t in tubes if t.name == parent)
        s = parent_tube.length_mm * float(rng.uniform(0.55, 0.95))
        start, _, _ = parent_tube.at(s)
        end = m.point(target, 5.0)
        mid = 0.5 * (start + end) + rng.normal(0.0, 4.0, 3)
        seg = add(f"{parent_tube.side}_{name}_segmental", "pa", "segmental", parent_tube.side, [start, mid, end],
                  float(rng.uniform(2.8, 3.6)), float(rng.uniform(2.0, 2.6)))
        for j in range(2):
            s_child = seg.length_mm * float(rng.uniform(0.5, 0.9))
            origin, tangent, _ = seg.at(s_child)
            direction = tangent + rng.normal(0.0, 0.7, 3)
            direction /= max(float(np.linalg.norm(direction)), 1e-6)
            length = float(rng.uniform(18.0, 32.0)) * m.sr
            add(f"{seg.name}_sub{j}", "pa", "subsegmental", seg.side, [origin, origin + length * direction],
                float(rng.uniform(1.4, 1.9)), 1.1)

    for name, side, ctrl in _VEINS:
        add(name, "vein", "vein", side, [m.point(p, 3.0) for p in ctrl], float(rng.uniform(4.5, 6.0)), 6.0)

    # Heart: LV and RV short-axis (transverse) semi-axes set the RV/LV ratio.
    lv_semi = m.radius(_LV_SEMI_MM) * float(rng.uniform(0.92, 1.08))
    rv_semi = lv_semi * spec.rv_lv_ratio
    lv_c = m.point((40.0, -18.0, -95.0))
    lv = Ellipsoid((float(lv_c[0]), float(lv_c[1]), float(lv_c[2])), (lv_semi, 0.9 * lv_semi, 38.0 * m.sz))
    rv_x = lv_c[0] - 0.6 * (lv_semi + rv_semi) - 4.0
    rv_y = lv_c[1] - 0.9 * lv_semi - 0.45 * 16.0 * m.sy - 8.0
    rv = Ellipsoid((float(rv_x), float(rv_y), float(lv_c[2]) + 4.0), (rv_semi, 16.0 * m.sy, 36.0 * m.sz))
    ra_c = m.point((-40.0, -30.0, -78.0))
    ra = Ellipsoid((float(ra_c[0]), float(ra_c[1]), float(ra_c[2])), (20.0 * m.sr, 22.0 * m.sr, 26.0 * m.sz))
    la_c = m.point((15.0, 10.0, -62.0))
    la = Ellipsoid((float(la_c[0]), float(la_c[1]), float(la_c[2])), (28.0 * m.sr, 13.0 * m.sy, 17.0 * m.sz))
    chambers = {"left_ventricle": lv, "right_ventricle": rv, "right_atrium": ra, "left_atrium": la}
    wall = 7.0
    x_lo = min(c.centre[0] - c.semi_axes[0] for c in (lv, rv)) - wall
    x_hi = max(c.centre[0] + c.semi_axes[0] for c in (lv, rv)) + wall
    y_lo = min(c.centre[1] - c.semi_axes[1] for c in (lv, rv)) - wall
    y_hi = max(c.centre[1] + c.semi_axes[1] for c in (lv, rv)) + wall
    heart = Ellipsoid(
        (0.5 * (x_lo + x_hi), 0.5 * (y_lo + y_hi), float(lv_c[2])),
        (0.5 * (x_hi - x_lo) * 1.12, 0.5 * (y_hi - y_lo) * 1.12, 48.0 * m.sz),
    )

    lungs = []
    for side, sign in (("right", -1.0), ("left", 1.0)):
        c = m.point((sign * 86.0, 5.0, 0.0))
        apex = m.point((0.0, 0.0, 88.0 + rng.uniform(-6.0, 6.0)))[2]
        base = m.point((0.0, 0.0, (-158.0 if side == "right" else -168.0) + rng.uniform(-8.0, 8.0)))[2]
        lungs.append(
            Lung(
                side=side,
                centre_xy=(float(c[0]), float(c[1])),
                semi_xy=(62.0 * m.sx, 90.0 * m.sy),
                exponent=float(rng.uniform(2.2, 2.8)),
                apex_z=float(apex),
                base_z=float(base),
                dome_mm=float((62.0 if side == "right" else 52.0) * m.sz * rng.uniform(0.85, 1.15)),
                shoulder_z=float(m.point((0.0, 0.0, 20.0))[2]),
            )
        )

    chest_wo_clots = Chest(
        spec=spec,
        body_semi_xy=(spec.body_width_mm / 2.0, spec.body_depth_mm / 2.0),
        body_centre_xy=(0.0, spec.table_offset_mm),
        body_exponent=float(rng.uniform(2.2, 3.0)),
        fat_mm=float(rng.uniform(6.0, 28.0)),
        lungs=tuple(lungs),
        heart=heart,
        chambers=chambers,
        tubes=tuple(tubes),
        clots=(),
        spine_centre_xy=(0.0, float(m.point((0.0, 64.0, 0.0))[1])),
        spine_scale=m.sr,
        sternum=Ellipsoid(
            tuple(float(v) for v in m.point((0.0, -104.0, -20.0))),  # type: ignore[arg-type]
            (16.0 * m.sx, 7.0 * m.sy, 80.0 * m.sz),
        ),
        liver=Ellipsoid(
            tuple(float(v) for v in m.point((-45.0, 0.0, -215.0))),  # type: ignore[arg-type]
            (110.0 * m.sx, 85.0 * m.sy, 90.0 * m.sz),
        ),
        table_y=spec.table_offset_mm + spec.body_depth_mm / 2.0 + 6.0,
        z_scale=m.sz,
        carina_z=spec.carina_z_mm,
        hu=hu,
        rv_lv_ratio=rv_semi / lv_semi,
    )
    clots = tuple(_place(chest_wo_clots, clot, bifurcation, rng) for clot in spec.clots)
    return dataclasses.replace(chest_wo_clots, clots=clots)


def _nearest_on(tubes: list[Tube], point: np.ndarray, roles: tuple[str, ...]) -> np.ndarray:
    """The centreline sample of any tube of ``roles`` nearest ``point`` (branches start on a parent)."""
    best: np.ndarray | None = None
    best_d = math.inf
    for tube in tubes:
        if tube.role not in roles:
            continue
        d = np.linalg.norm(tube.points - point, axis=1)
        k = int(np.argmin(d))
        if d[k] < best_d:
            best_d, best = float(d[k]), tube.points[k]
    assert best is not None  # the trunk and mains exist before any branch
    return best.copy()


def scan_range(chest: Chest) -> tuple[float, float]:
    """z (mm) of the first and last slice centre: the lungs plus the spec's margins."""
    spec = chest.spec
    return chest.lung_base_z - spec.below_base_mm, chest.lung_apex_z + spec.above_apex_mm


def _perpendicular(tangent: np.ndarray, angle: float) -> np.ndarray:
    ref = np.array([0.0, 0.0, 1.0]) if abs(tangent[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    u = np.cross(tangent, ref)
    u /= np.linalg.norm(u)
    v = np.cross(tangent, u)
    return math.cos(angle) * u + math.sin(angle) * v


def _candidates(chest: Chest, clot: ClotSpec) -> list[Tube]:
    if clot.level in ("saddle", "trunk"):
        return [chest.tube("pulmonary_trunk")]
    if clot.level == "main":
        return [chest.tube(f"{clot.side}_pa")]
    level = "lobar" if clot.level == "lobar" else "segmental"
    tubes = [t for t in chest.tubes if t.role == "pa" and t.level == level and t.side == clot.side]
    if level == "lobar":
        tubes = [t for t in tubes if not t.name.endswith("interlobar")] + [t for t in tubes if t.name.endswith("interlobar")]
    start = clot.branch % len(tubes)
    return tubes[start:] + tubes[:start]


def _place(chest: Chest, clot: ClotSpec, bifurcation: np.ndarray, rng: np.random.Generator) -> PlacedClot:
    """Put ``clot`` in the first candidate artery whose clot lies inside the scanned lungs."""
    z_lo, z_hi = scan_range(chest)
    z_lo = max(z_lo, chest.lung_base_z)
    z_hi = min(z_hi, chest.lung_apex_z)
    if clot.level == "saddle":
        trunk = chest.tube("pulmonary_trunk")
        _, t_end, r_end = trunk.at(trunk.length_mm)
        radius = 0.75 * r_end
        spheres: list[tuple[np.ndarray, float]] = [(bifurcation - 0.3 * r_end * t_end, radius)]
        far: list[np.ndarray] = []
        for name in ("left_pa", "right_pa"):
            main = chest.tube(name)
            reach = min(clot.length_mm, 0.6 * main.length_mm)
            for s in np.arange(6.0, reach + 1e-6, 6.0):
                p, _, r = main.at(float(s))
                spheres.append((p, 0.7 * r))
            far.append(main.at(reach)[0])
        if not z_lo <= float(bifurcation[2]) <= z_hi:
            raise HeldoutPlacementError("the pulmonary bifurcation lies outside the scanned lungs")
        return PlacedClot(
            spec=clot, tube_names=("pulmonary_trunk", "left_pa", "right_pa"), s0=0.0, s1=0.0,
            wall=np.zeros(3), spheres=tuple(spheres), flecks=(), centre=bifurcation.copy(),
            ends=(far[0], far[1]), location="saddle", radius_mm=float(radius),
        )
    for tube in _candidates(chest, clot):
        length = min(clot.length_mm, 0.8 * tube.length_mm)
        s_c = float(np.clip(clot.position * tube.length_mm, length / 2.0 + 1.0, tube.length_mm - length / 2.0 - 1.0))
        centre_axis, tangent, radius = tube.at(s_c)
        if not z_lo + 2.0 <= float(centre_axis[2]) <= z_hi - 2.0:
            continue
        wall = _perpendicular(tangent, clot.wall_angle)
        shift = {"occlusive": 0.0, "central": 0.0, "eccentric": 0.4, "mural": 0.72}[clot.form]
        centre = centre_axis + shift * radius * wall
        flecks: list[tuple[np.ndarray, float]] = []
        if clot.calcified:
            for _ in range(int(rng.integers(1, 4))):
                s_f = s_c + float(rng.uniform(-0.35, 0.35)) * length
                p, t_f, r_f = tube.at(s_f)
                flecks.append((p + 0.82 * r_f * _perpendicular(t_f, clot.wall_angle), float(rng.uniform(1.2, 2.2))))
        return PlacedClot(
            spec=clot, tube_names=(tube.name,), s0=s_c - length / 2.0, s1=s_c + length / 2.0, wall=wall,
            spheres=(), flecks=tuple(flecks), centre=centre,
            ends=(tube.at(s_c - length / 2.0)[0], tube.at(s_c + length / 2.0)[0]),
            location=tube.name, radius_mm=float(radius),
        )
    raise HeldoutPlacementError(f"no {clot.side} {clot.level} artery lies inside the scanned lungs")
