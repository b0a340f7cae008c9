"""Admin actions from the dashboard: reprocess, retry, cancel, acknowledge; each recorded with its user.

Each action runs in one transaction with its audit event (``admin_action``: action, user, via,
client address), so the trail says who did what even when the action changes nothing else.
An action that cannot be done raises ActionRefused with a sentence for the user.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Update, select, update
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.db.models import Delivery, DeliveryStatus, Job, Output, Series, Study
from pacs_agent.db.session import transaction
from pacs_agent.delivery.dispatcher import retry_deliveries
from pacs_agent.errors import AgentError, QueueError
from pacs_agent.db.events import record_event
from pacs_agent.metrics import Stage, record_stage
from pacs_agent.jobs.queue import JobNotFoundError, cancel_job, reprocess_series
from pacs_agent.node.web.resources import ACKNOWLEDGED_KIND

#: Longest acknowledgement note kept.
NOTE_MAX = 500


class ActionRefused(AgentError):
    """The action cannot be done (unknown target, wrong state); ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Actor:
    """Who asks, and from where (recorded with every action)."""

    user: str
    via: str  # "web" (signed-in session) or "api" (bearer token)
    client: str


@dataclass(frozen=True)
class ActionOutcome:
    message: str
    data: dict[str, Any]


def _audit(session: Session, actor: Actor, action: str, *, entity: str, entity_id: str | int, series_instance_uid: str = "",
           job_id: int | None = None, **detail: Any) -> None:
    record_event(
        session, entity=entity, entity_id=entity_id, kind="admin_action", series_instance_uid=series_instance_uid, job_id=job_id,
        action=action, user=actor.user, via=actor.via, client=actor.client, **detail,
    )


def _lock_first(session: Session, statement: Update) -> None:
    """Start the transaction with a no-op UPDATE of the rows the action changes.

    On SQLite a transaction that reads first and writes later fails at once with "database is
    locked" when another process wrote in between; one that writes first waits for the lock
    (busy timeout). On PostgreSQL the rows are locked against a concurrent action.
    """
    session.execute(statement.execution_options(synchronize_session=False))


def reprocess(factory: sessionmaker[Session], actor: Actor, series_instance_uid: str, *, max_attempts: int) -> ActionOutcome:
    with transaction(factory) as session:
        series_ids = select(Series.id).where(Series.series_instance_uid == series_instance_uid).scalar_subquery()
        _lock_first(session, update(Job).where(Job.series_id == series_ids).values(priority=Job.priority))
        series = session.scalars(select(Series).where(Series.series_instance_uid == series_instance_uid)).first()
        if series is None:
            raise ActionRefused(f"series {series_instance_uid} is not known to this node", 404)
        try:
            job = reprocess_series(session, series, max_attempts=max_attempts)
        except QueueError as exc:
            raise ActionRefused(str(exc)) from None
        _audit(session, actor, "reprocess", entity="series", entity_id=series.id, series_instance_uid=series_instance_uid,
               job_id=job.id, supersedes_job_id=job.supersedes_job_id)
        data = {"job_id": job.id, "series_instance_uid": series_instance_uid, "supersedes_job_id": job.supersedes_job_id}
    return ActionOutcome(f"queued job {data['job_id']} to analyse the series again", data)


def retry(factory: sessionmaker[Session], actor: Actor, delivery_id: int) -> ActionOutcome:
    with transaction(factory) as session:
        _lock_first(session, update(Delivery).where(Delivery.id == delivery_id).values(attempts=Delivery.attempts))
        delivery = session.get(Delivery, delivery_id)
        if delivery is None:
            raise ActionRefused(f"no delivery with id {delivery_id}", 404)
        if delivery.status in (DeliveryStatus.DELIVERED, DeliveryStatus.SENDING):
            raise ActionRefused(f"delivery {delivery_id} is {delivery.status.value}; only failed, cancelled or pending ones are sent again")
        count = retry_deliveries(session, delivery_ids=[delivery_id])
        output = session.get(Output, delivery.output_id)
        _audit(session, actor, "retry", entity="delivery", entity_id=delivery_id, job_id=output.job_id if output else None,
               destination=delivery.destination)
    return ActionOutcome(f"delivery {delivery_id} queued again", {"delivery_id": delivery_id, "requeued": count})


def cancel(factory: sessionmaker[Session], actor: Actor, job_id: int) -> ActionOutcome:
    with transaction(factory) as session:
        try:
            job = cancel_job(session, job_id, by=actor.user)
        except JobNotFoundError as exc:
            raise ActionRefused(str(exc), 404) from None
        except QueueError as exc:
            raise ActionRefused(str(exc)) from None
        _audit(session, actor, "cancel", entity="job", entity_id=job_id, series_instance_uid=job.series.series_instance_uid, job_id=job_id)
        state = job.status.value
    return ActionOutcome(f"job {job_id} {state}", {"job_id": job_id, "status": state})


def acknowledge(factory: sessionmaker[Session], actor: Actor, study_instance_uid: str, *, note: str = "") -> ActionOutcome:
    """Record that ``actor`` has seen the study's result (the ``acknowledged`` stage of time to notification)."""
    note = " ".join(note.split())[:NOTE_MAX]
    with transaction(factory) as session:
        _lock_first(session, update(Study).where(Study.study_instance_uid == study_instance_uid).values(flag_rank=Study.flag_rank))
        study = session.get(Study, study_instance_uid)
        if study is None:
            raise ActionRefused(f"study {study_instance_uid} has no result to acknowledge", 404)
        record_stage(session, study_instance_uid, Stage.ACKNOWLEDGED, user=actor.user, via=actor.via, flag=study.flag.value,
                     job_id=study.job_id, note=note)
        _audit(session, actor, "acknowledge", entity="study", entity_id=study_instance_uid, series_instance_uid=study.series_instance_uid,
               job_id=study.job_id, flag=study.flag.value)
    return ActionOutcome(f"{study.flag.value} result acknowledged by {actor.user}",
                         {"study_instance_uid": study_instance_uid, "acknowledged_by": actor.user, "kind": ACKNOWLEDGED_KIND})
