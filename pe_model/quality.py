"""Input-quality gate: is a CTPA good enough for the model's answer to be trusted?

A CTPA with a mistimed bolus is the commonest reason a PE is missed, and the model would still
answer it confidently. Before that answer is used, four things are measured on the volume itself
(never taken from the header alone, except the slice thickness):

- **pulmonary trunk attenuation** at the level of the bifurcation. The pulmonary arteries are found
  as the opacified structure between the lungs, in front of the spine, that spreads sideways into
  both hila (wider than deep, reaching both lungs), near the carina when the trachea is seen, above
  the left atrium otherwise. Its median HU is measured in the structure's patient-left third (the
  aorta and SVC lie to the right), away from its edge. When no such structure
  is found the gate says so: if nothing in the mediastinum reaches the threshold the series is
  non-diagnostic (no artery can be opacified enough); otherwise the contrast stays unverified.
- **lung coverage**: both lungs segmented in 3-D (air inside the body, large components); the apex
  or base is cut off when the first or last slice still holds a sizeable share of lung.
- **slice thickness and spacing** (SliceThickness, and the largest gap between slice positions).
- **image noise**: the mode of the local standard deviation over homogeneous soft tissue
  (Christianson et al., AJR 2015), and the trunk's contrast-to-noise ratio against thrombus at a
  3 mm reading thickness.

Thresholds and their sources are in docs/METHOD.md ("Input-quality gate"). The result is a frozen
:class:`QualityReport`: the measurements, pass/fail, and reasons such as
"pulmonary trunk 62 HU < 250 HU".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from pe_model.volume import Volume

#: HU below which a voxel is air (lungs, airways, outside the body).
_AIR_HU = -400.0
#: Smoothed HU from which a mediastinal voxel counts as opacified blood (unenhanced blood is 30-60).
_OPACIFIED_HU = 120.0
#: A lung component smaller than this (ml) is an airway or bowel gas, not a lung.
_MIN_LUNG_ML = 30.0
#: Coarse grid (mm) for the 3-D lung segmentation.
_LUNG_GRID_MM = 3.0
#: Grid (mm) of the mediastinal search, and the smoothing before thresholding.
_SEARCH_GRID_MM = 1.2
_SMOOTH_MM = 1.5
#: The pulmonary bifurcation: at least this wide (mm) and this much wider than deep.
_MIN_BIFURCATION_WIDTH_MM = 45.0
_MIN_WIDTH_TO_DEPTH = 1.15
#: The bifurcation reaches both lungs (its branches enter both hila) within this distance (mm).
_HILUM_REACH_MM = 10.0
#: Share of the bifurcation's width, from its patient-left end, where the attenuation is measured.
_LEFT_PART = 1.0 / 3.0
#: The trachea's centre lies within this distance (mm) of the midline between the lungs.
_TRACHEA_OFF_MIDLINE_MM = 20.0
#: Where the bifurcation is looked for relative to the carina when the trachea is seen (mm, + is up).
_CARINA_BAND_MM = (-45.0, 10.0)
#: Candidates for the bifurcation must be at least this fraction of the widest structure's width.
_NEAR_WIDEST = 0.75
#: Where to look for it, as fractions of the lungs' craniocaudal extent from the base.
_SEARCH_WINDOW = (0.25, 0.8)
#: Noise: window (mm) of the local SD map and the HU range of the soft tissue it is read in.
_NOISE_WINDOW_MM = 6.0
_NOISE_TISSUE_HU = (-150.0, 150.0)


@dataclass(frozen=True)
class QualityThresholds:
    """Limits of an adequate CTPA (sources in docs/METHOD.md)."""

    min_trunk_hu: float = 250.0
    max_slice_thickness_mm: float = 3.0
    max_slice_gap_mm: float = 3.0
    #: Share of the largest lung cross-section still present on the first/last slice that means
    #: the base/apex is cut off.
    max_end_lung_fraction: float = 0.1
    #: Contrast-to-noise ratio of the trunk against thrombus, noise scaled to the reading thickness.
    min_cnr: float = 5.0
    thrombus_hu: float = 50.0
    reading_thickness_mm: float = 3.0


@dataclass(frozen=True)
class QualityReport:
    """Measurements of one series and the verdict.

    ``passed`` is False when a measurement breaks a threshold (the series is non-diagnostic;
    ``reasons`` say which, with the value); ``unmeasured`` lists what could not be measured and why
    (then ``verified`` is False: the model's answer stands, but unconfirmed).
    """

    passed: bool
    reasons: tuple[str, ...]
    unmeasured: tuple[str, ...]
    pulmonary_trunk_hu: float | None
    #: LPS mm of the measured region's centre.
    pulmonary_trunk_position_patient: tuple[float, float, float] | None
    #: The brightest opacified mediastinal structure (median HU), or the highest smoothed HU there
    #: when nothing is opacified.
    brightest_mediastinal_hu: float | None
    lung_apex_covered: bool | None
    lung_base_covered: bool | None
    lung_extent_mm: float | None
    slice_thickness_mm: float | None
    max_slice_gap_mm: float | None
    noise_hu: float | None
    contrast_to_noise: float | None
    thresholds: QualityThresholds = field(default_factory=QualityThresholds)

    @property
    def verified(self) -> bool:
        return not self.unmeasured

    @property
    def status(self) -> str:
        """``non-diagnostic``, ``adequate`` or ``unverified`` (nothing failed, something unmeasured)."""
        if not self.passed:
            return "non-diagnostic"
        return "adequate" if self.verified else "unverified"

    @property
    def summary(self) -> str:
        """One line, e.g. "non-diagnostic: pulmonary trunk 62 HU < 250 HU"."""
        if not self.passed:
            return "non-diagnostic: " + "; ".join(self.reasons)
        if not self.verified:
            return "quality unverified: " + "; ".join(self.unmeasured)
        return "adequate"

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "passed": self.passed,
            "summary": self.summary,
            "reasons": list(self.reasons),
            "unmeasured": list(self.unmeasured),
            "pulmonary_trunk_hu": _round(self.pulmonary_trunk_hu, 1),
            "pulmonary_trunk_position_patient": (
                None if self.pulmonary_trunk_position_patient is None
                else [round(v, 2) for v in self.pulmonary_trunk_position_patient]
            ),
            "brightest_mediastinal_hu": _round(self.brightest_mediastinal_hu, 1),
            "lung_apex_covered": self.lung_apex_covered,
            "lung_base_covered": self.lung_base_covered,
            "lung_extent_mm": _round(self.lung_extent_mm, 1),
            "slice_thickness_mm": _round(self.slice_thickness_mm, 3),
            "max_slice_gap_mm": _round(self.max_slice_gap_mm, 3),
            "noise_hu": _round(self.noise_hu, 1),
            "contrast_to_noise": _round(self.contrast_to_noise, 2),
            "thresholds": asdict(self.thresholds),
        }

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> QualityReport:
        """Inverse of :meth:`to_json_dict` (a stored result read back)."""
        position = data.get("pulmonary_trunk_position_patient")
        return cls(
            passed=bool(data["passed"]),
            reasons=tuple(data.get("reasons", ())),
            unmeasured=tuple(data.get("unmeasured", ())),
            pulmonary_trunk_hu=data.get("pulmonary_trunk_hu"),
            pulmonary_trunk_position_patient=None if position is None else (
                float(position[0]), float(position[1]), float(position[2])),
            brightest_mediastinal_hu=data.get("brightest_mediastinal_hu"),
            lung_apex_covered=data.get("lung_apex_covered"),
            lung_base_covered=data.get("lung_base_covered"),
            lung_extent_mm=data.get("lung_extent_mm"),
            slice_thickness_mm=data.get("slice_thickness_mm"),
            max_slice_gap_mm=data.get("max_slice_gap_mm"),
            noise_hu=data.get("noise_hu"),
            contrast_to_noise=data.get("contrast_to_noise"),
            thresholds=QualityThresholds(**data.get("thresholds", {})),
        )


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


@dataclass(frozen=True)
class _Lungs:
    """Per-slice lung masks on the full grid's slices (coarse in-plane) and their areas (mm^2)."""

    masks: np.ndarray  # (D, h, w) bool on the coarse grid
    stride: int
    areas_mm2: np.ndarray  # (D,)


@dataclass(frozen=True)
class _Trunk:
    hu: float | None
    position: tuple[float, float, float] | None
    brightest_hu: float | None
    note: str


def assess_quality(volume: Volume, thresholds: QualityThresholds | None = None) -> QualityReport:
    """Measure ``volume`` against ``thresholds`` (default: :class:`QualityThresholds`)."""
    limits = thresholds or QualityThresholds()
    reasons: list[str] = []
    unmeasured: list[str] = []
    hu = volume.voxels
    depth = hu.shape[0]

    # Slice thickness and gaps.
    thickness = volume.slice_thickness_mm
    if thickness is None:
        unmeasured.append("slice thickness not given (SliceThickness missing)")
    elif thickness > limits.max_slice_thickness_mm + 1e-6:
        reasons.append(f"slice thickness {thickness:g} mm > {limits.max_slice_thickness_mm:g} mm")
    gap: float | None = None
    if depth >= 2:
        gap = float(np.max(np.abs(np.diff(volume.positions_mm))))
        if gap > limits.max_slice_gap_mm + 1e-6:
            reasons.append(f"slice spacing {gap:.2g} mm > {limits.max_slice_gap_mm:g} mm")

    axial = abs(float(volume.normal[2])) >= 0.9
    lungs = _segment_lungs(volume) if axial and depth >= 3 else None
    apex_covered: bool | None = None
    base_covered: bool | None = None
    extent: float | None = None
    trunk = _Trunk(None, None, None, "")
    if not axial:
        unmeasured.append("lung coverage and pulmonary trunk not measured: the slices are not axial")
    elif lungs is None:
        unmeasured.append("lungs not found: lung coverage and pulmonary trunk not measured")
    else:
        present = np.flatnonzero(lungs.areas_mm2 > 0)
        largest = float(lungs.areas_mm2.max())
        # Ascending positions along the normal: index 0 is inferior when the normal points to the head.
        first, last = float(lungs.areas_mm2[0]) / largest, float(lungs.areas_mm2[-1]) / largest
        inferior_fraction, superior_fraction = (first, last) if volume.normal[2] > 0 else (last, first)
        base_covered = inferior_fraction <= limits.max_end_lung_fraction
        apex_covered = superior_fraction <= limits.max_end_lung_fraction
        extent = float(abs(volume.positions_mm[present[-1]] - volume.positions_mm[present[0]]))
        if not apex_covered:
            reasons.append(f"lung apex not covered ({superior_fraction:.0%} of the largest lung section on the top slice)")
        if not base_covered:
            reasons.append(f"lung bases not covered ({inferior_fraction:.0%} of the largest lung section on the bottom slice)")
        trunk = _find_trunk(volume, lungs)

    if trunk.hu is not None:
        if trunk.hu < limits.min_trunk_hu:
            reasons.append(f"pulmonary trunk {trunk.hu:.0f} HU < {limits.min_trunk_hu:g} HU")
    elif lungs is not None and axial:
        if trunk.brightest_hu is not None and trunk.brightest_hu < limits.min_trunk_hu:
            reasons.append(f"{trunk.note}: brightest mediastinal structure {trunk.brightest_hu:.0f} HU "
                           f"< {limits.min_trunk_hu:g} HU")
        else:
            unmeasured.append(f"{trunk.note}: contrast not verified")

    noise = _noise(volume, lungs)
    cnr: float | None = None
    if noise is None:
        unmeasured.append("image noise not measured: too little homogeneous soft tissue")
    elif trunk.hu is not None:
        reading = noise * math.sqrt(min(1.0, (thickness or volume.mean_slice_spacing_mm) / limits.reading_thickness_mm))
        cnr = (trunk.hu - limits.thrombus_hu) / max(reading, 1e-6)
        if cnr < limits.min_cnr and trunk.hu >= limits.min_trunk_hu:
            reasons.append(f"contrast-to-noise {cnr:.1f} < {limits.min_cnr:g} (noise {noise:.0f} HU)")
    return QualityReport(
        passed=not reasons,
        reasons=tuple(reasons),
        unmeasured=tuple(unmeasured),
        pulmonary_trunk_hu=trunk.hu,
        pulmonary_trunk_position_patient=trunk.position,
        brightest_mediastinal_hu=trunk.brightest_hu,
        lung_apex_covered=apex_covered,
        lung_base_covered=base_covered,
        lung_extent_mm=extent,
        slice_thickness_mm=thickness,
        max_slice_gap_mm=gap,
        noise_hu=noise,
        contrast_to_noise=cnr,
        thresholds=limits,
    )


def _stride(volume: Volume, grid_mm: float) -> int:
    return max(1, int(round(grid_mm / max(min(volume.pixel_spacing_mm), 1e-3))))


def _segment_lungs(volume: Volume) -> _Lungs | None:
    """Air inside the body in 3-D on a coarse grid (block means, smoothed, then an opening); components of at
    least _MIN_LUNG_ML and a tenth of the largest are lung (outside air touches the image border
    and is dropped)."""
    stride = _stride(volume, _LUNG_GRID_MM)
    coarse = ndimage.gaussian_filter(_block_mean(volume.voxels, stride), (0.0, 0.7, 0.7), mode="nearest")
    # An opening cuts the thin bridges that noise or motion ghosts open through the chest wall.
    air = ndimage.binary_opening(coarse < _AIR_HU, structure=ndimage.generate_binary_structure(3, 1))
    labels, count = ndimage.label(air)
    if count == 0:
        return None
    border = np.unique(np.concatenate([
        labels[:, 0, :].ravel(), labels[:, -1, :].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]))
    sizes = np.bincount(labels.ravel(), minlength=count + 1).astype(np.float64)
    sizes[0] = 0.0
    sizes[border] = 0.0
    row_mm, col_mm = volume.pixel_spacing_mm
    voxel_ml = row_mm * stride * col_mm * stride * max(volume.mean_slice_spacing_mm, 1e-3) / 1000.0
    largest = float(sizes.max())
    if largest * voxel_ml < _MIN_LUNG_ML:
        return None
    keep = np.flatnonzero((sizes >= 0.1 * largest) & (sizes * voxel_ml >= _MIN_LUNG_ML))
    masks = np.isin(labels, keep)
    areas = masks.reshape(masks.shape[0], -1).sum(axis=1) * (row_mm * stride * col_mm * stride)
    return _Lungs(masks=masks, stride=stride, areas_mm2=areas.astype(np.float64))


def _block_mean(voxels: np.ndarray, stride: int) -> np.ndarray:
    """In-plane block means (D, H // stride, W // stride) float32, 16 slices at a time (bounded
    memory): a coarse grid that also averages noise away."""
    d, h, w = voxels.shape
    if stride == 1 or h < stride or w < stride:
        return voxels[:, ::stride, ::stride].astype(np.float32)
    h2, w2 = h // stride, w // stride
    out = np.empty((d, h2, w2), dtype=np.float32)
    for start in range(0, d, 16):
        block = voxels[start : start + 16, : h2 * stride, : w2 * stride].astype(np.float32)
        out[start : start + 16] = block.reshape(block.shape[0], h2, stride, w2, stride).mean(axis=(2, 4))
    return out


def _find_trunk(volume: Volume, lungs: _Lungs) -> _Trunk:
    """The pulmonary arteries at the bifurcation (see the module docstring) and their median HU."""
    present = np.flatnonzero(lungs.areas_mm2 > 0)
    positions = volume.positions_mm
    z_lo, z_hi = sorted((float(positions[present[0]]), float(positions[present[-1]])))
    # "Up" along the slice index: the base is at the low positions when the normal points headwards.
    length = z_hi - z_lo
    if volume.normal[2] > 0:
        window = (z_lo + _SEARCH_WINDOW[0] * length, z_lo + _SEARCH_WINDOW[1] * length)
    else:
        window = (z_hi - _SEARCH_WINDOW[1] * length, z_hi - _SEARCH_WINDOW[0] * length)
    candidates = [k for k in range(len(positions)) if window[0] <= positions[k] <= window[1]]
    step = max(1, int(round(2.0 / max(volume.mean_slice_spacing_mm, 1e-3))))
    stride = _stride(volume, _SEARCH_GRID_MM)
    row_mm, col_mm = volume.pixel_spacing_mm[0] * stride, volume.pixel_spacing_mm[1] * stride
    # Which way is anterior on the image rows: the column direction's y (LPS: +y is posterior).
    rows_posterior = float(volume.orientation[4]) >= 0.0
    sigma = (_SMOOTH_MM / row_mm, _SMOOTH_MM / col_mm)

    wide: list[tuple[float, int, np.ndarray, np.ndarray]] = []  # (width, slice, mask, image)
    trachea: list[int] = []  # slices with the trachea (one air column at the midline between the lungs)
    brightest_vessel: float | None = None
    brightest_any: float | None = None
    for k in candidates[::step]:
        image = volume.voxels[k, ::stride, ::stride].astype(np.float32)
        lung = _lung_on_grid(lungs, k, image.shape, stride)
        mediastinum = _mediastinum(lung, rows_posterior)
        if not mediastinum.any():
            continue
        midline = float(np.nonzero(lung)[1].mean())
        smooth = ndimage.gaussian_filter(image, sigma, mode="nearest")
        if _has_trachea(_mediastinum(lung, rows_posterior, anterior_only=False) & (smooth < -500.0), midline,
                        (row_mm, col_mm)):
            trachea.append(k)
        # Distance (mm) from each pixel to the right and to the left lung: the pulmonary arteries
        # run from the trunk into both hila; the aorta and the SVC do not reach the left lung.
        columns = np.arange(lung.shape[1])[None, :]
        to_lung = [
            ndimage.distance_transform_edt(~(lung & side), sampling=(row_mm, col_mm))
            for side in (columns < midline, columns > midline)
        ]
        top = float(np.percentile(smooth[mediastinum], 99.5))
        brightest_any = top if brightest_any is None else max(brightest_any, top)
        labels, count = ndimage.label(mediastinum & (smooth >= _OPACIFIED_HU))
        if count == 0:
            continue
        min_area = math.pi * 6.0**2 / (row_mm * col_mm)
        for index, region in enumerate(ndimage.find_objects(labels), start=1):
            if region is None:
                continue
            mask = labels[region] == index
            if mask.sum() < min_area:
                continue
            core = ndimage.binary_erosion(mask, iterations=max(1, int(round(1.5 / min(row_mm, col_mm)))))
            values = image[region][core if core.sum() >= 8 else mask]
            median = float(np.median(values))
            brightest_vessel = median if brightest_vessel is None else max(brightest_vessel, median)
            cols = np.flatnonzero(mask.any(axis=0))
            rows = np.flatnonzero(mask.any(axis=1))
            width = (cols[-1] - cols[0] + 1) * col_mm
            deep = (rows[-1] - rows[0] + 1) * row_mm
            reaches = all(float(d[region][mask].min()) <= _HILUM_REACH_MM for d in to_lung)
            if width >= _MIN_BIFURCATION_WIDTH_MM and width >= _MIN_WIDTH_TO_DEPTH * deep and reaches:
                full = np.zeros(image.shape, dtype=bool)
                full[region] = core if core.sum() >= 8 else mask
                wide.append((width, k, full, image))
    best: tuple[float, int, np.ndarray, np.ndarray] | None = None
    headwards = 1.0 if volume.normal[2] > 0 else -1.0
    carina = _carina(trachea, positions, headwards, 2.5 * step * volume.mean_slice_spacing_mm)
    if carina is not None:
        # With a trachea in view: the bifurcation lies at or a little below the carina (the aortic
        # arch above it, the left atrium further below); take the widest structure there.
        near = [w for w in wide if _CARINA_BAND_MM[0] <= headwards * (float(positions[w[1]]) - carina) <= _CARINA_BAND_MM[1]]
        if near:
            best = max(near, key=lambda w: w[0])
    if best is None and wide:
        # No trachea (or nothing wide near it): the left atrium with its veins and a dilated right
        # ventricle are about as wide, but lie below the bifurcation; the ascending aorta beside the
        # SVC lies above it but is narrower. Of the structures at least _NEAR_WIDEST as wide as the
        # widest, take the most superior run of slices, and in it the slice where it is widest.
        widest = max(w[0] for w in wide)
        wide = [w for w in wide if w[0] >= _NEAR_WIDEST * widest]
        order = sorted({w[1] for w in wide}, key=lambda k: -headwards * float(positions[k]))
        run = [order[0]]
        for k in order[1:]:
            if abs(float(positions[k]) - float(positions[run[-1]])) > 2.5 * step * volume.mean_slice_spacing_mm:
                break
            run.append(k)
        best = max((w for w in wide if w[1] in run), key=lambda w: w[0])
    if best is None:
        note = "pulmonary trunk not found" if brightest_vessel is not None else "no opacified vessel in the mediastinum"
        return _Trunk(None, None, brightest_vessel if brightest_vessel is not None else brightest_any, note)
    _, k, mask, image = best
    # The ascending aorta and the SVC lie to the right of the trunk and may touch it: measure the
    # patient-left part of the structure (the left pulmonary artery and the trunk's left side).
    rows_idx, cols_idx = np.nonzero(mask)
    span = float(cols_idx.max() - cols_idx.min())
    columns = np.arange(mask.shape[1])[None, :]
    if float(volume.orientation[0]) >= 0.0:  # columns run towards the patient's left
        part = mask & (columns >= cols_idx.max() - _LEFT_PART * span)
    else:
        part = mask & (columns <= cols_idx.min() + _LEFT_PART * span)
    if part.sum() >= 8:
        mask = part
    rows_idx, cols_idx = np.nonzero(mask)
    centre = volume.patient_position(float(k), float(rows_idx.mean() * stride), float(cols_idx.mean() * stride))
    return _Trunk(
        hu=float(np.median(image[mask])),
        position=(float(centre[0]), float(centre[1]), float(centre[2])),
        brightest_hu=brightest_vessel,
        note="",
    )


def _has_trachea(air: np.ndarray, midline: float, pixel_mm: tuple[float, float]) -> bool:
    """An air column between the lungs at the midline: at least 5 mm in radius, centred within
    _TRACHEA_OFF_MIDLINE_MM of it (the main bronchi below the carina lie further out)."""
    labels, count = ndimage.label(air)
    if count == 0:
        return False
    min_area = math.pi * 5.0**2 / (pixel_mm[0] * pixel_mm[1])
    for index in range(1, count + 1):
        rows, cols = np.nonzero(labels == index)
        if rows.size >= min_area and abs(float(cols.mean()) - midline) * pixel_mm[1] <= _TRACHEA_OFF_MIDLINE_MM:
            return True
    return False


def _carina(trachea: list[int], positions: np.ndarray, headwards: float, gap_mm: float) -> float | None:
    """z (mm) of the lowest slice of the uppermost run of slices that show the trachea, or None."""
    if not trachea:
        return None
    ordered = sorted(trachea, key=lambda k: -headwards * float(positions[k]))
    lowest = ordered[0]
    for k in ordered[1:]:
        if abs(float(positions[k]) - float(positions[lowest])) > gap_mm:
            break
        lowest = k
    return float(positions[lowest])


def _lung_on_grid(lungs: _Lungs, k: int, shape: tuple[int, ...], stride: int) -> np.ndarray:
    """The slice's coarse lung mask on the search grid (nearest neighbour), small parts removed."""
    coarse = lungs.masks[k]
    factor = lungs.stride / stride
    rows = np.minimum((np.arange(shape[0]) / factor).astype(int), coarse.shape[0] - 1)
    cols = np.minimum((np.arange(shape[1]) / factor).astype(int), coarse.shape[1] - 1)
    lung = coarse[np.ix_(rows, cols)]
    labels, count = ndimage.label(lung)
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        lung = np.isin(labels, np.flatnonzero(sizes >= 0.05 * sizes.sum()))
    return np.asarray(lung, dtype=bool)


def _mediastinum(lung: np.ndarray, rows_posterior: bool, *, anterior_only: bool = True) -> np.ndarray:
    """Pixels between the two lungs on each row, with ``anterior_only`` only in front of the lungs'
    antero-posterior middle (plus a tenth of their depth): where the great vessels are, not the spine."""
    out = np.zeros(lung.shape, dtype=bool)
    rows = np.flatnonzero(lung.any(axis=1))
    if rows.size == 0:
        return out
    cols = np.nonzero(lung)[1]
    midline = float(cols.mean())
    middle = 0.5 * (rows[0] + rows[-1])
    depth = rows[-1] - rows[0]
    limit = middle + 0.1 * depth if rows_posterior else middle - 0.1 * depth
    for r in rows:
        if anterior_only and ((r > limit) if rows_posterior else (r < limit)):
            continue
        line = np.flatnonzero(lung[r])
        right = line[line < midline]
        left = line[line > midline]
        if right.size and left.size and left[0] - right[-1] > 2:
            out[r, right[-1] + 1 : left[0]] = True
    return out


def _noise(volume: Volume, lungs: _Lungs | None) -> float | None:
    """Mode of the local SD (window _NOISE_WINDOW_MM) over homogeneous soft tissue, on up to 7 slices
    (Christianson et al., AJR 2015: the global noise level)."""
    depth = volume.voxels.shape[0]
    if lungs is not None:
        present = np.flatnonzero(lungs.areas_mm2 > 0)
        picks = np.linspace(present[0], present[-1], num=min(7, present.size)).round().astype(int)
    else:
        picks = np.linspace(0, depth - 1, num=min(7, depth)).round().astype(int)
    stride = 1 if min(volume.pixel_spacing_mm) >= 0.5 else 2
    pixel = min(volume.pixel_spacing_mm) * stride
    size = max(3, int(round(_NOISE_WINDOW_MM / pixel)) | 1)
    sds: list[np.ndarray] = []
    for k in np.unique(picks):
        image = volume.voxels[int(k), ::stride, ::stride].astype(np.float64)
        mean = ndimage.uniform_filter(image, size, mode="nearest")
        mean_sq = ndimage.uniform_filter(image * image, size, mode="nearest")
        sd = np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))
        low = ndimage.minimum_filter(image, size, mode="nearest")
        high = ndimage.maximum_filter(image, size, mode="nearest")
        tissue = (mean >= _NOISE_TISSUE_HU[0]) & (mean <= _NOISE_TISSUE_HU[1]) & (low > -400.0) & (high < 400.0)
        sds.append(sd[tissue])
    values = np.concatenate(sds) if sds else np.empty(0)
    if values.size < 200:
        return None
    upper = float(np.percentile(values, 99))
    if upper <= 0.0:
        return 0.0
    histogram, edges = np.histogram(values, bins=max(10, int(math.ceil(upper))), range=(0.0, upper))
    smooth = ndimage.uniform_filter1d(histogram.astype(np.float64), 3)
    peak = int(np.argmax(smooth))
    return float(0.5 * (edges[peak] + edges[peak + 1]))
