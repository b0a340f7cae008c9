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
from pacs_agent.errors import AgentError, NotificationError, QueueError
from pacs_agent.db.events import record_event
from pacs_agent.notify import acknowledge as notify_acknowledge
from pacs_agent.notify import acknowledge_by_link as notify_acknowledge_by_link
from pacs_agent.jobs.queue import JobNotFoundError, cancel_job, reprocess_series

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
    """Acknowledge a study's result (pacs_agent.notify.acknowledge: its open alerts, pending escalations
    and the ``acknowledged`` stage of time to notification); acknowledging twice reports the first."""
    with transaction(factory) as session:
        _lock_first(session, update(Study).where(Study.study_instance_uid == study_instance_uid).values(flag_rank=Study.flag_rank))
        try:
            ack = notify_acknowledge(session, study_instance_uid, actor.user, "dashboard" if actor.via == "web" else "api", note=note)
        except NotificationError as exc:
            raise ActionRefused(str(exc), 404) from None
        study = session.get(Study, study_instance_uid)
        _audit(session, actor, "acknowledge", entity="study", entity_id=study_instance_uid,
               series_instance_uid=study.series_instance_uid if study is not None else "",
               job_id=study.job_id if study is not None else None, already_acknowledged=ack.already_acknowledged,
               notification_ids=list(ack.acknowledged_ids))
    if ack.already_acknowledged:
        return ActionOutcome(f"already acknowledged by {ack.user}", ack.to_json_dict())
    return ActionOutcome(f"result acknowledged by {ack.user}", ack.to_json_dict())


def acknowledge_by_link(factory: sessionmaker[Session], signing_key: bytes, token: str, *, user: str, note: str,
                        client: str) -> ActionOutcome:
    """The POST of a signed acknowledgement link's page: no sign-in, the link is the authority."""
    with transaction(factory) as session:
        try:
            ack = notify_acknowledge_by_link(session, signing_key, token, user=user, note=note)
        except NotificationError as exc:
            raise ActionRefused(str(exc), 403) from None
        record_event(session, entity="study", entity_id=ack.study_instance_uid, kind="admin_action", action="acknowledge",
                     user=ack.user, via="link", client=client, already_acknowledged=ack.already_acknowledged)
    if ack.already_acknowledged:
        return ActionOutcome(f"already acknowledged by {ack.user}", ack.to_json_dict())
    return ActionOutcome(f"result acknowledged by {ack.user}", ack.to_json_dict())
