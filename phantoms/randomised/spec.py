"""What a second-generation (domain-randomised) CTPA phantom looks like, and how one is drawn at random.

A ``RandomisedSpec`` fixes the acquisition (field of view, matrix, slice thickness and spacing,
kernel, noise, artefacts) and the patient-level facts the labels depend on (PE or not, the clots'
kinds and sides, RV/LV ratio, contrast). Everything else (body shape, arterial tree, clot shapes
and positions, textures, intensities) is drawn by the renderer from ``seed``, so a spec and its
seed reproduce the series exactly. ``draw_spec`` samples specs over the ranges of
``ACQUISITION_RANGES`` (the ranges a CTPA protocol uses) or over narrower or wider ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Final

import numpy as np

from pe_model.errors import PEModelError

#: Clot kinds the generator draws; each one sits at a level of the arterial tree.
CLOT_KINDS: Final[tuple[str, ...]] = ("saddle", "central", "main", "lobar", "segmental")
#: How a clot fills its artery.
CLOT_FORMS: Final[tuple[str, ...]] = ("occlusive", "eccentric", "floating", "mural")
#: Sides a clot can be on (a saddle clot is on all three).
SIDES: Final[tuple[str, ...]] = ("central", "left", "right")
KERNELS: Final[tuple[str, ...]] = ("soft", "standard", "sharp")


class RandomisedPhantomError(PEModelError, ValueError):
    """A randomised phantom that cannot be made as asked."""


@dataclass(frozen=True)
class ClotSpec:
    """One embolus to place: its level in the tree, its side, how it fills the lumen, and whether chronic.

    ``side`` is ignored for ``saddle`` (astride the bifurcation: central, left and right) and
    ``central`` (the pulmonary trunk: central). A chronic clot is mural (a smooth crescent against
    the wall), calcified when ``calcified``.
    """

    kind: str
    side: str = "right"
    form: str = "eccentric"
    chronic: bool = False
    calcified: bool = False

    def __post_init__(self) -> None:
        if self.kind not in CLOT_KINDS:
            raise RandomisedPhantomError(f"clot kind must be one of {', '.join(CLOT_KINDS)}, not {self.kind!r}")
        if self.form not in CLOT_FORMS:
            raise RandomisedPhantomError(f"clot form must be one of {', '.join(CLOT_FORMS)}, not {self.form!r}")
        if self.kind in ("main", "lobar", "segmental") and self.side not in ("left", "right"):
            raise RandomisedPhantomError(f"a {self.kind} clot is on the left or the right, not {self.side!r}")
        if self.calcified and not self.chronic:
            raise RandomisedPhantomError("only a chronic clot is calcified")
        if self.chronic and self.form != "mural":
            object.__setattr__(self, "form", "mural")

    @property
    def sides(self) -> tuple[str, ...]:
        """The RSNA location labels this clot sets."""
        if self.kind == "saddle":
            return SIDES
        if self.kind == "central":
            return ("central",)
        return (self.side,)


@dataclass(frozen=True)
class AcquisitionRanges:
    """Closed ranges ``(low, high)`` an acquisition is drawn from."""

    fov_mm: tuple[float, float] = (280.0, 420.0)
    pixel_spacing_mm: tuple[float, float] = (0.5, 1.0)
    slice_thickness_mm: tuple[float, float] = (0.625, 3.0)
    n_slices: tuple[int, int] = (100, 700)
    noise_hu: tuple[float, float] = (4.0, 40.0)
    artery_hu: tuple[float, float] = (150.0, 500.0)
    rv_lv_ratio: tuple[float, float] = (0.7, 1.6)


#: The ranges of a CTPA protocol (what ``draw_spec`` uses by default).
ACQUISITION_RANGES: Final[AcquisitionRanges] = AcquisitionRanges()
#: Clot attenuation range (HU); chronic clots sit in the upper half.
CLOT_HU: Final[tuple[float, float]] = (20.0, 90.0)


@dataclass(frozen=True)
class RandomisedSpec:
    """One randomised CTPA series. ``rows``/``columns`` follow from FOV / pixel spacing.

    ``slice_spacing_mm`` may be smaller than the thickness (overlapping reconstruction).
    ``supersample``: in-plane sub-pixels per pixel side (partial volume); ``z_samples`` planes per
    slice thickness are averaged in any case. ``motion`` / ``streaks``: artefact strength 0-1.
    """

    pe: bool = True
    clots: tuple[ClotSpec, ...] = (ClotSpec("central", form="floating"),)
    rv_lv_ratio: float = 0.9
    artery_hu: float = 320.0
    fov_mm: float = 360.0
    pixel_spacing_mm: float = 0.7
    slice_thickness_mm: float = 2.5
    slice_spacing_mm: float = 2.5
    n_slices: int = 120
    noise_hu: float = 15.0
    kernel: str = "standard"
    supersample: int = 1
    motion: float = 0.0
    streaks: float = 0.0
    arms_up: bool = True
    table: bool = True
    seed: int = 0
    patient_id: str = "RANDOMISED-0001"
    patient_name: str = "PHANTOM^RANDOMISED"
    series_description: str = "CTPA"
    #: Free-form tag of the draw (e.g. "train"), written nowhere but kept for bookkeeping.
    tags: Mapping[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.clots, tuple):
            object.__setattr__(self, "clots", tuple(self.clots))
        if self.pe and not self.clots:
            raise RandomisedPhantomError("a PE phantom needs at least one clot")
        if not self.pe and self.clots:
            object.__setattr__(self, "clots", ())
        checks: dict[str, tuple[float, float]] = {
            "rv_lv_ratio": (0.3, 3.0),
            "artery_hu": (20.0, 1500.0),
            "fov_mm": (50.0, 700.0),
            "pixel_spacing_mm": (0.2, 5.0),
            "slice_thickness_mm": (0.3, 10.0),
            "slice_spacing_mm": (0.3, 10.0),
            "noise_hu": (0.0, 300.0),
            "motion": (0.0, 1.0),
            "streaks": (0.0, 1.0),
        }
        for name, (low, high) in checks.items():
            value = float(getattr(self, name))
            if not (math.isfinite(value) and low <= value <= high):
                raise RandomisedPhantomError(f"{name} must lie in [{low:g}, {high:g}], not {value}")
        if not 1 <= self.n_slices <= 2000:
            raise RandomisedPhantomError(f"n_slices must lie in [1, 2000], not {self.n_slices}")
        if self.kernel not in KERNELS:
            raise RandomisedPhantomError(f"kernel must be one of {', '.join(KERNELS)}, not {self.kernel!r}")
        if not 1 <= self.supersample <= 4:
            raise RandomisedPhantomError(f"supersample must lie in [1, 4], not {self.supersample}")
        if not 16 <= self.rows <= 2048:
            raise RandomisedPhantomError(
                f"the matrix (FOV / pixel spacing) must be 16 to 2048 pixels, not {self.rows}")

    @property
    def rows(self) -> int:
        return int(round(self.fov_mm / self.pixel_spacing_mm))

    @property
    def columns(self) -> int:
        return self.rows

    @property
    def has_pe(self) -> bool:
        return self.pe

    @property
    def locations(self) -> tuple[str, ...]:
        """Sorted RSNA location labels of the clots (empty without PE)."""
        return tuple(sorted({side for clot in self.clots for side in clot.sides}))

    @property
    def chronic(self) -> bool:
        """Every clot chronic (RSNA ``chronic_pe``)."""
        return self.pe and all(c.chronic for c in self.clots)

    @property
    def acute_and_chronic(self) -> bool:
        """Acute and chronic clots together (RSNA ``acute_and_chronic_pe``)."""
        return self.pe and any(c.chronic for c in self.clots) and not all(c.chronic for c in self.clots)

    @property
    def indeterminate(self) -> bool:
        return False

    @property
    def contrast(self) -> bool:
        return True

    @property
    def scan_length_mm(self) -> float:
        return (self.n_slices - 1) * self.slice_spacing_mm + self.slice_thickness_mm


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def draw_clots(rng: np.random.Generator) -> tuple[ClotSpec, ...]:
    """1-5 clots over every kind, form and side; about 15% of PE exams chronic, 15% acute on chronic."""
    pattern = rng.random()
    sides_wanted: tuple[str, ...]
    if pattern < 0.35:
        sides_wanted = ("left", "right")
    elif pattern < 0.65:
        sides_wanted = ("right",)
    else:
        sides_wanted = ("left",)
    chronicity = rng.random()
    clots: list[ClotSpec] = []
    first = rng.random()
    if first < 0.12:
        clots.append(ClotSpec("saddle", form=str(rng.choice(["floating", "eccentric", "occlusive"]))))
    elif first < 0.27:
        clots.append(ClotSpec("central", form=str(rng.choice(["floating", "eccentric"]))))
    for side in sides_wanted:
        for _ in range(int(rng.integers(1, 3))):
            kind = str(rng.choice(["main", "lobar", "lobar", "segmental", "segmental"]))
            form = str(rng.choice(["occlusive", "eccentric", "floating"] if kind != "main"
                                  else ["eccentric", "floating", "occlusive"]))
            clots.append(ClotSpec(kind, side=side, form=form))
    if chronicity < 0.15:
        clots = [ClotSpec(c.kind if c.kind not in ("saddle",) else "central", side=c.side, form="mural",
                          chronic=True, calcified=bool(rng.random() < 0.4)) for c in clots]
    elif chronicity < 0.30:
        side = str(rng.choice(sides_wanted))
        clots.append(ClotSpec(str(rng.choice(["main", "lobar"])), side=side, form="mural", chronic=True,
                              calcified=bool(rng.random() < 0.4)))
    return tuple(clots[:5])


def draw_spec(rng: np.random.Generator, *, ranges: AcquisitionRanges = ACQUISITION_RANGES,
              pe_fraction: float = 0.5, coverage_mm: tuple[float, float] = (300.0, 360.0),
              **overrides: object) -> RandomisedSpec:
    """A random spec over ``ranges``: about ``pe_fraction`` PE, every clot kind and side, both RV/LV
    calls, every kernel, arms up or down, artefacts in some. ``coverage_mm`` is the scan length
    aimed at (apex to base plus margins), clipped to what ``ranges.n_slices`` allows.
    ``overrides`` replace any field afterwards (the spec is validated again).
    """
    pe = bool(rng.random() < pe_fraction)
    thickness = _uniform(rng, ranges.slice_thickness_mm)
    spacing = thickness * float(rng.choice([1.0, 1.0, 0.8]))
    coverage = _uniform(rng, coverage_mm)
    low, high = ranges.n_slices
    n_slices = int(np.clip(round(coverage / spacing), low, high))
    fov = _uniform(rng, ranges.fov_mm)
    pixel = _uniform(rng, ranges.pixel_spacing_mm)
    kernel = str(rng.choice(KERNELS))
    noise = _uniform(rng, ranges.noise_hu) * (1.3 if kernel == "sharp" else 1.0)
    values: dict[str, object] = {
        "pe": pe,
        "clots": draw_clots(rng) if pe else (),
        "rv_lv_ratio": round(_uniform(rng, ranges.rv_lv_ratio), 3),
        "artery_hu": round(_uniform(rng, ranges.artery_hu), 1),
        "fov_mm": round(fov, 1),
        "pixel_spacing_mm": round(pixel, 4),
        "slice_thickness_mm": round(thickness, 3),
        "slice_spacing_mm": round(spacing, 3),
        "n_slices": n_slices,
        "noise_hu": round(min(noise, ranges.noise_hu[1] * 1.3), 2),
        "kernel": kernel,
        "supersample": int(rng.choice([1, 2])),
        "motion": round(float(rng.uniform(0.3, 1.0)) if rng.random() < 0.25 else 0.0, 3),
        "streaks": round(float(rng.uniform(0.2, 1.0)) if rng.random() < 0.4 else 0.0, 3),
        "arms_up": bool(rng.random() < 0.7),
        "table": bool(rng.random() < 0.85),
        "seed": int(rng.integers(0, 2**31 - 1)),
        "patient_id": f"RND-{int(rng.integers(0, 10**8)):08d}",
    }
    values.update(overrides)
    known = {f.name for f in fields(RandomisedSpec)}
    unknown = set(values) - known
    if unknown:
        raise RandomisedPhantomError(f"unknown spec fields: {', '.join(sorted(unknown))}")
    return replace(RandomisedSpec(pe=True), **values)  # type: ignore[arg-type]
