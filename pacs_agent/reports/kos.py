"""Key Object Selection documents: the result's key images, and IHE IOCM rejection notes.

- Key images (title (113000, DCM, "Of Interest"), TID 2010): the key CT slices and the Grad-CAM
  secondary captures of one result, in the source study, so a viewer's "key images" button shows
  them. The description says it is an unverified AI result and names the model.
- Rejection note (IHE Imaging Object Change Management): a KOS titled with a CID 7031 rejection
  reason that lists every object of a result a re-analysis supersedes, so PACS that honour IOCM
  hide them. The default reason is (113001, DCM, "Rejected for Quality Reasons"): the superseded
  result is not wrong-patient or unsafe data (that is what 113037 "Rejected for Patient Safety
  Reasons" and 113038 "Incorrect Modality Worklist Entry" are for, and archives may then purge or
  refuse to return it), nor is its retention period over (113039); it is an output replaced by a
  better one, which IOCM's quality rejection hides from normal display while the archive keeps it
  for audit. Sites that want it treated as unsafe set ``outputs.rejection_reason = "patient-safety"``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from highdicom.sr import CodedConcept, DeviceObserverIdentifyingAttributes, ObserverContext
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from pacs_agent.errors import ReportError
from pacs_agent.reports import codes
from pacs_agent.reports.provenance import (
    NOT_FOR_CLINICAL_USE,
    UNVERIFIED,
    contributing_equipment,
    device_observer_uid,
    keep_one_processing_item,
    long_string,
    series_description,
)
from pacs_agent.reports.sources import header
from pacs_agent.settings import OutputSettings
from pe_model.prediction import ModelInfo, Prediction

#: Series Numbers of the key-image and rejection-note series (new series in the source study).
KEY_IMAGES_SERIES_NUMBER = 9904
REJECTION_SERIES_NUMBER = 9905
#: SOP classes the KOS references as IMAGE items (everything else: COMPOSITE).
_IMAGE_SOP_CLASSES = frozenset(
    str(uid)
    for uid in (
        CTImageStorage,
        EnhancedCTImageStorage,
        SecondaryCaptureImageStorage,
        MultiFrameTrueColorSecondaryCaptureImageStorage,
        SegmentationStorage,
    )
)
_PATIENT_AND_STUDY = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


class RejectionReason(enum.StrEnum):
    """``outputs.rejection_reason``: the IOCM title of the rejection note of a superseded result."""

    QUALITY = "quality"
    PATIENT_SAFETY = "patient-safety"

    @property
    def code(self) -> CodedConcept:
        if self is RejectionReason.PATIENT_SAFETY:
            return codes.REJECTED_FOR_PATIENT_SAFETY_REASONS
        return codes.REJECTED_FOR_QUALITY_REASONS


@dataclass(frozen=True)
class RejectedInstance:
    """One object of a superseded result, as the outbox recorded it."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str


def _observer(model: ModelInfo, manufacturer: str) -> ObserverContext:
    return ObserverContext(
        observer_type=dicom_codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(model),
            name=long_string(f"PE triage {model.name}"),
            manufacturer_name=manufacturer or None,
            model_name=long_string(model.name),
        ),
    )


def _reference(sop_class_uid: str, sop_instance_uid: str, series_instance_uid: str, study_instance_uid: str) -> Dataset:
    """Evidence item of one referenced object (UIDs; Rows/Columns mark an image for highdicom)."""
    item = Dataset()
    item.SOPClassUID = sop_class_uid
    item.SOPInstanceUID = sop_instance_uid
    item.SeriesInstanceUID = series_instance_uid
    item.StudyInstanceUID = study_instance_uid
    if sop_class_uid in _IMAGE_SOP_CLASSES:
        item.Rows = 1
        item.Columns = 1
    return item


def _with_patient_and_study(item: Dataset, study_header: Dataset) -> Dataset:
    """``item`` plus the patient and study attributes the KOS inherits from its first evidence."""
    for keyword in _PATIENT_AND_STUDY:
        if keyword in study_header:
            setattr(item, keyword, study_header.data_element(keyword).value)  # type: ignore[union-attr]
    return item


def key_images_description(prediction: Prediction) -> str:
    text = (
        f"Key images of the AI pulmonary embolism triage result ({UNVERIFIED.lower()}): the slices the model "
        f"ranks highest and their Grad-CAM heatmaps. P(PE) {prediction.series_pe_probability:.2f}. "
        f"Model {prediction.model.name} {prediction.model.version}, sha256 {prediction.model.sha256}."
    )
    if prediction.model.not_for_clinical_use:
        text = f"{NOT_FOR_CLINICAL_USE}: synthetic demo model. " + text
    return text


def build_key_images(
    prediction: Prediction,
    source_datasets: Sequence[Dataset],
    secondary_captures: Sequence[Dataset],
    settings: OutputSettings,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
) -> KeyObjectSelectionDocument:
    """The "key images" KOS of one result: key CT slices first (model's rank), then the SCs."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source_datasets}
    key_uids = list(dict.fromkeys(k.sop_instance_uid for k in prediction.key_images))
    missing = [uid for uid in key_uids if uid not in by_uid]
    if missing:
        raise ReportError(f"key image {missing[0]} is not among the source images of series {prediction.series_instance_uid}")
    if not key_uids and not secondary_captures:
        raise ReportError(f"series {prediction.series_instance_uid} has no key images to select")
    study = str(source_datasets[0].StudyInstanceUID)
    first = header(by_uid[key_uids[0]]) if key_uids else header(source_datasets[0])
    referenced = [
        _with_patient_and_study(_reference(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), study), first)
        for ds in (by_uid[uid] for uid in key_uids)
    ]
    referenced += [
        _reference(str(sc.SOPClassUID), str(sc.SOPInstanceUID), str(sc.SeriesInstanceUID), study) for sc in secondary_captures
    ]
    if not key_uids:
        referenced[0] = _with_patient_and_study(referenced[0], first)
    model = prediction.model
    try:
        content = KeyObjectSelection(
            document_title=codes.OF_INTEREST,
            referenced_objects=referenced,
            observer_device_context=_observer(model, settings.manufacturer),
            description=key_images_description(prediction),
        )
        document = KeyObjectSelectionDocument(
            evidence=referenced,
            content=content,
            series_instance_uid=series_instance_uid,
            series_number=KEY_IMAGES_SERIES_NUMBER,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer=settings.manufacturer,
            institution_name=settings.institution_name or None,
            series_description=series_description("AI PE key images", model),
            contributing_equipment=[contributing_equipment(model, settings.manufacturer)],
            specific_character_set="ISO_IR 192",
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ReportError(f"key image selection for series {prediction.series_instance_uid} could not be built: {exc}") from exc
    keep_one_processing_item(document, model)
    return document


def build_rejection_note(
    rejected: Sequence[RejectedInstance],
    study_header: Dataset,
    model: ModelInfo,
    settings: OutputSettings,
    *,
    reason: RejectionReason,
    replaced_by: str,
    series_instance_uid: str,
    sop_instance_uid: str,
) -> KeyObjectSelectionDocument:
    """An IOCM rejection note for ``rejected`` (all in the study of ``study_header``).

    ``replaced_by``: the SOP Instance UID of the new report, named in the description.
    ``model``: the model of the NEW result (the rejecting device).
    """
    if not rejected:
        raise ReportError("a rejection note needs at least one object to reject")
    study = str(study_header.StudyInstanceUID)
    unique = list({r.sop_instance_uid: r for r in rejected}.values())
    referenced = [_reference(r.sop_class_uid, r.sop_instance_uid, r.series_instance_uid, study) for r in unique]
    referenced[0] = _with_patient_and_study(referenced[0], header(study_header))
    description = (
        f"Superseded AI result: a re-analysis replaced these {len(unique)} object(s); "
        f"the current result is SR {replaced_by}. Rejected by {model.name} {model.version}."
    )
    try:
        content = KeyObjectSelection(
            document_title=reason.code,
            referenced_objects=referenced,
            observer_device_context=_observer(model, settings.manufacturer),
            description=description,
        )
        document = KeyObjectSelectionDocument(
            evidence=referenced,
            content=content,
            series_instance_uid=series_instance_uid,
            series_number=REJECTION_SERIES_NUMBER,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer=settings.manufacturer,
            institution_name=settings.institution_name or None,
            series_description=long_string(f"AI PE result superseded ({reason.code.meaning})"),
            contributing_equipment=[contributing_equipment(model, settings.manufacturer)],
            specific_character_set="ISO_IR 192",
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ReportError(f"rejection note for study could not be built: {exc}") from exc
    keep_one_processing_item(document, model)
    return document
