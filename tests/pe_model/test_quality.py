"""The input-quality gate, measured on phantoms of both generators (phantoms.ctpa and the held-out
family): trunk attenuation, lung coverage, slice thickness and gaps, noise; and its place in Prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pe_model.predictor import Predictor
from pe_model.quality import QualityReport, QualityThresholds, assess_quality
from pe_model.volume import Volume, load_series
from phantoms import PhantomSpec, PhantomTruth, write_phantom_series
from phantoms.heldout import HeldoutSpec, write_heldout_series

#: Held-out phantoms: 96 x 96 over 340 mm (3.5 mm pixels), 3 mm slices: small but the trunk is 8 pixels wide.
HELDOUT = {"rows": 96, "columns": 96, "fov_mm": 340.0, "slice_thickness_mm": 3.0, "slice_spacing_mm": 3.0}
#: phantoms.ctpa: 64 x 64, 60 slices (its anatomy is scaled to the field of view and scan length).
CTPA = {"rows": 64, "columns": 64, "n_slices": 60, "pixel_spacing_mm": 2.6, "slice_spacing_mm": 2.5}


def _heldout(tmp_path: Path, name: str, **kwargs: object) -> Volume:
    spec = HeldoutSpec(**{"seed": 21, **HELDOUT, **kwargs})  # type: ignore[arg-type]
    write_heldout_series(tmp_path / name, spec)
    return load_series(tmp_path / name)


def _ctpa(tmp_path: Path, name: str, **kwargs: object) -> tuple[Volume, PhantomTruth]:
    truth = write_phantom_series(tmp_path / name, PhantomSpec(**{**CTPA, **kwargs}))  # type: ignore[arg-type]
    return load_series(tmp_path / name), truth


# -- pulmonary trunk attenuation ------------------------------------------------------------------


@pytest.mark.parametrize("pa_hu", [60.0, 180.0])
def test_heldout_poorly_opacified_arteries_are_non_diagnostic_with_the_value(tmp_path: Path, pa_hu: float) -> None:
    report = assess_quality(_heldout(tmp_path, "s", pulmonary_artery_hu=pa_hu))
    assert not report.passed and report.status == "non-diagnostic"
    assert report.summary.startswith("non-diagnostic: ")
    assert "< 250 HU" in report.summary
    if report.pulmonary_trunk_hu is not None:
        assert report.pulmonary_trunk_hu == pytest.approx(pa_hu, abs=30.0)
        assert f"pulmonary trunk {report.pulmonary_trunk_hu:.0f} HU" in report.summary
    else:  # nothing opacified at all: the brightest mediastinal structure is what was measured
        assert report.brightest_mediastinal_hu is not None and report.brightest_mediastinal_hu < 150.0
        assert f"{report.brightest_mediastinal_hu:.0f} HU < 250 HU" in report.summary


@pytest.mark.parametrize("systemic_fraction", [0.5, 0.95])
def test_heldout_trunk_is_measured_not_the_aorta(tmp_path: Path, systemic_fraction: float) -> None:
    report = assess_quality(_heldout(tmp_path, "s", pulmonary_artery_hu=350.0, systemic_fraction=systemic_fraction))
    assert report.passed and report.status == "adequate", report.summary
    assert report.pulmonary_trunk_hu == pytest.approx(350.0, abs=25.0)
    assert report.pulmonary_trunk_position_patient is not None
    assert not any("trunk" in r for r in report.reasons)


def test_ctpa_phantoms_with_and_without_contrast(tmp_path: Path) -> None:
    enhanced, _ = _ctpa(tmp_path, "enhanced")
    report = assess_quality(enhanced)
    assert report.passed, report.summary
    assert report.pulmonary_trunk_hu == pytest.approx(350.0, abs=25.0)
    plain, _ = _ctpa(tmp_path, "plain", contrast=False)
    report = assess_quality(plain)
    assert not report.passed
    assert "< 250 HU" in report.summary
    # Its "indeterminate" exam: poor contrast (and motion ghosts that need 128 x 128 to keep the
    # chest wall apart from the lungs).
    poor, _ = _ctpa(tmp_path, "poor", pe=False, indeterminate=True, rows=128, columns=128, pixel_spacing_mm=2.6)
    poor_report = assess_quality(poor)
    assert not poor_report.passed and "< 250 HU" in poor_report.summary


def test_no_lungs_means_unverified_not_a_verdict(tmp_path: Path) -> None:
    head, _ = _ctpa(tmp_path, "head", kind="head")
    report = assess_quality(head)
    assert report.passed and not report.verified and report.status == "unverified"
    assert report.pulmonary_trunk_hu is None and report.lung_apex_covered is None
    assert any("lungs not found" in u for u in report.unmeasured)
    assert report.summary.startswith("quality unverified: ")


# -- lung coverage ----------------------------------------------------------------------------------


def test_heldout_lung_coverage(tmp_path: Path) -> None:
    full = assess_quality(_heldout(tmp_path, "full", above_apex_mm=10.0, below_base_mm=20.0))
    assert full.lung_apex_covered and full.lung_base_covered
    cut_top = assess_quality(_heldout(tmp_path, "top", above_apex_mm=-45.0))
    assert cut_top.lung_apex_covered is False and cut_top.lung_base_covered
    assert any("apex not covered" in r for r in cut_top.reasons)
    cut_bottom = assess_quality(_heldout(tmp_path, "bottom", below_base_mm=-50.0))
    assert cut_bottom.lung_base_covered is False and cut_bottom.lung_apex_covered
    assert any("bases not covered" in r for r in cut_bottom.reasons)


def test_ctpa_lung_coverage_from_a_truncated_series(tmp_path: Path) -> None:
    volume, truth = _ctpa(tmp_path, "full")
    report = assess_quality(volume)
    assert report.lung_apex_covered and report.lung_base_covered
    # Files are inferior -> superior in the truth: drop the top or the bottom third.
    n = len(truth.files)
    top_cut = assess_quality(load_series(list(truth.files[: 2 * n // 3])))
    assert top_cut.lung_apex_covered is False and not top_cut.passed
    bottom_cut = assess_quality(load_series(list(truth.files[n // 3 :])))
    assert bottom_cut.lung_base_covered is False and not bottom_cut.passed


# -- slice thickness, gaps --------------------------------------------------------------------------


def test_thick_slices_fail_on_both_generators(tmp_path: Path) -> None:
    thick = assess_quality(_heldout(tmp_path, "thick", slice_thickness_mm=5.0, slice_spacing_mm=5.0))
    assert "slice thickness 5 mm > 3 mm" in thick.reasons
    ctpa, _ = _ctpa(tmp_path, "ctpa-thick", slice_spacing_mm=5.0, n_slices=40)
    assert "slice thickness 5 mm > 3 mm" in assess_quality(ctpa).reasons
    thin = assess_quality(_heldout(tmp_path, "thin", slice_thickness_mm=2.0, slice_spacing_mm=2.0))
    assert thin.slice_thickness_mm == 2.0 and not any("slice" in r for r in thin.reasons)


def test_gaps_between_slices_fail(tmp_path: Path) -> None:
    _, truth = _ctpa(tmp_path, "ctpa")
    every_other = assess_quality(load_series(list(truth.files[::2])))  # 2.5 mm slices 5 mm apart
    assert any(r.startswith("slice spacing 5") for r in every_other.reasons)
    assert every_other.max_slice_gap_mm == pytest.approx(5.0)


# -- noise --------------------------------------------------------------------------------------------


def test_noise_follows_the_noise_drawn_on_both_generators(tmp_path: Path) -> None:
    quiet, _ = _ctpa(tmp_path, "quiet", noise_hu=5.0)
    loud, _ = _ctpa(tmp_path, "loud", noise_hu=40.0)
    quiet_noise, loud_noise = assess_quality(quiet).noise_hu, assess_quality(loud).noise_hu
    assert quiet_noise is not None and loud_noise is not None
    assert quiet_noise == pytest.approx(5.0, rel=0.5) and loud_noise == pytest.approx(40.0, rel=0.35)
    silent = assess_quality(_heldout(tmp_path, "silent", noise_hu=0.0)).noise_hu
    noisy = assess_quality(_heldout(tmp_path, "noisy", noise_hu=40.0)).noise_hu
    assert silent is not None and noisy is not None and silent < 3.0 < 12.0 < noisy


def test_noise_too_high_for_the_contrast_fails(tmp_path: Path) -> None:
    report = assess_quality(_heldout(tmp_path, "s", pulmonary_artery_hu=270.0, noise_hu=130.0))
    assert report.contrast_to_noise is not None and report.contrast_to_noise < 5.0
    assert any(r.startswith("contrast-to-noise") for r in report.reasons)
    relaxed = assess_quality(load_series(tmp_path / "s"), QualityThresholds(min_cnr=0.5))
    assert not any(r.startswith("contrast-to-noise") for r in relaxed.reasons)


# -- the report and the Prediction ---------------------------------------------------------------------


def test_report_round_trips_through_json(tmp_path: Path) -> None:
    report = assess_quality(_heldout(tmp_path, "s", pulmonary_artery_hu=60.0))
    data = report.to_json_dict()
    assert data["status"] == "non-diagnostic" and data["passed"] is False
    assert QualityReport.from_json_dict(data).to_json_dict() == data


def test_prediction_carries_the_quality_report(tiny_checkpoint: Path, phantom_series: tuple[Path, PhantomTruth]) -> None:
    directory, _ = phantom_series
    predictor = Predictor.from_checkpoint(tiny_checkpoint, gradcam_top_k=0)
    prediction = predictor.predict(directory)
    assert prediction.quality is not None
    assert prediction.quality.pulmonary_trunk_hu is not None
    assert "quality" in prediction.timings_s
    assert prediction.to_json_dict()["quality"]["status"] == prediction.quality.status


# -- hostile volumes: an answer with what could not be measured, never an exception --------------------


def _volume(voxels: np.ndarray, orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0), thickness: float | None = 1.0,
            spacing: tuple[float, float] = (1.0, 1.0)) -> Volume:
    n = voxels.shape[0]
    return Volume(voxels=voxels, positions_mm=np.arange(n, dtype=np.float64),
                  image_positions=np.array([[0.0, 0.0, float(k)] for k in range(n)]),
                  orientation=np.asarray(orientation, dtype=np.float64), pixel_spacing_mm=spacing,
                  sop_instance_uids=tuple(str(k) for k in range(n)), frame_numbers=(None,) * n,
                  study_instance_uid="1", series_instance_uid="2", slice_thickness_mm=thickness, skipped=())


_RNG = np.random.default_rng(0)


@pytest.mark.parametrize(
    "volume",
    [
        _volume(np.zeros((1, 16, 16), np.int16)),
        _volume(np.full((5, 32, 32), -1000, np.int16)),
        _volume(_RNG.integers(-1024, 3000, (20, 40, 40)).astype(np.int16)),
        _volume(_RNG.integers(-1000, 100, (10, 30, 30)).astype(np.int16), orientation=(0, 1, 0, 0, 0, -1)),
        _volume(np.where(_RNG.random((6, 32, 32)) < 0.1, np.nan, 0.0).astype(np.float32)),
        _volume(np.zeros((4, 16, 16), np.int16), thickness=None),
        _volume(np.zeros((3, 2, 2), np.int16), spacing=(0.01, 0.01)),
    ],
    ids=["one-slice", "all-air", "random", "sagittal", "nan", "no-thickness", "2x2"],
)
def test_hostile_volumes_get_an_unverified_report(volume: Volume) -> None:
    report = assess_quality(volume)
    assert report.status == "unverified" and report.unmeasured
    assert report.summary.startswith("quality unverified: ")
