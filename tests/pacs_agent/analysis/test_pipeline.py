"""Analysis from files: pe_model reads the pixels; the reports get headers plus the heatmap slices only."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from pacs_agent.analysis.pipeline import SourceReadError, analyze_datasets, analyze_sources, read_sources, report_datasets
from pacs_agent.db.models import OutputKind
from pacs_agent.settings import OutputSettings
from phantoms import PhantomSpec, write_phantom_series

OUTPUTS = OutputSettings(segmentation=True, key_slices=2, manufacturer="PE Triage Test")


@pytest.fixture(scope="module")
def series_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("phantom")
    truth = write_phantom_series(folder / "series", PhantomSpec(n_slices=40, rows=64, columns=64, seed=11))
    (folder / "series" / "notes.txt").write_text("not DICOM")
    return sorted(truth.files)


def test_read_sources_keeps_headers_without_pixels(series_files: list[Path], tmp_path: Path) -> None:
    sources = read_sources(series_files)
    assert [s.path for s in sources] == series_files
    assert all("PixelData" not in s.header and "SOPInstanceUID" in s.header for s in sources)
    assert {s.pixel_data_length for s in sources} == {64 * 64 * 2}
    junk = series_files[0].parent / "notes.txt"
    assert len(read_sources([*series_files, junk], skip_non_dicom=True)) == len(series_files)
    with pytest.raises(SourceReadError, match="not a DICOM file"):
        read_sources([junk])
    with pytest.raises(SourceReadError, match="missing"):
        read_sources([tmp_path / "gone.dcm"])


def test_only_heatmap_slices_are_read_with_pixels(series_files: list[Path], tiny_predictor: Any) -> None:
    sources = read_sources(series_files)
    prediction = tiny_predictor.predict([s.path for s in sources])
    heatmap_uids = {h.sop_instance_uid for h in prediction.heatmaps}
    assert heatmap_uids
    datasets = report_datasets(prediction, sources)
    with_pixels = {str(ds.SOPInstanceUID) for ds in datasets if "PixelData" in ds}
    assert with_pixels == heatmap_uids
    assert [str(ds.SOPInstanceUID) for ds in datasets] == [str(s.header.SOPInstanceUID) for s in sources]


def test_analysis_from_files_matches_analysis_from_datasets(series_files: list[Path], tiny_predictor: Any, tmp_path: Path) -> None:
    from_files = analyze_sources(tiny_predictor, read_sources(series_files), OUTPUTS, tmp_path / "files")
    from_memory = analyze_datasets(tiny_predictor, [pydicom.dcmread(p) for p in series_files], OUTPUTS, tmp_path / "memory")
    a, b = from_files.prediction, from_memory.prediction
    assert a.probabilities == pytest.approx(b.probabilities, abs=1e-5)
    assert np.allclose(a.chunk_probabilities, b.chunk_probabilities, atol=1e-5)
    assert [h.sop_instance_uid for h in a.heatmaps] == [h.sop_instance_uid for h in b.heatmaps]
    kinds = sorted(p.kind.value for p in from_files.produced)
    assert kinds == sorted(p.kind.value for p in from_memory.produced)
    assert OutputKind.SC.value in kinds and OutputKind.SEG.value in kinds and OutputKind.SR.value in kinds
    for produced in from_files.produced:
        written = pydicom.dcmread(produced.path)
        if produced.kind == OutputKind.SC:
            assert written.pixel_array.shape[-1] == 3 and written.pixel_array.any()
        if produced.kind == OutputKind.SR:
            evidence = {
                str(item.ReferencedSOPInstanceUID)
                for study in written.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for item in series.ReferencedSOPSequence
            }
            assert evidence == {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in series_files}

@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"BitsAllocated": 8, "BitsStored": 8, "HighBit": 7}, "8192 bytes, but 64x64, 1 frame(s) at 8 bits allocated need 4096"),
        ({"Rows": 32, "Columns": 32}, "8192 bytes, but 32x32, 1 frame(s) at 16 bits allocated need 2048"),
        ({"Rows": 128, "Columns": 128}, "8192 bytes, but 128x128"),
    ],
    ids=["wrong_bits_allocated", "pixel_data_larger", "pixel_data_smaller"],
)
def test_pixel_data_contradicting_its_header_is_not_analysed(
    series_files: list[Path], tiny_predictor: Any, tmp_path: Path, attributes: dict[str, int], message: str
) -> None:
    """Decoding from a file reads only the announced bytes: without the check these would be analysed."""
    from pe_model.errors import UnreadablePixelsError

    damaged = []
    for k, path in enumerate(series_files):
        ds = pydicom.dcmread(path)
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        damaged.append(tmp_path / f"{k:03d}.dcm")
        ds.save_as(damaged[-1])
    with pytest.raises(UnreadablePixelsError, match=re.escape(message)):
        analyze_sources(tiny_predictor, read_sources(damaged), OUTPUTS, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_analyze_sources_refuses_an_empty_series(tiny_predictor: Any, tmp_path: Path) -> None:
    with pytest.raises(SourceReadError):
        analyze_sources(tiny_predictor, [], OUTPUTS, tmp_path / "out")
