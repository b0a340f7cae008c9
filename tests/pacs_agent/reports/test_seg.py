"""Optional FRACTIONAL segmentation of the heatmaps."""

from __future__ import annotations

from pathlib import Path

import highdicom
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage

from pacs_agent.db.models import OutputKind
from pacs_agent.reports import write_reports
from pacs_agent.settings import OutputSettings
from phantoms import PhantomSpec, write_phantom_series
from tests.support.ct_series import CTSeriesSpec, make_ct_series
from tests.support.dciodvfy import dciodvfy_available, run_dciodvfy
from tests.support.predictions import DEMO_SHA256, make_prediction

SEG_ONLY = OutputSettings(structured_report=False, secondary_capture=False, segmentation=True, key_slices=2)


@pytest.fixture
def series() -> list[Dataset]:
    return make_ct_series(CTSeriesSpec(n_slices=8, rows=32, columns=32))


def test_segmentation_only_when_enabled(tmp_path: Path, series: list[Dataset]) -> None:
    prediction = make_prediction(series)
    default = write_reports(prediction, series, OutputSettings(), tmp_path / "a")
    assert OutputKind.SEG not in {p.kind for p in default}
    enabled = write_reports(prediction, series, OutputSettings(segmentation=True), tmp_path / "b")
    assert [p.kind for p in enabled].count(OutputKind.SEG) == 1
    assert len({p.series_instance_uid for p in enabled}) == 3  # SR, SC and SEG series


def test_fractional_segmentation_holds_the_heatmaps_of_the_key_slices(tmp_path: Path, series: list[Dataset]) -> None:
    prediction = make_prediction(series)
    [produced] = write_reports(prediction, series, SEG_ONLY, tmp_path / "out")
    ds = pydicom.dcmread(produced.path)
    assert ds.SOPClassUID == SegmentationStorage
    assert ds.SegmentationType == "FRACTIONAL"
    assert ds.StudyInstanceUID == series[0].StudyInstanceUID
    assert ds.SeriesDescription.startswith("NOT FOR CLINICAL USE")
    [segment] = ds.SegmentSequence
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == prediction.model.name
    assert DEMO_SHA256 in str(algorithm.AlgorithmParameters)

    seg = highdicom.seg.segread(produced.path)
    ranked = sorted(prediction.heatmaps, key=lambda h: -prediction.chunk_probabilities[h.chunk_index])[:2]
    source_uids = [h.sop_instance_uid for h in ranked]
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    assert referenced == set(source_uids)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=source_uids, segment_numbers=[1], rescale_fractional=True)
    for i, heatmap in enumerate(ranked):
        np.testing.assert_allclose(pixels[i, :, :, 0], heatmap.values, atol=1 / 255 + 1e-6)


@pytest.mark.skipif(not dciodvfy_available(), reason="dciodvfy (dicom3tools) is not installed")
def test_segmentation_passes_dciodvfy(tmp_path: Path, series: list[Dataset]) -> None:
    [produced] = write_reports(make_prediction(series), series, SEG_ONLY, tmp_path / "out")
    result = run_dciodvfy(produced.path)
    assert result.errors == [], result.output
    assert result.iod == "Segmentation"


def test_enhanced_ct_segmentation_keeps_only_the_key_frames(tmp_path: Path) -> None:
    truth = write_phantom_series(tmp_path / "phantom", PhantomSpec(n_slices=12, rows=32, columns=32), enhanced=True)
    [enhanced] = [pydicom.dcmread(path) for path in dict.fromkeys(truth.files)]
    prediction = make_prediction([enhanced], n_key_images=2)
    [produced] = write_reports(prediction, [enhanced], SEG_ONLY, tmp_path / "out")
    seg = highdicom.seg.segread(produced.path)
    frames = sorted(int(h.frame_number or 0) for h in prediction.heatmaps[:2])
    assert seg.NumberOfFrames == 2
    referenced = sorted(
        int(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        for item in seg.PerFrameFunctionalGroupsSequence
    )
    assert referenced == frames
    pixels = seg.get_pixels_by_source_frame(
        source_sop_instance_uid=enhanced.SOPInstanceUID, source_frame_numbers=frames, rescale_fractional=True
    )
    by_frame = {h.frame_number: h for h in prediction.heatmaps}
    for i, frame in enumerate(frames):
        np.testing.assert_allclose(pixels[i, :, :, 0], by_frame[frame].values, atol=1 / 255 + 1e-6)
    if dciodvfy_available():
        result = run_dciodvfy(produced.path)
        assert result.errors == [], result.output
