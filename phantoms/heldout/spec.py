"""What one held-out CTPA looks like: its parameters (HeldoutSpec, ClotSpec) and the seeded draw of a family.

The held-out family exists only to evaluate models trained on other generators. Its parameters are
drawn from ranges a CTPA service meets (field of view 280-420 mm, slice thickness 0.625-3 mm,
pulmonary arterial contrast 150-500 HU, RV/LV ratio 0.7-1.6) and its clots span the kinds the RSNA
labels name: saddle, central (pulmonary trunk), main, lobar and segmental arteries; occlusive,
eccentric and central ("polo mint") filling defects; chronic mural thrombus, sometimes calcified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np

from phantoms.heldout.errors import HeldoutSpecError

#: Where a clot sits in the arterial tree.
CLOT_LEVELS: Final[tuple[str, ...]] = ("saddle", "trunk", "main", "lobar", "segmental")
#: How a clot fills the lumen.
CLOT_FORMS: Final[tuple[str, ...]] = ("occlusive", "eccentric", "central", "mural")
SIDES: Final[tuple[str, ...]] = ("left", "right")
#: Reconstruction kernels: the in-plane point-spread function, Gaussian sigma in mm.
KERNEL_SIGMA_MM: Final[dict[str, float]] = {"soft": 0.9, "standard": 0.65, "sharp": 0.4}
#: Slice thicknesses a CTPA protocol reconstructs (mm).
THICKNESSES_MM: Final[tuple[float, ...]] = (0.625, 0.75, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)


@dataclass(frozen=True)
class ClotSpec:
    """One embolus. ``position`` in [0, 1] places it along its artery (0 = the artery's origin);
    ``length_mm`` is its extent along the artery; ``hu`` its attenuation. A saddle clot straddles
    the bifurcation (its ``side`` is ignored); a trunk clot sits in the pulmonary trunk."""

    level: str
    form: str
    side: str = "right"
    #: Which lobar/segmental artery of that side (taken modulo the number there).
    branch: int = 0
    position: float = 0.5
    length_mm: float = 20.0
    hu: float = 45.0
    chronic: bool = False
    #: Calcified flecks inside a chronic clot.
    calcified: bool = False
    #: Angle (radians) of the wall the clot leans on, around the artery's axis.
    wall_angle: float = 0.0

    def __post_init__(self) -> None:
        if self.level not in CLOT_LEVELS:
            raise HeldoutSpecError(f"clot level must be one of {CLOT_LEVELS}, not {self.level!r}")
        if self.form not in CLOT_FORMS:
            raise HeldoutSpecError(f"clot form must be one of {CLOT_FORMS}, not {self.form!r}")
        if self.side not in SIDES:
            raise HeldoutSpecError(f"clot side must be one of {SIDES}, not {self.side!r}")
        if not 0.0 <= self.position <= 1.0:
            raise HeldoutSpecError(f"clot position must be in [0, 1], not {self.position}")
        if not self.length_mm > 0:
            raise HeldoutSpecError(f"clot length_mm must be positive, not {self.length_mm}")
        if not -100.0 <= self.hu <= 150.0:
            raise HeldoutSpecError(f"clot HU must be in [-100, 150] (thrombus), not {self.hu}")
        if self.branch < 0:
            raise HeldoutSpecError(f"clot branch must be zero or more, not {self.branch}")


@dataclass(frozen=True)
class HeldoutSpec:
    """Everything that decides one held-out series; the same spec always gives the same files.

    Geometry: ``rows`` x ``columns`` pixels over ``fov_mm``; slices ``slice_thickness_mm`` thick,
    ``slice_spacing_mm`` apart (less than the thickness: overlapping reconstruction), covering the
    lungs from ``above_apex_mm`` above the apex to ``below_base_mm`` below the lowest lung base
    (negative values cut the lungs off). Anatomy scales with ``body_width_mm`` / ``body_depth_mm``.
    """

    seed: int = 0
    clots: tuple[ClotSpec, ...] = ()
    rows: int = 512
    columns: int = 512
    fov_mm: float = 360.0
    slice_thickness_mm: float = 1.25
    slice_spacing_mm: float = 1.25
    above_apex_mm: float = 15.0
    below_base_mm: float = 25.0
    body_width_mm: float = 330.0
    body_depth_mm: float = 230.0
    #: Attenuation of opacified blood in the pulmonary trunk and arteries (HU).
    pulmonary_artery_hu: float = 350.0
    #: Aortic / left-heart attenuation as a fraction of the pulmonary arterial one (bolus timing).
    systemic_fraction: float = 0.7
    rv_lv_ratio: float = 0.9
    #: Image noise (SD, HU) in soft tissue for a 1 mm slice; thicker slices are quieter.
    noise_hu: float = 15.0
    kernel: str = "standard"
    #: Patient table height: the body centre's offset from the scanner isocentre (mm, +posterior).
    table_offset_mm: float = 0.0
    #: Craniocaudal position of the carina on the table (mm, patient z).
    carina_z_mm: float = -180.0
    #: Unsigned pixels with RescaleIntercept -1024 (most scanners) or signed with intercept 0.
    signed_pixels: bool = False
    #: InstanceNumber 1 at the top (head) of the scan, as many scanners number them.
    number_from_head: bool = False
    series_description: str = "CTA CHEST PE PROTOCOL"
    patient_id: str = "HELDOUT-0000"

    def __post_init__(self) -> None:
        if not isinstance(self.clots, tuple):
            object.__setattr__(self, "clots", tuple(self.clots))
        if not (16 <= self.rows <= 2048 and 16 <= self.columns <= 2048):
            raise HeldoutSpecError(f"rows and columns must be in [16, 2048], not {self.rows} x {self.columns}")
        checks = {
            "fov_mm": (100.0, 600.0),
            "slice_thickness_mm": (0.3, 10.0),
            "slice_spacing_mm": (0.2, 10.0),
            "body_width_mm": (150.0, 500.0),
            "body_depth_mm": (100.0, 400.0),
            "pulmonary_artery_hu": (-50.0, 1200.0),
            "systemic_fraction": (0.1, 1.5),
            "rv_lv_ratio": (0.5, 2.0),
            "noise_hu": (0.0, 200.0),
        }
        for name, (low, high) in checks.items():
            value = float(getattr(self, name))
            if not (math.isfinite(value) and low <= value <= high):
                raise HeldoutSpecError(f"{name} must be in [{low}, {high}], not {value}")
        if self.kernel not in KERNEL_SIGMA_MM:
            raise HeldoutSpecError(f"kernel must be one of {tuple(KERNEL_SIGMA_MM)}, not {self.kernel!r}")
        if self.body_width_mm > self.fov_mm:
            raise HeldoutSpecError(f"body_width_mm {self.body_width_mm} does not fit in fov_mm {self.fov_mm}")
        if self.above_apex_mm < -150 or self.below_base_mm < -150:
            raise HeldoutSpecError("above_apex_mm and below_base_mm must be at least -150 mm")

    @property
    def pe(self) -> bool:
        return bool(self.clots)

    @property
    def pixel_spacing_mm(self) -> float:
        """Square pixels: the field of view over the larger matrix side."""
        return self.fov_mm / max(self.rows, self.columns)


@dataclass(frozen=True)
class FamilyDraw:
    """Options of :func:`draw_spec` that an evaluation fixes for all its series."""

    rows: int = 512
    #: Draw the thickness from THICKNESSES_MM at or above this (small matrices: spare the disk).
    min_thickness_mm: float = 0.625
    #: Ranges of the random parameters.
    contrast_hu: tuple[float, float] = (150.0, 500.0)
    fov_mm: tuple[float, float] = (280.0, 420.0)
    rv_lv_ratio: tuple[float, float] = (0.7, 1.6)


def _draw_clots(rng: np.random.Generator) -> tuple[ClotSpec, ...]:
    """One PE scenario: the mix a CTPA service sees, from saddle emboli to a single segmental clot."""
    scenario = str(
        rng.choice(
            ["saddle", "trunk", "main", "lobar", "segmental", "bilateral", "chronic", "acute_on_chronic"],
            p=[0.1, 0.1, 0.15, 0.2, 0.15, 0.15, 0.07, 0.08],
        )
    )

    def acute(level: str, side: str | None = None, form: str | None = None) -> ClotSpec:
        chosen_form = form or str(rng.choice(["occlusive", "eccentric", "central"], p=[0.4, 0.35, 0.25]))
        if level in ("saddle", "trunk", "main") and chosen_form == "occlusive" and rng.random() < 0.6:
            chosen_form = "central"  # large arteries are seldom occluded whole
        return ClotSpec(
            level=level,
            form=chosen_form,
            side=side or str(rng.choice(SIDES)),
            branch=int(rng.integers(0, 6)),
            position=float(rng.uniform(0.3, 0.7)),
            length_mm=float(rng.uniform(12.0, 30.0) if level != "segmental" else rng.uniform(10.0, 18.0)),
            hu=float(rng.uniform(20.0, 70.0)),
            wall_angle=float(rng.uniform(0.0, 2.0 * math.pi)),
        )

    def chronic(level: str, side: str | None = None) -> ClotSpec:
        return ClotSpec(
            level=level,
            form="mural",
            side=side or str(rng.choice(SIDES)),
            branch=int(rng.integers(0, 6)),
            position=float(rng.uniform(0.3, 0.7)),
            length_mm=float(rng.uniform(20.0, 40.0)),
            hu=float(rng.uniform(60.0, 95.0)),
            chronic=True,
            calcified=bool(rng.random() < 0.4),
            wall_angle=float(rng.uniform(0.0, 2.0 * math.pi)),
        )

    if scenario == "bilateral":
        levels = ["main", "lobar", "segmental"]
        return (
            acute(str(rng.choice(levels)), "left"),
            acute(str(rng.choice(levels)), "right"),
            *((acute("segmental"),) if rng.random() < 0.5 else ()),
        )
    if scenario == "chronic":
        return (chronic(str(rng.choice(["main", "lobar"]))),)
    if scenario == "acute_on_chronic":
        return (acute(str(rng.choice(["main", "lobar", "segmental"]))), chronic(str(rng.choice(["main", "lobar"]))))
    return (acute(scenario),)


def draw_spec(seed: int, index: int, *, pe: bool, draw: FamilyDraw | None = None) -> HeldoutSpec:
    """The ``index``-th series of the family drawn from ``seed`` (same arguments -> same spec)."""
    options = draw or FamilyDraw()
    rng = np.random.default_rng([int(seed), int(index), 0x4E1D])
    body_width = float(rng.uniform(270.0, 380.0))
    fov = float(rng.uniform(*options.fov_mm))
    body_width = min(body_width, fov - 25.0)
    body_depth = body_width * float(rng.uniform(0.62, 0.8))
    thicknesses = [t for t in THICKNESSES_MM if t >= options.min_thickness_mm] or [THICKNESSES_MM[-1]]
    thickness = float(rng.choice(thicknesses))
    overlap = rng.random() < 0.3
    spacing = round(thickness * 0.8, 3) if overlap else thickness
    clots = _draw_clots(rng) if pe else ()
    return HeldoutSpec(
        seed=int(rng.integers(0, 2**31 - 1)),
        clots=clots,
        rows=options.rows,
        columns=options.rows,
        fov_mm=fov,
        slice_thickness_mm=thickness,
        slice_spacing_mm=spacing,
        above_apex_mm=float(rng.uniform(5.0, 30.0)),
        below_base_mm=float(rng.uniform(10.0, 40.0)),
        body_width_mm=body_width,
        body_depth_mm=body_depth,
        pulmonary_artery_hu=float(rng.uniform(*options.contrast_hu)),
        systemic_fraction=float(rng.uniform(0.45, 0.95)),
        rv_lv_ratio=float(rng.uniform(*options.rv_lv_ratio)),
        noise_hu=float(rng.uniform(10.0, 35.0)),
        kernel=str(rng.choice(list(KERNEL_SIGMA_MM))),
        table_offset_mm=float(rng.uniform(-30.0, 30.0)),
        carina_z_mm=float(rng.uniform(-400.0, 100.0)),
        signed_pixels=bool(rng.random() < 0.4),
        number_from_head=bool(rng.random() < 0.5),
        patient_id=f"HELDOUT-{int(seed) % 100000:05d}-{int(index):04d}",
    )
