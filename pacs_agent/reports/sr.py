"""The findings as a Comprehensive SR with a TID 1500 measurement report.

Layout of the content tree (PS3.16 TID 1500):
- observation context: the model as device observer (TID 1004);
- procedure reported: CT + angiography (CID 100);
- image library: the key slices (TID 1600);
- imaging measurements, one TID 1501 group each:
  pulmonary embolism (presence, finding sites, clinical course, certainty = P(PE in the series)),
  one group per site (pulmonary trunk / right / left pulmonary artery, certainty = P(site)),
  RV/LV diameter ratio >= 1 (local code, certainty = P(RV/LV >= 1));
- qualitative evaluations: TEXT comments (unverified AI output, model provenance, probabilities,
  and, on re-analysis, which report this one supersedes).
"Certainty of Finding" is always the model's probability that the group's finding is present.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom
from highdicom.sr import (
    CodedConcept,
    ComprehensiveSR,
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

from pacs_agent.errors import ReportError
from pacs_agent.reports import codes
from pacs_agent.reports.sources import evidence_headers, header
from pacs_agent.reports.provenance import (
    algorithm_identification,
    device_observer_uid,
    disclaimer,
    long_string,
    series_description,
)
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


def _summary(prediction: Prediction) -> str:
    """One line a reader understands: decision and every probability."""
    decision = "PE present" if prediction.pe_present else "no PE"
    positives = [name for name in EXAM_LABELS if prediction.labels.get(name, False)]
    probabilities = ", ".join(f"{name}={prediction.probabilities[name]:.3f}" for name in EXAM_LABELS if name in prediction.probabilities)
    return (
        f"Model decision: {decision} (series PE probability {prediction.series_pe_probability:.3f}, threshold {THRESHOLD}). "
        f"Labels set: {', '.join(positives) if positives else 'none'}. Probabilities: {probabilities}."
    )


def _comments(prediction: Prediction, previous_report: Dataset | None) -> ContainerContentItem:
    texts = [disclaimer(prediction.model), _summary(prediction)]
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
    previous_report: Dataset | None = None,
) -> ComprehensiveSR:
    """The SR document of one prediction, in the source study, evidence = every source instance."""
    if not source_datasets:
        raise ReportError("cannot write a report without the source images")
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
    library = [ds for ds in key_datasets if _is_cross_sectional_image(ds)]
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=[codes.CT_UNSPECIFIED_BODY_REGION, codes.ANGIOGRAPHY],
        imaging_measurements=groups,
        title=codes.IMAGING_MEASUREMENT_REPORT,
        referenced_images=library or None,
    )
    report[0].ContentSequence.append(_comments(prediction, previous_report))
    try:
        sr = ComprehensiveSR(
            evidence=evidence_headers(source_datasets),
            content=report[0],
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
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ReportError(f"structured report for series {prediction.series_instance_uid} could not be built: {exc}") from exc
    return sr
