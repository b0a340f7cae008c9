"""What an alert says: built from the database for one notification, rendered by each channel.

A message carries the flag, the one-line finding, the Study Instance UID, the model that made the
result and the disclaimer, and links to the dashboard. Patient identifiers (accession number,
patient name and ID) are added only for a target with ``include_patient_identifiers`` (and for HL7,
which must file the result against the patient); they are read from a received image, never stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_agent.db.models import Flag, Instance, Job, Notification, NotificationStatus, Output, OutputKind, Result, Series
from pacs_agent.notify.links import ack_url, study_url
from pacs_agent.settings import NotificationTarget, Settings
from pacs_agent.worklist import summarize

NOT_FOR_CLINICAL_USE: Final[str] = "NOT FOR CLINICAL USE"
#: Models known to be synthetic (pe_model's builtin demo and untrained checkpoints).
SYNTHETIC_MODELS: Final[frozenset[str]] = frozenset({"pe-triage-demo", "pe-triage-untrained"})
JSON_SCHEMA: Final[str] = "pe-agent.alert/1"

FLAG_WORDS: Final[dict[Flag, str]] = {
    Flag.CRITICAL: "CRITICAL - suspected pulmonary embolism with right heart strain or central clot",
    Flag.HIGH: "HIGH - suspected pulmonary embolism",
    Flag.REVIEW: "REVIEW - indeterminate AI result",
    Flag.ROUTINE: "ROUTINE - no pulmonary embolism suspected",
    Flag.ERROR: "ERROR - the AI analysis failed; read the study",
}


@dataclass(frozen=True)
class PatientIdentifiers:
    patient_name: str
    patient_id: str
    accession_number: str
    #: YYYYMMDD as in DICOM; used by HL7 only.
    patient_birth_date: str = ""
    patient_sex: str = ""
    #: The name as DICOM holds it ("FAMILY^GIVEN^MIDDLE^PREFIX^SUFFIX"); HL7 splits it into XPN parts.
    patient_name_dicom: str = ""


@dataclass(frozen=True)
class AlertMessage:
    """Everything a channel needs to render one notification."""

    notification_id: int
    target: str
    flag: Flag
    study_instance_uid: str
    series_instance_uid: str
    summary: str
    pe_probability: float | None
    labels: dict[str, Any]
    model_name: str
    model_version: str
    model_sha256: str
    not_for_clinical_use: bool
    raised_at: datetime
    result_at: datetime | None
    escalation_level: int
    escalation_reason: str
    dashboard_url: str
    acknowledge_url: str
    node_ae_title: str
    identifiers: PatientIdentifiers | None = None
    #: A later result of a study this target already received one for (HL7 result status C).
    correction: bool = False

    @property
    def disclaimer(self) -> str:
        text = (
            "Unverified AI output for triage (decision support), not a diagnosis; a radiologist must read the study. "
            f"Made by model {self.model_name or 'unknown'} version {self.model_version or 'unknown'}, "
            f"checkpoint sha256 {self.model_sha256 or 'unknown'}."
        )
        if self.not_for_clinical_use:
            text = f"{NOT_FOR_CLINICAL_USE}: synthetic or research model. " + text
        return text

    @property
    def title(self) -> str:
        prefix = f"ESCALATION {self.escalation_level}: " if self.escalation_level else ""
        demo = f"{NOT_FOR_CLINICAL_USE} - " if self.not_for_clinical_use else ""
        return f"{demo}{prefix}PE triage {self.flag.value}: AI result needs a radiologist"

    def text_lines(self) -> list[str]:
        """The plain-text body (e-mail; the JSON template's ``text``)."""
        lines = [FLAG_WORDS[self.flag] + "."]
        if self.escalation_level:
            lines.append(f"Escalated: {self.escalation_reason}.")
        lines.append(f"Finding: {self.summary}")
        if self.identifiers is not None:
            ids = self.identifiers
            lines.append(f"Patient: {ids.patient_name or '(no name)'}, ID {ids.patient_id or '(none)'}, accession {ids.accession_number or '(none)'}")
        lines.append(f"Study Instance UID: {self.study_instance_uid}")
        if self.dashboard_url:
            lines.append(f"Open: {self.dashboard_url}")
        if self.acknowledge_url:
            lines.append(f"Acknowledge: {self.acknowledge_url}")
        else:
            lines.append(f"Acknowledge: pe-agent ack {self.notification_id} --user NAME (or on the dashboard)")
        lines.append(f"Alert {self.notification_id} from node {self.node_ae_title}, raised {self.raised_at.isoformat(timespec='seconds')}.")
        lines.append(self.disclaimer)
        return lines

    def to_json_dict(self) -> dict[str, Any]:
        """The "json" webhook body (schema pe-agent.alert/1, docs/NOTIFICATIONS.md)."""
        return {
            "schema": JSON_SCHEMA,
            "notification_id": self.notification_id,
            "target": self.target,
            "flag": self.flag.value,
            "title": self.title,
            "text": "\n".join(self.text_lines()),
            "summary": self.summary,
            "pe_probability": None if self.pe_probability is None else round(self.pe_probability, 6),
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "escalation_level": self.escalation_level,
            "escalation_reason": self.escalation_reason,
            "raised_at": self.raised_at.isoformat(),
            "model": {"name": self.model_name, "version": self.model_version, "sha256": self.model_sha256},
            "not_for_clinical_use": self.not_for_clinical_use,
            "disclaimer": self.disclaimer,
            "dashboard_url": self.dashboard_url or None,
            "acknowledge_url": self.acknowledge_url or None,
            "node": self.node_ae_title,
            "patient": None if self.identifiers is None else {
                "name": self.identifiers.patient_name,
                "id": self.identifiers.patient_id,
                "accession_number": self.identifiers.accession_number,
            },
        }


def read_patient_identifiers(spool_root: Path, session: Session, series_instance_uid: str) -> PatientIdentifiers | None:
    """Identifiers from the first received image of the series; None when none is readable."""
    series = session.scalars(select(Series).where(Series.series_instance_uid == series_instance_uid)).first()
    if series is None:
        return None
    paths = session.scalars(select(Instance.path).where(Instance.series_id == series.id).order_by(Instance.id).limit(5)).all()
    for relative in paths:
        try:
            ds = pydicom.dcmread(
                spool_root / relative, stop_before_pixels=True,
                specific_tags=["PatientName", "PatientID", "AccessionNumber", "PatientBirthDate", "PatientSex"],
            )
        except (OSError, InvalidDicomError, ValueError, TypeError, AttributeError):
            continue
        name = ds.get("PatientName")
        return PatientIdentifiers(
            patient_name=name.family_comma_given() if name is not None and str(name) else "",
            patient_id=str(ds.get("PatientID", "") or ""),
            accession_number=str(ds.get("AccessionNumber", "") or series.accession_number),
            patient_birth_date=str(ds.get("PatientBirthDate", "") or ""),
            patient_sex=str(ds.get("PatientSex", "") or ""),
            patient_name_dicom=str(name or ""),
        )
    return None


def _not_for_clinical_use(session: Session, settings: Settings, result: Result | None, job_id: int | None) -> bool:
    """Synthetic model, or the job's report objects say so (their SeriesDescription leads with it)."""
    if settings.model.checkpoint == "builtin:demo" or (result is not None and result.model_name in SYNTHETIC_MODELS):
        return True
    if job_id is None:
        return False
    paths = session.scalars(
        select(Output.path).where(Output.job_id == job_id, Output.kind.in_((OutputKind.SR, OutputKind.SC))).limit(1)
    ).all()
    for relative in paths:
        try:
            ds = pydicom.dcmread(Path(settings.storage.root) / relative, stop_before_pixels=True, specific_tags=["SeriesDescription"])
        except (OSError, InvalidDicomError, ValueError, TypeError, AttributeError):
            continue
        return str(ds.get("SeriesDescription", "")).startswith(NOT_FOR_CLINICAL_USE)
    return False


def build_message(
    session: Session,
    notification: Notification,
    target: NotificationTarget,
    settings: Settings,
    *,
    signing_key: bytes | None,
    now: datetime,
) -> AlertMessage:
    """The message for ``notification`` as ``target`` receives it."""
    job = session.get(Job, notification.job_id) if notification.job_id is not None else None
    result = session.scalars(select(Result).where(Result.job_id == job.id)).first() if job is not None else None
    if result is not None:
        summary = summarize(result)
    elif job is not None and job.error:
        summary = f"analysis failed: {job.error}"
    else:
        summary = FLAG_WORDS[notification.flag]
    identifiers = None
    if target.include_patient_identifiers or target.kind == "hl7":
        identifiers = read_patient_identifiers(Path(settings.storage.root), session, notification.series_instance_uid)
    reason = ""
    if notification.escalation_level:
        parent = session.get(Notification, notification.escalated_from_id) if notification.escalated_from_id else None
        reason = str(notification_reason(parent)) if parent is not None else "earlier alert not acknowledged"
    correction = False
    if target.kind == "hl7":
        correction = session.scalars(
            select(Notification.id).where(
                Notification.study_instance_uid == notification.study_instance_uid,
                Notification.target == notification.target,
                Notification.id < notification.id,
            ).limit(1)
        ).first() is not None
    return AlertMessage(
        notification_id=notification.id,
        target=target.name,
        flag=notification.flag,
        study_instance_uid=notification.study_instance_uid,
        series_instance_uid=notification.series_instance_uid,
        summary=summary,
        pe_probability=result.pe_probability if result is not None else None,
        labels=dict(result.labels or {}) if result is not None else {},
        model_name=result.model_name if result is not None else "",
        model_version=result.model_version if result is not None else (job.model_version if job is not None else ""),
        model_sha256=result.model_sha256 if result is not None else "",
        not_for_clinical_use=_not_for_clinical_use(session, settings, result, notification.job_id),
        raised_at=notification.created_at,
        result_at=(job.finished_at if job is not None else None),
        escalation_level=notification.escalation_level,
        escalation_reason=reason,
        dashboard_url=study_url(settings.http.public_url, notification.study_instance_uid),
        acknowledge_url=ack_url(settings.http.public_url, signing_key, notification.id, now=now, valid_hours=settings.alerts.link_valid_hours)
        if target.alerts_a_person else "",
        node_ae_title=settings.node.ae_title,
        identifiers=identifiers,
        correction=correction,
    )


def notification_reason(parent: Notification) -> str:
    """Why ``parent`` was escalated, in words."""
    if parent.status == NotificationStatus.FAILED:
        return f"the alert to {parent.target} could not be delivered ({parent.last_error or 'failed'})"
    minutes = ((parent.escalated_at or parent.created_at) - parent.created_at).total_seconds() / 60
    return f"the alert to {parent.target} was not acknowledged within {minutes:.0f} minutes"
