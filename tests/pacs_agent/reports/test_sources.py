"""Malformed demographics in the source images do not stop the reports (SR, SC, SEG)."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from pacs_agent.analysis.pipeline import analyze_datasets
from pacs_agent.db.models import OutputKind
from pacs_agent.reports import write_reports
from pacs_agent.reports.sources import FALLBACK_CHARACTER_SET, header, repair_demographics
from pacs_agent.settings import OutputSettings
from pe_model.prediction import Prediction
from tests.support.ct_series import CTSeriesSpec, make_ct_series
from tests.support.dciodvfy import dciodvfy_available, run_dciodvfy
from tests.support.predictions import make_prediction

ALL_OUTPUTS = OutputSettings(segmentation=True, key_slices=2, manufacturer="PE Triage Test")


def _received(mutate: Callable[[Dataset], None]) -> list[Dataset]:
    """A small CT series written and read back (raw elements, as the worker reads the spool)."""
    series = []
    for ds in make_ct_series(CTSeriesSpec(n_slices=6, rows=32, columns=32)):
        mutate(ds)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        buffer.seek(0)
        series.append(pydicom.dcmread(buffer))
    return series


class _FixedPredictor:
    """Returns a prepared prediction: the test is about the reports, not the model."""

    def __init__(self, prediction: Prediction) -> None:
        self.prediction = prediction

    def predict(self, source: Sequence[object]) -> Prediction:
        return self.prediction


def _unknown_character_set(ds: Dataset) -> None:
    ds.SpecificCharacterSet = "ISO_IR 999"


def _invalid_birth_date(ds: Dataset) -> None:
    ds.PatientBirthDate = "19471399"
    ds.StudyTime = "256199"


def test_header_replaces_an_unknown_character_set_and_keeps_known_ones() -> None:
    odd = _received(_unknown_character_set)[0]
    copy = header(odd)
    assert copy.SpecificCharacterSet == FALLBACK_CHARACTER_SET
    assert odd.SpecificCharacterSet == "ISO_IR 999"  # header() copies; the source is untouched
    assert str(copy.PatientName) == str(odd.PatientName)

    latin = _received(lambda ds: setattr(ds, "SpecificCharacterSet", "ISO_IR 100"))[0]
    assert header(latin).SpecificCharacterSet == "ISO_IR 100"


def test_header_blanks_unparsable_dates_and_times_only() -> None:
    odd = _received(_invalid_birth_date)[0]
    copy = header(odd)
    assert copy.PatientBirthDate == "" and copy.StudyTime == ""
    assert copy.StudyDate == odd.StudyDate != ""
    assert odd.PatientBirthDate == "19471399"


def test_repair_decodes_text_before_changing_the_character_set() -> None:
    def latin1_name(ds: Dataset) -> None:
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Müller^Jürgen"

    ds = _received(latin1_name)[0]
    ds.SpecificCharacterSet = "ISO_IR 999"  # as if the sender had named an unknown set for these bytes
    decoded = str(ds.PatientName)
    repair_demographics(ds)
    assert ds.SpecificCharacterSet == FALLBACK_CHARACTER_SET
    assert str(ds.PatientName) == decoded


@pytest.mark.parametrize("mutate", [_unknown_character_set, _invalid_birth_date], ids=["unknown_character_set", "invalid_birth_date"])
def test_source_datasets_as_received_are_refused_by_highdicom(tmp_path: Path, mutate: Callable[[Dataset], None]) -> None:
    """The failure repair_demographics exists for: the SEG writer takes its sources unrepaired."""
    series = _received(mutate)
    from pacs_agent.errors import ReportError

    with pytest.raises(ReportError):
        write_reports(make_prediction(series, pe_present=True), series, ALL_OUTPUTS, tmp_path / "out")


@pytest.mark.parametrize("mutate", [_unknown_character_set, _invalid_birth_date], ids=["unknown_character_set", "invalid_birth_date"])
def test_analysis_writes_valid_reports_despite_malformed_demographics(
    tmp_path: Path, mutate: Callable[[Dataset], None]
) -> None:
    series = _received(mutate)
    predictor = _FixedPredictor(make_prediction(series, pe_present=True))
    outcome = analyze_datasets(predictor, series, ALL_OUTPUTS, tmp_path / "out")  # type: ignore[arg-type]
    kinds = sorted(p.kind.value for p in outcome.produced)
    assert kinds == sorted([OutputKind.SR.value, OutputKind.SC.value, OutputKind.SC.value, OutputKind.SEG.value])
    for produced in outcome.produced:
        written = pydicom.dcmread(produced.path)
        assert written.StudyInstanceUID == series[0].StudyInstanceUID
        assert written.PatientID == series[0].PatientID
        assert written.get("SpecificCharacterSet", "ISO_IR 6") != "ISO_IR 999"
        assert written.get("PatientBirthDate", "") != "19471399"
        if dciodvfy_available():
            result = run_dciodvfy(produced.path)
            assert result.errors == [], f"{produced.kind.value}: {result.errors}"
