"""The findings as an IHE AI Results (AIR) Evaluation Result: Comprehensive 3D SR, TID 1500.

Header: UTF-8 (ISO_IR 192); Contributing Equipment Sequence with one item for the algorithm
(Processing Equipment, manufacturer, model, software version, Device UID from the checkpoint's
sha256); Predecessor Documents Sequence naming the report a re-analysis supersedes.

Layout of the content tree (PS3.16 TID 1500):
- first, the impression: one sentence a reader understands ("Suspected central pulmonary
  embolism, RV/LV >= 1 suggested. AI result, unverified.");
- observation context: the model as device observer (TID 1004), Device UID as above;
- procedure reported: CT + angiography (CID 100);
- image library: the key slices (TID 1600);
- imaging measurements, one TID 1501 group each:
  pulmonary embolism (presence, finding sites, clinical course, certainty = P(PE in the series)),
  one group per site (pulmonary trunk / right / left pulmonary artery, certainty = P(site)),
  RV/LV diameter ratio >= 1 (local code, certainty = P(RV/LV >= 1)),
  worklist priority (SCT Priority = the flag CRITICAL / HIGH / REVIEW / ROUTINE),
  input image quality (DCM Image Quality = RadLex diagnostic / limited / non-diagnostic quality);
  every group carries the algorithm identification (TID 4019); the pulmonary embolism group's
  source images are the key CT slices and the Grad-CAM secondary captures;
- qualitative evaluations: TEXT comments (unverified AI output, model provenance, probabilities,
  and, on re-analysis, which report this one supersedes).
"Certainty of Finding" is always the model's probability that the group's finding is present.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom
from highdicom.sr import (
    CodedConcept,
    Comprehensive3DSR,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes

from pacs_agent.db.models import Flag
from pacs_agent.errors import ReportError
from pacs_agent.reports import codes
from pacs_agent.reports.provenance import (
    NOT_FOR_CLINICAL_USE,
    algorithm_identification,
    contributing_equipment,
    device_observer_uid,
    disclaimer,
    keep_one_processing_item,
    long_string,
    series_description,
)
from pacs_agent.reports.sources import evidence_headers, header
from pacs_agent.settings import OutputSettings
from pe_model.labels import EXAM_LABELS, THRESHOLD
from pe_model.prediction import Prediction

#: Series Number of the SR series (a new series in the source study).
SR_SERIES_NUMBER = 9901

_SITES: tuple[tuple[str, CodedConcept], ...] = (
    ("central_pe", codes.PULMONARY_TRUNK),
    ("rightsided_pe", codes.RIGHT_PULMONARY_ARTERY),
    ("leftsided_pe", codes.LEFT_PULMONARY_ARTERY),
)


def _certainty(probability: float) -> Measurement:
    return Measurement(name=codes.CERTAINTY_OF_FINDING, value=round(float(probability), 6), unit=codes.NO_UNITS)


def _tracking(identifier: str) -> TrackingIdentifier:
    return TrackingIdentifier(uid=highdicom.UID(), identifier=identifier)


def _is_cross_sectional_image(ds: Dataset) -> bool:
    """The image library needs per-image geometry (single-frame CT); Enhanced CT keeps it per frame."""
    return all(k in ds for k in ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness"))


def _presence(prediction: Prediction) -> CodedConcept:
    if prediction.pe_present:
        return codes.PRESENT
    if prediction.labels.get("indeterminate", False):
        return codes.INDETERMINATE
    return codes.ABSENT


def _clinical_course(prediction: Prediction) -> list[QualitativeEvaluation]:
    """Acute, chronic, or both (RSNA: acute when neither chronic label is set on a positive exam)."""
    if not prediction.pe_present:
        return []
    if prediction.labels.get("acute_and_chronic_pe", False):
        values = [codes.ACUTE, codes.CHRONIC]
    elif prediction.labels.get("chronic_pe", False):
        values = [codes.CHRONIC]
    else:
        values = [codes.ACUTE]
    return [QualitativeEvaluation(name=codes.CLINICAL_COURSE, value=v) for v in values]


_FLAG_CODES: dict[Flag, CodedConcept] = {
    Flag.CRITICAL: codes.FLAG_CRITICAL,
    Flag.HIGH: codes.FLAG_HIGH,
    Flag.REVIEW: codes.FLAG_REVIEW,
    Flag.ROUTINE: codes.FLAG_ROUTINE,
}


def impression(prediction: Prediction, flag: Flag) -> str:
    """The sentence the report leads with, e.g.
    "Suspected central pulmonary embolism, RV/LV >= 1 suggested. AI result, unverified."
    """
    labels = prediction.labels
    if prediction.pe_present:
        sites = [name for key, name in (("central_pe", "central"), ("rightsided_pe", "right-sided"), ("leftsided_pe", "left-sided"))
                 if labels.get(key)]
        where = (", ".join(sites[:-1]) + " and " + sites[-1] + " ") if len(sites) > 1 else (f"{sites[0]} " if sites else "")
        finding = f"Suspected {where}pulmonary embolism"
        if labels.get("acute_and_chronic_pe"):
            finding += " (acute and chronic)"
        elif labels.get("chronic_pe"):
            finding += " (chronic)"
        finding += ", RV/LV >= 1 suggested" if labels.get("rv_lv_ratio_gte_1") else ", RV/LV >= 1 not suggested"
    elif prediction.quality is not None and not prediction.quality.passed:
        finding = (
            f"Non-diagnostic examination for pulmonary embolism ({prediction.quality.summary.removeprefix('non-diagnostic: ')}); "
            "pulmonary embolism is not excluded"
        )
    elif labels.get("indeterminate"):
        finding = "Indeterminate examination for pulmonary embolism (limited image quality suggested)"
    elif flag == Flag.REVIEW:
        finding = "No pulmonary embolism suggested, but close to the decision threshold: review"
    else:
        finding = "No pulmonary embolism suggested"
    text = (
        f"{finding}. AI result, unverified. Worklist priority {flag.value}; "
        f"P(PE) {prediction.series_pe_probability:.2f} (threshold {THRESHOLD})."
    )
    if prediction.model.not_for_clinical_use:
        text = f"{NOT_FOR_CLINICAL_USE} (synthetic demo model). " + text
    return text


def _probabilities(prediction: Prediction) -> str:
    """Every probability and the labels set, for the record."""
    positives = [name for name in EXAM_LABELS if prediction.labels.get(name, False)]
    probabilities = ", ".join(f"{name}={prediction.probabilities[name]:.3f}" for name in EXAM_LABELS if name in prediction.probabilities)
    return f"Labels set: {', '.join(positives) if positives else 'none'}. Probabilities: {probabilities}."


@dataclass(frozen=True)
class QualityFinding:
    """The input-quality result as the SR states it: a RadLex quality value and why."""

    value: CodedConcept
    explanation: str


def quality_finding(prediction: Prediction) -> QualityFinding:
    """The input-quality finding: the input-quality gate's report (``Prediction.quality``,
    pe_model.quality) when it ran, else the model's own "indeterminate" output (the RSNA label for an
    exam whose quality does not allow a reading).

    Gate failed: non-diagnostic quality. Gate passed but something could not be measured, or the model
    says indeterminate: limited quality. Otherwise diagnostic quality.
    """
    quality = prediction.quality
    p = float(prediction.probabilities.get("indeterminate", 0.0))
    if quality is not None:
        if not quality.passed:
            value = codes.NON_DIAGNOSTIC_QUALITY
        elif not quality.verified or prediction.labels.get("indeterminate", False):
            value = codes.LIMITED_QUALITY
        else:
            value = codes.DIAGNOSTIC_QUALITY
        measured = {
            "pulmonary trunk": (quality.pulmonary_trunk_hu, "HU"),
            "noise": (quality.noise_hu, "HU"),
            "contrast-to-noise": (quality.contrast_to_noise, ""),
            "slice thickness": (quality.slice_thickness_mm, "mm"),
            "largest slice gap": (quality.max_slice_gap_mm, "mm"),
        }
        values = ", ".join(f"{name} {_number(v)}{(' ' + unit) if unit else ''}" for name, (v, unit) in measured.items() if v is not None)
        why = f"Input quality check: {value.meaning.lower()} ({quality.summary})."
        if values:
            why += f" Measured: {values}."
        why += f" Model P(indeterminate) {p:.3f}."
        return QualityFinding(value=value, explanation=why)
    if prediction.labels.get("indeterminate", False):
        return QualityFinding(
            value=codes.LIMITED_QUALITY,
            explanation=f"Input quality: the model finds the examination indeterminate (P {p:.3f}); quality may not allow a reading.",
        )
    return QualityFinding(
        value=codes.DIAGNOSTIC_QUALITY,
        explanation=f"Input quality: the model does not find the examination indeterminate (P {p:.3f}).",
    )


def _number(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _comments(prediction: Prediction, quality: QualityFinding, previous_report: Dataset | None) -> ContainerContentItem:
    texts = [disclaimer(prediction.model), _probabilities(prediction), quality.explanation,
             f"Model arithmetic: {prediction.precision}."]
    if prediction.skipped_images:
        shown = "; ".join(f"{uid} ({reason})" for uid, reason in prediction.skipped_images[:20])
        more = f"; and {len(prediction.skipped_images) - 20} more" if len(prediction.skipped_images) > 20 else ""
        texts.append(
            f"{len(prediction.skipped_images)} image(s) of the series were left out of the analysis and were not "
            f"seen by the model: {shown}{more}."
        )
    if previous_report is not None:
        texts.append(
            f"This report supersedes the earlier report SOP Instance UID {previous_report.SOPInstanceUID} "
            f"(series {previous_report.SeriesInstanceUID}); the earlier report must no longer be used."
        )
    container = ContainerContentItem(name=codes.QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS)
    container.ContentSequence = ContentSequence(
        [TextContentItem(name=codes.COMMENT, value=t, relationship_type=RelationshipTypeValues.CONTAINS) for t in texts]
    )
    return container


def build_structured_report(
    prediction: Prediction,
    source_datasets: Sequence[Dataset],
    settings: OutputSettings,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    flag: Flag,
    secondary_captures: Sequence[Dataset] = (),
    previous_report: Dataset | None = None,
) -> Comprehensive3DSR:
    """The SR document of one prediction, in the source study.

    Evidence: every source instance and every secondary capture it references. ``flag``: the
    worklist priority of this result (never ERROR: a failed analysis writes no report).
    """
    if not source_datasets:
        raise ReportError("cannot write a report without the source images")
    if flag not in _FLAG_CODES:
        raise ReportError(f"a report cannot carry the worklist flag {flag.value}")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source_datasets}
    key_uids = list(dict.fromkeys(k.sop_instance_uid for k in prediction.key_images))
    missing = [uid for uid in key_uids if uid not in by_uid]
    if missing:
        raise ReportError(f"key image {missing[0]} is not among the source images of series {prediction.series_instance_uid}")
    key_datasets = [header(by_uid[uid]) for uid in key_uids]
    model = prediction.model
    algorithm = algorithm_identification(model, settings.manufacturer)

    observer = ObserverContext(
        observer_type=dicom_codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(model),
            name=long_string(f"PE triage {model.name}"),
            manufacturer_name=settings.manufacturer or None,
            model_name=long_string(model.name),
        ),
    )
    frames: dict[str, list[int]] = {}
    for key in prediction.key_images:
        if key.frame_number is not None:
            frames.setdefault(key.sop_instance_uid, []).append(key.frame_number)
    source_images = [
        SourceImageForMeasurementGroup(
            referenced_sop_class_uid=ds.SOPClassUID,
            referenced_sop_instance_uid=ds.SOPInstanceUID,
            referenced_frame_numbers=sorted(set(frames[uid])) if uid in frames else None,
        )
        for uid, ds in zip(key_uids, key_datasets, strict=True)
    ]
    source_images += [
        SourceImageForMeasurementGroup(referenced_sop_class_uid=sc.SOPClassUID, referenced_sop_instance_uid=sc.SOPInstanceUID)
        for sc in secondary_captures
    ]
    positive_sites = [FindingSite(anatomic_location=site) for label, site in _SITES if prediction.labels.get(label, False)]
    groups = [
        MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking("Pulmonary embolism"),
            finding_type=codes.PULMONARY_EMBOLISM,
            algorithm_id=algorithm,
            finding_sites=positive_sites or None,
            measurements=[_certainty(prediction.series_pe_probability)],
            qualitative_evaluations=[
                QualitativeEvaluation(name=codes.PULMONARY_EMBOLISM, value=_presence(prediction)),
                *_clinical_course(prediction),
            ],
            source_images=source_images or None,
        )
    ]
    for label, site in _SITES:
        groups.append(
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(f"Pulmonary embolism, {site.meaning.lower()}"),
                finding_type=codes.PULMONARY_EMBOLISM,
                algorithm_id=algorithm,
                finding_sites=[FindingSite(anatomic_location=site)],
                measurements=[_certainty(prediction.probabilities[label])],
                qualitative_evaluations=[
                    QualitativeEvaluation(
                        name=codes.PULMONARY_EMBOLISM,
                        value=codes.PRESENT if prediction.labels.get(label, False) else codes.ABSENT,
                    )
                ],
            )
        )
    groups.append(
        MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking("RV/LV diameter ratio"),
            finding_type=codes.RV_LV_RATIO_GTE_1,
            algorithm_id=algorithm,
            measurements=[_certainty(prediction.probabilities["rv_lv_ratio_gte_1"])],
            qualitative_evaluations=[
                QualitativeEvaluation(
                    name=codes.RV_LV_RATIO_GTE_1,
                    value=codes.PRESENT if prediction.labels.get("rv_lv_ratio_gte_1", False) else codes.ABSENT,
                )
            ],
        )
    )
    groups.append(
        MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking("Worklist priority"),
            finding_type=codes.PRIORITY,
            algorithm_id=algorithm,
            qualitative_evaluations=[QualitativeEvaluation(name=codes.PRIORITY, value=_FLAG_CODES[flag])],
        )
    )
    quality = quality_finding(prediction)
    groups.append(
        MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking("Input image quality"),
            finding_type=codes.IMAGE_QUALITY,
            algorithm_id=algorithm,
            qualitative_evaluations=[QualitativeEvaluation(name=codes.IMAGE_QUALITY, value=quality.value)],
        )
    )
    library = [ds for ds in key_datasets if _is_cross_sectional_image(ds)]
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=[codes.CT_UNSPECIFIED_BODY_REGION, codes.ANGIOGRAPHY],
        imaging_measurements=groups,
        title=codes.IMAGING_MEASUREMENT_REPORT,
        referenced_images=library or None,
    )
    root = report[0]
    root.ContentSequence.insert(
        0, TextContentItem(name=codes.IMPRESSION, value=impression(prediction, flag), relationship_type=RelationshipTypeValues.CONTAINS)
    )
    root.ContentSequence.append(_comments(prediction, quality, previous_report))
    try:
        sr = Comprehensive3DSR(
            evidence=[*evidence_headers(source_datasets), *secondary_captures],
            content=root,
            series_instance_uid=series_instance_uid,
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer=settings.manufacturer,
            is_complete=True,
            is_final=False,
            is_verified=False,
            institution_name=settings.institution_name or None,
            previous_versions=[previous_report] if previous_report is not None else None,
            series_description=series_description("AI PE triage report", model),
            coding_schemes=codes.coding_schemes(),
            manufacturer_model_name=long_string(model.name),
            software_versions=long_string(model.version),
            contributing_equipment=[contributing_equipment(model, settings.manufacturer)],
            specific_character_set="ISO_IR 192",
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ReportError(f"structured report for series {prediction.series_instance_uid} could not be built: {exc}") from exc
    keep_one_processing_item(sr, model)
    return sr
