"""Key Object Selection: the "key images" of a result and the IHE IOCM rejection note of a superseded one."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from highdicom.ko import KeyObjectSelectionDocument
from pydicom.dataset import Dataset
from pydicom.uid import KeyObjectSelectionDocumentStorage

from pacs_agent.db.models import Flag
from pacs_agent.reports.kinds import ObjectKind as OutputKind
from pacs_agent.errors import ReportError
from pacs_agent.reports import ProducedObject, RejectedInstance, write_reports
from pacs_agent.reports.kos import RejectionReason, build_rejection_note
from pacs_agent.settings import OutputSettings
from tests.support.ct_series import PATIENT_ID, PATIENT_NAME, CTSeriesSpec, make_ct_series
from tests.support.dciodvfy import dciodvfy_available, run_dciodvfy
from tests.support.predictions import make_prediction


@pytest.fixture
def series() -> list[Dataset]:
    return make_ct_series(CTSeriesSpec(n_slices=8, rows=48, columns=48))


def _referenced(ds: Dataset) -> list[tuple[str, str]]:
    """(value type, SOP Instance UID) of each content item of a KOS, in order."""
    return [
        (str(item.ValueType), str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
        for item in ds.ContentSequence
        if "ReferencedSOPSequence" in item
    ]


def _evidence(ds: Dataset) -> set[str]:
    return {
        str(sop.ReferencedSOPInstanceUID)
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for s in study.ReferencedSeriesSequence
        for sop in s.ReferencedSOPSequence
    }


def _rejected(produced: list[ProducedObject]) -> list[RejectedInstance]:
    return [RejectedInstance(p.sop_class_uid, p.sop_instance_uid, p.series_instance_uid) for p in produced if p.kind != OutputKind.REJECTION]


def test_key_images_list_the_key_slices_then_the_secondary_captures(tmp_path: Path, series: list[Dataset]) -> None:
    prediction = make_prediction(series)
    produced = write_reports(prediction, series, OutputSettings(), tmp_path / "out")
    [kos_object] = [p for p in produced if p.kind == OutputKind.KOS]
    assert produced[-1] == kos_object  # after the images and the report it points at
    ds = pydicom.dcmread(kos_object.path)
    assert ds.SOPClassUID == KeyObjectSelectionDocumentStorage and ds.Modality == "KO"
    assert ds.StudyInstanceUID == series[0].StudyInstanceUID
    assert (str(ds.PatientName), ds.PatientID) == (PATIENT_NAME, PATIENT_ID)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    title = ds.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == ("113000", "DCM", "Of Interest")
    key_uids = list(dict.fromkeys(k.sop_instance_uid for k in prediction.key_images))
    sc_uids = [p.sop_instance_uid for p in produced if p.kind == OutputKind.SC]
    assert _referenced(ds) == [("IMAGE", uid) for uid in key_uids + sc_uids]
    assert _evidence(ds) == set(key_uids + sc_uids)
    [description] = [item for item in ds.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "113012"]
    assert description.ConceptNameCodeSequence[0].CodeValue == "113012"
    assert "unverified ai output" in description.TextValue.lower() and prediction.model.sha256 in description.TextValue
    assert "NOT FOR CLINICAL USE" in description.TextValue
    document = KeyObjectSelectionDocument.from_dataset(ds)
    assert document.resolve_reference(sc_uids[0])[0] == series[0].StudyInstanceUID
    if dciodvfy_available():
        result = run_dciodvfy(kos_object.path)
        assert result.errors == [], result.output
        assert result.iod == "KeyObjectSelectionDocument"


def test_negative_result_key_images_hold_the_key_slices_only(tmp_path: Path, series: list[Dataset]) -> None:
    produced = write_reports(make_prediction(series, pe_present=False), series, OutputSettings(), tmp_path / "out")
    assert [p.kind for p in produced] == [OutputKind.SR, OutputKind.KOS]  # no SCs for a ROUTINE result by default
    ds = pydicom.dcmread(produced[-1].path)
    assert {uid for _, uid in _referenced(ds)} <= {str(d.SOPInstanceUID) for d in series}
    assert write_reports(make_prediction(series), series, OutputSettings(key_images=False), tmp_path / "none")[-1].kind == OutputKind.SR


def test_reanalysis_rejects_every_object_of_the_superseded_result(tmp_path: Path, series: list[Dataset]) -> None:
    first = write_reports(make_prediction(series), series, OutputSettings(segmentation=True), tmp_path / "first")
    previous_sr = pydicom.dcmread(next(p.path for p in first if p.kind == OutputKind.SR))
    second = write_reports(
        make_prediction(series, pe_present=False), series, OutputSettings(), tmp_path / "second",
        previous_report=previous_sr, superseded=_rejected(first),
    )
    assert [p.kind for p in second] == [OutputKind.SR, OutputKind.KOS, OutputKind.REJECTION]  # the rejection last
    note = pydicom.dcmread(second[-1].path)
    title = note.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == ("113001", "DCM", "Rejected for Quality Reasons")
    assert note.StudyInstanceUID == series[0].StudyInstanceUID
    assert (str(note.PatientName), note.PatientID) == (PATIENT_NAME, PATIENT_ID)
    old = {p.sop_instance_uid for p in first}
    # Exactly the old result: nothing of the new one, and no source CT in the evidence (IOCM would hide it).
    assert {uid for _, uid in _referenced(note)} == old == _evidence(note)
    kinds = {p.sop_instance_uid: p.kind for p in first}
    for value_type, uid in _referenced(note):
        assert value_type == ("COMPOSITE" if kinds[uid] in (OutputKind.SR, OutputKind.KOS) else "IMAGE")
    [description] = [item for item in note.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "113012"]
    assert second[0].sop_instance_uid in description.TextValue  # names the replacement
    if dciodvfy_available():
        for p in second:
            result = run_dciodvfy(p.path)
            assert result.errors == [], result.output


def test_rejection_is_configurable(tmp_path: Path, series: list[Dataset]) -> None:
    first = write_reports(make_prediction(series), series, OutputSettings(), tmp_path / "first")
    off = write_reports(
        make_prediction(series), series, OutputSettings(retract_superseded=False), tmp_path / "off", superseded=_rejected(first)
    )
    assert OutputKind.REJECTION not in {p.kind for p in off}
    safety = write_reports(
        make_prediction(series), series, OutputSettings(rejection_reason="patient-safety"), tmp_path / "safety",
        superseded=_rejected(first),
    )
    note = pydicom.dcmread(safety[-1].path)
    assert note.ConceptNameCodeSequence[0].CodeValue == "113037"
    assert RejectionReason("patient-safety").code.meaning == "Rejected for Patient Safety Reasons"


def test_rejection_note_needs_objects_to_reject(series: list[Dataset]) -> None:
    with pytest.raises(ReportError, match="at least one"):
        build_rejection_note(
            [], series[0], make_prediction(series).model, OutputSettings(), reason=RejectionReason.QUALITY,
            replaced_by="1.2.3", series_instance_uid="1.2.3.4", sop_instance_uid="1.2.3.5",
        )


def test_review_result_gets_secondary_captures_in_its_key_images(tmp_path: Path, series: list[Dataset]) -> None:
    produced = write_reports(make_prediction(series, pe_present=False), series, OutputSettings(), tmp_path / "out", flag=Flag.REVIEW)
    assert [p.kind for p in produced].count(OutputKind.SC) == 3
    ds = pydicom.dcmread(produced[-1].path)
    assert {p.sop_instance_uid for p in produced if p.kind == OutputKind.SC} <= {uid for _, uid in _referenced(ds)}
