"""Grad-CAM Secondary Captures: one series per job, source references, legend, dciodvfy-clean."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, SecondaryCaptureImageStorage

from pacs_agent.db.models import OutputKind
from pacs_agent.reports import write_reports
from pacs_agent.reports.sc import (
    HEATMAP_FLOOR,
    MIN_WIDTH,
    blend_heatmap,
    window_to_rgb,
)
from pacs_agent.reports.sources import hounsfield
from pacs_agent.settings import OutputSettings
from phantoms import PhantomSpec, write_phantom_series
from tests.support.ct_series import PATIENT_BIRTH_DATE, PATIENT_ID, PATIENT_NAME, CTSeriesSpec, make_ct_series
from tests.support.dciodvfy import dciodvfy_available, run_dciodvfy
from tests.support.predictions import make_prediction

SC_ONLY = OutputSettings(structured_report=False, key_slices=3)


@pytest.fixture
def series() -> list[Dataset]:
    return make_ct_series(CTSeriesSpec(n_slices=10, rows=64, columns=64))


def _write(tmp_path: Path, series: list[Dataset], settings: OutputSettings = SC_ONLY, **kwargs: bool) -> list[Dataset]:
    prediction = make_prediction(series, **kwargs)
    produced = write_reports(prediction, series, settings, tmp_path / "out")
    assert all(p.kind == OutputKind.SC for p in produced)
    return [pydicom.dcmread(p.path) for p in produced]


def _band(sc: Dataset, source_rows: int) -> np.ndarray:
    """The legend band: everything below the (scaled) source image."""
    pixels = sc.pixel_array
    scale = pixels.shape[1] // source_rows
    return pixels[source_rows * scale :]


def test_one_series_in_the_source_study_referencing_each_key_slice(tmp_path: Path, series: list[Dataset]) -> None:
    prediction = make_prediction(series)
    produced = write_reports(prediction, series, OutputSettings(key_slices=3), tmp_path / "out")
    assert [p.kind for p in produced] == [OutputKind.SR, OutputKind.SC, OutputKind.SC, OutputKind.SC]
    scs = [pydicom.dcmread(p.path) for p in produced[1:]]
    assert len({sc.SeriesInstanceUID for sc in scs}) == 1
    assert scs[0].SeriesInstanceUID not in (series[0].SeriesInstanceUID, produced[0].series_instance_uid)
    assert len({sc.SOPInstanceUID for sc in scs}) == 3
    # Highest chunk probability first, each SC pointing at its source slice.
    ranked = sorted(prediction.heatmaps, key=lambda h: -prediction.chunk_probabilities[h.chunk_index])
    referenced = [sc.SourceImageSequence[0].ReferencedSOPInstanceUID for sc in scs]
    assert referenced == [h.sop_instance_uid for h in ranked]
    assert [sc.InstanceNumber for sc in scs] == [1, 2, 3]
    for sc in scs:
        assert sc.SOPClassUID == SecondaryCaptureImageStorage
        assert sc.SourceImageSequence[0].ReferencedSOPClassUID == series[0].SOPClassUID
        assert sc.StudyInstanceUID == series[0].StudyInstanceUID
        assert (str(sc.PatientName), sc.PatientID, sc.PatientBirthDate) == (PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH_DATE)
        assert (sc.AccessionNumber, sc.StudyDate, sc.StudyID) == ("ACC0042", "20240105", "42")
        assert sc.StudyDescription == series[0].StudyDescription
        assert sc.BurnedInAnnotation == "YES"
        assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
        assert list(sc.PatientOrientation) == ["L", "P"]
        assert sc.SeriesDescription.startswith("NOT FOR CLINICAL USE")
        assert "sha256" in sc.ImageComments


def test_key_slices_setting_limits_the_number_of_images(tmp_path: Path, series: list[Dataset]) -> None:
    prediction = make_prediction(series)
    scs = _write(tmp_path, series, OutputSettings(structured_report=False, key_slices=1))
    assert len(scs) == 1
    best = max(prediction.heatmaps, key=lambda h: prediction.chunk_probabilities[h.chunk_index])
    assert scs[0].SourceImageSequence[0].ReferencedSOPInstanceUID == best.sop_instance_uid
    assert write_reports(prediction, series, OutputSettings(structured_report=False, key_slices=0), tmp_path / "none") == []


def test_overlay_is_the_windowed_slice_with_the_heatmap_blended_in(tmp_path: Path, series: list[Dataset]) -> None:
    prediction = make_prediction(series)
    sc = _write(tmp_path, series, OutputSettings(structured_report=False, key_slices=1))[0]
    heatmap = max(prediction.heatmaps, key=lambda h: prediction.chunk_probabilities[h.chunk_index])
    source = next(ds for ds in series if ds.SOPInstanceUID == heatmap.sop_instance_uid)
    rows = int(source.Rows)
    scale = MIN_WIDTH // rows
    image = sc.pixel_array[: rows * scale : scale, ::scale]  # back on the source grid
    grey = window_to_rgb(hounsfield(source))
    assert np.array_equal(image, blend_heatmap(grey, heatmap.values))
    cold = heatmap.values <= HEATMAP_FLOOR
    assert np.array_equal(image[cold], grey[cold])  # no colour where the heatmap is low
    peak = np.unravel_index(np.argmax(heatmap.values), heatmap.values.shape)
    r, g, b = (int(v) for v in image[peak])
    assert not (r == g == b)  # coloured at the peak


def test_legend_is_burned_in_below_the_image(tmp_path: Path, series: list[Dataset]) -> None:
    demo = _write(tmp_path / "demo", series, OutputSettings(structured_report=False, key_slices=1))[0]
    clinical = _write(tmp_path / "clinical", series, OutputSettings(structured_report=False, key_slices=1), not_for_clinical_use=False)[0]
    demo_band, clinical_band = _band(demo, 64), _band(clinical, 64)
    # Text pixels: yellow legend lines on black, plus red NOT FOR CLINICAL USE for the demo model only.
    yellow = (demo_band[..., 0] > 200) & (demo_band[..., 1] > 200) & (demo_band[..., 2] < 80)
    assert yellow.sum() > 200
    red = lambda band: ((band[..., 0] > 200) & (band[..., 1] < 120)).sum()  # noqa: E731
    assert red(demo_band) > 50
    assert red(clinical_band) == 0
    assert demo_band.shape[0] > clinical_band.shape[0]


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
    assert [p.kind for p in produced] == [OutputKind.SR, OutputKind.SC, OutputKind.SC, OutputKind.SEG]
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    ranked = sorted(prediction.heatmaps, key=lambda h: -prediction.chunk_probabilities[h.chunk_index])
    for heatmap, p in zip(ranked, produced[1:3], strict=True):
        sc = pydicom.dcmread(p.path)
        reference = sc.SourceImageSequence[0]
        assert reference.ReferencedSOPInstanceUID == heatmap.sop_instance_uid
        assert reference.get("ReferencedFrameNumber") == heatmap.frame_number
        source = by_uid[heatmap.sop_instance_uid]
        rows = int(source.Rows)
        scale = -(-MIN_WIDTH // rows)
        image = sc.pixel_array[: rows * scale : scale, ::scale]
        assert np.array_equal(image, blend_heatmap(window_to_rgb(hounsfield(source, heatmap.frame_number)), heatmap.values))
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
