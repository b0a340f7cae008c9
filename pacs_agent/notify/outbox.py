"""The notification outbox: raise notifications for flagged studies, send them with retries, escalate.

Each round of the scheduler's ``notify`` job (every ``alerts.poll_seconds``):
1. raise: a study whose worklist flag is one a target listens for gets one notification per target
   (alerting targets: once per study and flag, again only when the flag becomes more urgent, e.g.
   HIGH -> CRITICAL; hl7 targets: once per result). ``dedup_key`` makes this idempotent even with
   several serve processes. Studies flagged longer ago than ``alerts.lookback_hours`` are left alone.
2. escalate: an alert neither acknowledged within its target's ``escalate_after_minutes`` nor
   deliverable (FAILED) raises one notification to its target's ``escalate_to`` entry.
3. send: due notifications are leased (PENDING -> SENDING), sent by their channel outside any
   transaction, and recorded: SENT, PENDING again after ``initial * 2**(attempts - 1)`` seconds
   (capped), or FAILED when permanent or after ``alerts.max_attempts``. Every try is a
   notification_attempts row; every state change an event.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.db.models import (
    Event,
    Notification,
    NotificationAttempt,
    NotificationStatus,
    Study,
    utcnow,
)
from pacs_agent.db.session import transaction
from pacs_agent.db.events import record_event
from pacs_agent.logs import get_logger
from pacs_agent.notify.channels import Channel, SendOutcome, build_channel
from pacs_agent.notify.links import load_signing_key
from pacs_agent.notify.message import build_message
from pacs_agent.jobs.leases import Backoff
from pacs_agent.settings import ALERT_KINDS, NotificationTarget, Settings

log = get_logger(__name__)

BATCH_SIZE = 50
#: An escalation chain (A -> B -> A ...) stops after this many levels.
MAX_ESCALATION_LEVEL = 5
#: Study events read by pacs_agent.metrics (time to notification).
STUDY_NOTIFIED = "study_notified"
STUDY_ACKNOWLEDGED = "study_acknowledged"


@dataclass(frozen=True)
class RoundReport:
    raised: tuple[int, ...] = ()
    escalated: tuple[int, ...] = ()
    sent: tuple[int, ...] = ()
    retrying: tuple[int, ...] = ()
    failed: tuple[int, ...] = ()


def _event(session: Session, n: Notification, kind: str, *, from_state: str = "", to_state: str = "", **detail: object) -> None:
    record_event(
        session, entity="notification", entity_id=n.id, kind=kind, from_state=from_state, to_state=to_state,
        series_instance_uid=n.series_instance_uid, job_id=n.job_id, study_instance_uid=n.study_instance_uid,
        target=n.target, flag=n.flag.value, escalation_level=n.escalation_level, **detail,
    )


class Notifier:
    """Raises, escalates and sends notifications; one per serve process, run by the scheduler."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        *,
        owner: str,
        channels: Mapping[str, Channel] | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.owner = owner
        self.targets: dict[str, NotificationTarget] = {t.name: t for t in settings.notifications}
        #: ConfigError at start when the key file is missing or short, not at the first alert.
        self.signing_key = load_signing_key(settings.alerts.signing_key_file) if settings.alerts.signing_key_file else None
        self.channels: dict[str, Channel] = (
            dict(channels) if channels is not None else {t.name: build_channel(t) for t in settings.notifications}
        )
        self.backoff = Backoff(settings.alerts.backoff_initial_seconds, settings.alerts.backoff_max_seconds)
        timeouts = [t.timeout_seconds for t in settings.notifications] or [10.0]
        #: A sender holds a notification at most this long (connect + send + answer, generously).
        self.lease_seconds = 4 * max(timeouts) + 60

    def run_once(self, now: datetime | None = None) -> RoundReport:
        """One round: raise, escalate, send what is due."""
        now = now or utcnow()
        if not self.targets:
            return RoundReport()
        raised = self.raise_due(now)
        escalated = self.escalate_due(now)
        sent, retrying, failed = self.send_due(now)
        if failed:  # a notification that failed for good escalates in the same round
            escalated += self.escalate_due(now)
            more_sent, more_retrying, more_failed = self.send_due(now)
            sent, retrying, failed = sent + more_sent, retrying + more_retrying, failed + more_failed
        return RoundReport(tuple(raised), tuple(escalated), tuple(sent), tuple(retrying), tuple(failed))

    # -- raising ---------------------------------------------------------------------------------
    def raise_due(self, now: datetime) -> list[int]:
        wanted = {flag for t in self.targets.values() for flag in t.effective_flags}
        if not wanted:
            return []
        cutoff = now - timedelta(hours=self.settings.alerts.lookback_hours)
        with self.session_factory() as session:
            studies = session.scalars(
                select(Study).where(Study.flag.in_(sorted(wanted)), Study.updated_at >= cutoff).order_by(Study.flag_rank, Study.updated_at)
            ).all()
            existing: dict[tuple[str, str], list[Notification]] = {}
            uids = [s.study_instance_uid for s in studies]
            for start in range(0, len(uids), 500):
                for n in session.scalars(select(Notification).where(Notification.study_instance_uid.in_(uids[start:start + 500]))):
                    existing.setdefault((n.study_instance_uid, n.target), []).append(n)
        plans: list[tuple[str, Study, NotificationTarget]] = []
        for study in studies:
            for target in self.targets.values():
                if study.flag.value not in target.effective_flags:
                    continue
                previous = existing.get((study.study_instance_uid, target.name), [])
                if target.alerts_a_person:
                    if any(n.escalation_level == 0 and n.flag.rank <= study.flag.rank for n in previous):
                        continue
                    key = f"alert|{target.name}|{study.study_instance_uid}|{study.flag.value}"
                else:
                    if study.job_id is None or any(n.job_id == study.job_id for n in previous):
                        continue
                    key = f"hl7|{target.name}|{study.study_instance_uid}|{study.job_id}"
                plans.append((key, study, target))
        raised: list[int] = []
        for key, study, target in plans:
            try:
                with transaction(self.session_factory) as session:
                    n = Notification(
                        dedup_key=key[:255], study_instance_uid=study.study_instance_uid, series_instance_uid=study.series_instance_uid,
                        job_id=study.job_id, flag=study.flag, target=target.name, kind=target.kind, escalation_level=0,
                        status=NotificationStatus.PENDING, attempts=0, next_attempt_at=now, created_at=now,
                    )
                    session.add(n)
                    session.flush()
                    _event(session, n, "notification_raised", to_state=NotificationStatus.PENDING, kind_of_target=target.kind)
                    raised.append(n.id)
            except IntegrityError:
                continue  # another process raised it first
        if raised:
            log.info("notifications_raised", notification_ids=raised)
        return raised

    # -- escalation ------------------------------------------------------------------------------
    def escalate_due(self, now: datetime) -> list[int]:
        created: list[int] = []
        with transaction(self.session_factory) as session:
            candidates = session.scalars(
                select(Notification).where(
                    Notification.kind.in_(ALERT_KINDS),
                    Notification.acknowledged_at.is_(None),
                    Notification.escalated_at.is_(None),
                    Notification.status != NotificationStatus.CANCELLED,
                    Notification.escalation_level < MAX_ESCALATION_LEVEL,
                ).order_by(Notification.id)
            ).all()
            for n in candidates:
                target = self.targets.get(n.target)
                if target is None or not target.escalate_to or target.escalate_to not in self.targets:
                    continue
                failed = n.status == NotificationStatus.FAILED
                if not failed and now - n.created_at < timedelta(minutes=target.escalate_after_minutes):
                    continue
                to = self.targets[target.escalate_to]
                n.escalated_at = now
                escalation = Notification(
                    dedup_key=f"escalation|{to.name}|{n.id}", study_instance_uid=n.study_instance_uid,
                    series_instance_uid=n.series_instance_uid, job_id=n.job_id, flag=n.flag, target=to.name, kind=to.kind,
                    escalation_level=n.escalation_level + 1, escalated_from_id=n.id, status=NotificationStatus.PENDING,
                    attempts=0, next_attempt_at=now, created_at=now,
                )
                session.add(escalation)
                session.flush()
                reason = "delivery failed" if failed else f"not acknowledged within {target.escalate_after_minutes:g} minutes"
                _event(session, n, "notification_escalated", escalated_to=to.name, escalation_id=escalation.id, reason=reason)
                _event(session, escalation, "notification_raised", to_state=NotificationStatus.PENDING, kind_of_target=to.kind,
                       escalated_from_id=n.id)
                created.append(escalation.id)
        if created:
            log.warning("notifications_escalated", notification_ids=created)
        return created

    # -- sending ---------------------------------------------------------------------------------
    def _claim(self, now: datetime) -> list[int]:
        with transaction(self.session_factory) as session:
            due_condition = or_(
                and_(Notification.status == NotificationStatus.PENDING, Notification.next_attempt_at <= now),
                and_(Notification.status == NotificationStatus.SENDING, Notification.lease_expires_at < now),
            )
            due = select(Notification.id).where(due_condition).order_by(Notification.next_attempt_at, Notification.id).limit(BATCH_SIZE)
            if session.get_bind().dialect.name == "postgresql":
                due = due.with_for_update(skip_locked=True)
            ids = list(session.scalars(due))
            if not ids:
                return []
            claimed = session.execute(
                update(Notification)
                .where(Notification.id.in_(ids), due_condition)
                .values(status=NotificationStatus.SENDING, lease_owner=self.owner,
                        lease_expires_at=now + timedelta(seconds=self.lease_seconds))
                .returning(Notification.id)
                .execution_options(synchronize_session=False)
            ).scalars().all()
            return sorted(claimed)

    def send_due(self, now: datetime) -> tuple[list[int], list[int], list[int]]:
        sent: list[int] = []
        retrying: list[int] = []
        failed: list[int] = []
        for notification_id in self._claim(now):
            outcome, started = self._send_one(notification_id, now)
            state = self._record(notification_id, outcome, started)
            if state == NotificationStatus.SENT:
                sent.append(notification_id)
            elif state == NotificationStatus.PENDING:
                retrying.append(notification_id)
            elif state == NotificationStatus.FAILED:
                failed.append(notification_id)
        return sent, retrying, failed

    def _send_one(self, notification_id: int, now: datetime) -> tuple[SendOutcome, datetime]:
        started = utcnow()
        with self.session_factory() as session:
            n = session.get(Notification, notification_id)
            target = self.targets.get(n.target) if n is not None else None
            channel = self.channels.get(n.target) if n is not None else None
            if n is None or target is None or channel is None:
                name = n.target if n is not None else "?"
                return SendOutcome(False, None, f"no [[notifications]] entry named {name!r} any more", retryable=False), started
            try:
                message = build_message(session, n, target, self.settings, signing_key=self.signing_key, now=now)
            except Exception as exc:  # a message that cannot be built is recorded, never lost silently
                return SendOutcome(False, None, f"message could not be built: {type(exc).__name__}: {exc}", retryable=True), started
        try:
            return channel.send(message), started
        except Exception as exc:  # a channel bug must not kill the round; it is recorded and retried
            return SendOutcome(False, None, f"{type(exc).__name__}: {exc}", retryable=True), started

    def _record(self, notification_id: int, outcome: SendOutcome, started: datetime) -> NotificationStatus | None:
        finished = utcnow()
        with transaction(self.session_factory) as session:
            n = session.get(Notification, notification_id)
            if n is None or n.status != NotificationStatus.SENDING or n.lease_owner != self.owner:
                log.warning("notification_lease_lost", notification_id=notification_id)
                return None
            n.attempts += 1
            session.add(NotificationAttempt(
                notification_id=n.id, attempt=n.attempts, started_at=started, finished_at=finished, ok=outcome.ok,
                status_code=outcome.status_code, detail=outcome.detail[:4000], retryable=outcome.retryable,
            ))
            n.lease_owner = None
            n.lease_expires_at = None
            if outcome.ok:
                n.status = NotificationStatus.SENT
                n.sent_at = finished
                n.last_error = ""
                _event(session, n, "notification_sent", from_state=NotificationStatus.SENDING, to_state=NotificationStatus.SENT,
                       attempt=n.attempts, answer=outcome.detail[:500])
                if n.kind in ALERT_KINDS and not _study_event_exists(session, n.study_instance_uid, STUDY_NOTIFIED):
                    record_event(session, entity="study", entity_id=n.study_instance_uid, kind=STUDY_NOTIFIED,
                                 series_instance_uid=n.series_instance_uid, job_id=n.job_id, target=n.target,
                                 flag=n.flag.value, notification_id=n.id)
                log.info("notification_sent", notification_id=n.id, target=n.target, attempt=n.attempts)
            elif outcome.retryable and n.attempts < self.settings.alerts.max_attempts:
                n.status = NotificationStatus.PENDING
                delay = self.backoff.delay(n.attempts)
                n.next_attempt_at = finished + timedelta(seconds=delay)
                n.last_error = outcome.detail[:4000]
                _event(session, n, "notification_retry", from_state=NotificationStatus.SENDING, to_state=NotificationStatus.PENDING,
                       attempt=n.attempts, error=outcome.detail[:500], retry_in_seconds=delay)
                log.warning("notification_retry", notification_id=n.id, target=n.target, attempt=n.attempts, error=outcome.detail[:200])
            else:
                n.status = NotificationStatus.FAILED
                n.last_error = outcome.detail[:4000]
                _event(session, n, "notification_failed", from_state=NotificationStatus.SENDING, to_state=NotificationStatus.FAILED,
                       attempt=n.attempts, error=outcome.detail[:500], permanent=not outcome.retryable)
                log.error("notification_failed", notification_id=n.id, target=n.target, attempt=n.attempts, error=outcome.detail[:200])
            return n.status


def _study_event_exists(session: Session, study_instance_uid: str, kind: str) -> bool:
    return session.scalars(
        select(Event.id).where(Event.entity == "study", Event.entity_id == study_instance_uid, Event.kind == kind).limit(1)
    ).first() is not None


def retry_notifications(session: Session, notification_ids: list[int], *, now: datetime | None = None) -> list[int]:
    """FAILED or CANCELLED notifications -> PENDING for an immediate attempt with a fresh count."""
    now = now or utcnow()
    moved: list[int] = []
    for n in session.scalars(select(Notification).where(Notification.id.in_(notification_ids)).order_by(Notification.id)):
        if n.status not in (NotificationStatus.FAILED, NotificationStatus.CANCELLED):
            continue
        previous = n.status
        n.status = NotificationStatus.PENDING
        n.attempts = 0
        n.next_attempt_at = now
        _event(session, n, "notification_retry_requested", from_state=previous, to_state=NotificationStatus.PENDING)
        moved.append(n.id)
    return moved
