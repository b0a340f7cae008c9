"""Worklist flags from consistent labels, the study row's most urgent flag, and the listing order."""

from __future__ import annotations

from datetime import timedelta

import pytest

from pacs_agent.db.models import Flag, Job, JobStatus, Result, Series, utcnow
from pacs_agent.db.session import transaction
from pacs_agent.worklist import flag_for, list_worklist, refresh_study, summarize
from pe_model.labels import EXAM_LABELS
from pe_model.prediction import ModelInfo, Prediction

from tests.support.settings import MigratedDB

MODEL = ModelInfo(name="tiny", version="0", sha256="0" * 64, intended_use="test", training_data="none", not_for_clinical_use=True)


def labels(**true: bool) -> dict[str, bool]:
    out = {k: False for k in EXAM_LABELS}
    out.update(true)
    return out


def prediction(p: float, **true: bool) -> Prediction:
    return Prediction(
        study_instance_uid="1.2", series_instance_uid="1.2.3", pe_present=p > 0.5,
        probabilities={**{k: 0.1 for k in EXAM_LABELS}, "pe_present": p}, labels=labels(**true),
        chunk_probabilities=(p,), chunk_sop_instance_uids=(("1.2.3.1",),), key_images=(), attention={},
        heatmaps=(), model=MODEL, timings_s={}, source_sop_instance_uids=("1.2.3.1",),
    )


@pytest.mark.parametrize(
    ("p", "true", "expected"),
    [
        (0.9, {"rv_lv_ratio_gte_1": True, "rightsided_pe": True}, Flag.CRITICAL),
        (0.9, {"central_pe": True, "rv_lv_ratio_lt_1": True}, Flag.CRITICAL),
        (0.9, {"leftsided_pe": True, "rv_lv_ratio_lt_1": True}, Flag.HIGH),
        (0.55, {"leftsided_pe": True, "rv_lv_ratio_lt_1": True}, Flag.HIGH),  # low confidence positive stays HIGH
        (0.45, {"negative_exam_for_pe": True}, Flag.REVIEW),  # within the margin
        (0.1, {"indeterminate": True}, Flag.REVIEW),
        (0.1, {"negative_exam_for_pe": True}, Flag.ROUTINE),
    ],
)
def test_flag_for_prediction(p: float, true: dict[str, bool], expected: Flag) -> None:
    assert flag_for(prediction(p, **true), review_margin=0.1) == expected


def test_flag_for_result_matches_prediction() -> None:
    result = Result(pe_present=False, pe_probability=0.41, labels=labels(negative_exam_for_pe=True), flag=Flag.ROUTINE)
    assert flag_for(result, review_margin=0.1) == Flag.REVIEW
    assert flag_for(result, review_margin=0.05) == Flag.ROUTINE
    assert summarize(result) == "no PE (p=0.41)"
    assert summarize(prediction(0.93, central_pe=True, rightsided_pe=True, rv_lv_ratio_gte_1=True)) == (
        "PE (p=0.93): central, right; RV/LV >= 1; acute"
    )


def _finished_series(db: MigratedDB, study: str, n: int, *, flag: Flag | None, p: float = 0.2, received_offset_s: float = 0.0) -> int:
    """A series with one finished job: SUCCEEDED with a Result of ``flag``, or FAILED when flag is None."""
    with transaction(db.session_factory) as session:
        series = Series(
            study_instance_uid=study, series_instance_uid=f"{study}.{n}", accession_number="ACC" + study[-1],
            first_received_at=utcnow() + timedelta(seconds=received_offset_s),
        )
        session.add(series)
        session.flush()
        job = Job(series_id=series.id, status=JobStatus.SUCCEEDED if flag else JobStatus.FAILED, finished_at=utcnow(), error="" if flag else "boom")
        session.add(job)
        session.flush()
        if flag is not None:
            session.add(Result(job_id=job.id, pe_present=p > 0.5, pe_probability=p, labels={}, flag=flag))
        session.flush()
        refresh_study(session, study)
        return job.id


def test_study_keeps_most_urgent_flag_and_worklist_order(migrated_db: MigratedDB) -> None:
    _finished_series(migrated_db, "1.1", 1, flag=Flag.ROUTINE, received_offset_s=-50)
    _finished_series(migrated_db, "1.2", 1, flag=Flag.ROUTINE, received_offset_s=-40)
    critical_job = _finished_series(migrated_db, "1.2", 2, flag=Flag.CRITICAL, p=0.97, received_offset_s=-10)
    _finished_series(migrated_db, "1.3", 1, flag=None, received_offset_s=-30)
    _finished_series(migrated_db, "1.4", 1, flag=Flag.HIGH, p=0.8, received_offset_s=-5)
    _finished_series(migrated_db, "1.5", 1, flag=Flag.HIGH, p=0.7, received_offset_s=-20)
    with migrated_db.session_factory() as session:
        entries = list_worklist(session)
    assert [(e.study_instance_uid, e.flag) for e in entries] == [
        ("1.2", Flag.CRITICAL), ("1.5", Flag.HIGH), ("1.4", Flag.HIGH), ("1.3", Flag.ERROR), ("1.1", Flag.ROUTINE),
    ]
    top = entries[0]
    assert top.job_id == critical_job and top.pe_probability == pytest.approx(0.97) and top.series_instance_uid == "1.2.2"
    assert entries[3].summary == "analysis failed: boom"
    assert top.to_json_dict()["flag"] == "CRITICAL"


def test_latest_result_per_series_replaces_earlier(migrated_db: MigratedDB) -> None:
    _finished_series(migrated_db, "2.1", 1, flag=Flag.HIGH, p=0.8)
    with transaction(migrated_db.session_factory) as session:
        series = session.query(Series).filter_by(series_instance_uid="2.1.1").one()
        job = Job(series_id=series.id, status=JobStatus.SUCCEEDED, finished_at=utcnow(), reason="reprocess")
        session.add(job)
        session.flush()
        session.add(Result(job_id=job.id, pe_present=False, pe_probability=0.1, labels={}, flag=Flag.ROUTINE))
        session.flush()
        refresh_study(session, "2.1")
    with migrated_db.session_factory() as session:
        (entry,) = list_worklist(session)
    assert entry.flag == Flag.ROUTINE


def test_unfinished_study_is_not_listed(migrated_db: MigratedDB) -> None:
    with transaction(migrated_db.session_factory) as session:
        session.add(Series(study_instance_uid="3.1", series_instance_uid="3.1.1"))
        session.flush()
        assert refresh_study(session, "3.1") is None
    with migrated_db.session_factory() as session:
        assert list_worklist(session) == []
