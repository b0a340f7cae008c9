"""Periodic work of the serve process, driven by APScheduler's BackgroundScheduler.

- tracker sweep (complete series -> selection -> job) every 0.5 s;
- dispatch of due deliveries every ``dispatch.poll_seconds``;
- recovery of expired job leases every few seconds;
- retention once a day (received files of finished series, outbox files of delivered jobs, old events
  and finished notifications);
- notifications (raise, escalate, send; pacs_agent/notify/) every ``alerts.poll_seconds`` when
  [[notifications]] are configured.
No job overlaps itself (max_instances=1) and missed runs are coalesced. A failing run is logged and the
next one tries again: the scheduler never dies with a job.
"""

from __future__ import annotations

import contextlib

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.db.models import (
    Delivery,
    DeliveryStatus,
    Event,
    Job,
    JobStatus,
    Notification,
    NotificationStatus,
    Output,
    Series,
    SeriesState,
    utcnow,
)
from pacs_agent.db.session import transaction
from pacs_agent.db.events import record_event
from pacs_agent.logs import get_logger
from pacs_agent.jobs.queue import recover_expired_leases
from pacs_agent.errors import InvalidUIDError
from pacs_agent.ingest.spool import Spool
from pacs_agent.settings import Settings

log = get_logger(__name__)

SWEEP_SECONDS = 0.5
FINISHED_SERIES = (SeriesState.ANALYSED, SeriesState.IGNORED, SeriesState.FAILED)
FINISHED_DELIVERIES = (DeliveryStatus.DELIVERED, DeliveryStatus.CANCELLED)


@dataclass(frozen=True)
class RetentionReport:
    series_purged: int
    instance_files_deleted: int
    outbox_jobs_purged: int
    events_deleted: int
    #: Finished notifications (SENT, FAILED, CANCELLED) older than events_days, with their attempts.
    notifications_deleted: int = 0


def lease_recovery_seconds(settings: Settings) -> float:
    """Often enough that a dead worker's job is back in the queue soon after its lease ends."""
    return max(1.0, min(5.0, settings.workers.lease_seconds / 4))


def run_retention(session_factory: sessionmaker[Session], settings: Settings, *, now: datetime | None = None) -> RetentionReport:
    """Delete what the node no longer needs; a setting of 0 days keeps that kind of data forever."""
    now = now or utcnow()
    spool = Spool(settings.spool_root, settings.node.min_free_disk_mb)
    retention = settings.retention
    series_purged = files_deleted = outbox_purged = events_deleted = notifications_deleted = 0

    if retention.incoming_days > 0:
        cutoff = now - timedelta(days=retention.incoming_days)
        with transaction(session_factory) as session:
            rows = session.scalars(
                select(Series).where(Series.state.in_(FINISHED_SERIES), Series.last_received_at < cutoff)
            ).all()
            for series in rows:
                try:
                    folder = spool.series_dir(series.study_instance_uid, series.series_instance_uid)
                except InvalidUIDError:
                    continue  # never stored under such a name
                if not folder.is_dir():
                    continue
                count = sum(1 for p in folder.iterdir() if p.is_file())
                shutil.rmtree(folder, ignore_errors=True)
                _remove_empty(folder.parent)
                files_deleted += count
                series_purged += 1
                record_event(
                    session, entity="series", entity_id=series.id, kind="series_files_purged",
                    series_instance_uid=series.series_instance_uid, files=count, older_than_days=retention.incoming_days,
                )

    if retention.outbox_days > 0:
        cutoff = now - timedelta(days=retention.outbox_days)
        with transaction(session_factory) as session:
            jobs = session.scalars(
                select(Job).where(Job.finished_at.is_not(None), Job.finished_at < cutoff, Job.status != JobStatus.RUNNING)
            ).all()
            for job in jobs:
                folder = spool.job_outbox_dir(job.id)
                if not folder.is_dir():
                    continue
                pending = session.scalars(
                    select(Delivery.id).join(Output)
                    .where(Output.job_id == job.id, Delivery.status.not_in(FINISHED_DELIVERIES)).limit(1)
                ).first()
                if pending is not None:
                    continue  # a FAILED or pending delivery may still be retried: keep its files
                shutil.rmtree(folder, ignore_errors=True)
                outbox_purged += 1
                record_event(
                    session, entity="job", entity_id=job.id, kind="outbox_purged", job_id=job.id,
                    series_instance_uid=job.series.series_instance_uid, older_than_days=retention.outbox_days,
                )

    if retention.events_days > 0:
        cutoff = now - timedelta(days=retention.events_days)
        with transaction(session_factory) as session:
            result = session.execute(delete(Event).where(Event.at < cutoff).execution_options(synchronize_session=False))
            events_deleted = int(result.rowcount or 0)  # type: ignore[attr-defined]
            finished = (NotificationStatus.SENT, NotificationStatus.FAILED, NotificationStatus.CANCELLED)
            result = session.execute(
                delete(Notification).where(Notification.created_at < cutoff, Notification.status.in_(finished))
                .execution_options(synchronize_session=False)
            )
            notifications_deleted = int(result.rowcount or 0)  # type: ignore[attr-defined]

    report = RetentionReport(series_purged, files_deleted, outbox_purged, events_deleted, notifications_deleted)
    log.info("retention_done", **report.__dict__)
    return report


def _remove_empty(folder: Path) -> None:
    """Remove a study folder once its last series is purged; rmdir refuses a folder that still
    holds other series of the study, which is the expected case, not an error."""
    with contextlib.suppress(OSError):
        folder.rmdir()


def _guarded(name: str, fn: Callable[[], Any]) -> Callable[[], None]:
    """Wrap a periodic job so that an error is one log line and the next run tries again."""

    def run() -> None:
        try:
            fn()
        except Exception as exc:  # the scheduler must outlive any single failing run
            log.error("scheduled_job_failed", job=name, error=f"{type(exc).__name__}: {exc}")

    run.__name__ = name
    return run


def build_scheduler(
    settings: Settings,
    session_factory: sessionmaker[Session],
    *,
    owner: str,
    tracker: bool = True,
    dispatcher: bool = True,
    notify: bool = True,
) -> BackgroundScheduler:
    """A configured (not yet started) scheduler for the serve process.

    Raises ConfigError when the notification settings cannot be used (e.g. the signing key file is
    missing), so that serve refuses to start rather than alert no one.
    """
    scheduler = BackgroundScheduler(
        timezone="UTC",
        job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": 30},
    )
    if tracker:
        from pacs_agent.series.tracker import sweep_series

        def sweep() -> None:
            queued = sweep_series(session_factory, settings)
            if queued:
                log.info("series_queued", job_ids=queued)

        scheduler.add_job(_guarded("tracker_sweep", sweep), "interval", seconds=SWEEP_SECONDS, id="tracker_sweep")
    if dispatcher:
        from pacs_agent.delivery.dispatcher import dispatch_due

        scheduler.add_job(
            _guarded("dispatch", lambda: dispatch_due(session_factory, settings, owner=owner)),
            "interval", seconds=settings.dispatch.poll_seconds, id="dispatch",
        )

    if notify and settings.notifications:
        from pacs_agent.notify import Notifier

        notifier = Notifier(settings, session_factory, owner=f"{owner.rsplit('/', 1)[0]}/notify")
        scheduler.add_job(
            _guarded("notify", notifier.run_once), "interval", seconds=settings.alerts.poll_seconds, id="notify",
        )

    def recover() -> None:
        recovered = recover_expired_leases(session_factory)
        if recovered:
            log.warning("expired_leases_recovered", job_ids=recovered)

    scheduler.add_job(_guarded("lease_recovery", recover), "interval", seconds=lease_recovery_seconds(settings), id="lease_recovery")
    scheduler.add_job(
        _guarded("retention", lambda: run_retention(session_factory, settings)),
        "interval", days=1, id="retention", next_run_time=utcnow() + timedelta(seconds=60),
    )
    return scheduler
