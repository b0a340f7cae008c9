"""Build a HU volume with its geometry from the DICOM images of one CT series.

Slices are ordered along the slice normal computed from ImageOrientationPatient (never by
InstanceNumber, never by z alone), so descending, shuffled, gapped and tilted acquisitions all
land at their real positions. Classic single-frame CT and Enhanced CT (functional groups) are
read; pixel data of every transfer syntax a PACS sends is decoded by pydicom with its pylibjpeg
and gdcm plugins. Images that cannot be part of the volume (localizers, other orientations,
other sizes, duplicate positions, implausible header values or pixel values) are dropped and listed
in ``Volume.skipped`` with the reason; a series that is not plausible CT as a whole (a gap of missing
slices, a PixelSpacing of metres, values that are not HU, too many disagreeing images, more voxels than
the memory cap) is refused with the reason (``pe_model.validation``) before its pixels are decoded
where the header suffices.
"""

from __future__ import annotations

import copy
import struct
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.pixels
import structlog
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.pixels.utils import _get_jpg_parameters
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from pe_model.errors import (
    ImplausibleGeometryError,
    ImplausiblePixelValuesError,
    InconsistentOrientationError,
    InconsistentSeriesError,
    MissingGeometryError,
    MixedSeriesError,
    NoImagesError,
    NotCTError,
    SeriesError,
    TooFewSlicesError,
    UnreadablePixelsError,
)
from pe_model.validation import (
    DEFAULT_LIMITS,
    SeriesLimits,
    check_dropped,
    check_size,
    check_stack,
    pixel_spacing_problem,
    rescale_problem,
    slice_values_problem,
)

log = structlog.get_logger(__name__)

DICOMDIR_SOP_CLASS_UID = "1.2.840.10008.1.3.10"
#: Two images share an orientation when their row and column directions differ by less than this.
ORIENTATION_TOLERANCE_DEG = 1.0
#: Two slices closer than this along the normal are duplicates of one position.
DUPLICATE_POSITION_TOLERANCE_MM = 0.01
#: Pixel spacings that differ by less than this are the same.
PIXEL_SPACING_TOLERANCE_MM = 1e-3

Source = str | Path | Sequence[str | Path] | Sequence[Dataset]


@dataclass(frozen=True, eq=False)
class Volume:
    """A HU volume of one series, slices ascending along the slice normal.

    ``voxels`` has shape (D, H, W): slice k lies at ``positions_mm[k]`` along ``normal`` and was
    read from ``sop_instance_uids[k]`` (frame ``frame_numbers[k]`` of a multi-frame image). Values are
    HU: int16 when every HU is an integer that fits (integral RescaleSlope and RescaleIntercept), else
    float32; consumers convert what they use to float32 (exact for int16).
    """

    voxels: np.ndarray
    positions_mm: np.ndarray
    image_positions: np.ndarray
    orientation: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    sop_instance_uids: tuple[str, ...]
    frame_numbers: tuple[int | None, ...]
    study_instance_uid: str
    series_instance_uid: str
    slice_thickness_mm: float | None
    skipped: tuple[tuple[str, str], ...]

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal, cross(row direction, column direction), shape (3,)."""
        row = np.asarray(self.orientation[:3], dtype=np.float64)
        col = np.asarray(self.orientation[3:], dtype=np.float64)
        n = np.cross(row, col)
        return n / np.linalg.norm(n)

    @property
    def shape(self) -> tuple[int, int, int]:
        d, h, w = self.voxels.shape
        return int(d), int(h), int(w)

    def patient_position(self, slice_index: float, row: float, column: float) -> np.ndarray:
        """Patient coordinates (3,) in LPS mm of a voxel; indices may be fractional.

        A fractional slice index interpolates linearly between the ImagePositionPatient of the two
        neighbouring slices (extrapolates beyond the ends), so uneven spacing and tilt are honoured.
        """
        d = self.image_positions.shape[0]
        if d == 1:
            origin = self.image_positions[0] + (slice_index * self.mean_slice_spacing_mm) * self.normal
        else:
            k0 = int(np.clip(np.floor(slice_index), 0, d - 2))
            t = float(slice_index) - k0
            origin = (1.0 - t) * self.image_positions[k0] + t * self.image_positions[k0 + 1]
        row_dir = np.asarray(self.orientation[:3], dtype=np.float64)
        col_dir = np.asarray(self.orientation[3:], dtype=np.float64)
        row_spacing, column_spacing = self.pixel_spacing_mm
        return np.asarray(
            origin + column * column_spacing * row_dir + row * row_spacing * col_dir, dtype=np.float64
        )

    @property
    def mean_slice_spacing_mm(self) -> float:
        """Mean distance between consecutive slices along the normal (slice thickness if one slice)."""
        if self.positions_mm.shape[0] < 2:
            return float(self.slice_thickness_mm or 1.0)
        return float((self.positions_mm[-1] - self.positions_mm[0]) / (self.positions_mm.shape[0] - 1))


@dataclass(frozen=True)
class _Image:
    """Header facts of one frame: enough to decide whether and where it enters the volume."""

    source_index: int
    sop_instance_uid: str
    frame_number: int | None
    rows: int
    columns: int
    orientation: np.ndarray | None
    position: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    #: As in the header: None when absent (1 and 0 apply), NaN when present but not a number.
    rescale_slope: float | None
    rescale_intercept: float | None
    is_localizer: bool
    order_key: tuple[int, int, int]
    #: (BitsAllocated, PixelRepresentation): how stored values are read.
    encoding: tuple[int, int] = (16, 0)

    @property
    def slope(self) -> float:
        return 1.0 if self.rescale_slope is None else self.rescale_slope

    @property
    def intercept(self) -> float:
        return 0.0 if self.rescale_intercept is None else self.rescale_intercept


@dataclass(frozen=True)
class _Skip:
    """An image left out of the volume: why, and whether it counts as disagreeing with the series
    (localizers and images received twice do not)."""

    sop_instance_uid: str
    reason: str
    counts: bool = True
    error: type[SeriesError] = InconsistentSeriesError


# ---------------------------------------------------------------------------------------------
# Reading


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.upper() != "DICOMDIR")


#: Header reads defer values larger than this (the pixel data): its length is kept, its bytes unread.
_DEFER_BYTES = 4096


def _read_file(path: Path, *, stop_before_pixels: bool) -> Dataset | None:
    """Read one file, or None when it is not a DICOM image file (a DICOMDIR, a stray text file).

    ``stop_before_pixels``: a header read; the pixel data is deferred (its length known, not read).
    """
    defer = _DEFER_BYTES if stop_before_pixels else None
    try:
        ds = pydicom.dcmread(path, defer_size=defer)
    except InvalidDicomError:
        # A file without the 128-byte preamble may still be DICOM: accept it only if it parses
        # into something that names an instance.
        try:
            ds = pydicom.dcmread(path, defer_size=defer, force=True)
        except Exception:  # noqa: BLE001 - any parse failure means "not DICOM"
            log.info("volume.skip_non_dicom", file=path.name)
            return None
        if "SOPInstanceUID" not in ds or "SOPClassUID" not in ds:
            log.info("volume.skip_non_dicom", file=path.name)
            return None
    except (OSError, ValueError, EOFError) as exc:
        log.info("volume.skip_unreadable_file", file=path.name, error=str(exc))
        return None
    media_class = ds.file_meta.get("MediaStorageSOPClassUID") if hasattr(ds, "file_meta") else None
    if ds.get("SOPClassUID") == DICOMDIR_SOP_CLASS_UID or media_class == DICOMDIR_SOP_CLASS_UID:
        return None
    return ds


def _sources(source: Source) -> list[Path | Dataset]:
    if isinstance(source, str | Path):
        path = Path(source)
        if path.is_dir():
            return list(_dicom_files(path))
        if path.is_file():
            return [path]
        raise NoImagesError(f"{path} is neither a folder nor a file")
    items: list[Path | Dataset] = []
    for item in source:
        if isinstance(item, Dataset):
            items.append(item)
        else:
            p = Path(item)
            items.extend(_dicom_files(p) if p.is_dir() else [p])
    return items


def read_datasets(source: Source) -> list[Dataset]:
    """Read every DICOM file of a folder (recursively, any file name), a list of paths, or datasets.

    Non-DICOM files and DICOMDIRs are skipped; pixel data is read too.
    """
    datasets: list[Dataset] = []
    for item in _sources(source):
        if isinstance(item, Dataset):
            datasets.append(item)
            continue
        ds = _read_file(item, stop_before_pixels=False)
        if ds is not None:
            datasets.append(ds)
    return datasets


# ---------------------------------------------------------------------------------------------
# Header parsing


def _floats(value: Any, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        return None
    return arr


def _valid_orientation(iop: np.ndarray | None) -> np.ndarray | None:
    """Unit, orthogonal row/column cosines (6,), or None when they cannot describe a plane."""
    if iop is None:
        return None
    row, col = iop[:3], iop[3:]
    nr, nc = np.linalg.norm(row), np.linalg.norm(col)
    if nr < 0.5 or nc < 0.5:
        return None
    row, col = row / nr, col / nc
    if abs(float(np.dot(row, col))) > 0.01:
        return None
    return np.concatenate([row, col])


def _int_or(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _float_or_none(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def _rescale_value(container: Dataset | None, keyword: str) -> float | None:
    """A RescaleSlope/RescaleIntercept as written: None when absent or empty, NaN when not a number."""
    if container is None:
        return None
    value = container.get(keyword)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _encoding(ds: Dataset) -> tuple[int, int]:
    return _int_or(ds.get("BitsAllocated"), 16), _int_or(ds.get("PixelRepresentation"), 0)


def _item(ds: Dataset, frame_group: Dataset | None, sequence: str) -> Dataset | None:
    """First item of a functional-group macro: per-frame group first, then the shared group."""
    for group in (frame_group, _first(ds.get("SharedFunctionalGroupsSequence"))):
        if group is not None:
            item = _first(group.get(sequence))
            if item is not None:
                return item
    return None


def _first(seq: Any) -> Dataset | None:
    if seq is None or len(seq) == 0:
        return None
    first = seq[0]
    return first if isinstance(first, Dataset) else None


def is_localizer(image_type: Any) -> bool:
    """Whether an ImageType (or FrameType) value marks a localizer (scout) image."""
    if image_type is None:
        return False
    values = image_type if isinstance(image_type, MultiValue | list | tuple) else [image_type]
    return any(str(v).strip().upper() == "LOCALIZER" for v in values)


def _images_of(ds: Dataset, source_index: int) -> list[_Image]:
    """One _Image per frame of a dataset (single-frame CT gives one)."""
    sop = str(ds.get("SOPInstanceUID", ""))
    rows = _int_or(ds.get("Rows"), 0)
    columns = _int_or(ds.get("Columns"), 0)
    order_key = (
        _int_or(ds.get("AcquisitionNumber"), 0),
        _int_or(ds.get("InstanceNumber"), 0),
        0,
    )
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None:
        spacing = _floats(ds.get("PixelSpacing"), 2)
        return [
            _Image(
                source_index=source_index,
                sop_instance_uid=sop,
                frame_number=None,
                rows=rows,
                columns=columns,
                orientation=_valid_orientation(_floats(ds.get("ImageOrientationPatient"), 6)),
                position=_floats(ds.get("ImagePositionPatient"), 3),
                pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing is not None else None,
                slice_thickness=_float_or_none(ds.get("SliceThickness")),
                rescale_slope=_rescale_value(ds, "RescaleSlope"),
                rescale_intercept=_rescale_value(ds, "RescaleIntercept"),
                is_localizer=is_localizer(ds.get("ImageType")),
                order_key=order_key,
                encoding=_encoding(ds),
            )
        ]
    whole_localizer = is_localizer(ds.get("ImageType"))
    images: list[_Image] = []
    for i, group in enumerate(per_frame):
        orientation_item = _item(ds, group, "PlaneOrientationSequence")
        position_item = _item(ds, group, "PlanePositionSequence")
        measures = _item(ds, group, "PixelMeasuresSequence")
        transform = _item(ds, group, "PixelValueTransformationSequence")
        frame_type = _item(ds, group, "CTImageFrameTypeSequence")
        spacing = _floats(measures.get("PixelSpacing"), 2) if measures is not None else None
        images.append(
            _Image(
                source_index=source_index,
                sop_instance_uid=sop,
                frame_number=i + 1,
                rows=rows,
                columns=columns,
                orientation=_valid_orientation(
                    _floats(orientation_item.get("ImageOrientationPatient"), 6)
                    if orientation_item is not None
                    else None
                ),
                position=_floats(position_item.get("ImagePositionPatient"), 3)
                if position_item is not None
                else None,
                pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing is not None else None,
                slice_thickness=_float_or_none(measures.get("SliceThickness")) if measures is not None else None,
                rescale_slope=_rescale_value(transform, "RescaleSlope"),
                rescale_intercept=_rescale_value(transform, "RescaleIntercept"),
                is_localizer=whole_localizer
                or (frame_type is not None and is_localizer(frame_type.get("FrameType"))),
                order_key=(order_key[0], order_key[1], i + 1),
                encoding=_encoding(ds),
            )
        )
    return images


# ---------------------------------------------------------------------------------------------
# Selection of the images that form the volume


def _same_orientation(a: np.ndarray, b: np.ndarray, cos_tol: float) -> bool:
    return float(np.dot(a[:3], b[:3])) >= cos_tol and float(np.dot(a[3:], b[3:])) >= cos_tol


def _dominant_orientation(images: list[_Image], skipped: list[_Skip], min_slices: int) -> list[_Image]:
    cos_tol = float(np.cos(np.deg2rad(ORIENTATION_TOLERANCE_DEG)))
    groups: list[list[_Image]] = []
    for image in images:
        assert image.orientation is not None
        for group in groups:
            assert group[0].orientation is not None
            if _same_orientation(group[0].orientation, image.orientation, cos_tol):
                group.append(image)
                break
        else:
            groups.append([image])
    groups.sort(key=len, reverse=True)
    best = groups[0]
    if len(groups) > 1:
        if len(groups[1]) == len(best):
            raise InconsistentOrientationError(
                f"series has {len(groups)} orientations and the two largest hold {len(best)} images each; "
                "cannot tell which forms the volume"
            )
        if len(best) < min_slices:
            raise InconsistentOrientationError(
                f"the largest group of images sharing one orientation holds {len(best)} of {len(images)} images; "
                f"at least {min_slices} are needed"
            )
    for group in groups[1:]:
        for image in group:
            # Another plane (a reformat, an untagged scout) is another image, not a missing slice.
            skipped.append(
                _Skip(image.sop_instance_uid, "orientation differs from the series' main orientation",
                      counts=False, error=InconsistentOrientationError)
            )
    return best


def _dominant_by(images: list[_Image], key: Any, skipped: list[_Skip], reason: str) -> list[_Image]:
    counts = Counter(key(im) for im in images)
    best_key, _ = counts.most_common(1)[0]
    kept = []
    for image in images:
        if key(image) == best_key:
            kept.append(image)
        else:
            skipped.append(_Skip(image.sop_instance_uid, reason.format(key(image), best_key)))
    return kept


def _spacing_key(image: _Image) -> tuple[float, float]:
    assert image.pixel_spacing is not None
    return (
        round(image.pixel_spacing[0] / PIXEL_SPACING_TOLERANCE_MM) * PIXEL_SPACING_TOLERANCE_MM,
        round(image.pixel_spacing[1] / PIXEL_SPACING_TOLERANCE_MM) * PIXEL_SPACING_TOLERANCE_MM,
    )


def _refuse_too_few(kept: int, skipped: list[_Skip], min_slices: int, what: str) -> None:
    """Raise when fewer than ``min_slices`` images are left, naming the commonest reason they were dropped
    (with the error class of that reason: a series whose every RescaleSlope is 0 is ImplausiblePixelValues)."""
    if kept >= min_slices:
        return
    counted = [s for s in skipped if s.counts]
    if not counted:
        raise TooFewSlicesError(
            f"series has {kept} usable slices; at least {min_slices} are needed"
            + (f" ({len(skipped)} images skipped)" if skipped else "")
        )
    error, count = Counter(s.error for s in counted).most_common(1)[0]
    reasons = [s.reason for s in counted if s.error is error]
    because = f"because {reasons[0]}" if len(set(reasons)) == 1 else f"for reasons such as: {reasons[0]}"
    others = len(counted) - count
    raise error(
        f"series has {kept} usable {what}; at least {min_slices} are needed: {count} image(s) dropped {because}"
        + (f"; {others} for other reasons" if others else "")
    )


def _summary(skipped: list[_Skip]) -> str:
    reasons = Counter(s.reason for s in skipped if s.counts)
    return "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common(3))


def _select(
    images: list[_Image], min_slices: int, limits: SeriesLimits = DEFAULT_LIMITS
) -> tuple[list[_Image], np.ndarray, list[_Skip]]:
    """Images that form the volume, ascending along the normal, their positions, and the dropped ones.

    Raises a SeriesError when what is left is not one plausible, complete CT series (pe_model.validation).
    """
    skipped: list[_Skip] = []
    usable: list[_Image] = []
    n_localizers = 0
    for image in images:
        if image.is_localizer:
            n_localizers += 1
            skipped.append(_Skip(image.sop_instance_uid, "localizer (scout) image", counts=False))
        else:
            usable.append(image)
    if not usable:
        raise TooFewSlicesError(
            f"series has 0 usable slices ({n_localizers} localizer images skipped); at least {min_slices} are needed"
        )
    with_geometry = []
    for image in usable:
        if image.orientation is None:
            skipped.append(_Skip(image.sop_instance_uid, "ImageOrientationPatient missing or invalid", error=MissingGeometryError))
        elif image.position is None:
            skipped.append(_Skip(image.sop_instance_uid, "ImagePositionPatient missing or invalid", error=MissingGeometryError))
        elif image.rows <= 0 or image.columns <= 0:
            skipped.append(_Skip(image.sop_instance_uid, "Rows or Columns missing", error=MissingGeometryError))
        else:
            with_geometry.append(image)
    if not with_geometry:
        raise MissingGeometryError(
            f"none of the {len(usable)} images has a valid ImagePositionPatient and ImageOrientationPatient"
        )
    kept = _dominant_orientation(with_geometry, skipped, min_slices)
    kept = _dominant_by(
        kept, lambda im: (im.rows, im.columns), skipped, "image size {0[0]}x{0[1]} differs from the series' {1[0]}x{1[1]}"
    )
    kept = _dominant_by(
        kept,
        lambda im: im.encoding,
        skipped,
        "pixel encoding (BitsAllocated, PixelRepresentation) {0} differs from the series' {1}",
    )
    missing_spacing = [im for im in kept if im.pixel_spacing is None]
    if len(missing_spacing) == len(kept):
        raise MissingGeometryError("PixelSpacing is missing or invalid in every image of the series")
    for image in missing_spacing:
        skipped.append(_Skip(image.sop_instance_uid, "PixelSpacing missing or invalid", error=MissingGeometryError))
    plausible: list[_Image] = []
    for image in kept:
        if image.pixel_spacing is None:
            continue
        problem = pixel_spacing_problem(image.pixel_spacing, image.rows, image.columns, limits)
        if problem is None:
            problem = rescale_problem(image.rescale_slope, image.rescale_intercept, limits)
            error: type[SeriesError] = ImplausiblePixelValuesError
        else:
            error = ImplausibleGeometryError
        if problem is None:
            plausible.append(image)
        else:
            skipped.append(_Skip(image.sop_instance_uid, problem, error=error))
    _refuse_too_few(len(plausible), skipped, min_slices, "images")
    kept = _dominant_by(
        plausible, _spacing_key, skipped, "pixel spacing {0[0]:.3f}x{0[1]:.3f} mm differs from the series' {1[0]:.3f}x{1[1]:.3f} mm"
    )

    orientation = kept[0].orientation
    assert orientation is not None
    normal = np.cross(orientation[:3], orientation[3:])
    normal /= np.linalg.norm(normal)
    positions = np.asarray([float(np.dot(np.asarray(im.position), normal)) for im in kept], dtype=np.float64)
    order = sorted(range(len(kept)), key=lambda i: (positions[i], kept[i].order_key))
    ordered: list[_Image] = []
    ordered_positions: list[float] = []
    for i in order:
        image, pos = kept[i], positions[i]
        if ordered and pos - ordered_positions[-1] < DUPLICATE_POSITION_TOLERANCE_MM:
            # Two images at one position: the later acquisition / instance / frame wins.
            earlier = ordered[-1]
            winner, loser = (image, earlier) if image.order_key >= earlier.order_key else (earlier, image)
            if (winner.sop_instance_uid, winner.frame_number) == (loser.sop_instance_uid, loser.frame_number):
                reason = "same image received twice"
            else:
                reason = f"duplicate position {pos:.2f} mm; kept the later image {winner.sop_instance_uid}"
            skipped.append(_Skip(loser.sop_instance_uid, reason, counts=False))
            ordered[-1] = winner
        else:
            ordered.append(image)
            ordered_positions.append(pos)
    _refuse_too_few(len(ordered), skipped, min_slices, "slices")
    stack = np.asarray(ordered_positions, dtype=np.float64)
    check_stack(stack, limits)
    check_dropped(len(images), sum(1 for s in skipped if s.counts), limits, detail=_summary(skipped))
    return ordered, stack, skipped


# ---------------------------------------------------------------------------------------------
# Pixel decoding


def _integral(value: float) -> bool:
    return float(value).is_integer() and abs(value) < 2**15


def _decode_into(
    voxels: np.ndarray,
    ordered: list[_Image],
    sources: list[Path | Dataset],
    headers: dict[int, Dataset],
    limits: SeriesLimits = DEFAULT_LIMITS,
) -> tuple[np.ndarray, dict[int, str]]:
    """Decode each chosen frame straight into its slice of ``voxels`` (D, H, W), in HU; returns the array
    and, by slice index, why a slice's values are not HU (``pe_model.validation.slice_values_problem``).

    ``voxels`` int16 (every image has an integral slope and intercept): each slice's HU are computed
    exactly in int32 and stored; a slice whose HU do not fit int16 turns the whole array into float32
    (exactly: int16 values are float32 values) and decoding goes on in float32.
    """
    problems: dict[int, str] = {}
    by_source: dict[int, list[tuple[int, _Image]]] = {}
    for k, image in enumerate(ordered):
        by_source.setdefault(image.source_index, []).append((k, image))
    rows, columns = voxels.shape[1:]
    for source_index, targets in by_source.items():
        uid = targets[0][1].sop_instance_uid
        try:
            src = _pixel_source(sources[source_index], headers.get(source_index))
            _check_native_length(src, headers.get(source_index), uid)
            src = _check_codestreams(src, headers.get(source_index), rows, columns, uid)
            if targets[0][1].frame_number is None:
                frames: Iterator[np.ndarray] = iter([pydicom.pixels.pixel_array(src)])
            else:
                targets.sort(key=lambda t: t[1].frame_number or 0)
                frames = pydicom.pixels.iter_pixels(
                    src, indices=[(im.frame_number or 1) - 1 for _, im in targets]
                )
            for (k, image), arr in zip(targets, frames, strict=True):
                if arr.shape != (rows, columns):
                    raise UnreadablePixelsError(
                        f"image {uid} decodes to shape {arr.shape}, expected {rows}x{columns} grayscale"
                    )
                if voxels.dtype == np.int16:
                    hu = arr.astype(np.int32)
                    if image.slope != 1.0:
                        hu *= int(image.slope)
                    if image.intercept != 0.0:
                        hu += int(image.intercept)
                    problem = slice_values_problem(hu, limits)
                    if problem is not None:
                        problems[k] = problem
                        continue
                    if hu.size and (int(hu.min()) < -(2**15) or int(hu.max()) >= 2**15):
                        voxels = voxels.astype(np.float32)
                    voxels[k] = hu
                    continue
                out = voxels[k]
                out[...] = arr
                if image.slope != 1.0:
                    out *= np.float32(image.slope)
                if image.intercept != 0.0:
                    out += np.float32(image.intercept)
                problem = slice_values_problem(out, limits)
                if problem is not None:
                    problems[k] = problem
        except UnreadablePixelsError:
            raise
        except Exception as exc:  # noqa: BLE001 - decoders raise many types; all mean "unreadable"
            raise UnreadablePixelsError(f"cannot decode the pixel data of image {uid}: {exc}") from exc
    return voxels, problems


def _check_native_length(src: Path | Dataset, header: Dataset | None, uid: str) -> None:
    """Refuse uncompressed pixel data whose length does not match Rows x Columns x frames x
    BitsAllocated: pydicom would silently decode the first bytes of it (wrong BitsAllocated, pixel
    data of another image size) into a plausible-looking but wrong image."""
    info = header if header is not None else (src if isinstance(src, Dataset) else None)
    if info is None:
        return
    meta = getattr(info, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None or UID(syntax).is_compressed:
        return
    element = info.get_item("PixelData", keep_deferred=True) if "PixelData" in info else None
    if element is None:
        raise UnreadablePixelsError(f"image {uid} has no pixel data")
    length = int(element.length) if hasattr(element, "length") else len(element.value or b"")
    rows, columns = _int_or(info.get("Rows"), 0), _int_or(info.get("Columns"), 0)
    frames, bits = _int_or(info.get("NumberOfFrames"), 1), _int_or(info.get("BitsAllocated"), 16)
    expected = rows * columns * _int_or(info.get("SamplesPerPixel"), 1) * frames * bits // 8
    if length not in (expected, expected + 1):
        raise UnreadablePixelsError(
            f"image {uid}: pixel data holds {length} bytes, but {rows}x{columns}, {frames} frame(s) "
            f"at {bits} bits allocated need {expected}"
        )


def _codestream_size(frame: bytes, syntax: UID) -> tuple[int, int] | None:
    """(rows, columns) a JPEG, JPEG-LS or JPEG 2000 codestream declares, None if it cannot be told."""
    if syntax in JPEG2000TransferSyntaxes:
        offset = 0
        if frame.startswith(b"\x00\x00\x00\x0cjP  "):  # a JP2 file: the codestream is in its jp2c box
            found = frame.find(b"jp2c")
            if found < 0:
                return None
            offset = found + 4
        if frame[offset : offset + 4] != b"\xff\x4f\xff\x51" or len(frame) < offset + 24:
            return None
        x_size, y_size, x_origin, y_origin = struct.unpack(">LLLL", frame[offset + 8 : offset + 24])
        return y_size - y_origin, x_size - x_origin
    if syntax in JPEGTransferSyntaxes or syntax in JPEGLSTransferSyntaxes:
        info = _get_jpg_parameters(frame)
        if "rows" in info and "columns" in info:
            return int(info["rows"]), int(info["columns"])
    return None


def _check_codestreams(src: Path | Dataset, header: Dataset | None, rows: int, columns: int, uid: str) -> Path | Dataset:
    """Refuse compressed frames whose codestream declares a larger image than Rows x Columns before a decoder
    allocates what the codestream asks for (a few bytes can declare a 4-gigapixel image). Returns what to
    decode from: the dataset read here (its compressed bytes: no second read of the file)."""
    info = header if header is not None else (src if isinstance(src, Dataset) else None)
    meta = getattr(info, "file_meta", None) if info is not None else None
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None or not UID(syntax).is_encapsulated:
        return src
    syntax = UID(syntax)
    if not (syntax in JPEG2000TransferSyntaxes or syntax in JPEGTransferSyntaxes or syntax in JPEGLSTransferSyntaxes):
        return src
    ds = src if isinstance(src, Dataset) else pydicom.dcmread(src)
    frames = _int_or(ds.get("NumberOfFrames"), 1)
    for index, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames)):
        size = _codestream_size(frame, syntax)
        if size is not None and (size[0] > rows or size[1] > columns):
            raise UnreadablePixelsError(
                f"image {uid}: frame {index + 1} declares {size[0]}x{size[1]} pixels, but Rows x Columns is {rows}x{columns}"
            )
    return ds


def _pixel_source(src: Path | Dataset, header: Dataset | None) -> Path | Dataset:
    """What pydicom decodes from: the path itself (reads only the pixel data, keeps no copy) or,
    for deflated files that must be inflated first, the fully read dataset.

    A dataset built in memory without a Transfer Syntax UID (file meta missing) but whose pixel
    data has exactly the native size is decoded as native little endian, from a shallow copy.
    """
    if isinstance(src, Dataset):
        meta = getattr(src, "file_meta", None)
        if (meta is not None and "TransferSyntaxUID" in meta) or "PixelData" not in src:
            return src
        frames = _int_or(src.get("NumberOfFrames"), 1)
        expected = (
            _int_or(src.get("Rows"), 0)
            * _int_or(src.get("Columns"), 0)
            * _int_or(src.get("SamplesPerPixel"), 1)
            * frames
            * _int_or(src.get("BitsAllocated"), 16)
            // 8
        )
        if len(src.PixelData) not in (expected, expected + 1):
            return src  # encapsulated or damaged: pydicom's own error says why
        native = copy.copy(src)
        native.file_meta = FileMetaDataset()
        native.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return native
    meta = getattr(header, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return pydicom.dcmread(src)
    return src


# ---------------------------------------------------------------------------------------------


def load_series(source: Source, *, min_slices: int = 10, limits: SeriesLimits = DEFAULT_LIMITS) -> Volume:
    """Build the HU volume of one CT series from a folder, a list of paths, or datasets.

    Raises a SeriesError subclass (NoImagesError, MixedSeriesError, NotCTError, TooFewSlicesError,
    InconsistentOrientationError, MissingGeometryError, UnreadablePixelsError, and from
    ``pe_model.validation``: ImplausibleGeometryError, IncompleteSeriesError, ImplausiblePixelValuesError,
    InconsistentSeriesError, VolumeTooLargeError) when the series cannot be analysed. Images left out
    are listed in ``Volume.skipped``.
    """
    sources = _sources(source)
    headers: dict[int, Dataset] = {}
    for i, item in enumerate(sources):
        ds = item if isinstance(item, Dataset) else _read_file(item, stop_before_pixels=True)
        if ds is not None:
            headers[i] = ds
    image_headers = [(i, ds) for i, ds in headers.items() if "Rows" in ds and "Columns" in ds]
    if not image_headers:
        raise NoImagesError(f"found no DICOM images among {len(sources)} inputs")

    series_uids = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in image_headers})
    if len(series_uids) > 1:
        raise MixedSeriesError(f"the input holds images of {len(series_uids)} series; give one series at a time")
    study_uids = sorted({str(ds.get("StudyInstanceUID", "")) for _, ds in image_headers})
    if len(study_uids) > 1:
        raise MixedSeriesError(f"the input's one series spans {len(study_uids)} studies")
    modalities = sorted({str(ds.get("Modality", "")) or "(none)" for _, ds in image_headers})
    if modalities != ["CT"]:
        raise NotCTError(f"series modality is {', '.join(modalities)}, not CT")

    images = [im for i, ds in image_headers for im in _images_of(ds, i)]
    ordered, positions, skipped = _select(images, min_slices, limits)

    first = ordered[0]
    assert first.orientation is not None and first.pixel_spacing is not None
    # HU as int16 when they are integers (integral RescaleSlope and RescaleIntercept: nearly every CT):
    # half the memory of float32 for the largest array of an analysis, and the same values.
    exact = all(_integral(im.slope) and _integral(im.intercept) for im in ordered)
    dtype = np.int16 if exact else np.float32
    check_size(len(ordered), first.rows, first.columns, np.dtype(dtype).itemsize, limits)
    voxels = np.empty((len(ordered), first.rows, first.columns), dtype=dtype)
    voxels, problems = _decode_into(voxels, ordered, sources, headers, limits)
    if problems:
        ordered, positions, voxels = _drop_slices(ordered, positions, voxels, problems, skipped)
        _refuse_too_few(len(ordered), skipped, min_slices, "slices")
        check_stack(positions, limits)
        check_dropped(len(images), sum(1 for s in skipped if s.counts), limits, detail=_summary(skipped))
    for skip in skipped:
        log.info("volume.image_skipped", sop_instance_uid=skip.sop_instance_uid, reason=skip.reason)
    volume = Volume(
        voxels=voxels,
        positions_mm=positions,
        image_positions=np.stack([np.asarray(im.position, dtype=np.float64) for im in ordered]),
        orientation=np.asarray(first.orientation, dtype=np.float64),
        pixel_spacing_mm=(float(first.pixel_spacing[0]), float(first.pixel_spacing[1])),
        sop_instance_uids=tuple(im.sop_instance_uid for im in ordered),
        frame_numbers=tuple(im.frame_number for im in ordered),
        study_instance_uid=study_uids[0],
        series_instance_uid=series_uids[0],
        slice_thickness_mm=first.slice_thickness,
        skipped=tuple((skip.sop_instance_uid, skip.reason) for skip in skipped),
    )
    log.info(
        "volume.loaded",
        series_instance_uid=volume.series_instance_uid,
        shape=volume.shape,
        skipped=len(skipped),
    )
    return volume


def _drop_slices(
    ordered: list[_Image], positions: np.ndarray, voxels: np.ndarray, problems: dict[int, str], skipped: list[_Skip]
) -> tuple[list[_Image], np.ndarray, np.ndarray]:
    """Leave out the slices whose values are not HU: moved down in place (no second copy of the volume)."""
    keep = [k for k in range(len(ordered)) if k not in problems]
    for k, reason in sorted(problems.items()):
        skipped.append(_Skip(ordered[k].sop_instance_uid, reason, error=ImplausiblePixelValuesError))
    for target, k in enumerate(keep):
        if target != k:
            voxels[target] = voxels[k]
    return [ordered[k] for k in keep], positions[keep], voxels[: len(keep)]
