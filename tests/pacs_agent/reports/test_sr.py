"""The TID 1500 Comprehensive SR: written, read back with pydicom and highdicom, validated by dciodvfy."""

from __future__ import annotations

from pathlib import Path

import highdicom
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage

from pacs_agent.db.models import OutputKind
from pacs_agent.errors import ReportError
from pacs_agent.reports import ProducedObject, codes, write_reports
from pacs_agent.settings import OutputSettings
from phantoms import PhantomSpec, write_phantom_series
from pe_model.prediction import KeyImage, Prediction
from tests.support.ct_series import PATIENT_ID, PATIENT_NAME, CTSeriesSpec, make_ct_series
from tests.support.dciodvfy import dciodvfy_available, run_dciodvfy
from tests.support.predictions import CLINICAL_SHA256, DEMO_SHA256, make_prediction

SR_ONLY = OutputSettings(secondary_capture=False, manufacturer="PE Triage Test")


@pytest.fixture
def series() -> list[Dataset]:
    return make_ct_series(CTSeriesSpec(n_slices=8, rows=32, columns=32))


def _write_sr(tmp_path: Path, prediction: Prediction, series: list[Dataset], **kwargs: object) -> ProducedObject:
    produced = write_reports(prediction, series, SR_ONLY, tmp_path / "out", **kwargs)  # type: ignore[arg-type]
    assert [p.kind for p in produced] == [OutputKind.SR]
    return produced[0]


def _codes(items: list[highdicom.sr.CodedConcept]) -> set[tuple[str, str]]:
    return {(c.scheme_designator, c.value) for c in items}


def _all_text(ds: Dataset) -> str:
    texts: list[str] = []

    def walk(seq: pydicom.Sequence) -> None:
        for item in seq:
            if "TextValue" in item:
                texts.append(str(item.TextValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return "\n".join(texts)


def _text_items(group: highdicom.sr.MeasurementsAndQualitativeEvaluations) -> dict[str, list[str]]:
    """TEXT children of a measurement group by concept code (TID 4019 algorithm identification)."""
    out: dict[str, list[str]] = {}
    for item in group[0].ContentSequence:
        if item.ValueType == "TEXT":
            out.setdefault(item.ConceptNameCodeSequence[0].CodeValue, []).append(str(item.TextValue))
    return out


def _groups(sr: highdicom.sr.ComprehensiveSR) -> list[highdicom.sr.MeasurementsAndQualitativeEvaluations]:
    return list(sr.content.get_image_measurement_groups())


def test_positive_report_round_trips_with_codes_flags_and_provenance(tmp_path: Path, series: list[Dataset]) -> None:
    prediction = make_prediction(series, pe_present=True, rv_lv_gte_1=True)
    produced = _write_sr(tmp_path, prediction, series)
    assert produced.path == tmp_path / "out" / f"{produced.sop_instance_uid}.dcm"

    ds = pydicom.dcmread(produced.path)
    assert ds.SOPClassUID == ComprehensiveSRStorage == produced.sop_class_uid
    assert (ds.CompletionFlag, ds.VerificationFlag, ds.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")
    assert ds.StudyInstanceUID == series[0].StudyInstanceUID
    assert ds.SeriesInstanceUID == produced.series_instance_uid != series[0].SeriesInstanceUID
    assert ds.Modality == "SR"
    # Patient and study attributes come from the source so PACS files the report with the study.
    assert (str(ds.PatientName), ds.PatientID, ds.AccessionNumber) == (PATIENT_NAME, PATIENT_ID, "ACC0042")
    assert ds.ManufacturerModelName == prediction.model.name
    assert ds.SoftwareVersions == prediction.model.version
    assert [item.CodingSchemeDesignator for item in ds.CodingSchemeIdentificationSequence] == [codes.LOCAL_SCHEME]

    sr = highdicom.sr.srread(produced.path)
    assert isinstance(sr, highdicom.sr.ComprehensiveSR)
    # The whole series is the evidence.
    evidence = {sop for _, _, sop, _ in sr.get_evidence()}
    assert evidence == {ds_.SOPInstanceUID for ds_ in series}

    observer = sr.content.get_observer_contexts()[0]
    assert observer.observer_type == highdicom.sr.CodedConcept("121007", "DCM", "Device")
    attributes = observer.observer_identifying_attributes
    assert attributes.model_name == prediction.model.name
    assert attributes.manufacturer_name == "PE Triage Test"

    groups = _groups(sr)
    finding_types = [(g.finding_type.scheme_designator, g.finding_type.value) for g in groups]
    assert finding_types.count(("SCT", "59282003")) == 4  # series + three sites
    assert ("99PETRIAGE", codes.RV_LV_RATIO_GTE_1.value) in finding_types

    main = groups[0]
    assert _codes(main.finding_sites and [s.value for s in main.finding_sites]) == {
        ("SCT", "45341000"),  # central -> pulmonary trunk
        ("SCT", "78480002"),  # right pulmonary artery
    }
    evaluations = {(e.name.value, e.value.value) for e in main.get_qualitative_evaluations()}
    assert ("59282003", "52101004") in evaluations  # PE present
    assert ("263502005", "424124008") in evaluations  # acute
    [certainty] = main.get_measurements(name=codes.CERTAINTY_OF_FINDING)
    assert certainty.value == pytest.approx(prediction.series_pe_probability)
    assert certainty.unit == codes.NO_UNITS
    algorithm = _text_items(main)
    assert algorithm["111001"] == [prediction.model.name]  # Algorithm Name
    assert algorithm["111003"] == [prediction.model.version]  # Algorithm Version
    assert f"checkpoint_sha256={DEMO_SHA256}" in algorithm["111002"]  # Algorithm Parameters
    # Key slices are the group's source images and sit in the image library.
    assert {img.referenced_sop_instance_uid for img in main.source_images} == {k.sop_instance_uid for k in prediction.key_images}
    library = [item for item in ds.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "111028"]
    assert len(library) == 1
    library_uids = {
        image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for image in highdicom.sr.utils.find_content_items(library[0], value_type=highdicom.sr.ValueTypeValues.IMAGE, recursive=True)
    }
    assert library_uids == {k.sop_instance_uid for k in prediction.key_images}

    rv_lv = next(g for g in groups if g.finding_type.value == codes.RV_LV_RATIO_GTE_1.value)
    assert {(e.name.value, e.value.value) for e in rv_lv.get_qualitative_evaluations()} == {(codes.RV_LV_RATIO_GTE_1.value, "52101004")}
    assert rv_lv.get_measurements(name=codes.CERTAINTY_OF_FINDING)[0].value == pytest.approx(0.75)

    sites = {g.finding_sites[0].value.value: g for g in groups[1:4]}
    assert sites["50408007"].get_measurements()[0].value == pytest.approx(prediction.probabilities["leftsided_pe"])
    assert {(e.value.value) for e in sites["50408007"].get_qualitative_evaluations()} == {"272519000"}  # left: absent

    text = _all_text(ds)
    assert "Unverified AI output" in text
    assert prediction.model.name in text and DEMO_SHA256 in text
    assert "NOT FOR CLINICAL USE" in text and "NOT FOR CLINICAL USE" in ds.SeriesDescription


def test_negative_report_says_absent_without_sites_or_course(tmp_path: Path, series: list[Dataset]) -> None:
    prediction = make_prediction(series, pe_present=False, not_for_clinical_use=False)
    sr = highdicom.sr.srread(_write_sr(tmp_path, prediction, series).path)
    main = _groups(sr)[0]
    assert main.finding_sites == []
    evaluations = {(e.name.value, e.value.value) for e in main.get_qualitative_evaluations()}
    assert evaluations == {("59282003", "272519000")}
    assert main.get_measurements()[0].value == pytest.approx(prediction.series_pe_probability)


def test_clinical_model_report_has_no_demo_warning(tmp_path: Path, series: list[Dataset]) -> None:
    prediction = make_prediction(series, not_for_clinical_use=False)
    ds = pydicom.dcmread(_write_sr(tmp_path, prediction, series).path)
    assert "NOT FOR CLINICAL USE" not in _all_text(ds)
    assert "NOT FOR CLINICAL USE" not in ds.SeriesDescription
    assert CLINICAL_SHA256 in _all_text(ds)
    assert "unverified" in ds.SeriesDescription.lower()


def test_chronic_label_is_reported_as_chronic_course(tmp_path: Path, series: list[Dataset]) -> None:
    prediction = make_prediction(series, chronic=True)
    main = _groups(highdicom.sr.srread(_write_sr(tmp_path, prediction, series).path))[0]
    courses = {e.value.value for e in main.get_qualitative_evaluations() if e.name.value == "263502005"}
    assert courses == {"90734009"}


def test_reanalysis_report_references_and_supersedes_the_previous_one(tmp_path: Path, series: list[Dataset]) -> None:
    first = _write_sr(tmp_path, make_prediction(series, pe_present=False), series)
    previous = pydicom.dcmread(first.path)
    second = _write_sr(tmp_path, make_prediction(series, pe_present=True), series, previous_report=previous)
    assert second.sop_instance_uid != first.sop_instance_uid
    assert second.series_instance_uid != first.series_instance_uid
    ds = pydicom.dcmread(second.path)
    [study] = ds.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == previous.StudyInstanceUID
    [ref_series] = study.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == previous.SeriesInstanceUID
    [ref] = ref_series.ReferencedSOPSequence
    assert (ref.ReferencedSOPInstanceUID, ref.ReferencedSOPClassUID) == (previous.SOPInstanceUID, ComprehensiveSRStorage)
    assert f"supersedes the earlier report SOP Instance UID {previous.SOPInstanceUID}" in _all_text(ds)
    assert "PredecessorDocumentsSequence" not in previous


def test_key_image_outside_the_series_is_refused(tmp_path: Path, series: list[Dataset]) -> None:
    good = make_prediction(series)
    bad = Prediction(**{**good.__dict__, "key_images": (KeyImage("1.2.3.4", 0.9, 0),)})
    with pytest.raises(ReportError, match="1.2.3.4 is not among the source images"):
        write_reports(bad, series, SR_ONLY, tmp_path)


def test_sources_of_another_study_are_refused(tmp_path: Path, series: list[Dataset]) -> None:
    other = make_ct_series(CTSeriesSpec(n_slices=8, rows=32, columns=32))
    with pytest.raises(ReportError, match="belong to study"):
        write_reports(make_prediction(series), other, SR_ONLY, tmp_path)


@pytest.mark.skipif(not dciodvfy_available(), reason="dciodvfy (dicom3tools) is not installed")
@pytest.mark.parametrize("pe_present", [True, False])
def test_report_passes_dciodvfy(tmp_path: Path, series: list[Dataset], pe_present: bool) -> None:
    first = _write_sr(tmp_path, make_prediction(series, pe_present=pe_present), series)
    second = _write_sr(
        tmp_path, make_prediction(series, pe_present=pe_present), series, previous_report=pydicom.dcmread(first.path)
    )
    for produced in (first, second):
        result = run_dciodvfy(produced.path)
        assert result.errors == [], result.output
        assert result.iod == "ComprehensiveSR"


@pytest.mark.skipif(not dciodvfy_available(), reason="dciodvfy (dicom3tools) is not installed")
def test_dciodvfy_check_catches_a_broken_report(tmp_path: Path, series: list[Dataset]) -> None:
    """The validation is not vacuous: a report missing a mandatory flag fails it."""
    produced = _write_sr(tmp_path, make_prediction(series), series)
    ds = pydicom.dcmread(produced.path)
    del ds.CompletionFlag
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken)
    result = run_dciodvfy(broken)
    assert any("Completion Flag" in line or "CompletionFlag" in line for line in result.errors), result.output


def test_enhanced_ct_key_frames_are_referenced_by_frame_number(tmp_path: Path) -> None:
    truth = write_phantom_series(tmp_path / "phantom", PhantomSpec(n_slices=12, rows=32, columns=32), enhanced=True)
    [enhanced] = [pydicom.dcmread(path) for path in dict.fromkeys(truth.files)]
    prediction = make_prediction([enhanced], n_key_images=3)
    sr = highdicom.sr.srread(_write_sr(tmp_path, prediction, [enhanced]).path)
    [source] = _groups(sr)[0].source_images
    assert source.referenced_sop_instance_uid == enhanced.SOPInstanceUID
    assert sorted(source.referenced_frame_numbers) == sorted(k.frame_number for k in prediction.key_images)
    assert {sop for _, _, sop, _ in sr.get_evidence()} == {enhanced.SOPInstanceUID}
    if dciodvfy_available():
        result = run_dciodvfy(_write_sr(tmp_path, prediction, [enhanced]).path)
        assert result.errors == [], result.output


def test_indeterminate_exam_is_reported_as_indeterminate(tmp_path: Path, series: list[Dataset]) -> None:
    negative = make_prediction(series, pe_present=False)
    probabilities = {**negative.probabilities, "negative_exam_for_pe": 0.3, "indeterminate": 0.7}
    labels = {**negative.labels, "negative_exam_for_pe": False, "indeterminate": True}
    prediction = Prediction(**{**negative.__dict__, "probabilities": probabilities, "labels": labels})
    main = _groups(highdicom.sr.srread(_write_sr(tmp_path, prediction, series).path))[0]
    assert {(e.name.value, e.value.value) for e in main.get_qualitative_evaluations()} == {("59282003", "82334004")}
