"""Phantom generator: files read back with pydicom hold the anatomy, clots and labels promised."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from pe_model.errors import PEModelError
from pe_model.labels import EXAM_LABELS
from phantoms import (
    SUPPORTED_TRANSFER_SYNTAXES,
    PhantomError,
    PhantomSpec,
    PhantomTruth,
    generate_volume,
    random_spec,
    write_phantom_series,
)

SMALL = {"n_slices": 48, "rows": 64, "columns": 64, "pixel_spacing_mm": 5.2, "slice_spacing_mm": 6.25}


def _read_hu(truth: PhantomTruth) -> np.ndarray:
    """(slices, rows, columns) HU from the written single-frame files, in truth order."""
    slices = []
    for path in truth.files:
        ds = pydicom.dcmread(path)
        slices.append(ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    return np.stack(slices)


def _hu_at(hu: np.ndarray, truth: PhantomTruth, point: tuple[float, float, float]) -> float:
    """HU of the voxel nearest a patient point, located with the files' own geometry."""
    first = pydicom.dcmread(truth.files[0], stop_before_pixels=True)
    x0, y0, _ = (float(v) for v in first.ImagePositionPatient)
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    k = int(np.argmin(np.abs(np.asarray(truth.slice_positions_mm) - point[2])))
    row = round((point[1] - y0) / row_spacing)
    column = round((point[0] - x0) / column_spacing)
    return float(hu[k, row, column])


@pytest.fixture(scope="module")
def central_pe(tmp_path_factory: pytest.TempPathFactory) -> tuple[PhantomTruth, np.ndarray]:
    spec = PhantomSpec(seed=7, **SMALL)
    truth = write_phantom_series(tmp_path_factory.mktemp("central"), spec)
    return truth, _read_hu(truth)


def test_round_trip_anatomy_in_expected_hu_ranges(central_pe: tuple[PhantomTruth, np.ndarray]) -> None:
    truth, hu = central_pe
    marks = truth.landmarks_patient_mm
    assert _hu_at(hu, truth, marks["right_lung"]) < -600
    assert _hu_at(hu, truth, marks["left_lung"]) < -600
    assert _hu_at(hu, truth, marks["pulmonary_trunk"]) > 200
    assert _hu_at(hu, truth, marks["left_ventricle"]) > 200
    assert _hu_at(hu, truth, marks["vertebral_body"]) > 150
    assert _hu_at(hu, truth, marks["outside_body"]) < -900
    for clot in truth.clots:
        assert _hu_at(hu, truth, clot.center_patient_mm) < 100


def test_files_carry_realistic_ct_tags(central_pe: tuple[PhantomTruth, np.ndarray]) -> None:
    truth, _ = central_pe
    ds = pydicom.dcmread(truth.files[3])
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == CTImageStorage
    assert ds.Modality == "CT"
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert float(ds.ImagePositionPatient[2]) == pytest.approx(truth.slice_positions_mm[3])
    assert float(ds.PixelSpacing[0]) == pytest.approx(5.2)
    assert float(ds.SliceThickness) == pytest.approx(6.25)
    assert ds.PixelRepresentation == 0 and ds.BitsAllocated == 16
    assert float(ds.RescaleIntercept) == -1024.0 and float(ds.RescaleSlope) == 1.0
    assert ds.pixel_array.dtype == np.uint16
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    assert ds.ContrastBolusAgent
    assert ds.BodyPartExamined == "CHEST"
    assert ds.SeriesDescription == "CTPA"
    assert str(ds.PatientName) == "PHANTOM^PE" and ds.PatientID == "PHANTOM-0001"
    assert ds.InstanceNumber == 4
    assert ds.StudyInstanceUID == truth.study_instance_uid
    assert ds.SeriesInstanceUID == truth.series_instance_uid
    assert ds.SOPInstanceUID == truth.sop_instance_uids[3]
    assert truth.files[3].name == f"{truth.sop_instance_uids[3]}.dcm"
    for keyword in ("KVP", "Manufacturer", "FrameOfReferenceUID", "AccessionNumber", "StudyID", "SeriesNumber",
                    "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyDescription",
                    "WindowCenter", "WindowWidth"):
        assert keyword in ds, keyword
    positions = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in truth.files]
    assert positions == sorted(positions), "files are ordered inferior -> superior"
    assert len(set(truth.sop_instance_uids)) == len(truth.files)


def test_slice_labels_true_exactly_on_clot_slices(tmp_path: Path) -> None:
    """With noise off, the only difference from the same phantom without PE is the clot."""
    spec = PhantomSpec(seed=11, noise_hu=0.0, locations=("central", "left", "right"), **SMALL)
    volume_pe, _, truth_pe = generate_volume(spec)
    volume_clean, _, truth_clean = generate_volume(PhantomSpec(seed=11, noise_hu=0.0, pe=False, **SMALL))
    changed = (volume_pe != volume_clean).any(axis=(1, 2))
    assert changed.any()
    assert tuple(bool(v) for v in changed) == truth_pe.slice_pe_present
    assert not any(truth_clean.slice_pe_present)
    assert {clot.location for clot in truth_pe.clots} == {"central", "left", "right"}
    # Defects are darker than the contrast they replace.
    assert volume_pe[volume_pe != volume_clean].max() < 100
    assert volume_clean[volume_pe != volume_clean].min() > 200
    # The same series written to disk has the same labels, per file.
    written = write_phantom_series(tmp_path, spec)
    assert written.slice_pe_present == truth_pe.slice_pe_present
    assert len(written.slice_pe_present) == len(written.files) == spec.n_slices


def test_acute_clot_is_surrounded_by_contrast_and_chronic_touches_wall() -> None:
    spec_acute = PhantomSpec(seed=3, noise_hu=0.0, rows=128, columns=128, n_slices=60, slice_spacing_mm=5.0)
    spec_chronic = PhantomSpec(seed=3, noise_hu=0.0, chronic=True, rows=128, columns=128, n_slices=60,
                               slice_spacing_mm=5.0)
    clean, _, _ = generate_volume(PhantomSpec(seed=3, noise_hu=0.0, pe=False, rows=128, columns=128, n_slices=60,
                                              slice_spacing_mm=5.0))
    for spec, surrounded in ((spec_acute, True), (spec_chronic, False)):
        volume, geometry, truth = generate_volume(spec)
        k, row, column = geometry.voxel_index(truth.clots[0].center_patient_mm)
        clot = volume[k] != clean[k]
        assert clot[row, column]
        # Ring of voxels just outside the clot on its slice.
        from scipy.ndimage import binary_dilation

        ring = binary_dilation(clot, iterations=1) & ~clot
        enhanced_fraction = float((clean[k][ring] > 200).mean())
        if surrounded:
            assert enhanced_fraction == 1.0, "acute clot: a polo mint, contrast all around"
        else:
            assert enhanced_fraction < 0.9, "chronic clot: adherent to the vessel wall"


def test_exam_labels_consistent_with_seed_rules() -> None:
    cases = [
        PhantomSpec(pe=True, locations=("left",), rv_lv_ratio=1.2, **SMALL),
        PhantomSpec(pe=True, locations=("central", "right"), chronic=True, **SMALL),
        PhantomSpec(pe=True, acute_and_chronic=True, **SMALL),
        PhantomSpec(pe=False, **SMALL),
        PhantomSpec(pe=False, indeterminate=True, **SMALL),
        PhantomSpec(kind="head", series_description="HEAD W/O", **SMALL),
    ]
    for spec in cases:
        _, _, truth = generate_volume(spec)
        labels = truth.exam_labels
        assert set(labels) == set(EXAM_LABELS)
        if spec.has_pe:
            assert any(truth.slice_pe_present)
            assert labels["rv_lv_ratio_gte_1"] != labels["rv_lv_ratio_lt_1"]
            assert labels["rv_lv_ratio_gte_1"] == (spec.rv_lv_ratio >= 1.0)
            assert labels["central_pe"] or labels["leftsided_pe"] or labels["rightsided_pe"]
            assert not (labels["chronic_pe"] and labels["acute_and_chronic_pe"])
            assert not labels["negative_exam_for_pe"] and not labels["indeterminate"]
        else:
            assert not any(truth.slice_pe_present)
            assert labels["negative_exam_for_pe"] != labels["indeterminate"]
            positives = [k for k in EXAM_LABELS if k not in ("negative_exam_for_pe", "indeterminate")]
            assert not any(labels[k] for k in positives)
    _, _, both = generate_volume(cases[2])
    assert sorted(clot.chronic for clot in both.clots) == [False, True]


def test_rv_lv_ratio_drawn() -> None:
    """The RV blood pool's left-right extent over the LV's follows the spec."""
    for ratio in (0.8, 1.3):
        spec = PhantomSpec(rv_lv_ratio=ratio, noise_hu=0.0, pe=False, rows=256, columns=256, pixel_spacing_mm=1.3)
        volume, geometry, truth = generate_volume(spec)
        widths = []
        for name in ("right_ventricle", "left_ventricle"):
            k, row, column = geometry.voxel_index(truth.landmarks_patient_mm[name])
            line = volume[k, row] > 200
            left = column
            while left > 0 and line[left - 1]:
                left -= 1
            right = column
            while right < line.size - 1 and line[right + 1]:
                right += 1
            widths.append(right - left + 1)
        assert widths[0] / widths[1] == pytest.approx(ratio, abs=0.12)


@pytest.mark.parametrize(
    "transfer_syntax",
    [
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        RLELossless,
        JPEG2000Lossless,
        JPEGLSLossless,
        JPEGLossless,
        JPEGLosslessSV1,
    ],
)
@pytest.mark.parametrize("enhanced", [False, True])
def test_every_transfer_syntax_decodes_to_same_hu(tmp_path: Path, transfer_syntax: str, enhanced: bool) -> None:
    spec = PhantomSpec(seed=5, n_slices=6, rows=48, columns=48)
    expected, _, _ = generate_volume(spec)
    truth = write_phantom_series(tmp_path, spec, transfer_syntax_uid=transfer_syntax, enhanced=enhanced)
    ds = pydicom.dcmread(truth.files[2])
    assert ds.file_meta.TransferSyntaxUID == transfer_syntax
    if enhanced:
        transform = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
        hu = ds.pixel_array[2].astype(np.int32) * int(transform.RescaleSlope) + int(transform.RescaleIntercept)
    else:
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    np.testing.assert_array_equal(hu, expected[2])


def test_supported_list_matches_tested_list() -> None:
    assert set(SUPPORTED_TRANSFER_SYNTAXES) == {
        ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless,
        JPEG2000Lossless, JPEGLSLossless, JPEGLossless, JPEGLosslessSV1,
    }


def test_unsupported_transfer_syntax_is_a_clear_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="JPEG Baseline"):
        write_phantom_series(tmp_path, PhantomSpec(**SMALL), transfer_syntax_uid=JPEGBaseline8Bit)
    with pytest.raises(PEModelError, match="cannot write transfer syntax"):
        write_phantom_series(tmp_path, PhantomSpec(**SMALL), transfer_syntax_uid="1.2.840.10008.1.2.2")
    assert not list(tmp_path.iterdir())


def test_enhanced_ct_has_one_frame_per_slice(tmp_path: Path) -> None:
    spec = PhantomSpec(seed=2, **SMALL)
    truth = write_phantom_series(tmp_path, spec, enhanced=True, file_names="index")
    assert len(set(truth.files)) == 1 and truth.files[0].name == "IM000001.dcm"
    ds = pydicom.dcmread(truth.files[0])
    assert ds.SOPClassUID == EnhancedCTImageStorage
    assert int(ds.NumberOfFrames) == spec.n_slices == len(truth.slice_positions_mm)
    assert ds.pixel_array.shape == (spec.n_slices, spec.rows, spec.columns)
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert float(shared.PixelMeasuresSequence[0].PixelSpacing[0]) == pytest.approx(spec.pixel_spacing_mm)
    assert float(shared.PixelValueTransformationSequence[0].RescaleIntercept) == -1024.0
    frames = ds.PerFrameFunctionalGroupsSequence
    assert len(frames) == spec.n_slices
    z = [float(item.PlanePositionSequence[0].ImagePositionPatient[2]) for item in frames]
    assert z == pytest.approx(list(truth.slice_positions_mm))
    assert set(truth.sop_instance_uids) == {ds.SOPInstanceUID}
    assert any(truth.slice_pe_present)


def _dciodvfy_errors(path: Path) -> tuple[list[str], str]:
    completed = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    output = completed.stdout + completed.stderr
    return [line for line in output.splitlines() if line.startswith("Error")], output


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
@pytest.mark.parametrize("kind", ["ctpa", "head"])
@pytest.mark.parametrize("enhanced", [False, True])
def test_dciodvfy_reports_no_errors(tmp_path: Path, kind: str, enhanced: bool) -> None:
    spec = PhantomSpec(kind=kind, n_slices=3, rows=32, columns=32, pe=kind == "ctpa")
    truth = write_phantom_series(tmp_path, spec, enhanced=enhanced)
    errors, output = _dciodvfy_errors(truth.files[1])
    assert ("EnhancedCTImage" if enhanced else "CTImage") in output
    assert errors == []


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
@pytest.mark.parametrize("transfer_syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless, JPEGLosslessSV1])
def test_dciodvfy_accepts_compressed_files(tmp_path: Path, transfer_syntax: str) -> None:
    truth = write_phantom_series(tmp_path, PhantomSpec(n_slices=2, rows=32, columns=32),
                                 transfer_syntax_uid=transfer_syntax)
    errors, _ = _dciodvfy_errors(truth.files[0])
    assert errors == []


@pytest.mark.dcmtk
@pytest.mark.skipif(shutil.which("dcmdump") is None, reason="dcmdump (dcmtk) is not installed")
def test_deflated_file_is_read_by_dcmtk(tmp_path: Path) -> None:
    """dciodvfy cannot inflate; dcmtk can, so it checks our deflate stream instead."""
    truth = write_phantom_series(tmp_path, PhantomSpec(n_slices=2, rows=32, columns=32),
                                 transfer_syntax_uid=DeflatedExplicitVRLittleEndian)
    completed = subprocess.run(["dcmdump", "-q", str(truth.files[0])], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr
    assert "Deflated Explicit VR Little Endian" in completed.stdout
    assert truth.sop_instance_uids[0] in completed.stdout
    assert "(7fe0,0010)" in completed.stdout


def test_deterministic_by_seed(tmp_path: Path) -> None:
    spec = PhantomSpec(seed=21, locations=("left",), **SMALL)
    first = write_phantom_series(tmp_path / "a", spec)
    second = write_phantom_series(tmp_path / "b", spec)
    other = write_phantom_series(tmp_path / "c", PhantomSpec(seed=22, locations=("left",), **SMALL))
    assert first.study_instance_uid == second.study_instance_uid
    assert first.sop_instance_uids == second.sop_instance_uids
    assert first.clots == second.clots
    np.testing.assert_array_equal(_read_hu(first), _read_hu(second))
    assert other.study_instance_uid != first.study_instance_uid
    assert not set(other.sop_instance_uids) & set(first.sop_instance_uids)
    assert not np.array_equal(_read_hu(first), _read_hu(other))


def test_shared_study_and_head_series(tmp_path: Path) -> None:
    ctpa = write_phantom_series(tmp_path / "ctpa", PhantomSpec(**SMALL))
    head = write_phantom_series(
        tmp_path / "head",
        PhantomSpec(kind="head", series_description="HEAD W/O", **SMALL),
        study_instance_uid=ctpa.study_instance_uid,
    )
    assert head.study_instance_uid == ctpa.study_instance_uid
    assert head.series_instance_uid != ctpa.series_instance_uid
    ds = pydicom.dcmread(head.files[len(head.files) // 2])
    assert ds.BodyPartExamined == "HEAD"
    assert ds.SeriesDescription == "HEAD W/O"
    assert not ds.get("ContrastBolusAgent")
    assert not any(head.slice_pe_present) and head.clots == ()
    assert head.exam_labels["negative_exam_for_pe"]
    hu = _read_hu(head)
    assert _hu_at(hu, head, head.landmarks_patient_mm["brain"]) == pytest.approx(35, abs=60)
    assert _hu_at(hu, head, head.landmarks_patient_mm["skull"]) > 300


def test_empty_description_and_body_part_are_absent(tmp_path: Path) -> None:
    truth = write_phantom_series(tmp_path, PhantomSpec(series_description="", body_part_examined="", **SMALL))
    ds = pydicom.dcmread(truth.files[0], stop_before_pixels=True)
    assert ds.get("SeriesDescription", "") == ""
    assert ds.get("BodyPartExamined", "") == ""


def test_signed_pixels_option(tmp_path: Path) -> None:
    spec = PhantomSpec(n_slices=4, rows=32, columns=32)
    expected, _, _ = generate_volume(spec)
    truth = write_phantom_series(tmp_path, spec, signed_pixels=True)
    ds = pydicom.dcmread(truth.files[1])
    assert ds.PixelRepresentation == 1
    assert ds.pixel_array.dtype == np.int16
    np.testing.assert_array_equal(ds.pixel_array.astype(np.int32) + int(ds.RescaleIntercept), expected[1])


def test_indeterminate_is_noisier() -> None:
    clean, geometry, truth = generate_volume(PhantomSpec(pe=False, seed=4, **SMALL))
    noisy, _, truth_bad = generate_volume(PhantomSpec(pe=False, indeterminate=True, seed=4, **SMALL))
    k, row, column = geometry.voxel_index(truth.landmarks_patient_mm["outside_body"])
    assert truth_bad.exam_labels["indeterminate"] and not truth_bad.exam_labels["negative_exam_for_pe"]
    assert noisy[k, : row + 3].std() > 3 * clean[k, : row + 3].std()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "pelvis"},
        {"locations": ("upper",)},
        {"locations": ()},
        {"chronic": True, "acute_and_chronic": True},
        {"pe": True, "indeterminate": True},
        {"rows": 8},
        {"pixel_spacing_mm": 0.0},
        {"noise_hu": -1.0},
    ],
)
def test_invalid_spec_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(PhantomError):
        PhantomSpec(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "size",
    [
        {"rows": 64, "columns": 64, "n_slices": 40},
        {"rows": 32, "columns": 32, "n_slices": 20, "pixel_spacing_mm": 10.4, "slice_spacing_mm": 15.0},
        {"rows": 96, "columns": 80, "n_slices": 50, "slice_spacing_mm": 1.0},
    ],
)
def test_random_phantoms_keep_their_promises_at_any_size(size: dict[str, float]) -> None:
    """Landmarks, visible clots and PE slices hold for random specs, also on coarse grids."""
    rng = np.random.default_rng(17)
    for _ in range(12):
        spec = random_spec(rng, noise_hu=0.0, indeterminate=False, **size)
        volume, geometry, truth = generate_volume(spec)
        marks = truth.landmarks_patient_mm
        assert volume[geometry.voxel_index(marks["pulmonary_trunk"])] > 200
        assert volume[geometry.voxel_index(marks["right_lung"])] < -600
        assert volume[geometry.voxel_index(marks["left_lung"])] < -600
        assert volume[geometry.voxel_index(marks["left_ventricle"])] > 200
        assert any(truth.slice_pe_present) == spec.pe
        for clot in truth.clots:
            assert volume[geometry.voxel_index(clot.center_patient_mm)] < 100


def test_random_spec_mix() -> None:
    rng = np.random.default_rng(0)
    specs = [random_spec(rng, rows=64, columns=64) for _ in range(200)]
    assert all(spec.rows == 64 for spec in specs)
    pe = [spec for spec in specs if spec.pe]
    assert 70 <= len(pe) <= 130
    assert {loc for spec in pe for loc in spec.locations} == {"central", "left", "right"}
    assert any(spec.chronic for spec in pe) and any(spec.acute_and_chronic for spec in pe)
    assert any(spec.rv_lv_ratio >= 1 for spec in pe) and any(spec.rv_lv_ratio < 1 for spec in pe)
    assert any(spec.indeterminate for spec in specs)
    assert len({spec.seed for spec in specs}) == len(specs)
    again = [random_spec(np.random.default_rng(0), rows=64, columns=64)]
    assert again[0] == specs[0]
