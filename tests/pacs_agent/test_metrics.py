"""Time-to-stage timelines and histograms (pacs_agent.metrics) on a real, migrated SQLite database."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest

from pacs_agent.db.models import Flag, utcnow
from pacs_agent.db.session import transaction
from pacs_agent.metrics import Stage, record_stage, stage_histograms, study_timelines
from pacs_agent.jobs.queue import claim_next_job, complete_job, reprocess_series
from pacs_agent.db.models import Result, Series

from tests.support.analysed_studies import seed_study

from tests.support.settings import MigratedDB


def test_timeline_stages_and_a_manual_reprocess_keeps_the_automatic_one(migrated_db: MigratedDB) -> None:
    series_id, job_id = seed_study(migrated_db.session_factory, study="2.1", flag=Flag.CRITICAL, probability=0.9, latency_s=100)
    with transaction(migrated_db.session_factory) as session:
        record_stage(session, "2.1", Stage.NOTIFIED, target="pager")
    with migrated_db.session_factory() as session:
        (before,) = study_timelines(session)
    assert before.job_id == job_id and before.flag == Flag.CRITICAL
    assert set(before.stages) == {Stage.COMPLETE, Stage.ANALYSED, Stage.DELIVERED, Stage.NOTIFIED}
    analysed = before.seconds(Stage.ANALYSED)
    assert analysed is not None and 100 <= analysed < 130
    assert before.seconds(Stage.ACKNOWLEDGED) is None

    with transaction(migrated_db.session_factory) as session:
        series = session.get(Series, series_id)
        assert series is not None
        again = reprocess_series(session, series, max_attempts=3).id
    claimed = claim_next_job(migrated_db.session_factory, owner="w", lease_seconds=30)
    assert claimed is not None and claimed.job_id == again
    with transaction(migrated_db.session_factory) as session:
        session.add(Result(job_id=again, pe_present=True, pe_probability=0.9, labels={"central_pe": True}, flag=Flag.CRITICAL))
        session.flush()
        complete_job(session, again, owner="w")
    with migrated_db.session_factory() as session:
        (after,) = study_timelines(session)
    assert after.job_id == job_id and after.stages[Stage.ANALYSED] == before.stages[Stage.ANALYSED]


def test_histograms_cover_every_stage_and_flag(migrated_db: MigratedDB) -> None:
    seed_study(migrated_db.session_factory, study="2.2", flag=Flag.HIGH, probability=0.8, latency_s=25)
    seed_study(migrated_db.session_factory, study="2.3", flag=Flag.HIGH, probability=0.7, latency_s=250)
    with transaction(migrated_db.session_factory) as session:
        record_stage(session, "2.2", Stage.ACKNOWLEDGED, at=utcnow() + timedelta(seconds=60), user="rad1")
    with migrated_db.session_factory() as session:
        histograms = {(h.stage, h.flag): h for h in stage_histograms(study_timelines(session))}
    assert len(histograms) == len(Stage) * len(Flag)
    high = histograms[(Stage.ANALYSED, Flag.HIGH)]
    assert high.count == 2 and high.median_seconds is not None and 25 <= high.median_seconds < 60
    assert high.max_seconds is not None and 250 <= high.max_seconds < 290
    assert dict(high.buckets)[30.0] == 1 and dict(high.buckets)[300.0] == 2 and dict(high.buckets)[math.inf] == 2
    assert histograms[(Stage.ACKNOWLEDGED, Flag.HIGH)].count == 1
    assert histograms[(Stage.ANALYSED, Flag.ROUTINE)].count == 0


def test_derived_stages_cannot_be_marked(migrated_db: MigratedDB) -> None:
    with transaction(migrated_db.session_factory) as session, pytest.raises(ValueError, match="cannot be marked"):
        record_stage(session, "2.4", Stage.ANALYSED)


@pytest.mark.postgres
def test_timelines_on_postgresql(postgres_url: str) -> None:
    from pacs_agent.db.migrate import upgrade_database
    from pacs_agent.db.session import make_engine, make_session_factory

    engine = make_engine(postgres_url)
    try:
        upgrade_database(postgres_url, engine)
        factory = make_session_factory(engine)
        seed_study(factory, study="3.1", flag=Flag.CRITICAL, probability=0.9, latency_s=40)
        seed_study(factory, study="3.2", flag=Flag.HIGH, probability=0.7, latency_s=80, delivered=False)
        with transaction(factory) as session:
            record_stage(session, "3.1", Stage.ACKNOWLEDGED, at=utcnow() + timedelta(seconds=30), user="rad1")
        with factory() as session:
            timelines = {t.study_instance_uid: t for t in study_timelines(session)}
        assert set(timelines["3.1"].stages) == {Stage.COMPLETE, Stage.ANALYSED, Stage.DELIVERED, Stage.ACKNOWLEDGED}
        assert Stage.DELIVERED not in timelines["3.2"].stages
        acknowledged = timelines["3.1"].seconds(Stage.ACKNOWLEDGED)
        assert acknowledged is not None and 70 <= acknowledged < 100
    finally:
        engine.dispose()
