"""What the dashboard reads from DICOM files: Grad-CAM PNGs from SC, a summary of an SR, patient identifiers.

Every reader takes a path already checked to lie in the spool and turns a missing or unreadable
file into DicomViewError (the page says so), never a traceback.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pacs_agent.errors import AgentError

NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"
#: Deepest SR content level shown (1: the document's direct children).
SR_MAX_DEPTH = 3
SR_MAX_ITEMS = 80
#: Observation-context items (TID 1001/1002/1004): who and in what language, not what was found.
SR_CONTEXT_ITEMS = frozenset({
    "Language of Content Item and Descendants", "Observer Type", "Device Observer UID", "Device Observer Name",
    "Device Observer Manufacturer", "Device Observer Model Name", "Device Observer Serial Number",
    "Device Observer Physical Location During Observation", "Country of Language",
})
#: Subtrees that list the source images (TID 1600), shown elsewhere on the page as the series.
SR_SKIPPED_SUBTREES = frozenset({"Image Library"})
#: Per-measurement provenance (TID 4019 algorithm identification, tracking, sources): the page shows
#: the model once, beside the result.
SR_PROVENANCE_ITEMS = frozenset({
    "Algorithm Name", "Algorithm Version", "Algorithm Manufacturer", "Algorithm Parameters", "Tracking Identifier",
    "Tracking Unique Identifier", "Source of Measurement", "Source",
})


class DicomViewError(AgentError):
    """A file the dashboard wanted to show is gone or unreadable."""


def _read(path: Path, *, pixels: bool) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except FileNotFoundError:
        raise DicomViewError(f"{path.name} is no longer in the spool (removed by retention?)") from None
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise DicomViewError(f"{path.name} cannot be read: {type(exc).__name__}") from exc


def secondary_capture_png(path: Path, *, max_width: int = 1024) -> bytes:
    """The SC image (RGB or MONOCHROME2, first frame) as PNG bytes, scaled down to ``max_width``."""
    ds = _read(path, pixels=True)
    try:
        pixels = np.asarray(ds.pixel_array)
    except (AttributeError, ValueError, RuntimeError, NotImplementedError) as exc:
        raise DicomViewError(f"{path.name} has no pixel data the dashboard can show ({type(exc).__name__})") from exc
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    photometric = str(getattr(ds, "PhotometricInterpretation", ""))
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            pixels = convert_color_space(pixels, photometric, "RGB")
        image = Image.fromarray(pixels.astype(np.uint8), mode="RGB")
    elif pixels.ndim == 2:
        values = pixels.astype(np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = np.zeros_like(values) if high <= low else (values - low) / (high - low) * 255.0
        if photometric == "MONOCHROME1":
            scaled = 255.0 - scaled
        image = Image.fromarray(scaled.astype(np.uint8), mode="L")
    else:
        raise DicomViewError(f"{path.name}: pixel data of shape {pixels.shape} is not an image the dashboard can show")
    if image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()


@dataclass(frozen=True)
class SRItem:
    depth: int
    name: str
    value: str


@dataclass(frozen=True)
class SRSummary:
    """The parts of a Structured Report a reader checks: title, flags and the findings tree."""

    sop_instance_uid: str
    title: str
    completion_flag: str
    verification_flag: str
    series_description: str
    not_for_clinical_use: bool
    items: tuple[SRItem, ...]


def _concept(item: Dataset) -> str:
    names = getattr(item, "ConceptNameCodeSequence", None)
    if names:
        return str(getattr(names[0], "CodeMeaning", ""))
    return ""


def _value(item: Dataset) -> str:
    kind = str(getattr(item, "ValueType", ""))
    if kind == "TEXT":
        return str(getattr(item, "TextValue", ""))
    if kind == "CODE" and getattr(item, "ConceptCodeSequence", None):
        return str(getattr(item.ConceptCodeSequence[0], "CodeMeaning", ""))
    if kind == "NUM" and getattr(item, "MeasuredValueSequence", None):
        measured = item.MeasuredValueSequence[0]
        unit = ""
        if getattr(measured, "MeasurementUnitsCodeSequence", None):
            unit = str(getattr(measured.MeasurementUnitsCodeSequence[0], "CodeValue", ""))
        return f"{measured.NumericValue} {unit if unit not in ('1', '{ratio}') else ''}".strip()
    if kind in ("UIDREF",):
        return str(getattr(item, "UID", ""))
    if kind == "IMAGE":
        return "image reference"
    if kind in ("CONTAINER",):
        return ""
    return ""


def _walk(items: Iterator[Dataset] | list[Dataset], depth: int) -> Iterator[SRItem]:
    for item in items:
        name = _concept(item)
        if name in SR_CONTEXT_ITEMS or name in SR_SKIPPED_SUBTREES or name in SR_PROVENANCE_ITEMS:
            continue
        value = _value(item)
        if name or value:
            yield SRItem(depth=depth, name=name, value=value)
        if depth < SR_MAX_DEPTH and getattr(item, "ContentSequence", None):
            yield from _walk(list(item.ContentSequence), depth + 1)


def structured_report_summary(path: Path) -> SRSummary:
    ds = _read(path, pixels=False)
    items = tuple(_walk(list(getattr(ds, "ContentSequence", [])), 1))[:SR_MAX_ITEMS]
    description = str(getattr(ds, "SeriesDescription", ""))
    texts = " ".join([description, *(i.value for i in items)])
    return SRSummary(
        sop_instance_uid=str(getattr(ds, "SOPInstanceUID", "")),
        title=_concept(ds),
        completion_flag=str(getattr(ds, "CompletionFlag", "")),
        verification_flag=str(getattr(ds, "VerificationFlag", "")),
        series_description=description,
        not_for_clinical_use=NOT_FOR_CLINICAL_USE in texts.upper() or "NOT_FOR_CLINICAL_USE=TRUE" in texts.upper(),
        items=items,
    )


@dataclass(frozen=True)
class PatientIdentifiers:
    patient_name: str
    patient_id: str
    accession_number: str


def patient_identifiers(path: Path) -> PatientIdentifiers:
    """Patient name, ID and accession number from the header of one received instance."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientName", "PatientID", "AccessionNumber"])
    except FileNotFoundError:
        raise DicomViewError(f"{path.name} is no longer in the spool (removed by retention?)") from None
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise DicomViewError(f"{path.name} cannot be read: {type(exc).__name__}") from exc
    name = str(getattr(ds, "PatientName", "") or "").replace("^", ", ", 1).replace("^", " ")
    return PatientIdentifiers(
        patient_name=name.strip(", "),
        patient_id=str(getattr(ds, "PatientID", "") or ""),
        accession_number=str(getattr(ds, "AccessionNumber", "") or ""),
    )
