"""Acknowledgement: a person says "I have seen this result"; escalation of the study stops.

Acknowledging works on a study: every open alert of it (webhook/email notifications not yet
acknowledged) is marked with who, when and how (``via``: "cli", "dashboard", "api", "link"), pending
escalations are cancelled, and one ``study_acknowledged`` event (entity "study", read by the time to
notification metrics) records it. A study on the worklist can be acknowledged without any alert.
Acknowledging twice is not an error: the first acknowledgement is reported back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_agent.db.models import Event, Notification, NotificationStatus, Study, utcnow
from pacs_agent.errors import NotificationError
from pacs_agent.db.events import record_event
from pacs_agent.notify.links import verify_ack_token
from pacs_agent.notify.outbox import STUDY_ACKNOWLEDGED
from pacs_agent.settings import ALERT_KINDS

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_VIA_RE = re.compile(r"^[a-z][a-z0-9_-]{0,15}$")
#: Longest user name and note kept.
USER_MAX = 128
NOTE_MAX = 500


@dataclass(frozen=True)
class AckResult:
    """What an acknowledgement did (or, with ``already_acknowledged``, what the first one did)."""

    study_instance_uid: str
    user: str
    via: str
    at: datetime
    #: Notifications acknowledged by this call.
    acknowledged_ids: tuple[int, ...]
    #: Pending escalations cancelled by this call.
    cancelled_ids: tuple[int, ...]
    already_acknowledged: bool

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "acknowledged_by": self.user,
            "via": self.via,
            "acknowledged_at": self.at.isoformat(),
            "notification_ids": list(self.acknowledged_ids),
            "cancelled_escalation_ids": list(self.cancelled_ids),
            "already_acknowledged": self.already_acknowledged,
        }


def _study_uid(session: Session, notification_or_study_id: int | str) -> str:
    if isinstance(notification_or_study_id, int) or str(notification_or_study_id).strip().isdigit():
        notification_id = int(notification_or_study_id)
        n = session.get(Notification, notification_id)
        if n is None:
            raise NotificationError(f"there is no notification {notification_id}")
        return n.study_instance_uid
    uid = str(notification_or_study_id).strip()
    if not _UID_RE.match(uid) or len(uid) > 64:
        raise NotificationError(f"{uid[:80]!r} is neither a notification id nor a Study Instance UID")
    return uid


def acknowledge(
    session: Session,
    notification_or_study_id: int | str,
    user: str,
    via: str,
    *,
    note: str = "",
    now: datetime | None = None,
) -> AckResult:
    """Acknowledge the study of a notification id (digits) or a Study Instance UID, in the caller's
    transaction. NotificationError when it names nothing known or ``user``/``via`` are empty."""
    user = " ".join(user.split())[:USER_MAX]
    if not user:
        raise NotificationError("say who acknowledges (a user name)")
    if not _VIA_RE.match(via):
        raise NotificationError(f"via {via!r} must be a short lower-case word such as cli, dashboard, api or link")
    note = " ".join(note.split())[:NOTE_MAX]
    now = now or utcnow()
    uid = _study_uid(session, notification_or_study_id)
    study = session.get(Study, uid)
    alerts = session.scalars(
        select(Notification).where(Notification.study_instance_uid == uid, Notification.kind.in_(ALERT_KINDS)).order_by(Notification.id)
    ).all()
    if study is None and not alerts:
        raise NotificationError(f"study {uid} has no result or alert to acknowledge")
    open_alerts = [n for n in alerts if n.acknowledged_at is None]
    if not open_alerts:
        previous = session.scalars(
            select(Event).where(Event.entity == "study", Event.entity_id == uid, Event.kind == STUDY_ACKNOWLEDGED).order_by(Event.id).limit(1)
        ).first()
        if previous is not None:
            return AckResult(uid, str(previous.detail.get("user", "")), str(previous.detail.get("via", "")), previous.at, (), (), True)
    acknowledged: list[int] = []
    cancelled: list[int] = []
    for n in open_alerts:
        n.acknowledged_at = now
        n.acknowledged_by = user
        n.acknowledged_via = via
        acknowledged.append(n.id)
        detail: dict[str, Any] = {"user": user, "via": via, "study_instance_uid": uid, "target": n.target}
        if n.escalation_level and n.status == NotificationStatus.PENDING:
            n.status = NotificationStatus.CANCELLED
            cancelled.append(n.id)
            record_event(session, entity="notification", entity_id=n.id, kind="notification_cancelled",
                         from_state=NotificationStatus.PENDING, to_state=NotificationStatus.CANCELLED,
                         series_instance_uid=n.series_instance_uid, job_id=n.job_id, reason="acknowledged", **detail)
        record_event(session, entity="notification", entity_id=n.id, kind="notification_acknowledged",
                     series_instance_uid=n.series_instance_uid, job_id=n.job_id, **detail)
    record_event(
        session, entity="study", entity_id=uid, kind=STUDY_ACKNOWLEDGED,
        series_instance_uid=study.series_instance_uid if study is not None else alerts[0].series_instance_uid,
        job_id=study.job_id if study is not None else alerts[0].job_id,
        user=user, via=via, note=note, flag=(study.flag.value if study is not None else alerts[0].flag.value),
        notification_ids=acknowledged,
    ).at = now
    session.flush()
    return AckResult(uid, user, via, now, tuple(acknowledged), tuple(cancelled), False)


def notification_for_link(session: Session, signing_key: bytes, token: str, *, now: datetime | None = None) -> Notification:
    """The notification a signed acknowledgement link names (for the confirmation page);
    NotificationError when the link is forged, malformed, expired or names nothing."""
    notification_id = verify_ack_token(signing_key, token, now=now or utcnow())
    n = session.get(Notification, notification_id)
    if n is None:
        raise NotificationError("this acknowledgement link names an alert that no longer exists")
    return n


def acknowledge_by_link(
    session: Session, signing_key: bytes, token: str, *, user: str = "", note: str = "", now: datetime | None = None
) -> AckResult:
    """Acknowledge through a signed link (the POST of its confirmation page). ``user``: the name the
    person typed; without one, the link's recipient ("recipient of <target>")."""
    now = now or utcnow()
    n = notification_for_link(session, signing_key, token, now=now)
    return acknowledge(session, n.id, user.strip() or f"recipient of {n.target}", "link", note=note, now=now)
