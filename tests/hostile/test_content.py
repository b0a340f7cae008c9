"""Valid DICOM that no CT scanner makes, sent to a running node: never a confident flag.

Each case is a small phantom series (48 x 48, 20 slices) damaged in one way and sent over C-STORE. A
refused case must end FAILED (the job's error names the problem) or IGNORED with a reason, or at most
ANALYSED with the REVIEW flag; a series analysed after dropping images must list them, with the reason, in
its result. A patient's name copied into free-text attributes must not reach the log.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from pacs_agent.db.models import Flag, Job, Result, Series
from phantoms import PhantomSpec, write_phantom_series
from tests.faults.node import send, wait_until
from tests.hostile.conftest import HostileNode

pytestmark = pytest.mark.slow

N_SLICES = 20
FINAL = ("ANALYSED", "IGNORED", "FAILED")


def _phantom(workdir: Path, seed: int, **spec: object) -> list[Dataset]:
    values: dict[str, object] = {"rows": 48, "columns": 48, "n_slices": N_SLICES, "seed": seed, "patient_id": f"HOSTILE-{seed}"}
    values.update(spec)
    truth = write_phantom_series(workdir / f"p{seed}", PhantomSpec(**values))  # type: ignore[arg-type]
    datasets = [pydicom.dcmread(f) for f in truth.files]
    return sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))


def _signed_phantom(workdir: Path, seed: int) -> list[Dataset]:
    spec = PhantomSpec(rows=48, columns=48, n_slices=N_SLICES, seed=seed, patient_id=f"HOSTILE-{seed}")
    truth = write_phantom_series(workdir / f"s{seed}", spec, signed_pixels=True)
    return sorted((pydicom.dcmread(f) for f in truth.files), key=lambda ds: float(ds.ImagePositionPatient[2]))


def _set(keyword: str, value: object) -> Callable[[list[Dataset]], None]:
    def damage(series: list[Dataset]) -> None:
        for ds in series:
            setattr(ds, keyword, value)
    return damage


def _gap(series: list[Dataset]) -> None:
    for ds in series[N_SLICES // 2 :]:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 100.0]


def _half_other_size(series: list[Dataset]) -> None:
    for ds in series[::2]:
        ds.Rows, ds.Columns = 24, 96


def _one_other_size(series: list[Dataset]) -> None:
    series[7].Rows, series[7].Columns = 24, 96


def _one_slope_zero(series: list[Dataset]) -> None:
    series[3].RescaleSlope = 0


def _name_in_free_text(series: list[Dataset]) -> None:
    for ds in series:
        ds.PatientName = "Quenby^Marguerite"
        ds.SeriesDescription = "CTPA for Marguerite Quenby"
        ds.ImageComments = "Quenby, Marguerite - ward 7"
        ds.StudyDescription = "MARGUERITE QUENBY chest"


@dataclass(frozen=True)
class ContentCase:
    name: str
    damage: Callable[[list[Dataset]], None]
    #: Words one of which the recorded reason (job error or ignore reason) must contain; empty: analysed.
    reason_words: tuple[str, ...]
    signed: bool = False
    #: An analysed series must list this many skipped images (None: not checked).
    skipped: int | None = None


CASES = (
    ContentCase("rescale_slope_zero", _set("RescaleSlope", 0), ("RescaleSlope",)),
    ContentCase("rescale_slope_huge", _set("RescaleSlope", 1000), ("RescaleSlope",)),
    ContentCase("rescale_slope_ten", _set("RescaleSlope", 10), ("denser than bone", "Hounsfield")),
    ContentCase("pixel_representation_wrong", _set("PixelRepresentation", 0), ("PixelRepresentation", "Hounsfield"), signed=True),
    ContentCase("pixel_spacing_zero", _set("PixelSpacing", [0, 0]), ("PixelSpacing",)),
    ContentCase("pixel_spacing_negative", _set("PixelSpacing", [-0.7, -0.7]), ("PixelSpacing",)),
    ContentCase("pixel_spacing_huge", _set("PixelSpacing", [5000, 5000]), ("PixelSpacing", "field of view")),
    ContentCase("gap_100_mm", _gap, ("gap",)),
    ContentCase("matrix_sizes_mixed", _half_other_size, ("image size", "disagree")),
    ContentCase("one_slice_other_size", _one_other_size, (), skipped=1),
    ContentCase("one_slice_rescale_slope_zero", _one_slope_zero, (), skipped=1),
    ContentCase("patient_name_in_free_text", _name_in_free_text, ()),
)


@pytest.fixture(scope="module")
def sent(hostile: HostileNode, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Send every case (one association each); series UID by case name."""
    workdir = tmp_path_factory.mktemp("content")
    out: dict[str, str] = {}
    for index, case in enumerate(CASES):
        seed = 5100 + index
        series = _signed_phantom(workdir, seed) if case.signed else _phantom(workdir, seed)
        series = [copy.deepcopy(ds) for ds in series]
        case.damage(series)
        result = send(hostile.port, series, calling_ae_title="CONTENT")
        assert set(result.statuses) == {0}, f"{case.name}: {result.statuses}"
        out[case.name] = str(series[0].SeriesInstanceUID)
    return out


def _outcome(hostile: HostileNode, uid: str) -> tuple[str, str, Result | None] | None:
    with hostile.node.sessions()() as session:
        series = session.scalars(select(Series).where(Series.series_instance_uid == uid)).first()
        if series is None or series.state.value not in FINAL:
            return None
        job = session.scalars(select(Job).where(Job.series_id == series.id).order_by(Job.id.desc())).first()
        result = job.result if job is not None else None
        if result is not None:
            session.expunge(result)
        reason = series.ignore_reason if series.state.value == "IGNORED" else (job.error if job is not None else "")
        return series.state.value, reason, result


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_content_case_is_refused_with_its_reason_or_analysed_with_its_drops(
    hostile: HostileNode, sent: dict[str, str], case: ContentCase
) -> None:
    state, reason, result = wait_until(lambda: _outcome(hostile, sent[case.name]), timeout=120, what=f"{case.name} to be decided")
    if case.reason_words:
        confident = state == "ANALYSED" and (result is None or result.flag != Flag.REVIEW)
        assert not confident, f"{case.name}: analysed with flag {result.flag if result else None}"
        if state != "ANALYSED":
            assert any(word in reason for word in case.reason_words), f"{case.name}: {state} with reason {reason!r}"
        hostile.tally.record(f"content_{case.name}", refused_with_reason=True, detail=f"{state}: {reason[:160]}")
        return
    assert state == "ANALYSED", f"{case.name}: {state} {reason}"
    assert result is not None
    if case.skipped is not None:
        assert len(result.skipped_images) == case.skipped, result.skipped_images
        assert all(item["reason"] for item in result.skipped_images)
    hostile.tally.record(f"content_{case.name}", refused_with_reason=case.skipped is not None)


def test_a_name_in_free_text_never_reaches_the_log(hostile: HostileNode, sent: dict[str, str]) -> None:
    wait_until(lambda: _outcome(hostile, sent["patient_name_in_free_text"]), timeout=120, what="the free-text case")
    text = hostile.node.log_text()
    for secret in ("Quenby", "QUENBY", "Marguerite", "MARGUERITE"):
        assert secret not in text, f"{secret} in the node's log"
