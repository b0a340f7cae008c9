"""Content sanity of a CT series before the model sees it: refuse what no scanner makes, never guess.

A header can be valid DICOM and still describe something no CT scanner produces: a RescaleSlope of
0 (every pixel becomes the intercept), a huge slope or a flipped PixelRepresentation (values far
outside the Hounsfield scale), a PixelSpacing of 0, -1 or 50 mm (a field of view of metres, and a
resampled grid of tens of gigabytes), slices 100 mm apart in a 2.5 mm series (missing anatomy the
resampler would silently interpolate over). Each check here either names what is wrong in one line
(the image is then dropped and listed, or the series refused with a ``SeriesError`` subclass) or
passes; the model never turns such input into a confident flag.

Checks, in the order ``pe_model.volume.load_series`` applies them:
- per image, from the header: `rescale_problem`, `pixel_spacing_problem`;
- per series, before any pixel is decoded: `check_stack` (slice spacing, extent, gaps), `check_size`
  (the HU volume's bytes against ``SeriesLimits.max_volume_bytes``), `check_dropped` (how many images
  disagreed with the rest);
- per decoded slice: `slice_values_problem` (share of voxels outside the Hounsfield range);
- per series before resampling (``Predictor.predict``): `check_resampled_size`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pe_model.errors import (
    ImplausibleGeometryError,
    IncompleteSeriesError,
    InconsistentSeriesError,
    VolumeTooLargeError,
)

#: Hounsfield values a CT voxel can hold: air is -1000, the extended CT scale ends near 30,700;
#: padding outside the reconstruction circle may be as low as -32,768.
HU_FLOOR = -32768.0
HU_CEILING = 32767.0
#: Above this a voxel is metal at most: a body slice where many voxels exceed it is not in HU.
HIGH_HU = 4000.0


@dataclass(frozen=True)
class SeriesLimits:
    """What a CT series may look like and cost before it is refused. Defaults fit any clinical CT.

    ``max_volume_bytes``: the HU volume (D, H, W) in memory (int16 or float32), checked before it is
    allocated. ``max_resampled_voxels``: the isotropic grid the model resamples to (float32).
    ``max_gap_factor``: a step between neighbouring slices larger than this many median spacings is a
    gap (slices missing). ``max_dropped_fraction``: slices that disagree with the series (matrix size,
    pixel spacing, encoding, header or pixel values) may be dropped and listed up to this share of the
    images; more and the series is refused as inconsistent (images of another orientation, localizers
    and images received twice are listed but not counted: they are other images, not missing slices).
    """

    max_volume_bytes: int = 4 * 1024**3
    max_resampled_voxels: int = 400_000_000
    min_pixel_spacing_mm: float = 0.05
    max_pixel_spacing_mm: float = 20.0
    max_field_of_view_mm: float = 1000.0
    min_slice_spacing_mm: float = 0.05
    max_slice_spacing_mm: float = 20.0
    max_extent_mm: float = 2500.0
    max_gap_factor: float = 3.0
    max_dropped_fraction: float = 0.25
    min_rescale_slope: float = 1e-3
    max_rescale_slope: float = 100.0
    max_abs_rescale_intercept: float = 32768.0
    #: A slice is not in HU when more than this share of its voxels lies above HIGH_HU ...
    max_high_fraction: float = 0.05
    #: ... or more than this share outside [HU_FLOOR, HU_CEILING].
    max_outside_fraction: float = 0.01

    def __post_init__(self) -> None:
        for name in ("max_volume_bytes", "max_resampled_voxels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if not 0 < self.min_pixel_spacing_mm < self.max_pixel_spacing_mm:
            raise ValueError("pixel spacing limits must satisfy 0 < min < max")
        if not 0 < self.min_slice_spacing_mm < self.max_slice_spacing_mm:
            raise ValueError("slice spacing limits must satisfy 0 < min < max")
        if not 0 < self.min_rescale_slope < self.max_rescale_slope:
            raise ValueError("rescale slope limits must satisfy 0 < min < max")
        if self.max_gap_factor < 1:
            raise ValueError(f"max_gap_factor must be at least 1, not {self.max_gap_factor}")
        if not 0 <= self.max_dropped_fraction <= 1:
            raise ValueError(f"max_dropped_fraction must be within [0, 1], not {self.max_dropped_fraction}")


DEFAULT_LIMITS = SeriesLimits()


# ---------------------------------------------------------------------------------------------
# Per image, from the header


def rescale_problem(slope: float | None, intercept: float | None, limits: SeriesLimits = DEFAULT_LIMITS) -> str | None:
    """Why RescaleSlope/RescaleIntercept cannot map this image to HU, or None.

    ``None`` means the attribute is absent (slope 1, intercept 0 apply); NaN means present but not a
    number.
    """
    if slope is not None:
        if not math.isfinite(slope):
            return "RescaleSlope is not a number"
        if slope == 0:
            return "RescaleSlope is 0 (every pixel would be the intercept)"
        if slope < 0:
            return f"RescaleSlope {slope:g} is negative (CT values increase with density)"
        if not limits.min_rescale_slope <= slope <= limits.max_rescale_slope:
            return (
                f"RescaleSlope {slope:g} is outside the plausible range for CT "
                f"[{limits.min_rescale_slope:g}, {limits.max_rescale_slope:g}]"
            )
    if intercept is not None:
        if not math.isfinite(intercept):
            return "RescaleIntercept is not a number"
        if abs(intercept) > limits.max_abs_rescale_intercept:
            return f"RescaleIntercept {intercept:g} is outside the plausible range for CT"
    return None


def pixel_spacing_problem(
    spacing: tuple[float, float], rows: int, columns: int, limits: SeriesLimits = DEFAULT_LIMITS
) -> str | None:
    """Why a PixelSpacing (row, column spacing in mm) is not one a CT scanner produces, or None."""
    row_spacing, column_spacing = spacing
    for value in spacing:
        if not math.isfinite(value) or value <= 0:
            return f"PixelSpacing {row_spacing:g}\\{column_spacing:g} mm is not positive"
        if not limits.min_pixel_spacing_mm <= value <= limits.max_pixel_spacing_mm:
            return (
                f"PixelSpacing {row_spacing:g}\\{column_spacing:g} mm is outside the plausible range "
                f"[{limits.min_pixel_spacing_mm:g}, {limits.max_pixel_spacing_mm:g}] mm"
            )
    fov_rows, fov_columns = rows * row_spacing, columns * column_spacing
    if max(fov_rows, fov_columns) > limits.max_field_of_view_mm:
        return (
            f"field of view {fov_rows:.0f} x {fov_columns:.0f} mm (PixelSpacing x matrix) exceeds "
            f"{limits.max_field_of_view_mm:.0f} mm"
        )
    return None


# ---------------------------------------------------------------------------------------------
# Per series, before decoding


def check_stack(positions_mm: np.ndarray, limits: SeriesLimits = DEFAULT_LIMITS) -> None:
    """Slice positions (ascending, along the normal) must be spaced like a CT series: plausible median
    spacing, plausible extent, and no gap larger than ``max_gap_factor`` median spacings.

    Raises ImplausibleGeometryError or IncompleteSeriesError.
    """
    if positions_mm.shape[0] < 2:
        return
    steps = np.diff(positions_mm)
    median = float(np.median(steps))
    extent = float(positions_mm[-1] - positions_mm[0])
    if not math.isfinite(extent) or extent > limits.max_extent_mm:
        raise ImplausibleGeometryError(
            f"the slices span {extent:.0f} mm along the slice normal; more than {limits.max_extent_mm:.0f} mm "
            "is not one CT series (ImagePositionPatient is wrong)"
        )
    if not limits.min_slice_spacing_mm <= median <= limits.max_slice_spacing_mm:
        raise ImplausibleGeometryError(
            f"median slice spacing {median:.3g} mm is outside the plausible range "
            f"[{limits.min_slice_spacing_mm:g}, {limits.max_slice_spacing_mm:g}] mm"
        )
    worst = int(np.argmax(steps))
    if float(steps[worst]) > limits.max_gap_factor * median:
        gaps = int(np.count_nonzero(steps > limits.max_gap_factor * median))
        raise IncompleteSeriesError(
            f"gap of {float(steps[worst]):.1f} mm between the slices at {float(positions_mm[worst]):.1f} and "
            f"{float(positions_mm[worst + 1]):.1f} mm (median spacing {median:.2f} mm"
            + (f"; {gaps} gaps in all" if gaps > 1 else "")
            + "): slices are missing, the series is incomplete"
        )


def check_size(slices: int, rows: int, columns: int, itemsize: int, limits: SeriesLimits = DEFAULT_LIMITS) -> None:
    """Refuse a HU volume larger than ``limits.max_volume_bytes`` before it is allocated."""
    needed = slices * rows * columns * itemsize
    if needed > limits.max_volume_bytes:
        raise VolumeTooLargeError(
            f"the volume of {slices} x {rows} x {columns} voxels needs {needed / 1024**3:.1f} GiB; the limit is "
            f"{limits.max_volume_bytes / 1024**3:.1f} GiB"
        )


def check_resampled_size(
    extent_mm: float,
    rows: int,
    columns: int,
    pixel_spacing_mm: tuple[float, float],
    spacing_mm: float,
    limits: SeriesLimits = DEFAULT_LIMITS,
) -> None:
    """Refuse a series whose isotropic grid at ``spacing_mm`` would exceed ``limits.max_resampled_voxels``."""
    z = math.floor(extent_mm / spacing_mm + 1e-6) + 1
    y = max(1, round(rows * pixel_spacing_mm[0] / spacing_mm))
    x = max(1, round(columns * pixel_spacing_mm[1] / spacing_mm))
    if z * y * x > limits.max_resampled_voxels:
        raise VolumeTooLargeError(
            f"resampled to {spacing_mm:g} mm the series is {z} x {y} x {x} voxels, more than the limit of "
            f"{limits.max_resampled_voxels:,}"
        )


def check_dropped(candidates: int, dropped: int, limits: SeriesLimits = DEFAULT_LIMITS, *, detail: str = "") -> None:
    """Refuse a series where more than ``limits.max_dropped_fraction`` of the images were dropped for
    disagreeing with the rest (``detail`` names the reasons)."""
    if candidates <= 0 or dropped <= 0:
        return
    if dropped / candidates > limits.max_dropped_fraction:
        raise InconsistentSeriesError(
            f"{dropped} of {candidates} images disagree with the rest of the series"
            + (f" ({detail})" if detail else "")
            + f"; more than {limits.max_dropped_fraction:.0%} is not one consistent series"
        )


# ---------------------------------------------------------------------------------------------
# Per decoded slice


def slice_values_problem(hu: np.ndarray, limits: SeriesLimits = DEFAULT_LIMITS) -> str | None:
    """Why a decoded slice (H, W) is not in Hounsfield units, or None.

    A flipped PixelRepresentation turns air (-1000) into +64,536; a huge slope or intercept moves
    tissue far beyond bone and metal. Real CT holds at most a few voxels above HIGH_HU (metal).
    """
    if hu.size == 0:
        return "the slice has no pixels"
    values = hu if hu.dtype == np.int16 else np.asarray(hu)
    if values.dtype != np.int16:
        finite = np.isfinite(values)
        if not bool(finite.all()):
            return "pixel values are not finite after RescaleSlope/RescaleIntercept"
        outside = float(np.count_nonzero((values < HU_FLOOR) | (values > HU_CEILING))) / values.size
        if outside > limits.max_outside_fraction:
            return (
                f"{outside:.0%} of the voxels lie outside the Hounsfield range [{HU_FLOOR:.0f}, {HU_CEILING:.0f}] "
                "(RescaleSlope, RescaleIntercept or PixelRepresentation is wrong)"
            )
    high = float(np.count_nonzero(values > HIGH_HU)) / values.size
    if high > limits.max_high_fraction:
        return (
            f"{high:.0%} of the voxels lie above {HIGH_HU:.0f} HU, denser than bone "
            "(RescaleSlope, RescaleIntercept or PixelRepresentation is wrong)"
        )
    return None
