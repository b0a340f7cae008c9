"""The domain-randomised CTPA generator: truth consistent with the pixels, ranges, valid DICOM, reproducible."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pe_model.labels import EXAM_LABELS
from pe_model.volume import load_series
from phantoms.randomised import (
    ACQUISITION_RANGES,
    CLOT_FORMS,
    CLOT_FRACTION_ON_SLICE,
    CLOT_HU,
    CLOT_KINDS,
    KERNELS,
    ClotSpec,
    RandomisedPhantomError,
    RandomisedSpec,
    Renderer,
    draw_spec,
    render_volume,
    write_randomised_series,
)
from tests.support.dciodvfy import dciodvfy_available, run_dciodvfy

#: Small and quick: 100 x 100 pixels of 2.4 mm, 3 mm slices over 300 mm.
SMALL = {"fov_mm": 240.0, "pixel_spacing_mm": 2.4, "slice_thickness_mm": 3.0, "slice_spacing_mm": 3.0,
         "n_slices": 100, "supersample": 1}


def _spec(seed: int, **values: object) -> RandomisedSpec:
    return dataclasses.replace(RandomisedSpec(seed=seed), **{**SMALL, **values})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pe_render() -> tuple[RandomisedSpec, Renderer]:
    clots = (ClotSpec("saddle", form="floating"), ClotSpec("lobar", side="left", form="occlusive"),
             ClotSpec("segmental", side="right", form="eccentric"),
             ClotSpec("main", side="right", form="mural", chronic=True, calcified=True))
    spec = _spec(7, clots=clots, rv_lv_ratio=1.3, noise_hu=0.0, streaks=0.0, motion=0.0)
    return spec, Renderer(spec)


def test_every_clot_lies_in_an_artery_darker_than_the_contrast(pe_render: tuple[RandomisedSpec, Renderer]) -> None:
    spec, renderer = pe_render
    clots = renderer.scene.clots
    assert [c.kind for c in clots] == ["saddle", "lobar", "segmental", "main"]
    for clot in clots:
        x, y, z = clot.centre_patient_mm
        k = int(np.argmin(np.abs(renderer.geometry.z_mm - z)))
        _, ideal, fraction = renderer.render(k)
        row = int(np.argmin(np.abs(renderer.geometry.y_mm - y)))
        column = int(np.argmin(np.abs(renderer.geometry.x_mm - x)))
        assert fraction.max() > 0.3, f"{clot.kind} clot not drawn on the slice of its centre"
        # The clot's own pixels are clot-dark: well under the arterial contrast.
        clot_pixels = ideal[fraction >= 0.9]
        if clot_pixels.size:
            assert CLOT_HU[0] - 15 <= float(np.median(clot_pixels)) <= CLOT_HU[1] + 40, clot.kind
            assert float(np.median(clot_pixels)) < spec.artery_hu - 80
        # And it sits inside contrast: bright artery next to it (beside it, or before and after an
        # occlusive clot along the vessel).
        extent = max(clot.shape.ellipsoid.axes) + 6.0
        reach = max(2, int(round(extent / spec.pixel_spacing_mm)))
        brightest = -1000.0
        for near in np.flatnonzero(np.abs(renderer.geometry.z_mm - z) <= extent):
            plane = renderer.render(int(near))[1]
            around = plane[max(row - reach, 0): row + reach + 1, max(column - reach, 0): column + reach + 1]
            brightest = max(brightest, float(around.max()))
        assert brightest > 0.6 * spec.artery_hu, f"{clot.kind} clot has no contrast around it"


def test_per_slice_truth_matches_the_drawn_clot(pe_render: tuple[RandomisedSpec, Renderer]) -> None:
    spec, renderer = pe_render
    fractions = [float(renderer.render(k)[2].max()) for k in range(spec.n_slices)]
    volume, _, truth = render_volume(spec)
    assert volume.shape == (spec.n_slices, spec.rows, spec.columns) and volume.dtype == np.int16
    flags = np.asarray(truth.slice_pe_present)
    drawn = np.asarray(fractions) >= CLOT_FRACTION_ON_SLICE
    assert np.all(flags[drawn]), "every slice with a solid clot pixel is marked"
    assert not np.any(flags[np.asarray(fractions) == 0.0]), "no slice without clot is marked"
    for clot in truth.clots:
        k = int(np.argmin(np.abs(np.asarray(truth.slice_positions_mm) - clot.center_patient_mm[2])))
        assert flags[k], f"the slice of the {clot.kind} clot's centre is marked"
    assert truth.exam_labels["central_pe"] and truth.exam_labels["leftsided_pe"] and truth.exam_labels["rightsided_pe"]
    assert truth.exam_labels["acute_and_chronic_pe"] and not truth.exam_labels["chronic_pe"]
    assert truth.exam_labels["rv_lv_ratio_gte_1"] and not truth.exam_labels["rv_lv_ratio_lt_1"]
    assert not truth.exam_labels["negative_exam_for_pe"]
    assert abs(truth.rv_lv_ratio - 1.3) < 1e-6
    assert sum(1 for c in truth.clots if c.calcified) == 1


def test_a_negative_series_has_no_clot_anywhere() -> None:
    spec = _spec(3, pe=False)
    volume, _, truth = render_volume(spec)
    assert not any(truth.slice_pe_present) and not truth.clots
    assert truth.exam_labels == {name: name == "negative_exam_for_pe" for name in EXAM_LABELS}
    assert int(volume.max()) > 150 and int(volume.min()) <= -900, "contrast and air are both there"


def test_a_left_clot_is_left_of_a_right_clot_in_patient_coordinates() -> None:
    spec = _spec(11, clots=(ClotSpec("lobar", side="left"), ClotSpec("lobar", side="right")))
    renderer = Renderer(spec)
    left, right = renderer.scene.clots
    assert left.centre_patient_mm[0] > right.centre_patient_mm[0], "LPS: +x is the patient's left"


def test_drawn_specs_cover_the_ranges_and_every_kind() -> None:
    rng = np.random.default_rng(0)
    specs = [draw_spec(rng) for _ in range(300)]
    r = ACQUISITION_RANGES
    for spec in specs:
        assert r.fov_mm[0] <= spec.fov_mm <= r.fov_mm[1]
        assert r.pixel_spacing_mm[0] <= spec.pixel_spacing_mm <= r.pixel_spacing_mm[1]
        assert r.slice_thickness_mm[0] <= spec.slice_thickness_mm <= r.slice_thickness_mm[1]
        assert r.n_slices[0] <= spec.n_slices <= r.n_slices[1]
        assert r.artery_hu[0] <= spec.artery_hu <= r.artery_hu[1]
        assert r.rv_lv_ratio[0] <= spec.rv_lv_ratio <= r.rv_lv_ratio[1]
        assert spec.slice_spacing_mm <= spec.slice_thickness_mm + 1e-9
        assert spec.pe == bool(spec.clots)
    positives = [s for s in specs if s.pe]
    assert 0.4 < len(positives) / len(specs) < 0.6
    kinds = Counter(c.kind for s in positives for c in s.clots)
    forms = Counter(c.form for s in positives for c in s.clots)
    assert set(kinds) == set(CLOT_KINDS) and set(forms) == set(CLOT_FORMS)
    assert any(c.calcified for s in positives for c in s.clots)
    assert {frozenset(s.locations) for s in positives} >= {frozenset({"left"}), frozenset({"right"}),
                                                            frozenset({"left", "right"}),
                                                            frozenset({"central", "left", "right"})}
    assert any(s.chronic for s in positives) and any(s.acute_and_chronic for s in positives)
    assert {s.rv_lv_ratio >= 1.0 for s in positives} == {True, False}
    assert {s.kernel for s in specs} == set(KERNELS) and {s.arms_up for s in specs} == {True, False}
    assert any(s.motion > 0 for s in specs) and any(s.streaks > 0 for s in specs)
    assert min(s.n_slices for s in specs) < 150 and max(s.n_slices for s in specs) > 400


@pytest.mark.parametrize("values, message", [
    ({"n_slices": 0}, "n_slices"),
    ({"kernel": "bone"}, "kernel"),
    ({"artery_hu": float("nan")}, "artery_hu"),
    ({"fov_mm": 40.0}, "fov_mm"),
    ({"pe": True, "clots": ()}, "at least one clot"),
])
def test_an_impossible_spec_is_refused(values: dict[str, object], message: str) -> None:
    with pytest.raises(RandomisedPhantomError, match=message):
        _spec(0, **values)


def test_clot_specs_are_checked() -> None:
    with pytest.raises(RandomisedPhantomError, match="left or the right"):
        ClotSpec("lobar", side="central")
    with pytest.raises(RandomisedPhantomError, match="only a chronic clot"):
        ClotSpec("main", side="left", calcified=True)
    assert ClotSpec("lobar", side="left", form="occlusive", chronic=True).form == "mural"
    assert ClotSpec("saddle").sides == ("central", "left", "right")


def test_written_series_is_valid_dicom_that_loads_back_exactly(tmp_path: Path) -> None:
    spec = _spec(21, n_slices=100, clots=(ClotSpec("main", side="left", form="eccentric"),), kernel="sharp",
                 arms_up=False, streaks=0.8, motion=0.5)
    truth = write_randomised_series(tmp_path / "series", spec)
    assert len(truth.files) == spec.n_slices == len(set(truth.sop_instance_uids))
    first = pydicom.dcmread(truth.files[0])
    assert first.SOPClassUID == pydicom.uid.CTImageStorage and first.Modality == "CT"
    assert float(first.PixelSpacing[0]) == pytest.approx(spec.pixel_spacing_mm)
    assert float(first.SliceThickness) == pytest.approx(spec.slice_thickness_mm)
    assert first.ContrastBolusAgent and first.ConvolutionKernel == "LUNG"
    volume = load_series(tmp_path / "series")
    assert volume.series_instance_uid == truth.series_instance_uid
    assert volume.shape == (spec.n_slices, spec.rows, spec.columns)
    np.testing.assert_allclose(np.diff(volume.positions_mm), spec.slice_spacing_mm, atol=1e-3)
    expected, _, _ = render_volume(spec)
    np.testing.assert_array_equal(np.asarray(volume.voxels, dtype=np.int16), expected)
    if dciodvfy_available():
        result = run_dciodvfy(truth.files[len(truth.files) // 2])
        assert not result.errors, result.output


def test_same_spec_same_series_other_seed_other_series(tmp_path: Path) -> None:
    spec = _spec(33, n_slices=100, clots=(ClotSpec("central", form="floating"),))
    a, _, truth_a = render_volume(spec)
    b, _, truth_b = render_volume(spec)
    np.testing.assert_array_equal(a, b)
    assert truth_a.clots == truth_b.clots and truth_a.slice_pe_present == truth_b.slice_pe_present
    written_a = write_randomised_series(tmp_path / "a", spec)
    written_b = write_randomised_series(tmp_path / "b", spec)
    assert written_a.sop_instance_uids == written_b.sop_instance_uids
    other, _, truth_other = render_volume(dataclasses.replace(spec, seed=34))
    assert not np.array_equal(a, other)
    assert truth_other.clots[0].center_patient_mm != truth_a.clots[0].center_patient_mm
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    assert [draw_spec(rng_a) for _ in range(5)] == [draw_spec(rng_b) for _ in range(5)]
