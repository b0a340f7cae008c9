"""Read and test notifications for operators (`pe-agent notifications`, `pe-agent notify-test`, the dashboard)."""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_agent.db.models import Flag, Notification, NotificationAttempt, NotificationStatus, utcnow
from pacs_agent.notify.channels import SendOutcome, build_channel
from pacs_agent.notify.message import AlertMessage, PatientIdentifiers
from pacs_agent.settings import NotificationTarget, Settings

#: The Study Instance UID of a test message (2.25 form of a fixed UUID: no real study has it).
TEST_STUDY_INSTANCE_UID = "2.25.1"


def attempt_dict(attempt: NotificationAttempt) -> dict[str, Any]:
    return {
        "attempt": attempt.attempt,
        "started_at": attempt.started_at.isoformat(),
        "finished_at": attempt.finished_at.isoformat(),
        "ok": attempt.ok,
        "status_code": attempt.status_code,
        "detail": attempt.detail,
        "retryable": attempt.retryable,
    }


def notification_dict(n: Notification, *, attempts: bool = False) -> dict[str, Any]:
    """The JSON shape of one notification (`pe-agent notifications --json`, docs/NOTIFICATIONS.md)."""
    data: dict[str, Any] = {
        "id": n.id,
        "study_instance_uid": n.study_instance_uid,
        "series_instance_uid": n.series_instance_uid,
        "job_id": n.job_id,
        "flag": n.flag.value,
        "target": n.target,
        "kind": n.kind,
        "escalation_level": n.escalation_level,
        "escalated_from_id": n.escalated_from_id,
        "status": n.status.value,
        "attempts": n.attempts,
        "next_attempt_at": n.next_attempt_at.isoformat() if n.status == NotificationStatus.PENDING else None,
        "last_error": n.last_error,
        "created_at": n.created_at.isoformat(),
        "sent_at": n.sent_at.isoformat() if n.sent_at else None,
        "escalated_at": n.escalated_at.isoformat() if n.escalated_at else None,
        "acknowledged": None if n.acknowledged_at is None else {
            "by": n.acknowledged_by, "via": n.acknowledged_via, "at": n.acknowledged_at.isoformat(),
        },
    }
    if attempts:
        data["attempt_log"] = [attempt_dict(a) for a in n.attempt_rows]
    return data


def list_notifications(
    session: Session,
    *,
    study_instance_uid: str | None = None,
    statuses: tuple[NotificationStatus, ...] = (),
    unacknowledged: bool = False,
    limit: int = 100,
    attempts: bool = False,
) -> list[dict[str, Any]]:
    """Notifications, newest first."""
    stmt = select(Notification).order_by(Notification.id.desc()).limit(limit)
    if study_instance_uid:
        stmt = stmt.where(Notification.study_instance_uid == study_instance_uid)
    if statuses:
        stmt = stmt.where(Notification.status.in_(statuses))
    if unacknowledged:
        stmt = stmt.where(Notification.acknowledged_at.is_(None), Notification.kind != "hl7")
    return [notification_dict(n, attempts=attempts) for n in session.scalars(stmt)]


def sample_message(target: NotificationTarget, settings: Settings) -> AlertMessage:
    """A message that says it is a test, with no patient and a study UID no real study has."""
    now = utcnow()
    return AlertMessage(
        notification_id=0,
        target=target.name,
        flag=Flag.CRITICAL,
        study_instance_uid=TEST_STUDY_INSTANCE_UID,
        series_instance_uid=TEST_STUDY_INSTANCE_UID + ".1",
        summary="TEST MESSAGE from pe-agent notify-test: no study, no patient, nothing to do",
        pe_probability=None,
        labels={},
        model_name="none (test message)",
        model_version="-",
        model_sha256="-",
        not_for_clinical_use=True,
        raised_at=now,
        result_at=now,
        escalation_level=0,
        escalation_reason="",
        dashboard_url=settings.http.public_url,
        acknowledge_url="",
        node_ae_title=settings.node.ae_title,
    )


def send_test(target: NotificationTarget, settings: Settings) -> SendOutcome:
    """Send a test message to ``target`` now (nothing is stored); what the receiver answered.

    An HL7 test goes as a training message (MSH-11 "T") for patient ID PEAGENT-TEST, so that a
    receiver in production mode refuses to file it; an AR/AE answer still proves the link works.
    """
    message = sample_message(target, settings)
    if target.kind == "hl7":
        target = dataclasses.replace(target, processing_id="T")
        message = dataclasses.replace(message, identifiers=PatientIdentifiers(
            patient_name="TEST, PEAGENT", patient_id="PEAGENT-TEST", accession_number="", patient_name_dicom="TEST^PEAGENT",
        ))
    return build_channel(target).send(message)
