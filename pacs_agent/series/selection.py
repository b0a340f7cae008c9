"""Selection rules: is a complete series a CT pulmonary angiogram the model should read?

`select_series` applies the default CTPA rule of `SelectionSettings` to the series' headers (read with
``stop_before_pixels``) and gives a decision with a reason a person understands, plus the input
priority from ``priority_rules``. Every failing check is named, so an ignored series says why.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pydicom

from pacs_agent.settings import PriorityRule, SelectionSettings, SeriesSettings

#: A slice normal within this angle of the patient's z axis counts as axial (gantry tilt allowed).
AXIAL_TOLERANCE_DEGREES = 30.0
_AXIAL_MIN_COS = math.cos(math.radians(AXIAL_TOLERANCE_DEGREES))


@dataclass(frozen=True)
class SelectionDecision:
    """Accepted series are queued with ``priority``; rejected ones are IGNORED with ``reason``."""

    accepted: bool
    reason: str
    priority: int


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def _first_item(ds: pydicom.Dataset, sequence: str) -> pydicom.Dataset | None:
    seq = ds.get(sequence)
    if seq is None:
        return None
    items = seq.value if hasattr(seq, "value") else seq
    return items[0] if items else None


def _functional_group_value(ds: pydicom.Dataset, macro: str, keyword: str) -> Any:
    """A value from the shared (else first per-frame) functional groups of an enhanced image."""
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        group = _first_item(ds, groups)
        if group is None:
            continue
        item = _first_item(group, macro)
        if item is not None and keyword in item:
            return item.get(keyword)
    return None


def _orientation(ds: pydicom.Dataset) -> list[float] | None:
    value = ds.get("ImageOrientationPatient")
    if value is None:
        value = _functional_group_value(ds, "PlaneOrientationSequence", "ImageOrientationPatient")
    if value is None:
        return None
    try:
        cosines = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return cosines if len(cosines) == 6 else None


def _slice_thickness(ds: pydicom.Dataset) -> float | None:
    value = ds.get("SliceThickness")
    if value in (None, ""):
        value = _functional_group_value(ds, "PixelMeasuresSequence", "SliceThickness")
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _frames(ds: pydicom.Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def _is_localizer(ds: pydicom.Dataset) -> bool:
    image_type = ds.get("ImageType")
    if image_type is None:
        return False
    values = [image_type] if isinstance(image_type, str) else list(image_type)
    return any(str(v).strip().upper() == "LOCALIZER" for v in values)


def _plane(cosines: list[float]) -> tuple[str, float]:
    """Name the plane of an orientation and |cos| of the normal's angle to z."""
    row, col = cosines[:3], cosines[3:]
    normal = (
        row[1] * col[2] - row[2] * col[1],
        row[2] * col[0] - row[0] * col[2],
        row[0] * col[1] - row[1] * col[0],
    )
    length = math.sqrt(sum(c * c for c in normal)) or 1.0
    unit = [abs(c) / length for c in normal]
    axis = max(range(3), key=lambda i: unit[i])
    names = ("sagittal", "coronal", "axial")
    name = names[axis] if unit[axis] >= _AXIAL_MIN_COS else "oblique"
    return name, unit[2]


def _descriptions(ds: pydicom.Dataset) -> list[str]:
    return [d for d in (_text(ds.get(k)) for k in ("SeriesDescription", "StudyDescription", "ProtocolName")) if d]


def _contrast(headers: Sequence[pydicom.Dataset]) -> str:
    """The contrast agent (or route) named by any header, '' if none."""
    for ds in headers:
        for keyword in ("ContrastBolusAgent", "ContrastBolusRoute"):
            value = _text(ds.get(keyword))
            if value:
                return value
        sequence = _first_item(ds, "ContrastBolusAgentSequence")
        if sequence is not None:
            meaning = _text(sequence.get("CodeMeaning"))
            return meaning or "coded contrast agent"
    return ""


def _priority(settings: SeriesSettings, calling_ae_title: str, descriptions: Sequence[str]) -> int:
    matching = [rule.priority for rule in settings.priority_rules if _rule_matches(rule, calling_ae_title, descriptions)]
    return max(matching) if matching else settings.default_priority


def _rule_matches(rule: PriorityRule, calling_ae_title: str, descriptions: Sequence[str]) -> bool:
    if rule.calling_ae_title and rule.calling_ae_title.strip() != calling_ae_title.strip():
        return False
    if rule.description_pattern:
        pattern = re.compile(rule.description_pattern, re.IGNORECASE)
        if not any(pattern.search(d) for d in descriptions):
            return False
    return True


def _check(headers: Sequence[pydicom.Dataset], rule: SelectionSettings, instance_count: int) -> tuple[list[str], str]:
    """(failures, summary of an accepted series); ``headers`` may be an even sample of ``instance_count``."""
    first = headers[0]
    failures: list[str] = []
    modality = _text(first.get("Modality")).upper()
    body_part = _text(first.get("BodyPartExamined")).upper()
    allowed_modalities = {m.upper() for m in rule.modalities}
    if allowed_modalities and modality not in allowed_modalities:
        failures.append(f"modality {modality or '(none)'} is not {'/'.join(sorted(allowed_modalities))}")
    allowed_parts = {p.upper() for p in rule.body_parts}
    if allowed_parts and body_part not in allowed_parts:
        if body_part:
            failures.append(f"{body_part.lower()} {modality or 'series'}: body part {body_part} is not chest")
        else:
            failures.append("body part is not specified and unspecified is not allowed")

    images = [ds for ds in headers if not _is_localizer(ds)]
    if not images:
        failures.append("localizer series (ImageType LOCALIZER)")
    planes: dict[str, int] = {}
    missing_orientation = 0
    for ds in images:
        cosines = _orientation(ds)
        if cosines is None:
            missing_orientation += 1
            continue
        name, _ = _plane(cosines)
        planes[name] = planes.get(name, 0) + 1
    if missing_orientation:
        failures.append(f"{missing_orientation} of {len(images)} images have no ImageOrientationPatient")
    not_axial = {name: n for name, n in planes.items() if name != "axial"}
    if not_axial:
        described = ", ".join(f"{n} {name}" for name, n in sorted(not_axial.items()))
        failures.append(f"not axial: {described} of {len(images)} images")

    slices = sum(_frames(ds) for ds in images)
    if instance_count > len(headers):
        slices = round(slices * instance_count / len(headers))
    if slices < rule.min_slices:
        failures.append(f"{slices} slices; at least {rule.min_slices} needed")

    thicknesses = [t for t in (_slice_thickness(ds) for ds in images) if t is not None]
    thickest = max(thicknesses) if thicknesses else None
    if thickest is not None and thickest > rule.max_slice_thickness_mm:
        failures.append(f"slice thickness {thickest:g} mm is over {rule.max_slice_thickness_mm:g} mm")

    descriptions = _descriptions(first)
    agent = _contrast(headers)
    pattern = re.compile(rule.description_pattern, re.IGNORECASE) if rule.description_pattern else None
    matched = next((d for d in descriptions if pattern is not None and pattern.search(d)), "")
    if rule.require_contrast_or_description and not agent and not matched:
        shown = " / ".join(descriptions) if descriptions else ""
        failures.append(f"no contrast agent and description '{shown}' does not match {rule.description_pattern}")

    evidence = f"contrast agent '{agent}'" if agent else (f"description '{matched}'" if matched else "no contrast check")
    summary = f"CTPA: {slices} axial {modality} slices, {evidence}"
    return failures, summary


def select_series(
    headers: Sequence[pydicom.Dataset],
    settings: SeriesSettings,
    *,
    calling_ae_title: str,
    instance_count: int | None = None,
) -> SelectionDecision:
    """Apply the CTPA rule to one series' headers (pixel data not needed).

    ``headers``: one dataset per instance, or an even sample of them when ``instance_count`` (the
    number of instances in the series) is larger; slice counts are then scaled to the whole series.
    """
    if not headers:
        return SelectionDecision(False, "no readable instances in the series", settings.default_priority)
    priority = _priority(settings, calling_ae_title, _descriptions(headers[0]))
    failures, summary = _check(headers, settings.selection, max(instance_count or 0, len(headers)))
    if failures:
        return SelectionDecision(False, "; ".join(failures), priority)
    return SelectionDecision(True, summary, priority)
