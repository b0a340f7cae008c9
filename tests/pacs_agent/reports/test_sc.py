"""Grad-CAM Secondary Captures: one series per job, source references, fixed probability colour scale,
colour bar, orientation and slice position, full source resolution, the SC policy, dciodvfy-clean."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, SecondaryCaptureImageStorage

from pacs_agent.db.models import Flag, OutputKind
from pacs_agent.reports import secondary_captures_wanted, write_reports
from pacs_agent.reports.sc import (
    HEATMAP_FLOOR,
    blend_heatmap,
    font_size,
    overlay_text,
    scale_colours,
    window_to_rgb,
)
from pacs_agent.reports.provenance import device_observer_uid
from pacs_agent.reports.sources import hounsfield
from pacs_agent.settings import OutputSettings, load_settings
from phantoms import PhantomSpec, write_phantom_series
from tests.support.ct_series import PATIENT_BIRTH_DATE, PATIENT_ID, PATIENT_NAME, CTSeriesSpec, make_ct_series
from tests.support.dciodvfy import dciodvfy_available, run_dciodvfy
from tests.support.predictions import make_prediction

SC_ONLY = OutputSettings(structured_report=False, key_images=False, secondary_capture="always", key_slices=3)


def _sc_only(**kwargs: Any) -> OutputSettings:
    return OutputSettings(**{"structured_report": False, "key_images": False, "secondary_capture": "always", **kwargs})


@pytest.fixture
def series() -> list[Dataset]:
    return make_ct_series(CTSeriesSpec(n_slices=10, rows=64, columns=64))


def _write(tmp_path: Path, series: list[Dataset], settings: OutputSettings = SC_ONLY, **kwargs: bool) -> list[Dataset]:
    prediction = make_prediction(series, **kwargs)
    produced = write_reports(prediction, series, settings, tmp_path / "out")
    assert all(p.kind == OutputKind.SC for p in produced)
    return [pydicom.dcmread(p.path) for p in produced]


def _interior(image: np.ndarray, rows: int, columns: int) -> tuple[slice, slice]:
    """The anatomy without the edge letters (one font height from each edge)."""
    margin = font_size(columns) + 3
    return slice(margin, rows - margin), slice(margin, columns - margin)


def test_one_series_in_the_source_study_referencing_each_key_slice(tmp_path: Path, series: list[Dataset]) -> None:
    prediction = make_prediction(series)
    produced = write_reports(prediction, series, OutputSettings(key_slices=3), tmp_path / "out")
    # Images first, then the documents that reference them.
    assert [p.kind for p in produced] == [OutputKind.SC, OutputKind.SC, OutputKind.SC, OutputKind.SR, OutputKind.KOS]
    scs = [pydicom.dcmread(p.path) for p in produced[:3]]
    assert len({sc.SeriesInstanceUID for sc in scs}) == 1
    assert scs[0].SeriesInstanceUID not in (series[0].SeriesInstanceUID, produced[3].series_instance_uid)
    assert len({sc.SOPInstanceUID for sc in scs}) == 3
    # Highest chunk probability first, each SC pointing at its source slice.
    ranked = sorted(prediction.heatmaps, key=lambda h: -prediction.chunk_probabilities[h.chunk_index])
    referenced = [sc.SourceImageSequence[0].ReferencedSOPInstanceUID for sc in scs]
    assert referenced == [h.sop_instance_uid for h in ranked]
    assert [sc.InstanceNumber for sc in scs] == [1, 2, 3]
    for sc in scs:
        assert sc.SOPClassUID == SecondaryCaptureImageStorage
        assert sc.SpecificCharacterSet == "ISO_IR 192"
        assert sc.SourceImageSequence[0].ReferencedSOPClassUID == series[0].SOPClassUID
        assert sc.StudyInstanceUID == series[0].StudyInstanceUID
        assert (str(sc.PatientName), sc.PatientID, sc.PatientBirthDate) == (PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH_DATE)
        assert (sc.AccessionNumber, sc.StudyDate, sc.StudyID) == ("ACC0042", "20240105", "42")
        assert sc.StudyDescription == series[0].StudyDescription
        assert sc.BurnedInAnnotation == "YES"
        assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
        assert list(sc.PatientOrientation) == ["L", "P"]
        assert [float(v) for v in sc.PixelSpacing] == [float(v) for v in series[0].PixelSpacing]
        assert sc.SeriesDescription.startswith("NOT FOR CLINICAL USE")
        assert "sha256" in sc.ImageComments
        [equipment] = [
            item for item in sc.ContributingEquipmentSequence if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        ]
        assert equipment.DeviceUID == device_observer_uid(prediction.model)
        assert equipment.ManufacturerModelName == prediction.model.name
        assert [item.get("Manufacturer") for item in sc.ContributingEquipmentSequence].count("highdicom") == 0


def test_key_slices_setting_limits_the_number_of_images(tmp_path: Path, series: list[Dataset]) -> None:
    prediction = make_prediction(series)
    scs = _write(tmp_path, series, _sc_only(key_slices=1))
    assert len(scs) == 1
    best = max(prediction.heatmaps, key=lambda h: prediction.chunk_probabilities[h.chunk_index])
    assert scs[0].SourceImageSequence[0].ReferencedSOPInstanceUID == best.sop_instance_uid
    assert write_reports(prediction, series, _sc_only(key_slices=0), tmp_path / "none") == []


@pytest.mark.parametrize(
    ("policy", "flag", "wanted"),
    [
        ("positive", Flag.CRITICAL, True),
        ("positive", Flag.HIGH, True),
        ("positive", Flag.REVIEW, True),
        ("positive", Flag.ROUTINE, False),
        ("always", Flag.ROUTINE, True),
        ("never", Flag.CRITICAL, False),
    ],
)
def test_secondary_capture_policy(policy: str, flag: Flag, wanted: bool) -> None:
    assert secondary_captures_wanted(OutputSettings(secondary_capture=policy), flag) is wanted


def test_by_default_negatives_get_no_heatmaps_and_positives_do(tmp_path: Path, series: list[Dataset]) -> None:
    defaults = OutputSettings(structured_report=False, key_images=False)
    assert defaults.secondary_capture == "positive"
    negative = write_reports(make_prediction(series, pe_present=False), series, defaults, tmp_path / "neg")
    assert negative == []
    review = write_reports(make_prediction(series, pe_present=False), series, defaults, tmp_path / "review", flag=Flag.REVIEW)
    assert [p.kind for p in review] == [OutputKind.SC] * 3
    positive = write_reports(make_prediction(series, pe_present=True), series, defaults, tmp_path / "pos")
    assert [p.kind for p in positive] == [OutputKind.SC] * 3


def test_secondary_capture_setting_accepts_the_older_booleans(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("[outputs]\nsecondary_capture = false\n")
    assert load_settings(config, environ={}).outputs.secondary_capture == "never"
    assert load_settings(None, environ={"PE_AGENT__OUTPUTS__SECONDARY_CAPTURE": "true"}).outputs.secondary_capture == "always"
    assert load_settings(None, environ={"PE_AGENT__OUTPUTS__SECONDARY_CAPTURE": "never"}).outputs.secondary_capture == "never"
    from pacs_agent.errors import ConfigError

    with pytest.raises(ConfigError, match="secondary_capture"):
        load_settings(None, environ={"PE_AGENT__OUTPUTS__SECONDARY_CAPTURE": "sometimes"})
    with pytest.raises(ConfigError, match="rejection_reason"):
        load_settings(None, environ={"PE_AGENT__OUTPUTS__REJECTION_REASON": "whim"})


def test_overlay_keeps_the_source_resolution_and_weights_the_heatmap_by_probability(tmp_path: Path, series: list[Dataset]) -> None:
    prediction = make_prediction(series)
    sc = _write(tmp_path, series, _sc_only(key_slices=1))[0]
    heatmap = max(prediction.heatmaps, key=lambda h: prediction.chunk_probabilities[h.chunk_index])
    probability = prediction.chunk_probabilities[heatmap.chunk_index]
    source = next(ds for ds in series if ds.SOPInstanceUID == heatmap.sop_instance_uid)
    rows, columns = int(source.Rows), int(source.Columns)
    assert sc.Rows > rows and sc.Columns > columns  # legend band below, colour bar beside
    image = sc.pixel_array[:rows, :columns]  # pixel for pixel, no scaling
    grey = window_to_rgb(hounsfield(source))
    expected = blend_heatmap(grey, heatmap.values, probability)
    inside = _interior(image, rows, columns)
    assert np.array_equal(image[inside], expected[inside])
    cold = heatmap.values * probability < HEATMAP_FLOOR
    assert np.array_equal(image[inside][cold[inside]], grey[inside][cold[inside]])  # no colour where the weighted map is low
    peak = np.unravel_index(np.argmax(heatmap.values), heatmap.values.shape)
    r, g, b = (int(v) for v in image[peak])
    assert not (r == g == b)  # coloured at the peak


def test_fixed_colour_scale_a_negative_never_looks_as_hot_as_a_positive(tmp_path: Path, series: list[Dataset]) -> None:
    """The same saliency map at P 0.93 and P 0.07: only the positive is coloured, and on the shared scale."""
    source = series[0]
    grey = window_to_rgb(hounsfield(source))
    saliency = np.zeros(grey.shape[:2], dtype=np.float32)
    saliency[20:40, 20:40] = 1.0
    hot = blend_heatmap(grey, saliency, 0.93)
    cold = blend_heatmap(grey, saliency, 0.07)
    assert np.array_equal(cold, grey)  # 0.07 x 1.0 is below the floor: nothing drawn
    assert not np.array_equal(hot[30, 30], grey[30, 30])
    # The colour depends only on saliency x probability: one fixed scale for every image.
    half = blend_heatmap(grey, saliency * 0.5, 0.9)
    assert not np.array_equal(half[30, 30], hot[30, 30])
    assert np.array_equal(blend_heatmap(grey, saliency * 0.9, 0.5)[30, 30], half[30, 30])


def test_colour_bar_runs_from_probability_zero_to_one(tmp_path: Path, series: list[Dataset]) -> None:
    sc = _write(tmp_path, series, _sc_only(key_slices=1))[0]
    pixels = sc.pixel_array
    columns = int(series[0].Columns)
    size = font_size(columns)
    bar_column = columns + 6 + size // 2
    bar_top = 6 + size + 4  # below the "P(PE)" title
    bar = pixels[bar_top:, bar_column]
    coloured = np.flatnonzero(bar.astype(int).sum(axis=1) > 0)
    assert coloured[0] == 0
    end = int(np.argmax(np.diff(coloured) > 1)) if np.any(np.diff(coloured) > 1) else len(coloured) - 1
    assert end > int(series[0].Rows) // 2  # a bar, not a glyph
    top, bottom = bar[coloured[0]].astype(int), bar[coloured[end]].astype(int)
    assert np.abs(top - scale_colours(np.array([1.0]))[0].astype(int)).max() <= 3
    assert np.abs(bottom - scale_colours(np.array([0.0]))[0].astype(int)).max() <= 3


def test_legend_band_says_not_for_clinical_use_only_for_the_demo_model(tmp_path: Path, series: list[Dataset]) -> None:
    demo = _write(tmp_path / "demo", series, _sc_only(key_slices=1))[0]
    clinical = _write(tmp_path / "clinical", series, _sc_only(key_slices=1), not_for_clinical_use=False)[0]
    rows = int(series[0].Rows)
    size = font_size(int(series[0].Columns))
    demo_band, clinical_band = demo.pixel_array[max(rows, 8 * size) :], clinical.pixel_array[max(rows, 8 * size) :]
    yellow = (demo_band[..., 0] > 200) & (demo_band[..., 1] > 200) & (demo_band[..., 2] < 80)
    assert yellow.sum() > 200
    red = lambda band: ((band[..., 0] > 200) & (band[..., 1] < 120) & (band[..., 2] < 120)).sum()  # noqa: E731
    assert red(demo_band) > 50
    assert red(clinical_band) == 0
    assert demo_band.shape[0] > clinical_band.shape[0]


def test_overlay_text_names_the_edges_and_the_slice_position(series: list[Dataset]) -> None:
    prediction = make_prediction(series)
    heatmap = prediction.heatmaps[0]
    source = next(ds for ds in series if ds.SOPInstanceUID == heatmap.sop_instance_uid)
    text = overlay_text(source, heatmap, prediction.model, 0.93, prediction.series_pe_probability)
    # Axial LPS (rows run to the patient's left, columns to posterior): R on the image's left edge.
    assert text.edges == ("A", "P", "R", "L")
    z = float(source.ImagePositionPatient[2])
    assert any(f"z = {z:.1f} mm" in line for line in text.lines)
    assert any("0.93" in line for line in text.lines)
    flipped = source.copy()
    flipped.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]  # rotated 180 degrees
    assert overlay_text(flipped, heatmap, prediction.model, 0.5, 0.5).edges == ("P", "A", "L", "R")


@pytest.mark.skipif(not dciodvfy_available(), reason="dciodvfy (dicom3tools) is not installed")
def test_secondary_captures_pass_dciodvfy(tmp_path: Path, series: list[Dataset]) -> None:
    produced = write_reports(make_prediction(series), series, SC_ONLY, tmp_path / "out")
    assert len(produced) == 3
    for p in produced:
        result = run_dciodvfy(p.path)
        assert result.errors == [], result.output
        assert result.iod == "SCImage"


def _phantom(tmp_path: Path, **kwargs: Any) -> list[Dataset]:
    truth = write_phantom_series(tmp_path / "phantom", PhantomSpec(n_slices=12, rows=48, columns=48), **kwargs)
    return [pydicom.dcmread(path) for path in dict.fromkeys(truth.files)]


@pytest.mark.parametrize(
    "phantom_kwargs",
    [{"enhanced": True}, {"transfer_syntax_uid": JPEG2000Lossless}],
    ids=["enhanced-ct", "jpeg2000-single-frame"],
)
def test_overlays_of_enhanced_and_compressed_phantoms(tmp_path: Path, phantom_kwargs: dict[str, Any]) -> None:
    datasets = _phantom(tmp_path, **phantom_kwargs)
    prediction = make_prediction(datasets, n_key_images=2)
    produced = write_reports(prediction, datasets, OutputSettings(key_slices=2, segmentation=True), tmp_path / "out")
    assert [p.kind for p in produced] == [OutputKind.SC, OutputKind.SC, OutputKind.SEG, OutputKind.SR, OutputKind.KOS]
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    ranked = sorted(prediction.heatmaps, key=lambda h: -prediction.chunk_probabilities[h.chunk_index])
    for heatmap, p in zip(ranked, produced[0:2], strict=True):
        sc = pydicom.dcmread(p.path)
        reference = sc.SourceImageSequence[0]
        assert reference.ReferencedSOPInstanceUID == heatmap.sop_instance_uid
        assert reference.get("ReferencedFrameNumber") == heatmap.frame_number
        source = by_uid[heatmap.sop_instance_uid]
        rows, columns = int(source.Rows), int(source.Columns)
        image = sc.pixel_array[:rows, :columns]
        expected = blend_heatmap(
            window_to_rgb(hounsfield(source, heatmap.frame_number)), heatmap.values, prediction.chunk_probabilities[heatmap.chunk_index]
        )
        inside = _interior(image, rows, columns)
        assert np.array_equal(image[inside], expected[inside])
    if dciodvfy_available():
        for p in produced:
            result = run_dciodvfy(p.path)
            assert result.errors == [], result.output


def test_hounsfield_reads_the_same_values_from_enhanced_frames_and_single_slices(tmp_path: Path) -> None:
    spec = PhantomSpec(n_slices=6, rows=32, columns=32)
    enhanced = pydicom.dcmread(write_phantom_series(tmp_path / "e", spec, enhanced=True).files[0])
    slices = sorted(
        (pydicom.dcmread(f) for f in write_phantom_series(tmp_path / "s", spec).files), key=lambda ds: int(ds.InstanceNumber)
    )
    for frame, single in enumerate(slices, start=1):
        assert np.array_equal(hounsfield(enhanced, frame), hounsfield(single))
    assert not np.array_equal(hounsfield(enhanced, 1), hounsfield(enhanced, 2))
    assert hounsfield(slices[0]).min() < -900  # air, so the rescale was applied
