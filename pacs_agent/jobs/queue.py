"""The job queue: enqueue, atomic claim with a lease, heartbeat, retry with backoff, cancel.

Ordering: higher `priority` first, then arrival (`id`). Every transition records an event.

An attempt is counted when a job is claimed. A job whose worker vanished (lease expired) goes back to
the queue with that attempt counted; a job released by a worker that is shutting down does not count it.
Claiming is one statement: SQLite runs ``UPDATE ... WHERE id = (SELECT ... LIMIT 1) RETURNING`` under its
single-writer lock; PostgreSQL runs the same statement with ``FOR UPDATE SKIP LOCKED`` in the sub-select,
so concurrent claimers never get the same job.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.db.models import Job, JobStatus, Series, SeriesState, Worker, utcnow
from pacs_agent.db.session import transaction
from pacs_agent.errors import QueueError
from pacs_agent.db.events import record_event
from pacs_agent.jobs.leases import Backoff, owner_process, process_alive
from pacs_agent.series.states import set_series_state
from pacs_agent.worklist import refresh_study

ACTIVE_STATUSES: tuple[JobStatus, ...] = (JobStatus.QUEUED, JobStatus.RUNNING)


class JobNotFoundError(QueueError):
    """No job with that id."""


class IllegalTransitionError(QueueError):
    """The job is not in a state that allows the operation."""


class LeaseLostError(QueueError):
    """The worker no longer holds the job (cancelled, or its lease expired and another worker took it)."""


@dataclass(frozen=True)
class ClaimedJob:
    """A job a worker holds a lease on."""

    job_id: int
    series_id: int
    study_instance_uid: str
    series_instance_uid: str
    priority: int
    reason: str
    attempts: int
    max_attempts: int
    supersedes_job_id: int | None
    lease_owner: str
    lease_expires_at: datetime


def enqueue_job(
    session: Session,
    series: Series,
    *,
    priority: int,
    reason: str,
    max_attempts: int,
    supersedes_job_id: int | None = None,
) -> Job:
    """Queue an analysis of ``series`` and move the series to QUEUED (inside the caller's transaction)."""
    job = Job(
        series_id=series.id,
        status=JobStatus.QUEUED,
        priority=priority,
        reason=reason,
        max_attempts=max_attempts,
        not_before=utcnow(),
        supersedes_job_id=supersedes_job_id,
    )
    session.add(job)
    session.flush()
    series.analysed_instance_count = series.instance_count
    record_event(
        session, entity="job", entity_id=job.id, kind="job_queued", to_state=JobStatus.QUEUED,
        series_instance_uid=series.series_instance_uid, job_id=job.id, priority=priority, reason=reason,
    )
    set_series_state(session, series, SeriesState.QUEUED, job_id=job.id)
    return job


def active_job(session: Session, series_id: int, *, excluding: int | None = None) -> Job | None:
    """The series' QUEUED or RUNNING job, if any."""
    stmt = select(Job).where(Job.series_id == series_id, Job.status.in_(ACTIVE_STATUSES))
    if excluding is not None:
        stmt = stmt.where(Job.id != excluding)
    return session.scalars(stmt.order_by(Job.id.desc()).limit(1)).first()


def last_succeeded_job(session: Session, series_id: int) -> Job | None:
    stmt = select(Job).where(Job.series_id == series_id, Job.status == JobStatus.SUCCEEDED).order_by(Job.id.desc()).limit(1)
    return session.scalars(stmt).first()


def reprocess_series(session: Session, series: Series, *, max_attempts: int, priority: int | None = None) -> Job:
    """Queue a new analysis (reason "reprocess") that supersedes the series' last successful job."""
    running = active_job(session, series.id)
    if running is not None:
        raise IllegalTransitionError(f"series already has job {running.id} {running.status}; wait for it or cancel it")
    previous = last_succeeded_job(session, series.id)
    return enqueue_job(
        session, series,
        priority=series.input_priority if priority is None else priority,
        reason="reprocess",
        max_attempts=max_attempts,
        supersedes_job_id=previous.id if previous is not None else None,
    )


def claim_next_job(
    session_factory: sessionmaker[Session],
    *,
    owner: str,
    lease_seconds: float,
    now: datetime | None = None,
) -> ClaimedJob | None:
    """Atomically take the next due QUEUED job (highest priority, then oldest) and lease it to ``owner``."""
    now = now or utcnow()
    expires = now + timedelta(seconds=lease_seconds)
    with transaction(session_factory) as session:
        candidate = (
            select(Job.id)
            .where(Job.status == JobStatus.QUEUED, Job.not_before <= now)
            .order_by(Job.priority.desc(), Job.id)
            .limit(1)
        )
        if session.get_bind().dialect.name == "postgresql":
            candidate = candidate.with_for_update(skip_locked=True)
        stmt = (
            update(Job)
            .where(Job.id == candidate.scalar_subquery(), Job.status == JobStatus.QUEUED)
            .values(
                status=JobStatus.RUNNING,
                lease_owner=owner,
                lease_expires_at=expires,
                attempts=Job.attempts + 1,
                started_at=now,
                error="",
            )
            .returning(
                Job.id, Job.series_id, Job.priority, Job.reason, Job.attempts, Job.max_attempts, Job.supersedes_job_id,
            )
            .execution_options(synchronize_session=False)
        )
        row = session.execute(stmt).first()
        if row is None:
            return None
        series = session.get(Series, row.series_id)
        if series is None:  # cannot happen with the foreign key; keeps the type checker honest
            raise QueueError(f"job {row.id} points at a missing series")
        record_event(
            session, entity="job", entity_id=row.id, kind="job_claimed", from_state=JobStatus.QUEUED,
            to_state=JobStatus.RUNNING, series_instance_uid=series.series_instance_uid, job_id=row.id,
            owner=owner, attempt=row.attempts,
        )
        return ClaimedJob(
            job_id=row.id,
            series_id=row.series_id,
            study_instance_uid=series.study_instance_uid,
            series_instance_uid=series.series_instance_uid,
            priority=row.priority,
            reason=row.reason,
            attempts=row.attempts,
            max_attempts=row.max_attempts,
            supersedes_job_id=row.supersedes_job_id,
            lease_owner=owner,
            lease_expires_at=expires,
        )


def heartbeat(
    session_factory: sessionmaker[Session],
    job_id: int,
    *,
    owner: str,
    lease_seconds: float,
    now: datetime | None = None,
) -> bool:
    """Extend the lease; False when the worker no longer holds the job (cancelled or taken over)."""
    now = now or utcnow()
    with transaction(session_factory) as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.lease_owner == owner)
            .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
            .execution_options(synchronize_session=False)
        )
        held = bool(result.rowcount)  # type: ignore[attr-defined]
        session.execute(
            update(Worker).where(Worker.id == owner).values(heartbeat_at=now, current_job_id=job_id if held else None)
            .execution_options(synchronize_session=False)
        )
        return held


def _lock_rows(session: Session, *conditions: ColumnElement[bool]) -> int:
    """Take the write lock on the matching job rows before reading them; returns how many match.

    A no-op UPDATE is the one statement that locks on every backend: SQLite's driver starts the
    write transaction (and waits for the lock) at the first UPDATE, PostgreSQL locks the rows it
    updates. Everything read after it is current, so a cancel cannot race a completion.
    """
    result = session.execute(
        update(Job).where(*conditions).values(priority=Job.priority).execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def _locked_job(session: Session, job_id: int) -> Job:
    if not _lock_rows(session, Job.id == job_id):
        raise JobNotFoundError(f"job {job_id} does not exist")
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise JobNotFoundError(f"job {job_id} does not exist")
    return job


def _held_job(session: Session, job_id: int, owner: str) -> Job:
    if not _lock_rows(session, Job.id == job_id, Job.status == JobStatus.RUNNING, Job.lease_owner == owner):
        job = session.get(Job, job_id, populate_existing=True)
        state = job.status if job is not None else "gone"
        raise LeaseLostError(f"job {job_id} is {state} and no longer held by {owner}; its result is dropped")
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise LeaseLostError(f"job {job_id} vanished")
    return job


def _set_series_state_after(session: Session, job: Job, state: SeriesState, *, reason: str = "") -> None:
    """Move the series on once its latest job finished (a newer active job keeps it QUEUED)."""
    series = job.series
    if active_job(session, series.id, excluding=job.id) is not None:
        return
    set_series_state(session, series, state, job_id=job.id, **({"reason": reason} if reason else {}))


def complete_job(session: Session, job_id: int, *, owner: str, model_version: str = "", now: datetime | None = None) -> Job:
    """RUNNING -> SUCCEEDED inside the caller's transaction (with the Result and outputs it stores).

    Raises LeaseLostError when the job was cancelled or taken over meanwhile: the caller rolls back.
    """
    now = now or utcnow()
    job = _held_job(session, job_id, owner)
    job.status = JobStatus.SUCCEEDED
    job.finished_at = now
    job.lease_owner = None
    job.lease_expires_at = None
    job.error = ""
    if model_version:
        job.model_version = model_version
    record_event(
        session, entity="job", entity_id=job.id, kind="job_succeeded", from_state=JobStatus.RUNNING,
        to_state=JobStatus.SUCCEEDED, series_instance_uid=job.series.series_instance_uid, job_id=job.id, owner=owner,
    )
    _set_series_state_after(session, job, SeriesState.ANALYSED)
    session.flush()
    refresh_study(session, job.series.study_instance_uid)
    return job


def _fail_for_good(session: Session, job: Job, error: str, now: datetime, **detail: object) -> None:
    previous = job.status
    job.status = JobStatus.FAILED
    job.finished_at = now
    job.lease_owner = None
    job.lease_expires_at = None
    job.error = error
    record_event(
        session, entity="job", entity_id=job.id, kind="job_failed", from_state=previous, to_state=JobStatus.FAILED,
        series_instance_uid=job.series.series_instance_uid, job_id=job.id, error=error, attempts=job.attempts, **detail,
    )
    _set_series_state_after(session, job, SeriesState.FAILED)
    session.flush()
    refresh_study(session, job.series.study_instance_uid)


def fail_job(
    session_factory: sessionmaker[Session],
    job_id: int,
    *,
    owner: str,
    error: str,
    retryable: bool,
    backoff: Backoff,
    now: datetime | None = None,
) -> JobStatus:
    """Record a failed attempt: back to QUEUED after a backoff, or FAILED for good.

    Not retryable (e.g. a series the model cannot analyse) or out of attempts -> FAILED with ``error``,
    and the study's worklist flag becomes ERROR. Returns the job's new status.
    """
    now = now or utcnow()
    error = " ".join(error.split())[:2000] or "unknown error"
    with transaction(session_factory) as session:
        job = _held_job(session, job_id, owner)
        if retryable and job.attempts < job.max_attempts:
            delay = backoff.delay(job.attempts)
            job.status = JobStatus.QUEUED
            job.lease_owner = None
            job.lease_expires_at = None
            job.not_before = now + timedelta(seconds=delay)
            job.error = error
            record_event(
                session, entity="job", entity_id=job.id, kind="job_retry", from_state=JobStatus.RUNNING,
                to_state=JobStatus.QUEUED, series_instance_uid=job.series.series_instance_uid, job_id=job.id,
                error=error, attempts=job.attempts, retry_in_seconds=round(delay, 3),
            )
            return JobStatus.QUEUED
        _fail_for_good(session, job, error, now, retryable=retryable)
        return JobStatus.FAILED


def release_job(session_factory: sessionmaker[Session], job_id: int, *, owner: str) -> bool:
    """Give a RUNNING job back to the queue without counting the attempt (worker shutting down)."""
    with transaction(session_factory) as session:
        try:
            job = _held_job(session, job_id, owner)
        except LeaseLostError:
            return False
        job.status = JobStatus.QUEUED
        job.lease_owner = None
        job.lease_expires_at = None
        job.attempts = max(job.attempts - 1, 0)
        job.not_before = utcnow()
        record_event(
            session, entity="job", entity_id=job.id, kind="job_released", from_state=JobStatus.RUNNING,
            to_state=JobStatus.QUEUED, series_instance_uid=job.series.series_instance_uid, job_id=job.id, owner=owner,
        )
        return True


def cancel_job(session: Session, job_id: int, *, by: str = "admin") -> Job:
    """QUEUED or RUNNING -> CANCELLED. A running worker notices at its next heartbeat and drops its result."""
    job = _locked_job(session, job_id)
    if job.status not in ACTIVE_STATUSES:
        raise IllegalTransitionError(f"job {job_id} is {job.status}; only QUEUED or RUNNING jobs can be cancelled")
    previous = job.status
    job.status = JobStatus.CANCELLED
    job.finished_at = utcnow()
    job.lease_owner = None
    job.lease_expires_at = None
    record_event(
        session, entity="job", entity_id=job.id, kind="job_cancelled", from_state=previous, to_state=JobStatus.CANCELLED,
        series_instance_uid=job.series.series_instance_uid, job_id=job.id, by=by,
    )
    session.flush()
    if last_succeeded_job(session, job.series_id) is not None:
        _set_series_state_after(session, job, SeriesState.ANALYSED)
    else:
        _set_series_state_after(session, job, SeriesState.IGNORED, reason=f"analysis cancelled by {by} (job {job.id})")
    return job


def _requeue_or_fail(session: Session, job: Job, now: datetime, *, kind: str, why: str) -> None:
    """A RUNNING job whose worker is gone -> QUEUED (event ``kind``), or FAILED when out of attempts."""
    owner = job.lease_owner or ""
    if job.attempts >= job.max_attempts:
        _fail_for_good(
            session, job, f"worker {owner} {why} on attempt {job.attempts} of {job.max_attempts}",
            now, lease_expired=True,
        )
        return
    job.status = JobStatus.QUEUED
    job.lease_owner = None
    job.lease_expires_at = None
    job.not_before = now
    record_event(
        session, entity="job", entity_id=job.id, kind=kind, from_state=JobStatus.RUNNING,
        to_state=JobStatus.QUEUED, series_instance_uid=job.series.series_instance_uid, job_id=job.id,
        owner=owner, attempts=job.attempts,
    )


def recover_expired_leases(session_factory: sessionmaker[Session], *, now: datetime | None = None) -> list[int]:
    """RUNNING jobs whose lease expired (worker died or hung) -> QUEUED, or FAILED when out of attempts."""
    now = now or utcnow()
    recovered: list[int] = []
    with transaction(session_factory) as session:
        expired = (Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
        if not _lock_rows(session, *expired):
            return recovered
        stmt = select(Job).where(*expired).order_by(Job.id).execution_options(populate_existing=True)
        for job in session.scalars(stmt).all():
            _requeue_or_fail(session, job, now, kind="job_lease_expired", why="stopped responding (lease expired)")
            recovered.append(job.id)
    return recovered


def release_jobs_of_dead_local_workers(
    session_factory: sessionmaker[Session],
    *,
    now: datetime | None = None,
    hostname: str | None = None,
    alive: Callable[[int], bool] = process_alive,
) -> list[int]:
    """RUNNING jobs leased to a worker process of THIS host that no longer exists -> QUEUED (or FAILED).

    Run at start-up so a crash does not leave jobs waiting ``workers.lease_seconds``. The worker's
    own pid comes from its Worker row (a pool names workers after the parent's pid); without a row,
    the pid in the owner. Other hosts' leases are never touched: they expire as usual.
    """
    now = now or utcnow()
    host = hostname or socket.gethostname()
    released: list[int] = []
    with transaction(session_factory) as session:
        running = (Job.status == JobStatus.RUNNING, Job.lease_owner.is_not(None))
        if not _lock_rows(session, *running):
            return released
        stmt = select(Job).where(*running).order_by(Job.id).execution_options(populate_existing=True)
        for job in session.scalars(stmt).all():
            owner = job.lease_owner or ""
            worker = session.get(Worker, owner)
            if worker is not None and worker.hostname and worker.pid > 0:
                if worker.hostname != host or alive(worker.pid):
                    continue
            else:
                parsed = owner_process(owner)
                if parsed is None or parsed[0] != host or alive(parsed[1]):
                    continue
            _requeue_or_fail(session, job, now, kind="job_lease_released", why="is gone (process no longer running)")
            released.append(job.id)
    return released


def queue_depth(session: Session) -> dict[str, int]:
    """Number of jobs by status (every status present, zero included)."""
    counts = {status.value: 0 for status in JobStatus}
    for status, count in session.execute(select(Job.status, func.count()).group_by(Job.status)):
        counts[JobStatus(status).value] = int(count)
    return counts
