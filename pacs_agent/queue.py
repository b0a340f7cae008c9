"""The job queue: enqueue, atomic claim with a lease, heartbeat, retry with backoff, cancel.

Ordering: higher `priority` first, then arrival (`id`). Every transition records an event.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from pacs_agent.db.models import Job, JobStatus, Series, SeriesState, utcnow
from pacs_agent.events import record_event


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
    previous = series.state
    series.state = SeriesState.QUEUED
    series.analysed_instance_count = series.instance_count
    record_event(
        session, entity="job", entity_id=job.id, kind="job_queued", to_state=JobStatus.QUEUED,
        series_instance_uid=series.series_instance_uid, job_id=job.id, priority=priority, reason=reason,
    )
    if previous != SeriesState.QUEUED:
        record_event(
            session, entity="series", entity_id=series.id, kind="series_state", from_state=previous,
            to_state=SeriesState.QUEUED, series_instance_uid=series.series_instance_uid, job_id=job.id,
        )
    return job
