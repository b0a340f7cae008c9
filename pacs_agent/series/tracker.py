"""The series tracker: decide when a received series is complete, then select and queue it.

A series is complete when no instance arrived for ``series.quiet_seconds`` and no association that
delivered any of its instances is still open (release, abort or a closed connection end it). Then the
selection rules run on its headers: a CTPA gets a job (priority from the rules), anything else becomes
IGNORED with the reason. Instances that arrive after a job was queued are folded into that job while it
still waits; once it ran, the series gets a re-analysis job ("late-instances") whose report supersedes
the last one, as soon as the series is quiet again.

`sweep_series` is called by the scheduler every ~0.5 s; it reads files outside any transaction and
re-checks the series in the transaction that changes it, so a concurrent arrival only delays the decision
to the next sweep.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import ColumnElement, exists, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker
from sqlalchemy.sql.expression import Exists

from pacs_agent.db.models import Association, Instance, Job, JobStatus, Series, SeriesState, utcnow
from pacs_agent.db.session import transaction
from pacs_agent.errors import StorageError
from pacs_agent.db.events import record_event
from pacs_agent.logs import get_logger
from pacs_agent.jobs.queue import enqueue_job
from pacs_agent.series.selection import SelectionDecision, select_series
from pacs_agent.series.states import set_series_state
from pacs_agent.settings import Settings
from pacs_agent.ingest.spool import Spool

log = get_logger(__name__)

#: What the selection rules read from each instance (everything else, pixel data included, is skipped).
SELECTION_KEYWORDS: tuple[str, ...] = (
    "SOPClassUID",
    "Modality",
    "BodyPartExamined",
    "ImageType",
    "ImageOrientationPatient",
    "SliceThickness",
    "NumberOfFrames",
    "ContrastBolusAgent",
    "ContrastBolusRoute",
    "ContrastBolusAgentSequence",
    "SeriesDescription",
    "StudyDescription",
    "ProtocolName",
    "SharedFunctionalGroupsSequence",
)
#: At most this many headers are read per series (evenly spaced, first and last included): a 400-slice
#: series is decided in tens of milliseconds, well inside the quiet_seconds + 1 s budget.
SELECTION_SAMPLE = 48
#: Series states that may take a decision again once more instances arrived.
_DECIDED_STATES = (SeriesState.QUEUED, SeriesState.ANALYSED, SeriesState.FAILED, SeriesState.IGNORED)
#: Job statuses whose report a re-analysis supersedes (it exists, or will once the job finishes).
_REPORTING_STATUSES = (JobStatus.RUNNING, JobStatus.SUCCEEDED)


@dataclass(frozen=True)
class _Candidate:
    series_id: int
    series_instance_uid: str
    state: SeriesState
    instance_count: int
    calling_ae_title: str
    paths: tuple[str, ...]


def read_selection_headers(spool: Spool, paths: Iterable[str]) -> list[pydicom.Dataset]:
    """The selection headers of stored instances (spool-relative paths); unreadable files are skipped."""
    headers: list[pydicom.Dataset] = []
    for relative in paths:
        try:
            headers.append(
                pydicom.dcmread(spool.absolute(relative), stop_before_pixels=True, specific_tags=list(SELECTION_KEYWORDS))
            )
        except (InvalidDicomError, OSError, ValueError, StorageError) as exc:
            log.warning("spool_file_unreadable", path=relative, error=str(exc))
    return headers


def even_sample(items: Sequence[str], limit: int) -> list[str]:
    """Up to ``limit`` items spread evenly over ``items``, first and last included, in order."""
    if len(items) <= limit:
        return list(items)
    if limit <= 1:
        return list(items[:limit])
    step = (len(items) - 1) / (limit - 1)
    return [items[round(i * step)] for i in range(limit)]


def _open_association_for(series_id: int | ColumnElement[int] | InstrumentedAttribute[int]) -> Exists:
    """An association that delivered an instance of the series is still open."""
    return exists().where(
        Instance.series_id == series_id,
        Instance.association_id == Association.id,
        Association.closed_at.is_(None),
    )


def _quiet(cutoff: datetime) -> ColumnElement[bool]:
    """The completion rule: nothing arrived since ``cutoff`` and no association that delivered any of
    the series' instances is still open (the re-check in `sweep_series` uses the same clause)."""
    return (Series.last_received_at <= cutoff) & ~_open_association_for(Series.id)


def _candidates(session: Session, cutoff: datetime) -> list[_Candidate]:
    waiting = Series.state.in_((SeriesState.RECEIVING, SeriesState.COMPLETE))
    late = Series.state.in_(_DECIDED_STATES) & (Series.instance_count > Series.analysed_instance_count)
    rows = session.execute(
        select(Series.id, Series.series_instance_uid, Series.state, Series.instance_count, Series.calling_ae_title)
        .where(waiting | late, _quiet(cutoff))
        .order_by(Series.last_received_at, Series.id)
    ).all()
    found = []
    for row in rows:
        paths = tuple(session.scalars(select(Instance.path).where(Instance.series_id == row.id).order_by(Instance.id)))
        found.append(_Candidate(row.id, row.series_instance_uid, row.state, row.instance_count, row.calling_ae_title, paths))
    return found


def sweep_series(
    session_factory: sessionmaker[Session],
    settings: Settings,
    *,
    now: datetime | None = None,
) -> list[int]:
    """Decide every series that became complete; return the ids of the jobs queued."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=settings.series.quiet_seconds)
    with session_factory() as session:
        candidates = _candidates(session, cutoff)
    if not candidates:
        return []
    spool = Spool(settings.spool_root, settings.node.min_free_disk_mb)
    queued: list[int] = []
    for candidate in candidates:
        headers = read_selection_headers(spool, even_sample(candidate.paths, SELECTION_SAMPLE))
        decision = select_series(
            headers, settings.series, calling_ae_title=candidate.calling_ae_title,
            instance_count=len(candidate.paths) if headers else None,
        )
        with transaction(session_factory) as session:
            series = session.get(Series, candidate.series_id, with_for_update=True)
            if series is None or series.instance_count != candidate.instance_count or series.state != candidate.state:
                continue  # changed since it was read: decide on the next sweep
            if not session.scalar(select(Series.id).where(Series.id == series.id, _quiet(cutoff))):
                continue
            job_id = _decide(session, series, decision, settings)
        if job_id is not None:
            queued.append(job_id)
    return queued


def _last_job(session: Session, series_id: int, statuses: Sequence[JobStatus] | None = None) -> Job | None:
    stmt = select(Job).where(Job.series_id == series_id)
    if statuses is not None:
        stmt = stmt.where(Job.status.in_(statuses))
    return session.scalars(stmt.order_by(Job.id.desc()).limit(1)).first()


def _decide(session: Session, series: Series, decision: SelectionDecision, settings: Settings) -> int | None:
    """Apply one selection decision to a complete series inside the caller's transaction."""
    uid = series.series_instance_uid
    series.input_priority = decision.priority
    last = _last_job(session, series.id)
    late = series.state in _DECIDED_STATES and last is not None

    if late and last is not None and last.status == JobStatus.QUEUED:
        # Not started yet: the waiting job reads the series when it runs, late instances included.
        added = series.instance_count - series.analysed_instance_count
        series.analysed_instance_count = series.instance_count
        record_event(
            session, entity="series", entity_id=series.id, kind="late_instances_joined_job",
            series_instance_uid=uid, job_id=last.id, added=added,
        )
        log.info("late_instances_joined_job", series_instance_uid=uid, job_id=last.id, added=added)
        return None
    if late and last is not None and last.status == JobStatus.CANCELLED:
        added = series.instance_count - series.analysed_instance_count
        series.analysed_instance_count = series.instance_count
        record_event(
            session, entity="series", entity_id=series.id, kind="late_instances_after_cancel",
            series_instance_uid=uid, job_id=last.id, added=added,
        )
        return None

    if series.state in (SeriesState.RECEIVING, SeriesState.COMPLETE):
        set_series_state(session, series, SeriesState.COMPLETE, instance_count=series.instance_count)
    if not decision.accepted:
        series.ignore_reason = decision.reason
        series.analysed_instance_count = series.instance_count
        previous = series.state
        set_series_state(session, series, SeriesState.IGNORED, reason=decision.reason)
        if previous == SeriesState.IGNORED:
            record_event(
                session, entity="series", entity_id=series.id, kind="series_ignored_again",
                series_instance_uid=uid, reason=decision.reason, instance_count=series.instance_count,
            )
        log.info("series_ignored", series_instance_uid=uid, reason=decision.reason)
        return None

    series.ignore_reason = ""
    reanalysis = late and last is not None
    superseded = _last_job(session, series.id, _REPORTING_STATUSES) if reanalysis else None
    job = enqueue_job(
        session,
        series,
        priority=decision.priority,
        reason="late-instances" if reanalysis else "received",
        max_attempts=settings.workers.max_attempts,
        supersedes_job_id=superseded.id if superseded is not None else None,
    )
    log.info(
        "series_queued", series_instance_uid=uid, job_id=job.id, priority=decision.priority, reason=job.reason,
        selection=decision.reason, instance_count=series.instance_count,
    )
    return job.id


def recover_open_associations(session_factory: sessionmaker[Session]) -> int:
    """At start-up: associations a crash left open are closed ("recovered"); return how many."""
    now = utcnow()
    with transaction(session_factory) as session:
        ids = list(session.scalars(select(Association.id).where(Association.closed_at.is_(None))))
        if not ids:
            return 0
        session.execute(
            update(Association)
            .where(Association.id.in_(ids), Association.closed_at.is_(None))
            .values(closed_at=now, close_reason="recovered")
        )
        for association_id in ids:
            record_event(
                session, entity="association", entity_id=association_id, kind="association_closed",
                from_state="OPEN", to_state="RECOVERED",
            )
    log.warning("associations_recovered", count=len(ids))
    return len(ids)
