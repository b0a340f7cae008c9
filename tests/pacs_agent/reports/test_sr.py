"""The TID 1500 Comprehensive SR: written, read back with pydicom and highdicom, validated by dciodvfy."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import highdicom
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage

from pacs_agent.db.models import Flag, OutputKind
from pacs_agent.errors import ReportError
from pacs_agent.reports import ProducedObject, codes, write_reports
from pacs_agent.reports.provenance import device_observer_uid
from pacs_agent.reports.sr import impression, quality_finding
from pacs_agent.settings import OutputSettings
from phantoms import PhantomSpec, write_phantom_series
from pe_model.prediction import KeyImage, Prediction
from pe_model.quality import QualityReport
from tests.support.ct_series import PATIENT_ID, PATIENT_NAME, CTSeriesSpec, make_ct_series
from tests.support.dciodvfy import dciodvfy_available, run_dciodvfy
from tests.support.predictions import CLINICAL_SHA256, DEMO_SHA256, make_prediction

SR_ONLY = OutputSettings(secondary_capture="never", key_images=False, manufacturer="PE Triage Test")


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


def _groups(sr: highdicom.sr.Comprehensive3DSR) -> list[highdicom.sr.MeasurementsAndQualitativeEvaluations]:
    return list(sr.content.get_image_measurement_groups())


def test_positive_report_round_trips_with_codes_flags_and_provenance(tmp_path: Path, series: list[Dataset]) -> None:
    prediction = make_prediction(series, pe_present=True, rv_lv_gte_1=True)
    produced = _write_sr(tmp_path, prediction, series)
    assert produced.path == tmp_path / "out" / f"{produced.sop_instance_uid}.dcm"

    ds = pydicom.dcmread(produced.path)
    assert ds.SOPClassUID == Comprehensive3DSRStorage == produced.sop_class_uid
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
    assert isinstance(sr, highdicom.sr.Comprehensive3DSR)
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
    assert (ref.ReferencedSOPInstanceUID, ref.ReferencedSOPClassUID) == (previous.SOPInstanceUID, Comprehensive3DSRStorage)
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
        assert result.iod == "Comprehensive3DSR"


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


# -- IHE AI Results (AIR) Evaluation Result ------------------------------------------------------


def _group(sr: highdicom.sr.Comprehensive3DSR, finding_type: highdicom.sr.CodedConcept) -> highdicom.sr.MeasurementsAndQualitativeEvaluations:
    [group] = [g for g in _groups(sr) if g.finding_type == finding_type]
    return group


def test_contributing_equipment_names_the_algorithm_with_a_device_uid_from_the_checkpoint(tmp_path: Path, series: list[Dataset]) -> None:
    prediction = make_prediction(series)
    ds = pydicom.dcmread(_write_sr(tmp_path, prediction, series).path)
    processing = [item for item in ds.ContributingEquipmentSequence if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"]
    assert len(processing) == 1  # one item per algorithm (highdicom's own item is not an algorithm)
    [item] = processing
    code = item.PurposeOfReferenceCodeSequence[0]
    assert (code.CodingSchemeDesignator, code.CodeMeaning) == ("DCM", "Processing Equipment")
    assert (item.Manufacturer, item.ManufacturerModelName, item.SoftwareVersions) == ("PE Triage Test", prediction.model.name, "0.1.0")
    assert item.DeviceUID == device_observer_uid(prediction.model)
    assert DEMO_SHA256 in item.ContributionDescription
    # Same checkpoint -> same Device UID, everywhere; another checkpoint (same name and version) -> another.
    again = pydicom.dcmread(_write_sr(tmp_path / "again", make_prediction(series), series).path)
    assert again.ContributingEquipmentSequence[-1].DeviceUID == item.DeviceUID
    other = replace(prediction.model, sha256="12" * 32)
    assert device_observer_uid(other) != item.DeviceUID
    assert device_observer_uid(other).startswith("2.25.") and len(device_observer_uid(other)) <= 64
    # The observer context names the same device.
    observer = highdicom.sr.srread(_write_sr(tmp_path / "obs", prediction, series).path).content.get_observer_contexts()[0]
    assert observer.observer_identifying_attributes.uid == item.DeviceUID


def test_impression_leads_the_document(tmp_path: Path, series: list[Dataset]) -> None:
    prediction = make_prediction(series, pe_present=True, rv_lv_gte_1=True)
    ds = pydicom.dcmread(_write_sr(tmp_path, prediction, series).path)
    first = ds.ContentSequence[0]
    assert (first.ValueType, first.ConceptNameCodeSequence[0].CodeValue) == ("TEXT", "121073")
    assert "Suspected central and right-sided pulmonary embolism, RV/LV >= 1 suggested. AI result, unverified." in first.TextValue
    assert first.TextValue.startswith("NOT FOR CLINICAL USE")
    assert "Worklist priority CRITICAL" in first.TextValue
    negative = pydicom.dcmread(_write_sr(tmp_path / "neg", make_prediction(series, pe_present=False), series).path)
    assert negative.ContentSequence[0].TextValue.startswith("NOT FOR CLINICAL USE (synthetic demo model). No pulmonary embolism suggested.")
    clinical = make_prediction(series, pe_present=True, rv_lv_gte_1=False, not_for_clinical_use=False)
    text = impression(clinical, Flag.CRITICAL)
    assert text.startswith("Suspected central and right-sided pulmonary embolism, RV/LV >= 1 not suggested. AI result, unverified.")
    only_central = Prediction(**{**clinical.__dict__, "labels": {**clinical.labels, "rightsided_pe": False, "rv_lv_ratio_gte_1": True}})
    assert impression(only_central, Flag.CRITICAL).startswith("Suspected central pulmonary embolism, RV/LV >= 1 suggested. AI result, unverified.")


@pytest.mark.skipif(shutil.which("dsrdump") is None, reason="dcmtk dsrdump is not installed")
def test_dsrdump_shows_the_impression_before_any_geometry(tmp_path: Path, series: list[Dataset]) -> None:
    """As a PACS administrator reads it (dcmtk): the summary is the first content line."""
    produced = _write_sr(tmp_path, make_prediction(series), series)
    out = subprocess.run(["dsrdump", "+U8", "+Pl", str(produced.path)], capture_output=True, text=True, check=True, timeout=60).stdout
    lines = [line.strip() for line in out.splitlines() if line.strip().startswith("<")]
    assert "Imaging Measurement Report" in lines[0], out
    assert "Impression" in lines[1] and "Suspected central and right-sided pulmonary embolism" in lines[1], out
    assert out.splitlines()[0].strip() == "Comprehensive 3D SR Document"


def test_priority_flag_is_a_finding(tmp_path: Path, series: list[Dataset]) -> None:
    critical = highdicom.sr.srread(_write_sr(tmp_path / "c", make_prediction(series), series).path)
    [evaluation] = _group(critical, codes.PRIORITY).get_qualitative_evaluations()
    assert (evaluation.name, evaluation.value) == (codes.PRIORITY, codes.FLAG_CRITICAL)
    assert _text_items(_group(critical, codes.PRIORITY))["111001"] == [make_prediction(series).model.name]  # TID 4019
    routine = highdicom.sr.srread(_write_sr(tmp_path / "r", make_prediction(series, pe_present=False), series).path)
    assert _group(routine, codes.PRIORITY).get_qualitative_evaluations()[0].value == codes.FLAG_ROUTINE
    review = highdicom.sr.srread(_write_sr(tmp_path / "v", make_prediction(series, pe_present=False), series, flag=Flag.REVIEW).path)
    assert _group(review, codes.PRIORITY).get_qualitative_evaluations()[0].value == codes.FLAG_REVIEW
    with pytest.raises(ReportError, match="ERROR"):
        write_reports(make_prediction(series), series, SR_ONLY, tmp_path / "e", flag=Flag.ERROR)


def _quality(passed: bool = True, reasons: tuple[str, ...] = (), unmeasured: tuple[str, ...] = ()) -> QualityReport:
    return QualityReport(
        passed=passed, reasons=reasons, unmeasured=unmeasured, pulmonary_trunk_hu=95.0 if not passed else 320.0,
        pulmonary_trunk_position_patient=(0.0, 20.0, -100.0), brightest_mediastinal_hu=140.0,
        lung_apex_covered=True, lung_base_covered=True, lung_extent_mm=240.0, slice_thickness_mm=1.0,
        max_slice_gap_mm=1.0, noise_hu=18.0, contrast_to_noise=4.2,
    )


def test_input_quality_is_a_finding_with_or_without_a_quality_result(tmp_path: Path, series: list[Dataset]) -> None:
    plain = highdicom.sr.srread(_write_sr(tmp_path / "plain", make_prediction(series), series).path)
    assert _group(plain, codes.IMAGE_QUALITY).get_qualitative_evaluations()[0].value == codes.DIAGNOSTIC_QUALITY

    negative = make_prediction(series, pe_present=False)
    indeterminate = Prediction(**{**negative.__dict__, "labels": {**negative.labels, "indeterminate": True}})
    limited = highdicom.sr.srread(_write_sr(tmp_path / "ind", indeterminate, series).path)
    assert _group(limited, codes.IMAGE_QUALITY).get_qualitative_evaluations()[0].value == codes.LIMITED_QUALITY

    failed = replace(negative, quality=_quality(False, reasons=("pulmonary trunk 95 HU < 250 HU",)))
    path = _write_sr(tmp_path / "failed", failed, series).path
    ds, sr = pydicom.dcmread(path), highdicom.sr.srread(path)
    assert _group(sr, codes.IMAGE_QUALITY).get_qualitative_evaluations()[0].value == codes.NON_DIAGNOSTIC_QUALITY
    text = _all_text(ds)
    assert "pulmonary trunk 95 HU < 250 HU" in text and "pulmonary trunk 95 HU" in text
    assert "Non-diagnostic examination for pulmonary embolism" in text and "not excluded" in text
    assert "No pulmonary embolism suggested" not in text
    if dciodvfy_available():
        assert run_dciodvfy(path).errors == []

    unverified = replace(make_prediction(series), quality=_quality(unmeasured=("lung extent: no lung found",)))
    assert quality_finding(unverified).value == codes.LIMITED_QUALITY
    assert quality_finding(replace(make_prediction(series), quality=_quality())).value == codes.DIAGNOSTIC_QUALITY


def test_skipped_images_and_precision_are_in_the_report(tmp_path: Path, series: list[Dataset]) -> None:
    prediction = replace(
        make_prediction(series), precision="bf16",
        skipped_images=(("1.2.3.4.5", "localizer"), ("1.2.3.4.6", "matrix 256 x 256, the series is 512 x 512")),
    )
    text = _all_text(pydicom.dcmread(_write_sr(tmp_path / "s", prediction, series).path))
    assert "2 image(s) of the series were left out of the analysis" in text
    assert "1.2.3.4.6 (matrix 256 x 256, the series is 512 x 512)" in text
    assert "Model arithmetic: bf16." in text


def test_report_references_its_secondary_captures(tmp_path: Path, series: list[Dataset]) -> None:
    prediction = make_prediction(series)
    produced = write_reports(prediction, series, OutputSettings(key_images=False), tmp_path / "out")
    sc_uids = {p.sop_instance_uid for p in produced if p.kind == OutputKind.SC}
    [sr_object] = [p for p in produced if p.kind == OutputKind.SR]
    sr = highdicom.sr.srread(sr_object.path)
    referenced = {img.referenced_sop_instance_uid for img in _groups(sr)[0].source_images}
    assert sc_uids and sc_uids <= referenced
    assert {k.sop_instance_uid for k in prediction.key_images} <= referenced
    assert sc_uids <= {sop for _, _, sop, _ in sr.get_evidence()}
    if dciodvfy_available():
        assert run_dciodvfy(sr_object.path).errors == []


def test_text_is_utf8_and_survives_characters_latin1_lacks(tmp_path: Path, series: list[Dataset], recwarn: pytest.WarningsRecorder) -> None:
    prediction = make_prediction(series)
    model = replace(prediction.model, name="pe-r3d18 — Ångström ✓", intended_use="triage — decision support")
    produced = _write_sr(tmp_path, Prediction(**{**prediction.__dict__, "model": model}), series)
    ds = pydicom.dcmread(produced.path)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert "pe-r3d18 — Ångström ✓" in _all_text(ds)
    assert ds.ManufacturerModelName == "pe-r3d18 — Ångström ✓"
    assert not [w for w in recwarn.list if "encod" in str(w.message).lower()]
