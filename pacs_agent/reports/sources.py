"""Reading what the report writers need from the source images: headers, HU pixels, orientation.

Works for single-frame CT (one dataset per slice) and Enhanced CT (one multi-frame dataset,
geometry and rescale in functional groups; frames are 1-based as in DICOM).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import structlog
from highdicom import SpecificCharacterSetValues
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM

from pacs_agent.errors import ReportError

#: Patient and study attributes an output inherits; missing ones become empty (type 2).
_TYPE2_DEFAULTS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_PIXEL_KEYWORDS: tuple[str, ...] = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: Character set of a copy whose source names a term highdicom does not know; the copy holds
#: decoded text, which UTF-8 always encodes.
FALLBACK_CHARACTER_SET = "ISO_IR 192"
_TEMPORAL_PARSERS: dict[str, type] = {"DA": DA, "TM": TM, "DT": DT}

_log = structlog.get_logger(__name__)


def header(ds: Dataset) -> Dataset:
    """A copy of ``ds`` without pixel data, with the type 2 patient/study attributes present.

    The copy's demographics are repaired (see repair_demographics); the received files are left as
    they are.
    """
    out = Dataset()
    for element in ds:  # iterating decodes text with the source's character set (pydicom falls back)
        if element.keyword in _PIXEL_KEYWORDS:
            continue
        out.add(copy.deepcopy(element))
    if hasattr(ds, "file_meta"):
        out.file_meta = copy.deepcopy(ds.file_meta)
    for keyword in _TYPE2_DEFAULTS:
        if keyword not in out or out[keyword].value is None:
            setattr(out, keyword, "")
    repair_demographics(out)
    return out


def repair_demographics(ds: Dataset) -> None:
    """Make ``ds`` (an in-memory copy) acceptable to highdicom; the SEG takes its sources as they are.

    An unknown SpecificCharacterSet term becomes ISO_IR 192 (text is decoded first, with pydicom's
    fallback, so nothing is re-read under the new set); unparsable top-level DA/TM/DT values become
    empty. A malformed demographic must not stop the triage of a real CTPA.
    """
    _repair_character_set(ds)
    _blank_unparsable_temporal_values(ds)


def _known_character_set(term: str) -> bool:
    try:
        SpecificCharacterSetValues(term)
    except ValueError:
        return False
    return True


def _repair_character_set(ds: Dataset) -> None:
    """Replace a SpecificCharacterSet with any term highdicom refuses by ISO_IR 192."""
    if "SpecificCharacterSet" not in ds or not ds.SpecificCharacterSet:
        return
    value = ds.SpecificCharacterSet
    terms = [str(value)] if isinstance(value, str) else [str(v) for v in value]
    if all(_known_character_set(term) for term in terms):
        return
    ds.walk(lambda _dataset, _element: None)  # decode every text value under the original set first
    ds.SpecificCharacterSet = FALLBACK_CHARACTER_SET
    _log.warning("report_character_set_replaced", sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                 fallback=FALLBACK_CHARACTER_SET)


def _blank_unparsable_temporal_values(ds: Dataset) -> None:
    """Empty each top-level DA/TM/DT element whose value is not a valid date/time."""
    for element in ds:
        parser = _TEMPORAL_PARSERS.get(element.VR)
        if parser is None or element.value is None or element.value == "":
            continue
        values = [element.value] if element.VM <= 1 else list(element.value)
        try:
            for value in values:
                if str(value).strip():
                    parser(str(value).strip())
        except (ValueError, TypeError, OverflowError):
            element.value = ""
            _log.warning("report_invalid_date_blanked", sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                         attribute=element.keyword)


def evidence_headers(source_datasets: Sequence[Dataset]) -> list[Dataset]:
    """Small datasets naming each source instance (UIDs only); the first carries the full header."""
    if not source_datasets:
        raise ReportError("no source images were given")
    items = [header(source_datasets[0])]
    for ds in source_datasets[1:]:
        item = Dataset()
        item.SOPClassUID = ds.SOPClassUID
        item.SOPInstanceUID = ds.SOPInstanceUID
        item.StudyInstanceUID = ds.StudyInstanceUID
        item.SeriesInstanceUID = ds.SeriesInstanceUID
        items.append(item)
    return items


def _frame_item(ds: Dataset, keyword: str, frame_number: int | None) -> Dataset | None:
    """The functional-group macro ``keyword`` for a frame (per-frame first, then shared)."""
    if frame_number is not None and "PerFrameFunctionalGroupsSequence" in ds:
        per_frame = ds.PerFrameFunctionalGroupsSequence[frame_number - 1]
        if keyword in per_frame:
            return per_frame[keyword].value[0]
    if "SharedFunctionalGroupsSequence" in ds:
        shared = ds.SharedFunctionalGroupsSequence[0]
        if keyword in shared:
            return shared[keyword].value[0]
    return None


def hounsfield(ds: Dataset, frame_number: int | None = None) -> np.ndarray:
    """(Rows, Columns) float32 HU of one slice (``frame_number`` for multi-frame images)."""
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises several types for undecodable pixel data
        raise ReportError(f"pixel data of image {ds.SOPInstanceUID} cannot be decoded: {exc}") from exc
    if pixels.ndim == 3:
        index = (frame_number or 1) - 1
        if not 0 <= index < pixels.shape[0]:
            raise ReportError(f"image {ds.SOPInstanceUID} has no frame {frame_number}")
        pixels = pixels[index]
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    transform = _frame_item(ds, "PixelValueTransformationSequence", frame_number)
    if transform is not None:
        slope = float(transform.get("RescaleSlope", slope))
        intercept = float(transform.get("RescaleIntercept", intercept))
    return pixels.astype(np.float32) * slope + intercept


def image_orientation(ds: Dataset, frame_number: int | None = None) -> list[float] | None:
    """The six direction cosines of a slice, or None when the image does not say."""
    if "ImageOrientationPatient" in ds:
        return [float(v) for v in ds.ImageOrientationPatient]
    plane = _frame_item(ds, "PlaneOrientationSequence", frame_number)
    if plane is not None and "ImageOrientationPatient" in plane:
        return [float(v) for v in plane.ImageOrientationPatient]
    return None


def _letter(vector: Sequence[float]) -> str:
    """The dominant patient direction (LPS) of a direction cosine."""
    axis = int(np.argmax(np.abs(vector)))
    positive = vector[axis] >= 0
    return (("L", "R"), ("P", "A"), ("H", "F"))[axis][0 if positive else 1]


def patient_orientation(ds: Dataset, frame_number: int | None = None) -> tuple[str, str]:
    """Patient Orientation (row, column directions) of a slice; axial (L, P) when unknown."""
    cosines = image_orientation(ds, frame_number)
    if cosines is None or len(cosines) != 6:
        return ("L", "P")
    return (_letter(cosines[:3]), _letter(cosines[3:]))


def image_position(ds: Dataset, frame_number: int | None = None) -> tuple[float, float, float] | None:
    """Image Position (Patient) of a slice in mm (LPS), or None when the image does not say."""
    values = None
    if "ImagePositionPatient" in ds:
        values = ds.ImagePositionPatient
    else:
        plane = _frame_item(ds, "PlanePositionSequence", frame_number)
        if plane is not None and "ImagePositionPatient" in plane:
            values = plane.ImagePositionPatient
    if values is None or len(values) != 3:
        return None
    try:
        x, y, z = (float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return (x, y, z)


def opposite(letter: str) -> str:
    """The opposite patient direction of L/R/A/P/H/F."""
    return {"L": "R", "R": "L", "A": "P", "P": "A", "H": "F", "F": "H"}[letter]


def pixel_spacing(ds: Dataset, frame_number: int | None = None) -> list[str] | None:
    """Pixel Spacing (row, column; mm, as DS strings) of a slice, or None when absent or not positive."""
    values = ds.get("PixelSpacing")
    if values is None:
        measures = _frame_item(ds, "PixelMeasuresSequence", frame_number)
        values = measures.get("PixelSpacing") if measures is not None else None
    if values is None or len(values) != 2:
        return None
    try:
        if min(float(v) for v in values) <= 0:
            return None
    except (TypeError, ValueError):
        return None
    return [str(v) for v in values]
