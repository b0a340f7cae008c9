"""The held-out phantom family: reproducible, valid DICOM, truth that matches the pixels, labels by the rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from pe_model.consistency import violations
from pe_model.labels import EXAM_LABELS
from pe_model.volume import load_series
from phantoms.heldout import (
    ClotSpec,
    FamilyDraw,
    HeldoutSpec,
    HeldoutSpecError,
    draw_spec,
    generate_heldout_volume,
    write_heldout_series,
)
from phantoms.heldout.spec import THICKNESSES_MM
from tests.support.dciodvfy import dciodvfy_available, run_dciodvfy

#: Small and quick: 48 x 48 over 340 mm, 5 mm slices (HU checks use 96 x 96).
SMALL = {"rows": 48, "columns": 48, "fov_mm": 340.0, "slice_thickness_mm": 5.0, "slice_spacing_mm": 5.0}
#: Coarser still, where only the truth is checked (labels do not depend on pixels).
COARSE = {"rows": 24, "columns": 24, "fov_mm": 340.0, "slice_thickness_mm": 10.0, "slice_spacing_mm": 10.0}


def _index(truth_positions: tuple[float, ...], z: float) -> int:
    return int(np.argmin(np.abs(np.asarray(truth_positions) - z)))


def _pixel(spec: HeldoutSpec, x: float, y: float) -> tuple[int, int]:
    column = int(round(x / spec.pixel_spacing_mm + (spec.columns - 1) / 2.0))
    row = int(round(y / spec.pixel_spacing_mm + (spec.rows - 1) / 2.0))
    return row, column


def test_same_spec_gives_same_pixels_and_truth() -> None:
    spec = HeldoutSpec(seed=5, clots=(ClotSpec(level="lobar", form="occlusive", side="left"),), **SMALL)
    first, truth_a = generate_heldout_volume(spec)
    second, truth_b = generate_heldout_volume(spec)
    assert np.array_equal(first, second)
    assert truth_a.to_json_dict() == truth_b.to_json_dict()
    other, _ = generate_heldout_volume(HeldoutSpec(seed=6, **SMALL))
    assert not np.array_equal(first[: len(other)], other[: len(first)])


def test_written_series_is_valid_ct_that_the_model_loader_reads(tmp_path: Path) -> None:
    spec = HeldoutSpec(seed=1, signed_pixels=True, number_from_head=True, table_offset_mm=12.0,
                       clots=(ClotSpec(level="main", form="central", side="right"),), **SMALL)
    truth = write_heldout_series(tmp_path / "s", spec)
    assert len(truth.files) == len(truth.slice_positions_mm) == len(truth.sop_instance_uids)
    first = pydicom.dcmread(truth.files[0])
    assert first.SOPClassUID == pydicom.uid.CTImageStorage
    assert first.InstanceNumber == len(truth.files)  # numbered from the head: slice 0 is the last
    assert first.PixelRepresentation == 1 and float(first.RescaleIntercept) == 0.0
    volume = load_series(tmp_path / "s")
    assert volume.shape == (len(truth.files), spec.rows, spec.columns)
    assert volume.sop_instance_uids == truth.sop_instance_uids  # ascending z, as the truth
    assert np.allclose(volume.positions_mm, truth.slice_positions_mm, atol=1e-3)
    assert volume.pixel_spacing_mm == pytest.approx((spec.pixel_spacing_mm, spec.pixel_spacing_mm), abs=1e-4)
    assert volume.slice_thickness_mm == pytest.approx(spec.slice_thickness_mm)
    in_memory, _ = generate_heldout_volume(spec)
    assert np.allclose(volume.voxels.astype(np.float32), np.clip(np.rint(in_memory), -1024, 3071))


@pytest.mark.skipif(not dciodvfy_available(), reason="dciodvfy (dicom3tools) is not installed")
@pytest.mark.parametrize("signed", [False, True])
def test_written_images_pass_dciodvfy(tmp_path: Path, signed: bool) -> None:
    spec = HeldoutSpec(seed=2, signed_pixels=signed, **SMALL)
    truth = write_heldout_series(tmp_path / "s", spec)
    result = run_dciodvfy(truth.files[len(truth.files) // 2])
    assert result.iod == "CTImage"
    assert result.errors == [], result.output


def test_trunk_holds_the_contrast_and_the_clot_is_a_filling_defect() -> None:
    spec = HeldoutSpec(seed=3, rows=96, columns=96, fov_mm=330.0, slice_thickness_mm=2.5, slice_spacing_mm=2.5,
                       noise_hu=0.0, pulmonary_artery_hu=420.0,
                       clots=(ClotSpec(level="main", form="central", side="left", hu=35.0, length_mm=24.0),))
    volume, truth = generate_heldout_volume(spec)
    trunk = truth.landmarks_patient_mm["pulmonary_trunk"]
    k = _index(truth.slice_positions_mm, trunk[2])
    row, column = _pixel(spec, trunk[0], trunk[1])
    assert float(volume[k, row, column]) == pytest.approx(420.0, abs=15.0)
    (clot,) = truth.clots
    k = _index(truth.slice_positions_mm, clot.centre_patient_mm[2])
    row, column = _pixel(spec, clot.centre_patient_mm[0], clot.centre_patient_mm[1])
    assert float(volume[k, row, column]) < 150.0  # a filling defect inside a 420 HU artery
    assert truth.slice_pe_present[k]
    assert truth.exam_labels["leftsided_pe"] and not truth.exam_labels["central_pe"]
    # Slices far from the clot show none.
    far = [i for i, z in enumerate(truth.slice_positions_mm) if abs(z - clot.centre_patient_mm[2]) > 60.0]
    assert far and not any(truth.slice_pe_present[i] for i in far)


def test_scan_covers_the_lungs_with_the_spec_margins() -> None:
    spec = HeldoutSpec(seed=4, above_apex_mm=20.0, below_base_mm=30.0, **SMALL)
    volume, truth = generate_heldout_volume(spec)
    assert truth.slice_positions_mm[0] == pytest.approx(truth.lung_base_z_mm - 30.0)
    assert truth.slice_positions_mm[-1] <= truth.lung_apex_z_mm + 20.0 + 1e-6
    air_in_body = (volume < -700).reshape(volume.shape[0], -1).sum(axis=1)
    lungs = np.flatnonzero(air_in_body > 0.05 * spec.rows * spec.columns)
    # Lung slices start near the base and end near the apex (the outside air is excluded by the 5%).
    assert truth.slice_positions_mm[lungs[-1]] == pytest.approx(truth.lung_apex_z_mm, abs=25.0)
    assert truth.slice_positions_mm[lungs[0]] <= truth.lung_base_z_mm + 40.0


@pytest.mark.parametrize(
    ("clots", "expected"),
    [
        ((), {"negative_exam_for_pe"}),
        ((ClotSpec(level="saddle", form="central"),), {"central_pe", "leftsided_pe", "rightsided_pe"}),
        ((ClotSpec(level="trunk", form="eccentric"),), {"central_pe"}),
        ((ClotSpec(level="segmental", form="occlusive", side="right"),), {"rightsided_pe"}),
        ((ClotSpec(level="lobar", form="mural", side="left", chronic=True, hu=80.0),), {"leftsided_pe", "chronic_pe"}),
        ((ClotSpec(level="lobar", form="eccentric", side="left"),
          ClotSpec(level="main", form="mural", side="right", chronic=True, hu=80.0, calcified=True)),
         {"leftsided_pe", "rightsided_pe", "acute_and_chronic_pe"}),
    ],
)
def test_exam_labels_follow_the_clots(clots: tuple[ClotSpec, ...], expected: set[str]) -> None:
    for ratio, rv_label in ((0.8, "rv_lv_ratio_lt_1"), (1.3, "rv_lv_ratio_gte_1")):
        spec = HeldoutSpec(seed=8, clots=clots, rv_lv_ratio=ratio, **COARSE)
        _, truth = generate_heldout_volume(spec)
        want = set(expected) | ({rv_label} if clots else set())
        assert {k for k in EXAM_LABELS if truth.exam_labels[k]} == want
        probabilities = {k: 0.9 if truth.exam_labels[k] else 0.1 for k in EXAM_LABELS}
        assert violations(0.9 if clots else 0.1, probabilities) == []
        assert truth.rv_lv_ratio == pytest.approx(ratio)
        assert len(truth.clots) == len(clots)


def test_clot_distance_measures_to_the_clot_not_the_origin() -> None:
    spec = HeldoutSpec(seed=9, clots=(ClotSpec(level="lobar", form="occlusive", side="right", length_mm=30.0),), **COARSE)
    _, truth = generate_heldout_volume(spec)
    (clot,) = truth.clots
    assert clot.distance_mm(clot.centre_patient_mm) == 0.0
    end = np.asarray(clot.ends_patient_mm[1])
    assert clot.distance_mm(end + np.array([0.0, 0.0, 0.0])) == pytest.approx(0.0, abs=1e-6)
    assert clot.distance_mm(np.asarray(clot.centre_patient_mm) + np.array([0.0, 0.0, 200.0])) > 150.0


def test_family_draw_spans_the_ranges_and_every_clot_kind() -> None:
    specs = [draw_spec(11, i, pe=i % 2 == 0, draw=FamilyDraw(rows=64)) for i in range(120)]
    assert {s.pe for s in specs} == {True, False}
    assert all(280.0 <= s.fov_mm <= 420.0 for s in specs)
    assert all(150.0 <= s.pulmonary_artery_hu <= 500.0 for s in specs)
    assert all(0.7 <= s.rv_lv_ratio <= 1.6 for s in specs)
    assert {s.slice_thickness_mm for s in specs} <= set(THICKNESSES_MM)
    assert min(s.slice_thickness_mm for s in specs) == 0.625 and max(s.slice_thickness_mm for s in specs) == 3.0
    clots = [c for s in specs for c in s.clots]
    assert {c.level for c in clots} == {"saddle", "trunk", "main", "lobar", "segmental"}
    assert {c.form for c in clots} == {"occlusive", "eccentric", "central", "mural"}
    assert any(c.chronic for c in clots) and any(c.calcified for c in clots)
    assert draw_spec(11, 3, pe=True) == draw_spec(11, 3, pe=True)


@pytest.mark.parametrize(
    "kwargs",
    [{"rows": 8}, {"fov_mm": 50.0}, {"slice_thickness_mm": 0.0}, {"kernel": "bone"},
     {"body_width_mm": 450.0, "fov_mm": 400.0}, {"pulmonary_artery_hu": float("nan")}],
)
def test_bad_specs_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(HeldoutSpecError):
        HeldoutSpec(**kwargs)  # type: ignore[arg-type]


def test_bad_clots_are_refused() -> None:
    with pytest.raises(HeldoutSpecError, match="level"):
        ClotSpec(level="subsegmental", form="occlusive")
    with pytest.raises(HeldoutSpecError, match="HU"):
        ClotSpec(level="lobar", form="occlusive", hu=300.0)


def test_a_storage_scp_accepts_the_series_over_c_store(tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    from tests.support.pacs_scp import PacsSCP

    truth = write_heldout_series(tmp_path / "s", HeldoutSpec(seed=13, **SMALL))
    with PacsSCP(ae_title="PACS") as pacs:
        ae = AE(ae_title="HELDOUT")
        ae.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", pacs.port, ae_title="PACS")
        assert assoc.is_established
        try:
            statuses = [assoc.send_c_store(pydicom.dcmread(path)).Status for path in truth.files[:5]]
        finally:
            assoc.release()
        assert statuses == [0x0000] * 5
        received = pacs.wait_for(5)
    assert [str(ds.SOPInstanceUID) for ds in received] == [str(pydicom.dcmread(p).SOPInstanceUID) for p in truth.files[:5]]
