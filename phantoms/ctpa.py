"""Synthetic CT pulmonary angiograms (first-generation generator) written as real DICOM files, with their ground truth.

Tests, the demo and synthetic training need CTPA series whose answer is known. A phantom is drawn
in Hounsfield units on an axial grid (body, lungs, spine and ribs, heart with RV and LV, pulmonary
trunk and arteries, aorta), emboli are filling defects inside the pulmonary arteries, and the
volume is written as single-frame CT Image Storage files or one Enhanced CT Image Storage file.

Coordinates are DICOM patient coordinates (LPS, mm): x grows to the patient's left, y to the
posterior, z to the head. Slices are axial (ImageOrientationPatient 1\\0\\0\\0\\1\\0), ordered
inferior -> superior (ascending z); InstanceNumber 1 is the most inferior slice.

The anatomy is laid out for a 330 mm field of view and a 300 mm scan length and is scaled to the
real ones (in-plane by FOV / 330, along z by scan length / 300), so a 64 x 64 test phantom still
shows the whole chest. Volumes are drawn slice by slice with vectorised numpy inside bounding
boxes, so a 400 x 512 x 512 series needs neither per-voxel Python loops nor a full float volume.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from pe_model.errors import PEModelError
from pe_model.labels import EXAM_LABELS

__all__ = [
    "Clot",
    "PhantomError",
    "PhantomGeometry",
    "PhantomGroundTruth",
    "PhantomSpec",
    "PhantomTruth",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "generate_volume",
    "random_spec",
    "write_phantom_series",
]

KINDS: Final[tuple[str, ...]] = ("ctpa", "head")
LOCATIONS: Final[tuple[str, ...]] = ("central", "left", "right")

#: Stored value = HU - RESCALE_INTERCEPT (unsigned storage, like most scanners).
RESCALE_INTERCEPT: Final[float] = -1024.0
#: HU range every phantom is clipped to (what 12 unsigned bits with intercept -1024 hold).
HU_MIN: Final[int] = -1024
HU_MAX: Final[int] = 3071
#: 12 bits stored: HU from -1024 to 3071.
BITS_STORED: Final[int] = 12

#: Transfer syntaxes ``write_phantom_series`` can write (all lossless). JPEG Baseline is refused:
#: 8 bits cannot hold 12-bit CT values.
SUPPORTED_TRANSFER_SYNTAXES: Final[tuple[str, ...]] = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLossless,
    JPEGLosslessSV1,
)
_UNCOMPRESSED: Final[frozenset[str]] = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
)
_PYDICOM_ENCODED: Final[frozenset[str]] = frozenset({RLELossless, JPEG2000Lossless, JPEGLSLossless})
_GDCM_ENCODED: Final[frozenset[str]] = frozenset({JPEGLossless, JPEGLosslessSV1})

# Reference layout: 330 mm FOV, 300 mm scan length, origin at the scan centre.
_REFERENCE_FOV_MM: Final[float] = 330.0
_REFERENCE_LENGTH_MM: Final[float] = 300.0
#: Table position of the scan centre (a non-zero z keeps readers honest about origins).
_SCAN_CENTRE_Z_MM: Final[float] = -150.0

_HU_AIR: Final[float] = -1000.0
_HU_FAT: Final[float] = -100.0
_HU_SOFT: Final[float] = 40.0
_HU_LUNG: Final[float] = -850.0
_HU_BONE: Final[float] = 700.0
_HU_MARROW: Final[float] = 250.0
_HU_MYOCARDIUM: Final[float] = 50.0
_HU_BLOOD: Final[float] = 40.0
_HU_BLOOD_CONTRAST: Final[float] = 300.0
_HU_PA_CONTRAST: Final[float] = 350.0
_HU_AORTA_CONTRAST: Final[float] = 250.0
_HU_POOR_CONTRAST: Final[float] = 130.0
_HU_CLOT_ACUTE: Final[float] = 40.0
_HU_CLOT_CHRONIC: Final[float] = 60.0
_HU_BRAIN: Final[float] = 35.0
_HU_CSF: Final[float] = 5.0

_PA_RADIUS_MM: Final[float] = 14.0
_BRANCH_RADIUS_MM: Final[float] = 11.0
_DISTAL_RADIUS_MM: Final[float] = 8.5
_LV_RADIUS_MM: Final[float] = 22.0
#: The RV pool stops growing here (RV/LV ratio about 1.55) so it stays inside the heart.
_RV_RADIUS_MAX_MM: Final[float] = 34.0

Point3 = tuple[float, float, float]


class PhantomError(PEModelError, ValueError):
    """A phantom that cannot be made as asked (invalid spec or unsupported transfer syntax)."""


@dataclass(frozen=True)
class PhantomSpec:
    """What to draw; invalid combinations raise ``PhantomError`` (a ValueError).

    ``kind="head"`` is a non-contrast head CT the node must ignore: no clots, no contrast, exam
    labels negative, BodyPartExamined HEAD unless set to something other than CHEST.
    ``rv_lv_ratio`` is the left-right diameter of the RV blood pool over the LV's on axial slices
    (the RV stops growing at about 1.55). ``chronic``: every clot chronic (eccentric, against the
    wall); ``acute_and_chronic``: acute clots at ``locations`` plus one chronic clot in the last
    one. ``indeterminate`` (only with ``pe=False``): heavy noise, poor contrast and motion ghosts.
    ``seed`` fixes anatomy details, clots, noise and UIDs. An empty ``series_description`` or
    ``body_part_examined`` leaves the attribute out.
    """

    kind: str = "ctpa"
    pe: bool = True
    locations: tuple[str, ...] = ("central",)
    chronic: bool = False
    acute_and_chronic: bool = False
    rv_lv_ratio: float = 0.9
    n_slices: int = 120
    rows: int = 128
    columns: int = 128
    pixel_spacing_mm: float = 2.6
    slice_spacing_mm: float = 2.5
    slice_thickness_mm: float | None = None
    contrast: bool = True
    noise_hu: float = 12.0
    seed: int = 0
    series_description: str = "CTPA"
    body_part_examined: str = "CHEST"
    patient_name: str = "PHANTOM^PE"
    patient_id: str = "PHANTOM-0001"
    indeterminate: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PhantomError(f"phantom kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if not isinstance(self.locations, tuple):
            object.__setattr__(self, "locations", tuple(self.locations))
        unknown = [loc for loc in self.locations if loc not in LOCATIONS]
        if unknown:
            raise PhantomError(f"clot locations must be among {', '.join(LOCATIONS)}, not {unknown}")
        if self.has_pe and not self.locations:
            raise PhantomError("a PE phantom needs at least one clot location")
        if self.chronic and self.acute_and_chronic:
            raise PhantomError("chronic and acute_and_chronic exclude each other (RSNA labels)")
        if self.pe and self.indeterminate and self.kind == "ctpa":
            raise PhantomError("indeterminate is a negative-exam label; set pe=False with it")
        if self.n_slices < 1:
            raise PhantomError(f"n_slices must be at least 1, not {self.n_slices}")
        if self.rows < 16 or self.columns < 16:
            raise PhantomError(f"rows and columns must be at least 16, not {self.rows} x {self.columns}")
        if self.rows > 4096 or self.columns > 4096:
            raise PhantomError(f"rows and columns must be at most 4096, not {self.rows} x {self.columns}")
        for name in ("pixel_spacing_mm", "slice_spacing_mm", "rv_lv_ratio"):
            if not getattr(self, name) > 0:
                raise PhantomError(f"{name} must be positive, not {getattr(self, name)}")
        if self.slice_thickness_mm is not None and not self.slice_thickness_mm > 0:
            raise PhantomError(f"slice_thickness_mm must be positive, not {self.slice_thickness_mm}")
        if self.noise_hu < 0:
            raise PhantomError(f"noise_hu must not be negative, not {self.noise_hu}")

    @property
    def has_pe(self) -> bool:
        """True when clots are drawn (a head phantom never has PE)."""
        return self.pe and self.kind == "ctpa"

    @property
    def thickness_mm(self) -> float:
        """SliceThickness written to the files."""
        return self.slice_spacing_mm if self.slice_thickness_mm is None else self.slice_thickness_mm


@dataclass(frozen=True)
class Clot:
    """One embolus: a sphere (patient mm) intersected with the artery lumen it sits in."""

    center_patient_mm: Point3
    radius_mm: float
    location: str
    chronic: bool


@dataclass(frozen=True)
class PhantomGeometry:
    """Where each voxel of the ``(n_slices, rows, columns)`` volume lies in patient space."""

    rows: int
    columns: int
    pixel_spacing_mm: tuple[float, float]  # (row spacing, column spacing), as PixelSpacing
    slice_thickness_mm: float
    image_orientation_patient: tuple[float, float, float, float, float, float]
    image_positions_patient: tuple[Point3, ...]  # one per slice, inferior -> superior

    @property
    def slice_positions_mm(self) -> tuple[float, ...]:
        """Position of each slice along the slice normal (+z for axial)."""
        return tuple(position[2] for position in self.image_positions_patient)

    def voxel_index(self, point_patient_mm: Sequence[float]) -> tuple[int, int, int]:
        """Nearest ``(slice, row, column)`` to a patient point, clipped to the volume."""
        x, y, z = (float(v) for v in point_patient_mm)
        x0, y0, _ = self.image_positions_patient[0]
        column = round((x - x0) / self.pixel_spacing_mm[1])
        row = round((y - y0) / self.pixel_spacing_mm[0])
        positions = np.asarray(self.slice_positions_mm)
        index = int(np.argmin(np.abs(positions - z)))
        return index, min(max(row, 0), self.rows - 1), min(max(column, 0), self.columns - 1)

    def patient_point(self, slice_index: int, row: int, column: int) -> Point3:
        """Patient coordinates (mm) of a voxel centre."""
        x0, y0, z = self.image_positions_patient[slice_index]
        return (x0 + column * self.pixel_spacing_mm[1], y0 + row * self.pixel_spacing_mm[0], z)


@dataclass(frozen=True)
class PhantomGroundTruth:
    """The answer for a generated volume, before it is written (no UIDs, no files)."""

    spec: PhantomSpec
    slice_positions_mm: tuple[float, ...]  # inferior -> superior
    slice_pe_present: tuple[bool, ...]  # a clot voxel on the slice
    clots: tuple[Clot, ...]
    exam_labels: dict[str, bool]  # the nine RSNA exam labels, consistent per pe_model.consistency
    # Named anatomy points (pulmonary_trunk, right_lung, left_lung, left_ventricle, ...; head:
    # brain, skull) away from clots and lung vessels; indeterminate phantoms add motion, so there
    # they are only approximate.
    landmarks_patient_mm: dict[str, Point3]


@dataclass(frozen=True)
class PhantomTruth:
    """The answer for a written series. Every per-slice tuple is ordered inferior -> superior
    (ascending z, InstanceNumber order). For an Enhanced CT file there is one entry per frame, all
    sharing the file's single SOP Instance UID and path."""

    spec: PhantomSpec
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]
    slice_positions_mm: tuple[float, ...]
    slice_pe_present: tuple[bool, ...]
    clots: tuple[Clot, ...]
    exam_labels: dict[str, bool]
    files: tuple[Path, ...]
    landmarks_patient_mm: dict[str, Point3] = field(default_factory=dict)
    transfer_syntax_uid: str = ExplicitVRLittleEndian


# --------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Capsule:
    """A tube (segment with radius) in reference millimetres, painted with one HU value."""

    start: Point3
    end: Point3
    radius: float


@dataclass(frozen=True)
class _Ellipsoid:
    centre: Point3
    semi_axes: Point3


# Reference-frame layout (mm, LPS, origin at scan centre, FOV 330, length 300).
_BIFURCATION: Final[Point3] = (5.0, -25.0, 10.0)
_TRUNK = _Capsule((-2.0, -52.0, -40.0), _BIFURCATION, _PA_RADIUS_MM)
_LEFT_PA = _Capsule(_BIFURCATION, (45.0, -5.0, 18.0), _BRANCH_RADIUS_MM)
_LEFT_PA_DISTAL = _Capsule((45.0, -5.0, 18.0), (78.0, 12.0, 14.0), _DISTAL_RADIUS_MM)
_RIGHT_PA = _Capsule(_BIFURCATION, (-40.0, -5.0, 12.0), _BRANCH_RADIUS_MM)
_RIGHT_PA_DISTAL = _Capsule((-40.0, -5.0, 12.0), (-76.0, 12.0, 8.0), _DISTAL_RADIUS_MM)
_PULMONARY_ARTERIES: Final[tuple[_Capsule, ...]] = (
    _TRUNK,
    _LEFT_PA,
    _LEFT_PA_DISTAL,
    _RIGHT_PA,
    _RIGHT_PA_DISTAL,
)
_AORTA: Final[tuple[_Capsule, ...]] = (
    _Capsule((-32.0, -38.0, -45.0), (-32.0, -38.0, 40.0), 14.0),
    _Capsule((-32.0, -38.0, 40.0), (-5.0, 10.0, 58.0), 13.0),
    _Capsule((-5.0, 10.0, 58.0), (22.0, 48.0, 40.0), 12.0),
    _Capsule((22.0, 48.0, 40.0), (22.0, 48.0, -200.0), 12.0),
)
_HEART = _Ellipsoid((18.0, -30.0, -78.0), (66.0, 54.0, 55.0))
_LV_CENTRE: Final[Point3] = (40.0, -15.0, -82.0)
_RV_CENTRE: Final[Point3] = (-8.0, -52.0, -82.0)
_LUNGS: Final[dict[str, _Ellipsoid]] = {
    "right": _Ellipsoid((-72.0, 8.0, 5.0), (52.0, 70.0, 135.0)),
    "left": _Ellipsoid((72.0, 8.0, 5.0), (50.0, 70.0, 135.0)),
}
#: Parenchyma points kept clear of vessels (landmarks "right_lung" / "left_lung").
_LUNG_MARKS: Final[dict[str, Point3]] = {"right": (-95.0, 30.0, 60.0), "left": (100.0, 30.0, 60.0)}
_LUNG_MARK_CLEARANCE_MM: Final[float] = 25.0
_BODY_SEMI_AXES: Final[tuple[float, float]] = (150.0, 108.0)
_HEAD_SKULL = _Ellipsoid((0.0, 0.0, 0.0), (88.0, 108.0, 110.0))


@dataclass(frozen=True)
class _Scale:
    """Reference mm -> patient mm."""

    in_plane: float
    axial: float
    centre_z: float

    def to_patient(self, point: Sequence[float]) -> Point3:
        return (point[0] * self.in_plane, point[1] * self.in_plane, self.centre_z + point[2] * self.axial)

    def to_reference(self, point: Sequence[float]) -> Point3:
        return (point[0] / self.in_plane, point[1] / self.in_plane, (point[2] - self.centre_z) / self.axial)


def _geometry(spec: PhantomSpec) -> PhantomGeometry:
    ps = spec.pixel_spacing_mm
    x0 = -(spec.columns - 1) / 2.0 * ps
    y0 = -(spec.rows - 1) / 2.0 * ps
    z0 = _SCAN_CENTRE_Z_MM - (spec.n_slices - 1) / 2.0 * spec.slice_spacing_mm
    positions = tuple(
        (round(x0, 4), round(y0, 4), round(z0 + k * spec.slice_spacing_mm, 4)) for k in range(spec.n_slices)
    )
    return PhantomGeometry(
        rows=spec.rows,
        columns=spec.columns,
        pixel_spacing_mm=(ps, ps),
        slice_thickness_mm=spec.thickness_mm,
        image_orientation_patient=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        image_positions_patient=positions,
    )


def _scale(spec: PhantomSpec) -> _Scale:
    fov = min(spec.rows, spec.columns) * spec.pixel_spacing_mm
    length = max(spec.n_slices * spec.slice_spacing_mm, 1e-3)
    return _Scale(in_plane=fov / _REFERENCE_FOV_MM, axial=length / _REFERENCE_LENGTH_MM, centre_z=_SCAN_CENTRE_Z_MM)


def _point_on(capsule: _Capsule, t: float) -> Point3:
    a, b = np.asarray(capsule.start), np.asarray(capsule.end)
    p = a + t * (b - a)
    return (float(p[0]), float(p[1]), float(p[2]))


def _segment_distance(point: np.ndarray, start: np.ndarray, end: np.ndarray) -> float:
    """Distance from a point to a segment (3-vectors)."""
    d = end - start
    t = float(np.clip((point - start) @ d / max(float(d @ d), 1e-12), 0.0, 1.0))
    return float(np.linalg.norm(point - (start + t * d)))


def _wall_direction(direction: np.ndarray, side: float) -> np.ndarray:
    """Unit vector perpendicular to a vessel and lying in the axial plane (so an eccentric clot
    touches the wall visibly on axial slices); ``side`` (+1 / -1) picks which wall."""
    d = direction / np.linalg.norm(direction)
    u = np.cross(d, np.array([0.0, 0.0, 1.0]))
    if np.linalg.norm(u) < 1e-6:
        u = np.array([1.0, 0.0, 0.0])
    return side * u / np.linalg.norm(u)


def _clots(spec: PhantomSpec, scale: _Scale) -> tuple[tuple[Clot, _Capsule], ...]:
    """Place the clots (with the artery segment each one sits in) from the spec's seed."""
    if not spec.has_pe:
        return ()
    rng = np.random.default_rng([spec.seed, 1])
    voxel_floor = max(1.6 * spec.pixel_spacing_mm, 0.8 * spec.slice_spacing_mm)
    kinds: list[tuple[str, bool]] = []
    for location in spec.locations:
        kinds.append((location, spec.chronic))
    if spec.acute_and_chronic:
        # One acute and one chronic clot: the first location gets the acute one, the last (or the
        # same artery, further along) the chronic one.
        kinds = [(loc, False) for loc in spec.locations]
        kinds.append((spec.locations[-1], True))
    placed: list[tuple[Clot, _Capsule]] = []
    used: dict[str, int] = {}
    for location, chronic in kinds:
        nth = used.get(location, 0)
        used[location] = nth + 1
        if location == "central":
            capsule, t = _TRUNK, (0.72, 0.88)[nth % 2] + rng.uniform(-0.04, 0.04)
        else:
            near, far = (_LEFT_PA, _LEFT_PA_DISTAL) if location == "left" else (_RIGHT_PA, _RIGHT_PA_DISTAL)
            capsule, t = (near, 0.65) if nth % 2 == 0 else (far, 0.45)
            t += rng.uniform(-0.1, 0.1)
        axis_point = np.asarray(_point_on(capsule, t))
        lumen_mm = capsule.radius * scale.in_plane
        radius_mm = float(np.clip(rng.uniform(3.0, 8.0) * scale.in_plane, 0.0, 0.65 * lumen_mm))
        radius_mm = max(radius_mm, voxel_floor)
        if chronic:
            # Eccentric: centre pushed against the wall, so the lumen cuts the sphere into a
            # wall-adherent crescent.
            direction = np.asarray(capsule.end) - np.asarray(capsule.start)
            offset_ref = max(capsule.radius - 0.45 * radius_mm / scale.in_plane, 0.0)
            axis_point = axis_point + offset_ref * _wall_direction(direction, 1.0 if rng.random() < 0.5 else -1.0)
        centre = scale.to_patient([float(v) for v in axis_point])
        clot = Clot(
            center_patient_mm=(round(float(centre[0]), 3), round(float(centre[1]), 3), round(float(centre[2]), 3)),
            radius_mm=round(float(radius_mm), 3),
            location=location,
            chronic=chronic,
        )
        placed.append((clot, capsule))
    return tuple(placed)


def _exam_labels(spec: PhantomSpec) -> dict[str, bool]:
    """The nine RSNA exam labels, consistent with pe_model.consistency's rules."""
    labels = dict.fromkeys(EXAM_LABELS, False)
    if spec.has_pe:
        labels["chronic_pe"] = spec.chronic
        labels["acute_and_chronic_pe"] = spec.acute_and_chronic
        labels["central_pe"] = "central" in spec.locations
        labels["leftsided_pe"] = "left" in spec.locations
        labels["rightsided_pe"] = "right" in spec.locations
        labels["rv_lv_ratio_gte_1"] = spec.rv_lv_ratio >= 1.0
        labels["rv_lv_ratio_lt_1"] = spec.rv_lv_ratio < 1.0
    elif spec.indeterminate:
        labels["indeterminate"] = True
    else:
        labels["negative_exam_for_pe"] = True
    return labels


def _landmarks(spec: PhantomSpec, scale: _Scale) -> dict[str, Point3]:
    """Named patient points inside known anatomy, away from any clot, for checks and tests."""
    if spec.kind == "head":
        reference = {"brain": (30.0, 20.0, 20.0), "skull": (0.0, -_HEAD_SKULL.semi_axes[1] + 3.5, 0.0)}
    else:
        reference = {
            "pulmonary_trunk": _point_on(_TRUNK, 0.25),
            "right_lung": _LUNG_MARKS["right"],
            "left_lung": _LUNG_MARKS["left"],
            "left_ventricle": _LV_CENTRE,
            "right_ventricle": _RV_CENTRE,
            "descending_aorta": (22.0, 48.0, -60.0),
            "vertebral_body": (0.0, 70.0, -10.0),
            "outside_body": (0.0, -_BODY_SEMI_AXES[1] - 40.0, 0.0),
        }
    landmarks: dict[str, Point3] = {}
    for name, point in reference.items():
        x, y, z = scale.to_patient(point)
        landmarks[name] = (round(float(x), 3), round(float(y), 3), round(float(z), 3))
    return landmarks


class _Renderer:
    """Draws one axial slice at a time: ``render(k) -> (HU float32 (rows, columns), clot on slice)``."""

    def __init__(self, spec: PhantomSpec) -> None:
        self.spec = spec
        self.geometry = _geometry(spec)
        self.scale = _scale(spec)
        self.placed_clots = _clots(spec, self.scale)
        ps = spec.pixel_spacing_mm
        x0, y0, _ = self.geometry.image_positions_patient[0]
        self._x_mm = (x0 + ps * np.arange(spec.columns)).astype(np.float32)  # (columns,)
        self._y_mm = (y0 + ps * np.arange(spec.rows)).astype(np.float32)  # (rows,)
        s = self.scale.in_plane
        self._xr = self._x_mm / s  # reference mm along columns
        self._yr = self._y_mm / s  # reference mm along rows
        anatomy_rng = np.random.default_rng([spec.seed, 0])
        self.enhanced_blood = spec.contrast and spec.kind == "ctpa"
        if spec.indeterminate and self.enhanced_blood:
            self.blood_hu, self.pa_hu, self.aorta_hu = _HU_POOR_CONTRAST, _HU_POOR_CONTRAST, _HU_POOR_CONTRAST
        elif self.enhanced_blood:
            self.blood_hu, self.pa_hu, self.aorta_hu = _HU_BLOOD_CONTRAST, _HU_PA_CONTRAST, _HU_AORTA_CONTRAST
        else:
            self.blood_hu = self.pa_hu = self.aorta_hu = _HU_BLOOD
        self.noise_hu = max(spec.noise_hu * 5.0, 60.0) if spec.indeterminate else spec.noise_hu
        if spec.kind == "ctpa":
            self._static = self._chest_static()
            self._texture = self._lung_texture(anatomy_rng)
            self._lung_vessels = self._make_lung_vessels(anatomy_rng)
        else:
            self._static = np.full((spec.rows, spec.columns), _HU_AIR, dtype=np.float32)
            self._texture = self._lung_texture(anatomy_rng)
            self._lung_vessels = ()
        self._motion_rng = np.random.default_rng([spec.seed, 3])
        self._motion = (
            self._motion_rng.integers(-3, 4, size=(spec.n_slices, 2)) if spec.indeterminate else None
        )

    # -- z-invariant parts --------------------------------------------------------------------

    def _chest_static(self) -> np.ndarray:
        """Body, fat rim, spine, sternum: the same on every chest slice. (rows, columns) HU."""
        xr, yr = self._xr[None, :], self._yr[:, None]
        image = np.full((self.spec.rows, self.spec.columns), _HU_AIR, dtype=np.float32)
        a, b = _BODY_SEMI_AXES
        body = (xr / a) ** 2 + (yr / b) ** 2 <= 1.0
        image[body] = _HU_FAT
        muscle = (xr / (a - 12.0)) ** 2 + (yr / (b - 12.0)) ** 2 <= 1.0
        image[muscle] = _HU_SOFT
        vertebra = xr**2 + (yr - 70.0) ** 2 <= 18.0**2
        image[vertebra] = _HU_BONE
        image[xr**2 + (yr - 70.0) ** 2 <= 12.0**2] = _HU_MARROW
        arch = xr**2 + (yr - 95.0) ** 2 <= 13.0**2
        image[arch] = _HU_BONE
        image[xr**2 + (yr - 95.0) ** 2 <= 7.0**2] = 20.0
        sternum = (np.abs(xr) <= 12.0) & (np.abs(yr + 88.0) <= 5.0)
        image[sternum] = 400.0
        return image

    def _lung_texture(self, rng: np.random.Generator) -> np.ndarray:
        """Four smooth random fields (4, rows, columns), std about 1, mixed along z by ``_texture_at``."""
        from scipy.ndimage import gaussian_filter

        coarse = rng.standard_normal((4, self.spec.rows, self.spec.columns)).astype(np.float32)
        sigma = max(1.0, 3.0 / self.spec.pixel_spacing_mm)
        smooth = gaussian_filter(coarse, sigma=(0.0, sigma, sigma))
        std = smooth.std(axis=(1, 2), keepdims=True)
        return (smooth / np.where(std > 0, std, 1.0)).astype(np.float32)

    def _texture_at(self, z: float, box: tuple[slice, slice]) -> np.ndarray:
        """Texture of one slice: the fields rotate into each other along z (periods 75 and 46 mm),
        so it changes smoothly from slice to slice instead of repeating as streaks."""
        a, b = z / 12.0, z / 7.3
        weights = np.array([math.cos(a), math.sin(a), math.cos(b), math.sin(b)], dtype=np.float32) / math.sqrt(2.0)
        fields = self._texture[:, box[0], box[1]]
        return np.tensordot(weights, fields, axes=1)

    def _make_lung_vessels(self, rng: np.random.Generator) -> tuple[_Capsule, ...]:
        """Peripheral vessels fanning out from each hilum into its lung."""
        vessels: list[_Capsule] = []
        for side, lung in _LUNGS.items():
            cx, cy, cz = lung.centre
            ax, ay, az = lung.semi_axes
            hilum = (cx * 0.7, cy - 10.0, 12.0)
            mark = np.asarray(_LUNG_MARKS[side])
            made = 0
            while made < 14:
                theta = rng.uniform(0, 2 * math.pi)
                phi = rng.uniform(-1.1, 1.1)
                reach = rng.uniform(0.55, 0.9)
                radius = rng.uniform(1.8, 3.2)
                end = (
                    cx + reach * ax * math.cos(theta) * math.cos(phi),
                    cy + reach * ay * math.sin(theta) * math.cos(phi),
                    cz + reach * az * math.sin(phi),
                )
                if _segment_distance(mark, np.asarray(hilum), np.asarray(end)) < radius + _LUNG_MARK_CLEARANCE_MM:
                    continue
                vessels.append(_Capsule(hilum, end, radius))
                made += 1
        return tuple(vessels)

    # -- per-slice painting -------------------------------------------------------------------

    def _boxes(self, x_lo: float, x_hi: float, y_lo: float, y_hi: float) -> tuple[slice, slice] | None:
        """Pixel index ranges (rows, columns) covering a reference-mm box; None when outside."""
        s, ps = self.scale.in_plane, self.spec.pixel_spacing_mm
        x0, y0, _ = self.geometry.image_positions_patient[0]
        c0 = max(int(math.floor((x_lo * s - x0) / ps)), 0)
        c1 = min(int(math.ceil((x_hi * s - x0) / ps)) + 1, self.spec.columns)
        r0 = max(int(math.floor((y_lo * s - y0) / ps)), 0)
        r1 = min(int(math.ceil((y_hi * s - y0) / ps)) + 1, self.spec.rows)
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def _capsule_mask(self, capsule: _Capsule, z: float) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """Voxels of this slice (reference z) inside the tube; None when it misses the slice."""
        a = np.asarray(capsule.start, dtype=np.float64)
        b = np.asarray(capsule.end, dtype=np.float64)
        r = capsule.radius
        d = b - a
        # Parameter range of the axis within r of this slice.
        if abs(d[2]) < 1e-9:
            if abs(z - a[2]) > r:
                return None
            t_lo, t_hi = 0.0, 1.0
        else:
            t1, t2 = (z - r - a[2]) / d[2], (z + r - a[2]) / d[2]
            t_lo, t_hi = max(min(t1, t2), 0.0), min(max(t1, t2), 1.0)
            if t_lo > t_hi:
                return None
        p_lo, p_hi = a + t_lo * d, a + t_hi * d
        box = self._boxes(
            min(p_lo[0], p_hi[0]) - r, max(p_lo[0], p_hi[0]) + r, min(p_lo[1], p_hi[1]) - r, max(p_lo[1], p_hi[1]) + r
        )
        if box is None:
            return None
        xr = self._xr[box[1]][None, :].astype(np.float64)
        yr = self._yr[box[0]][:, None].astype(np.float64)
        length2 = float(d @ d)
        t = ((xr - a[0]) * d[0] + (yr - a[1]) * d[1] + (z - a[2]) * d[2]) / length2
        t = np.clip(t, 0.0, 1.0)
        dist2 = (xr - a[0] - t * d[0]) ** 2 + (yr - a[1] - t * d[1]) ** 2 + (z - a[2] - t * d[2]) ** 2
        mask = dist2 <= r * r
        if not mask.any():
            return None
        return box, mask

    def _ellipsoid_mask(self, e: _Ellipsoid, z: float) -> tuple[tuple[slice, slice], np.ndarray] | None:
        cx, cy, cz = e.centre
        ax, ay, az = e.semi_axes
        f = 1.0 - ((z - cz) / az) ** 2
        if f <= 0:
            return None
        sx, sy = ax * math.sqrt(f), ay * math.sqrt(f)
        box = self._boxes(cx - sx, cx + sx, cy - sy, cy + sy)
        if box is None:
            return None
        xr = self._xr[box[1]][None, :]
        yr = self._yr[box[0]][:, None]
        mask = ((xr - cx) / sx) ** 2 + ((yr - cy) / sy) ** 2 <= 1.0
        return box, mask

    def _paint(self, image: np.ndarray, hit: tuple[tuple[slice, slice], np.ndarray] | None, hu: float) -> None:
        if hit is not None:
            box, mask = hit
            image[box][mask] = hu

    def _chest(self, k: int, z: float) -> tuple[np.ndarray, bool]:
        image = self._static.copy()
        # Lungs, flattened at the top and the base like real apices and domes.
        for lung in _LUNGS.values():
            squashed = _Ellipsoid(lung.centre, lung.semi_axes)
            cz, az = lung.centre[2], lung.semi_axes[2]
            u = (z - cz) / az
            if abs(u) < 1.0:
                f = math.sqrt(max(1.0 - u**4, 0.0))
                squashed = _Ellipsoid(
                    (lung.centre[0], lung.centre[1], z),
                    (lung.semi_axes[0] * f, lung.semi_axes[1] * f, 1.0),
                )
                hit = self._ellipsoid_mask(squashed, z)
                if hit is not None:
                    box, mask = hit
                    region = image[box]
                    region[mask] = _HU_LUNG + 25.0 * self._texture_at(z, box)[mask]
        vessel_hu = 200.0 if self.enhanced_blood else _HU_BLOOD
        for vessel in self._lung_vessels:
            self._paint(image, self._capsule_mask(vessel, z), vessel_hu)
        # Ribs: a posterolateral shell in bands along z.
        if ((z * self.scale.axial) % 28.0) < 10.0:
            xr, yr = self._xr[None, :], self._yr[:, None]
            a, b = _BODY_SEMI_AXES
            outer = (xr / (a - 14.0)) ** 2 + (yr / (b - 14.0)) ** 2 <= 1.0
            inner = (xr / (a - 21.0)) ** 2 + (yr / (b - 21.0)) ** 2 <= 1.0
            image[outer & ~inner & (yr > -55.0)] = _HU_BONE
        # Heart with blood pools.
        self._paint(image, self._ellipsoid_mask(_HEART, z), _HU_MYOCARDIUM)
        lv = _LV_RADIUS_MM
        rv = min(_LV_RADIUS_MM * self.spec.rv_lv_ratio, _RV_RADIUS_MAX_MM)
        self._paint(image, self._ellipsoid_mask(_Ellipsoid(_LV_CENTRE, (lv, lv, 32.0)), z), self.blood_hu)
        self._paint(image, self._ellipsoid_mask(_Ellipsoid(_RV_CENTRE, (rv, 0.8 * lv, 32.0)), z), self.blood_hu)
        for segment in _AORTA:
            self._paint(image, self._capsule_mask(segment, z), self.aorta_hu)
        for segment in _PULMONARY_ARTERIES:
            self._paint(image, self._capsule_mask(segment, z), self.pa_hu)
        return image, self._paint_clots(image, k)

    def _paint_clots(self, image: np.ndarray, k: int) -> bool:
        """Clot voxels = inside the clot sphere (patient mm) and inside its artery lumen."""
        if not self.placed_clots:
            return False
        z_mm = self.geometry.image_positions_patient[k][2]
        z_ref = self.scale.to_reference((0.0, 0.0, z_mm))[2]
        any_clot = False
        for clot, capsule in self.placed_clots:
            cx, cy, cz = clot.center_patient_mm
            dz = z_mm - cz
            half = clot.radius_mm**2 - dz * dz
            if half < 0:
                continue
            lumen = self._capsule_mask(capsule, z_ref)
            if lumen is None:
                continue
            box, lumen_mask = lumen
            xs = self._x_mm[box[1]][None, :]
            ys = self._y_mm[box[0]][:, None]
            inside = ((xs - cx) ** 2 + (ys - cy) ** 2 <= half) & lumen_mask
            if inside.any():
                image[box][inside] = _HU_CLOT_CHRONIC if clot.chronic else _HU_CLOT_ACUTE
                any_clot = True
        return any_clot

    def _head(self, z: float) -> np.ndarray:
        image = self._static.copy()
        skull = _HEAD_SKULL
        self._paint(image, self._ellipsoid_mask(skull, z), _HU_BONE)
        inner = _Ellipsoid(skull.centre, (skull.semi_axes[0] - 7.0, skull.semi_axes[1] - 7.0, skull.semi_axes[2] - 7.0))
        hit = self._ellipsoid_mask(inner, z)
        if hit is not None:
            box, mask = hit
            image[box][mask] = _HU_BRAIN + 4.0 * self._texture_at(z, box)[mask]
        for cx in (-10.0, 10.0):
            self._paint(image, self._ellipsoid_mask(_Ellipsoid((cx, -5.0, 10.0), (5.0, 22.0, 18.0)), z), _HU_CSF)
        return image

    def render(self, k: int) -> tuple[np.ndarray, bool]:
        """HU of slice ``k`` as float32 (rows, columns) and whether a clot voxel lies on it."""
        z_mm = self.geometry.image_positions_patient[k][2]
        z_ref = self.scale.to_reference((0.0, 0.0, z_mm))[2]
        if self.spec.kind == "ctpa":
            image, clot = self._chest(k, z_ref)
        else:
            image, clot = self._head(z_ref), False
        if self._motion is not None:
            dy, dx = (int(v) for v in self._motion[k])
            ghost = np.roll(image, (dy * 2, dx * 2), axis=(0, 1))
            image = 0.7 * np.roll(image, (dy, dx), axis=(0, 1)) + 0.3 * ghost
        if self.noise_hu > 0:
            noise_rng = np.random.default_rng([self.spec.seed, 2, k])
            image += self.noise_hu * noise_rng.standard_normal(image.shape, dtype=np.float32)
        return image, clot

    def slices(self) -> Iterator[tuple[np.ndarray, bool]]:
        for k in range(self.spec.n_slices):
            yield self.render(k)


def _truth(renderer: _Renderer, slice_pe_present: tuple[bool, ...]) -> PhantomGroundTruth:
    spec = renderer.spec
    return PhantomGroundTruth(
        spec=spec,
        slice_positions_mm=renderer.geometry.slice_positions_mm,
        slice_pe_present=slice_pe_present,
        clots=tuple(clot for clot, _ in renderer.placed_clots),
        exam_labels=_exam_labels(spec),
        landmarks_patient_mm=_landmarks(spec, renderer.scale),
    )


def _intercept(signed: bool) -> float:
    """Signed storage keeps HU as stored values (intercept 0), unsigned adds 1024."""
    return 0.0 if signed else RESCALE_INTERCEPT


def _stored(hu: np.ndarray, signed: bool) -> np.ndarray:
    """HU float -> stored values: uint16 HU + 1024 (12 bits) or, signed, int16 HU itself."""
    clipped = np.clip(np.rint(hu), HU_MIN, HU_MAX) - _intercept(signed)
    return clipped.astype(np.int16 if signed else np.uint16)


def generate_volume(spec: PhantomSpec) -> tuple[np.ndarray, PhantomGeometry, PhantomGroundTruth]:
    """Draw the phantom in memory.

    Returns the HU volume as int16 ``(n_slices, rows, columns)`` (slice 0 most inferior, row
    index growing posterior, column index growing to the patient's left), its geometry and the
    ground truth. ``write_phantom_series`` writes exactly these values (clipped to -1024..3071).
    """
    renderer = _Renderer(spec)
    volume = np.empty((spec.n_slices, spec.rows, spec.columns), dtype=np.int16)
    flags: list[bool] = []
    for k, (image, clot) in enumerate(renderer.slices()):
        volume[k] = _stored(image, signed=True)
        flags.append(clot)
    return volume, renderer.geometry, _truth(renderer, tuple(flags))


# --------------------------------------------------------------------------------------------
# DICOM writing
# --------------------------------------------------------------------------------------------


def _uid(spec: PhantomSpec, *parts: object) -> str:
    """A UID derived from the spec and ``parts``: same inputs, same UID."""
    fields = [f"{f.name}={getattr(spec, f.name)!r}" for f in dataclasses.fields(spec)]
    return str(generate_uid(entropy_srcs=["pe-phantom-v1", *fields, *(str(p) for p in parts)]))


def _format_ds(value: float) -> str:
    """A DS string of at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text[:16]


def _common_dataset(
    spec: PhantomSpec,
    study_instance_uid: str,
    series_instance_uid: str,
    frame_of_reference_uid: str,
    series_number: int,
) -> Dataset:
    """Patient, study, series, equipment and frame-of-reference attributes shared by every file."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = "20240315"
    ds.StudyTime = f"{8 + spec.seed % 10:02d}{(spec.seed * 7) % 60:02d}00"
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.AcquisitionDate = ds.StudyDate
    ds.AcquisitionTime = ds.StudyTime
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.AccessionNumber = f"PH{abs(spec.seed) % 10**8:08d}"
    ds.Modality = "CT"
    ds.Manufacturer = "PE-Triage Phantom"
    ds.ManufacturerModelName = "Synthetic CTPA"
    ds.SoftwareVersions = "phantoms 1"
    ds.InstitutionName = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StationName = "PHANTOM"
    head = spec.kind == "head"
    ds.StudyDescription = "CT HEAD" if head else "CT ANGIO CHEST PE"
    if spec.series_description:
        ds.SeriesDescription = spec.series_description
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = ("M", "F")[spec.seed % 2]
    ds.PatientAge = "064Y"
    body_part = spec.body_part_examined
    if head and body_part == "CHEST":
        body_part = "HEAD"
    if body_part:
        ds.BodyPartExamined = body_part
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    return ds


def _contrast_attributes(ds: Dataset, spec: PhantomSpec) -> None:
    if spec.contrast and spec.kind == "ctpa":
        ds.ContrastBolusAgent = "IOHEXOL 350"
        ds.ContrastBolusRoute = "IV"
        ds.ContrastBolusVolume = 70
        ds.ContrastBolusIngredient = "IODINE"
    else:
        ds.ContrastBolusAgent = ""


def _pixel_attributes(ds: Dataset, spec: PhantomSpec, signed: bool) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if signed else BITS_STORED
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0


def _window(spec: PhantomSpec) -> tuple[str, str]:
    return ("40", "80") if spec.kind == "head" else ("100", "700")


def _single_frame(
    common: Dataset, spec: PhantomSpec, geometry: PhantomGeometry, k: int, sop_instance_uid: str, signed: bool
) -> Dataset:
    ds = Dataset()
    ds.update(common)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = k + 1
    ds.AcquisitionNumber = 1
    ds.ScanOptions = "HELICAL MODE"
    position = geometry.image_positions_patient[k]
    ds.ImagePositionPatient = [_format_ds(v) for v in position]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceLocation = _format_ds(position[2])
    ds.PixelSpacing = [_format_ds(spec.pixel_spacing_mm)] * 2
    ds.SliceThickness = _format_ds(spec.thickness_mm)
    ds.KVP = 120
    ds.DataCollectionDiameter = _format_ds(500.0)
    ds.ReconstructionDiameter = _format_ds(spec.pixel_spacing_mm * spec.columns)
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.ExposureTime = 500
    ds.XRayTubeCurrent = 250
    ds.Exposure = 125
    ds.ConvolutionKernel = "STANDARD" if spec.kind == "ctpa" else "HEAD"
    _contrast_attributes(ds, spec)
    _pixel_attributes(ds, spec, signed)
    center, width = _window(spec)
    ds.WindowCenter = center
    ds.WindowWidth = width
    ds.RescaleIntercept = _format_ds(_intercept(signed))
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def _item(**attributes: object) -> Dataset:
    """A sequence item from keyword attributes."""
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _code(code: Code) -> Dataset:
    return _item(CodeValue=code.value, CodingSchemeDesignator=code.scheme_designator, CodeMeaning=code.meaning)


def _enhanced(
    common: Dataset,
    spec: PhantomSpec,
    geometry: PhantomGeometry,
    sop_instance_uid: str,
    signed: bool,
) -> Dataset:
    """One Enhanced CT Image Storage object whose frames are the slices, inferior -> superior.

    Geometry and rescale live in the shared functional groups (PixelMeasures, PlaneOrientation,
    PixelValueTransformation), each frame's position in its PlanePositionSequence.
    """
    ds = Dataset()
    ds.update(common)
    for keyword in ("AcquisitionDate", "AcquisitionTime"):
        delattr(ds, keyword)
    head = spec.kind == "head"
    contrast = spec.contrast and not head
    acquisition_datetime = f"{common.AcquisitionDate}{common.AcquisitionTime}"
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.InstanceNumber = 1
    ds.AcquisitionNumber = 1
    ds.ContentQualification = "PRODUCT"
    ds.ImageComments = "Synthetic phantom"
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionDateTime = acquisition_datetime
    ds.AcquisitionDuration = 5.0
    ds.DeviceSerialNumber = "0001"
    ds.NumberOfFrames = spec.n_slices
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.PixelPresentation = "MONOCHROME"
    ds.AcquisitionContextSequence = DicomSequence([])
    _pixel_attributes(ds, spec, signed)
    if contrast:
        # Kept beside the Enhanced Contrast/Bolus module for readers that only look here.
        ds.ContrastBolusAgent = "IOHEXOL 350"
        ds.ContrastBolusAgentSequence = DicomSequence([
            _item(
                CodeValue=codes.SCT.Iohexol.value,
                CodingSchemeDesignator=codes.SCT.Iohexol.scheme_designator,
                CodeMeaning=codes.SCT.Iohexol.meaning,
                ContrastBolusAgentNumber=1,
                ContrastBolusAdministrationRouteSequence=DicomSequence(
                    [_code(codes.SCT.IntravenousRoute)]
                ),
                ContrastBolusIngredientCodeSequence=DicomSequence([_code(codes.SCT.Iodine)]),
                ContrastBolusVolume=70.0,
                ContrastBolusIngredientConcentration=350.0,
                ContrastBolusIngredientOpaque="YES",
            )
        ])

    dimension_uid = _uid(spec, "dimension-organization", sop_instance_uid)
    ds.DimensionOrganizationSequence = DicomSequence([_item(DimensionOrganizationUID=dimension_uid)])
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = DicomSequence([
        _item(
            DimensionOrganizationUID=dimension_uid,
            DimensionIndexPointer=pydicom.tag.Tag("ImagePositionPatient"),
            FunctionalGroupPointer=pydicom.tag.Tag("PlanePositionSequence"),
            DimensionDescriptionLabel="Image Position (Patient)",
        )
    ])

    window_center, window_width = _window(spec)
    region = _code(codes.SCT.Head if head else codes.SCT.Chest)
    shared = _item(
        PixelMeasuresSequence=DicomSequence([
            _item(
                PixelSpacing=[_format_ds(spec.pixel_spacing_mm)] * 2,
                SliceThickness=_format_ds(spec.thickness_mm),
                SpacingBetweenSlices=_format_ds(spec.slice_spacing_mm),
            )
        ]),
        PlaneOrientationSequence=DicomSequence([_item(ImageOrientationPatient=["1", "0", "0", "0", "1", "0"])]),
        PixelValueTransformationSequence=DicomSequence([
            _item(RescaleIntercept=_format_ds(_intercept(signed)), RescaleSlope="1", RescaleType="HU")
        ]),
        FrameVOILUTSequence=DicomSequence([_item(WindowCenter=window_center, WindowWidth=window_width)]),
        CTImageFrameTypeSequence=DicomSequence([
            _item(
                FrameType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"],
                PixelPresentation="MONOCHROME",
                VolumetricProperties="VOLUME",
                VolumeBasedCalculationTechnique="NONE",
            )
        ]),
        FrameAnatomySequence=DicomSequence([
            _item(AnatomicRegionSequence=DicomSequence([region]), FrameLaterality="U")
        ]),
        IrradiationEventIdentificationSequence=DicomSequence([
            _item(IrradiationEventUID=_uid(spec, "irradiation-event", sop_instance_uid))
        ]),
        CTAcquisitionTypeSequence=DicomSequence([
            _item(AcquisitionType="SPIRAL", ConstantVolumeFlag="NO", FluoroscopyFlag="NO")
        ]),
        CTAcquisitionDetailsSequence=DicomSequence([
            _item(
                DataCollectionDiameter=500.0,
                GantryDetectorTilt=0.0,
                TableHeight=150.0,
                RotationDirection="CW",
                RevolutionTime=0.5,
                SingleCollimationWidth=0.625,
                TotalCollimationWidth=40.0,
            )
        ]),
        CTTableDynamicsSequence=DicomSequence([
            _item(TableSpeed=78.75, TableFeedPerRotation=39.375, SpiralPitchFactor=0.984)
        ]),
        CTGeometrySequence=DicomSequence([
            _item(DistanceSourceToDetector=1040.0, DistanceSourceToDataCollectionCenter=570.0)
        ]),
        CTReconstructionSequence=DicomSequence([
            _item(
                ReconstructionAlgorithm="FILTER_BACK_PROJ",
                ConvolutionKernel="HEAD" if head else "STANDARD",
                ConvolutionKernelGroup="BRAIN" if head else "SOFT_TISSUE",
                ReconstructionFieldOfView=[spec.pixel_spacing_mm * spec.rows, spec.pixel_spacing_mm * spec.columns],
                ReconstructionPixelSpacing=[spec.pixel_spacing_mm, spec.pixel_spacing_mm],
                ReconstructionAngle=360.0,
                ImageFilter="NONE",
            )
        ]),
        CTExposureSequence=DicomSequence([
            _item(
                ExposureTimeInms=500.0,
                XRayTubeCurrentInmA=250.0,
                ExposureInmAs=125.0,
                ExposureModulationType="NONE",
                CTDIvol=8.0,
                CTDIPhantomTypeCodeSequence=DicomSequence([
                    _item(CodeValue="113691", CodingSchemeDesignator="DCM", CodeMeaning="IEC Body Dosimetry Phantom")
                ]),
            )
        ]),
        CTXRayDetailsSequence=DicomSequence([
            _item(KVP=120.0, FocalSpots=[1.2], FilterType="BODY", FilterMaterial=["ALUMINUM"])
        ]),
    )
    if contrast:
        shared.ContrastBolusUsageSequence = DicomSequence([
            _item(ContrastBolusAgentNumber=1, ContrastBolusAgentAdministered="YES", ContrastBolusAgentDetected="YES")
        ])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    per_frame: list[Dataset] = []
    for k, position in enumerate(geometry.image_positions_patient):
        content = _item(
            FrameReferenceDateTime=acquisition_datetime,
            FrameAcquisitionDateTime=acquisition_datetime,
            FrameAcquisitionDuration=12.5,
            DimensionIndexValues=[k + 1],
            FrameAcquisitionNumber=1,
            StackID="1",
            InStackPositionNumber=k + 1,
        )
        per_frame.append(
            _item(
                FrameContentSequence=DicomSequence([content]),
                PlanePositionSequence=DicomSequence([_item(ImagePositionPatient=[_format_ds(v) for v in position])]),
                CTPositionSequence=DicomSequence([
                    _item(
                        TablePosition=float(position[2]),
                        ReconstructionTargetCenterPatient=[0.0, 0.0, float(position[2])],
                        DataCollectionCenterPatient=[0.0, 0.0, float(position[2])],
                    )
                ]),
            )
        )
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    return ds


def _set_pixels(ds: Dataset, pixels: np.ndarray, transfer_syntax_uid: str) -> None:
    """Store ``pixels`` ((rows, columns) or (frames, rows, columns)) in the transfer syntax."""
    if transfer_syntax_uid in _UNCOMPRESSED:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds["PixelData"].VR = "OW"
        return
    if transfer_syntax_uid in _PYDICOM_ENCODED:
        # pydicom's encoders (pylibjpeg-rle / openjpeg, pyjpegls) do the work.
        try:
            ds.compress(transfer_syntax_uid, np.ascontiguousarray(pixels), generate_instance_uid=False)
        except (RuntimeError, ValueError) as exc:
            # e.g. JPEG-LS needs the pyjpegls package; say so instead of a library traceback.
            raise PhantomError(f"cannot encode {UID(transfer_syntax_uid).name} here: {exc}".splitlines()[0]) from exc
        return
    if transfer_syntax_uid in _GDCM_ENCODED:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds["PixelData"].VR = "OW"
        ds.PixelData = _gdcm_encode(ds, transfer_syntax_uid)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        return
    raise PhantomError(
        f"cannot write transfer syntax {transfer_syntax_uid} ({UID(transfer_syntax_uid).name}); "
        f"supported: {', '.join(UID(t).name for t in SUPPORTED_TRANSFER_SYNTAXES)}"
    )


def _gdcm_encode(ds: Dataset, transfer_syntax_uid: str) -> bytes:
    """Encapsulated JPEG Lossless pixel data for ``ds`` (uncompressed), encoded by GDCM.

    pydicom has no encoder for JPEG processes 14 / 14 SV1, GDCM has; its Python binding is used
    file to file (its in-memory buffers are not safe to hand across), and only the encoded
    PixelData is kept so our own attributes stay as written.
    """
    import gdcm

    target = (
        gdcm.TransferSyntax.JPEGLosslessProcess14_1
        if transfer_syntax_uid == JPEGLosslessSV1
        else gdcm.TransferSyntax.JPEGLosslessProcess14
    )
    with tempfile.TemporaryDirectory(prefix="phantom-gdcm-") as work:
        source, encoded = Path(work) / "in.dcm", Path(work) / "out.dcm"
        copy = Dataset()
        copy.update(ds)
        copy.file_meta = _file_meta(ds, ExplicitVRLittleEndian)
        copy.save_as(source, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(source))
        if not reader.Read():
            raise PhantomError("GDCM could not read the uncompressed phantom image")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(target))
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise PhantomError(f"GDCM could not encode the image as {UID(transfer_syntax_uid).name}")
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(encoded))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise PhantomError(f"GDCM could not write the {UID(transfer_syntax_uid).name} image")
        result = pydicom.dcmread(encoded)
        if result.file_meta.TransferSyntaxUID != transfer_syntax_uid:
            written = result.file_meta.TransferSyntaxUID.name
            raise PhantomError(f"GDCM wrote {written}, not {UID(transfer_syntax_uid).name}")
        return bytes(result.PixelData)


def _file_meta(ds: Dataset, transfer_syntax_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
    return meta


def _save(ds: Dataset, path: Path, transfer_syntax_uid: str) -> None:
    """Write atomically (temp file + rename) so a half-written file is never seen by a reader."""
    ds.file_meta = _file_meta(ds, transfer_syntax_uid)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".dcm")
    os.close(handle)
    try:
        ds.save_as(temporary, enforce_file_format=True)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_phantom_series(
    directory: str | Path,
    spec: PhantomSpec,
    *,
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
    study_instance_uid: str | None = None,
    enhanced: bool = False,
    file_names: str = "sop",
    series_number: int | None = None,
    signed_pixels: bool = False,
) -> PhantomTruth:
    """Draw the phantom and write it under ``directory`` as DICOM Part 10 files.

    Single-frame CT Image Storage files (one per slice) or, with ``enhanced``, one Enhanced CT
    Image Storage file. ``file_names``: ``"sop"`` -> ``<SOPInstanceUID>.dcm``, ``"index"`` ->
    ``IM000001.dcm`` (InstanceNumber order). Stored values: uint16 HU + 1024 with 12 bits stored
    and RescaleIntercept -1024 by default; with ``signed_pixels`` int16 HU, intercept 0. UIDs
    are derived from the spec (same spec -> same UIDs); pass ``study_instance_uid`` to put
    several series in one study. Transfer syntaxes: ``SUPPORTED_TRANSFER_SYNTAXES`` (JPEG
    Lossless via GDCM, JPEG-LS via pyjpegls, the rest via pydicom's own encoders); any other
    raises ``PhantomError``. ``series_number`` defaults to 3 (CTPA), 4 (Enhanced), 2 (head).
    """
    if file_names not in ("sop", "index"):
        raise PhantomError(f'file_names must be "sop" or "index", not {file_names!r}')
    transfer_syntax_uid = UID(str(transfer_syntax_uid))
    if transfer_syntax_uid == JPEGBaseline8Bit:
        raise PhantomError("JPEG Baseline (8 bit) cannot hold 12-bit CT values; use JPEG Lossless instead")
    if transfer_syntax_uid not in SUPPORTED_TRANSFER_SYNTAXES:
        raise PhantomError(
            f"cannot write transfer syntax {transfer_syntax_uid} ({transfer_syntax_uid.name}); "
            f"supported: {', '.join(UID(t).name for t in SUPPORTED_TRANSFER_SYNTAXES)}"
        )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    renderer = _Renderer(spec)
    geometry = renderer.geometry
    study_uid = str(study_instance_uid) if study_instance_uid else _uid(spec, "study")
    series_uid = _uid(spec, "series", study_uid, "enhanced" if enhanced else "single")
    frame_of_reference_uid = _uid(spec, "frame-of-reference", study_uid)
    number = series_number if series_number is not None else (2 if spec.kind == "head" else 3 + int(enhanced))
    common = _common_dataset(spec, study_uid, series_uid, frame_of_reference_uid, number)

    flags: list[bool] = []
    if enhanced:
        sop_uid = _uid(spec, "sop-enhanced", series_uid)
        frames = np.empty((spec.n_slices, spec.rows, spec.columns), dtype=np.int16 if signed_pixels else np.uint16)
        for k, (image, clot) in enumerate(renderer.slices()):
            frames[k] = _stored(image, signed_pixels)
            flags.append(clot)
        ds = _enhanced(common, spec, geometry, sop_uid, signed_pixels)
        _set_pixels(ds, frames, transfer_syntax_uid)
        path = out / (f"{sop_uid}.dcm" if file_names == "sop" else "IM000001.dcm")
        _save(ds, path, transfer_syntax_uid)
        sop_uids = (sop_uid,) * spec.n_slices
        files = (path,) * spec.n_slices
    else:
        sops: list[str] = []
        paths: list[Path] = []
        for k, (image, clot) in enumerate(renderer.slices()):
            sop_uid = _uid(spec, "sop", series_uid, k)
            ds = _single_frame(common, spec, geometry, k, sop_uid, signed_pixels)
            _set_pixels(ds, _stored(image, signed_pixels), transfer_syntax_uid)
            path = out / (f"{sop_uid}.dcm" if file_names == "sop" else f"IM{k + 1:06d}.dcm")
            _save(ds, path, transfer_syntax_uid)
            sops.append(sop_uid)
            paths.append(path)
            flags.append(clot)
        sop_uids, files = tuple(sops), tuple(paths)

    truth = _truth(renderer, tuple(flags))
    return PhantomTruth(
        spec=spec,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        sop_instance_uids=sop_uids,
        slice_positions_mm=truth.slice_positions_mm,
        slice_pe_present=truth.slice_pe_present,
        clots=truth.clots,
        exam_labels=truth.exam_labels,
        files=files,
        landmarks_patient_mm=truth.landmarks_patient_mm,
        transfer_syntax_uid=transfer_syntax_uid,
    )


def random_spec(rng: np.random.Generator, **overrides: object) -> PhantomSpec:
    """A varied CTPA spec for synthetic training: about half PE, every side, acute/chronic mixes,
    RV/LV ratios on both sides of 1, indeterminate negatives, spacing and noise. ``overrides``
    replace any field (e.g. ``rows=64, columns=64, n_slices=48``)."""
    pe = bool(rng.random() < 0.5)
    locations: tuple[str, ...] = ("central",)
    chronic = acute_and_chronic = indeterminate = False
    if pe:
        chosen = tuple(loc for loc in LOCATIONS if rng.random() < 0.5)
        locations = chosen or (LOCATIONS[int(rng.integers(len(LOCATIONS)))],)
        kind_draw = rng.random()
        chronic = bool(kind_draw < 0.15)
        acute_and_chronic = bool(0.15 <= kind_draw < 0.27)
    else:
        indeterminate = bool(rng.random() < 0.1)
    if pe and rng.random() < 0.4:
        rv_lv_ratio = float(rng.uniform(1.0, 1.5))
    else:
        rv_lv_ratio = float(rng.uniform(0.6, 0.98))
    slice_spacing = float(rng.choice([2.0, 2.5, 3.0]))
    n_slices = int(round(rng.uniform(260.0, 340.0) / slice_spacing))
    values: dict[str, object] = {
        "pe": pe,
        "locations": locations,
        "chronic": chronic,
        "acute_and_chronic": acute_and_chronic,
        "rv_lv_ratio": round(rv_lv_ratio, 3),
        "n_slices": n_slices,
        "slice_spacing_mm": slice_spacing,
        "pixel_spacing_mm": float(rng.uniform(2.4, 2.8)),
        "noise_hu": float(rng.uniform(6.0, 20.0)),
        "seed": int(rng.integers(0, 2**31 - 1)),
        "indeterminate": indeterminate,
        "patient_id": f"PHANTOM-{int(rng.integers(0, 10**6)):06d}",
    }
    values.update(overrides)
    return PhantomSpec(**values)  # type: ignore[arg-type]
