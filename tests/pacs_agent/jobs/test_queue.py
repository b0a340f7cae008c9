"""Queue on a real SQLite file: order, atomic claims, leases, backoff, cancel, events."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select

from pacs_agent.db.models import Event, Flag, Job, JobStatus, Series, SeriesState, Study, Worker, utcnow
from pacs_agent.db.session import transaction
from pacs_agent.jobs.queue import (
    IllegalTransitionError,
    LeaseLostError,
    cancel_job,
    claim_next_job,
    complete_job,
    enqueue_job,
    fail_job,
    heartbeat,
    queue_depth,
    recover_expired_leases,
    release_job,
    reprocess_series,
)
from pacs_agent.jobs.leases import Backoff
from pacs_agent.jobs.workers import register_worker

from tests.support.settings import MigratedDB

BACKOFF = Backoff(initial_seconds=10.0, max_seconds=60.0)


def add_series(db: MigratedDB, n: int, *, study: str = "1.2.3", priority: int = 0) -> int:
    with transaction(db.session_factory) as session:
        series = Series(study_instance_uid=study, series_instance_uid=f"1.2.3.{n}", instance_count=50, input_priority=priority)
        session.add(series)
        session.flush()
        return series.id


def queue(db: MigratedDB, series_id: int, *, priority: int = 0, max_attempts: int = 3) -> int:
    with transaction(db.session_factory) as session:
        series = session.get(Series, series_id)
        assert series is not None
        return enqueue_job(session, series, priority=priority, reason="received", max_attempts=max_attempts).id


def job_row(db: MigratedDB, job_id: int) -> Job:
    with db.session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def event_kinds(db: MigratedDB, job_id: int) -> list[str]:
    with db.session_factory() as session:
        return list(session.scalars(select(Event.kind).where(Event.job_id == job_id, Event.entity == "job").order_by(Event.id)))


def test_claim_order_is_priority_then_arrival(migrated_db: MigratedDB) -> None:
    low1 = queue(migrated_db, add_series(migrated_db, 1), priority=0)
    high = queue(migrated_db, add_series(migrated_db, 2), priority=5)
    low2 = queue(migrated_db, add_series(migrated_db, 3), priority=0)
    high2 = queue(migrated_db, add_series(migrated_db, 4), priority=5)
    order = []
    while (claimed := claim_next_job(migrated_db.session_factory, owner="w", lease_seconds=30)) is not None:
        order.append(claimed.job_id)
    assert order == [high, high2, low1, low2]
    claimed_row = job_row(migrated_db, high)
    assert claimed_row.status == JobStatus.RUNNING and claimed_row.attempts == 1 and claimed_row.lease_owner == "w"
    assert event_kinds(migrated_db, high) == ["job_queued", "job_claimed"]


def test_claim_skips_jobs_not_yet_due(migrated_db: MigratedDB) -> None:
    job_id = queue(migrated_db, add_series(migrated_db, 1))
    with transaction(migrated_db.session_factory) as session:
        session.get(Job, job_id).not_before = utcnow() + timedelta(seconds=60)  # type: ignore[union-attr]
    assert claim_next_job(migrated_db.session_factory, owner="w", lease_seconds=30) is None
    later = utcnow() + timedelta(seconds=61)
    claimed = claim_next_job(migrated_db.session_factory, owner="w", lease_seconds=30, now=later)
    assert claimed is not None and claimed.job_id == job_id


def test_concurrent_claimers_never_share_a_job(migrated_db: MigratedDB) -> None:
    job_ids = {queue(migrated_db, add_series(migrated_db, i)) for i in range(40)}
    claims: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def claimer(name: str) -> None:
        got: list[int] = []
        try:
            while (claimed := claim_next_job(migrated_db.session_factory, owner=name, lease_seconds=30)) is not None:
                got.append(claimed.job_id)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        claims[name] = got

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    all_claims = [j for got in claims.values() for j in got]
    assert sorted(all_claims) == sorted(job_ids)  # each job exactly once
    with migrated_db.session_factory() as session:
        owners = {j.id: j.lease_owner for j in session.scalars(select(Job))}
    for name, got in claims.items():
        assert all(owners[j] == name for j in got)


def test_heartbeat_extends_lease_and_detects_cancel(migrated_db: MigratedDB) -> None:
    job_id = queue(migrated_db, add_series(migrated_db, 1))
    register_worker(migrated_db.session_factory, "w")
    claimed = claim_next_job(migrated_db.session_factory, owner="w", lease_seconds=10)
    assert claimed is not None
    before = job_row(migrated_db, job_id).lease_expires_at
    assert heartbeat(migrated_db.session_factory, job_id, owner="w", lease_seconds=100)
    after = job_row(migrated_db, job_id).lease_expires_at
    assert before is not None and after is not None and after - before > timedelta(seconds=80)
    with migrated_db.session_factory() as session:
        assert session.get(Worker, "w").current_job_id == job_id  # type: ignore[union-attr]
    assert not heartbeat(migrated_db.session_factory, job_id, owner="intruder", lease_seconds=100)
    with transaction(migrated_db.session_factory) as session:
        cancel_job(session, job_id)
    assert not heartbeat(migrated_db.session_factory, job_id, owner="w", lease_seconds=100)
    with pytest.raises(LeaseLostError), transaction(migrated_db.session_factory) as session:
        complete_job(session, job_id, owner="w")
    assert job_row(migrated_db, job_id).status == JobStatus.CANCELLED


def test_cancel_queued_and_refuse_finished(migrated_db: MigratedDB) -> None:
    series_id = add_series(migrated_db, 1)
    job_id = queue(migrated_db, series_id)
    with transaction(migrated_db.session_factory) as session:
        cancel_job(session, job_id)
    assert claim_next_job(migrated_db.session_factory, owner="w", lease_seconds=30) is None
    with migrated_db.session_factory() as session:
        series = session.get(Series, series_id)
        assert series is not None and series.state == SeriesState.IGNORED and "cancelled" in series.ignore_reason
    with pytest.raises(IllegalTransitionError, match="only QUEUED or RUNNING"), transaction(migrated_db.session_factory) as session:
        cancel_job(session, job_id)
    assert event_kinds(migrated_db, job_id) == ["job_queued", "job_cancelled"]


def test_retry_backoff_then_failed_for_good(migrated_db: MigratedDB) -> None:
    series_id = add_series(migrated_db, 1, study="9.9")
    job_id = queue(migrated_db, series_id, max_attempts=3)
    now = utcnow()
    delays = []
    for attempt in (1, 2):
        claimed = claim_next_job(migrated_db.session_factory, owner="w", lease_seconds=30, now=now)
        assert claimed is not None and claimed.attempts == attempt
        status = fail_job(migrated_db.session_factory, job_id, owner="w", error="disk\nhiccup", retryable=True, backoff=BACKOFF, now=now)
        assert status == JobStatus.QUEUED
        row = job_row(migrated_db, job_id)
        assert row.error == "disk hiccup"
        delays.append((row.not_before - now).total_seconds())
        assert claim_next_job(migrated_db.session_factory, owner="w", lease_seconds=30, now=now) is None  # not due yet
        now = row.not_before
    assert delays == [10.0, 20.0]
    assert claim_next_job(migrated_db.session_factory, owner="w", lease_seconds=30, now=now) is not None
    status = fail_job(migrated_db.session_factory, job_id, owner="w", error="disk hiccup", retryable=True, backoff=BACKOFF, now=now)
    assert status == JobStatus.FAILED
    with migrated_db.session_factory() as session:
        assert session.get(Series, series_id).state == SeriesState.FAILED  # type: ignore[union-attr]
        study = session.get(Study, "9.9")
        assert study is not None and study.flag == Flag.ERROR and "disk hiccup" in study.summary
    assert event_kinds(migrated_db, job_id)[-1] == "job_failed"


def test_backoff_is_capped() -> None:
    assert [BACKOFF.delay(a) for a in (1, 2, 3, 4, 5, 100)] == [10, 20, 40, 60, 60, 60]


def test_non_retryable_error_fails_at_once(migrated_db: MigratedDB) -> None:
    job_id = queue(migrated_db, add_series(migrated_db, 1), max_attempts=5)
    claim_next_job(migrated_db.session_factory, owner="w", lease_seconds=30)
    status = fail_job(migrated_db.session_factory, job_id, owner="w", error="only 12 slices; at least 40 needed", retryable=False, backoff=BACKOFF)
    assert status == JobStatus.FAILED
    row = job_row(migrated_db, job_id)
    assert row.attempts == 1 and row.error == "only 12 slices; at least 40 needed"


def test_expired_lease_goes_back_to_queue_then_fails(migrated_db: MigratedDB) -> None:
    job_id = queue(migrated_db, add_series(migrated_db, 1), max_attempts=2)
    t0 = utcnow()
    assert claim_next_job(migrated_db.session_factory, owner="dead", lease_seconds=5, now=t0) is not None
    assert recover_expired_leases(migrated_db.session_factory, now=t0 + timedelta(seconds=4)) == []
    assert recover_expired_leases(migrated_db.session_factory, now=t0 + timedelta(seconds=6)) == [job_id]
    row = job_row(migrated_db, job_id)
    assert row.status == JobStatus.QUEUED and row.attempts == 1 and row.lease_owner is None
    t1 = t0 + timedelta(seconds=10)
    claimed = claim_next_job(migrated_db.session_factory, owner="dead2", lease_seconds=5, now=t1)
    assert claimed is not None and claimed.attempts == 2
    assert recover_expired_leases(migrated_db.session_factory, now=t1 + timedelta(seconds=6)) == [job_id]
    row = job_row(migrated_db, job_id)
    assert row.status == JobStatus.FAILED and "lease expired" in row.error
    assert event_kinds(migrated_db, job_id) == ["job_queued", "job_claimed", "job_lease_expired", "job_claimed", "job_failed"]


def test_release_does_not_count_the_attempt(migrated_db: MigratedDB) -> None:
    job_id = queue(migrated_db, add_series(migrated_db, 1))
    claim_next_job(migrated_db.session_factory, owner="w", lease_seconds=30)
    assert release_job(migrated_db.session_factory, job_id, owner="w")
    row = job_row(migrated_db, job_id)
    assert row.status == JobStatus.QUEUED and row.attempts == 0
    assert not release_job(migrated_db.session_factory, job_id, owner="w")


def test_complete_marks_series_analysed_and_reprocess_supersedes(migrated_db: MigratedDB) -> None:
    series_id = add_series(migrated_db, 1)
    job_id = queue(migrated_db, series_id)
    claim_next_job(migrated_db.session_factory, owner="w", lease_seconds=30)
    with transaction(migrated_db.session_factory) as session:
        complete_job(session, job_id, owner="w", model_version="0.1")
    with transaction(migrated_db.session_factory) as session:
        series = session.get(Series, series_id)
        assert series is not None and series.state == SeriesState.ANALYSED
        new = reprocess_series(session, series, max_attempts=3)
        assert new.reason == "reprocess" and new.supersedes_job_id == job_id
        new_id = new.id
    with pytest.raises(IllegalTransitionError, match="already has job"), transaction(migrated_db.session_factory) as session:
        series = session.get(Series, series_id)
        assert series is not None
        reprocess_series(session, series, max_attempts=3)
    with migrated_db.session_factory() as session:
        assert queue_depth(session) == {"QUEUED": 1, "RUNNING": 0, "SUCCEEDED": 1, "FAILED": 0, "CANCELLED": 0}
        assert session.get(Series, series_id).state == SeriesState.QUEUED  # type: ignore[union-attr]
    assert job_row(migrated_db, new_id).status == JobStatus.QUEUED


@pytest.mark.postgres
def test_concurrent_claimers_on_postgresql_skip_locked(postgres_url: str) -> None:
    from pacs_agent.db.migrate import upgrade_database
    from pacs_agent.db.session import make_engine, make_session_factory

    engine = make_engine(postgres_url)
    upgrade_database(postgres_url, engine)
    factory = make_session_factory(engine)
    expected = []
    with transaction(factory) as session:
        for i in range(30):
            series = Series(study_instance_uid="1.2", series_instance_uid=f"1.2.{i}")
            session.add(series)
            session.flush()
            expected.append((-(i % 3), enqueue_job(session, series, priority=i % 3, reason="received", max_attempts=3).id))
    claims: dict[str, list[int]] = {}

    def claimer(name: str) -> None:
        got = claims.setdefault(name, [])
        while (claimed := claim_next_job(factory, owner=name, lease_seconds=30)) is not None:
            got.append(claimed.job_id)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    all_claims = [j for got in claims.values() for j in got]
    assert sorted(all_claims) == sorted(j for _, j in expected)
    single = claims["w0"]
    order = [j for _, j in sorted(expected)]
    assert single == [j for j in order if j in set(single)]  # each claimer takes priority order, then arrival
    engine.dispose()
