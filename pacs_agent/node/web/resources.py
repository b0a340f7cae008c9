"""The dashboard's resources, read from the database: one JSON shape per resource (docs/API.md).

The HTML pages render the same dictionaries the JSON API returns, so a page and ``/api/...`` never
disagree. Patient identifiers (name, ID, accession number) are None unless
``http.show_patient_identifiers``; then they are read from a received image of the series.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_agent.db.models import (
    Delivery,
    DeliveryStatus,
    Event,
    Flag,
    Instance,
    Job,
    JobStatus,
    Output,
    OutputKind,
    Result,
    Series,
    Study,
)
from pacs_agent.metrics import STAGE_EVENT_KINDS, Stage
from pacs_agent.node import admin
from pacs_agent.notify.admin import list_notifications
from pacs_agent.node.web.dicom_views import DicomViewError, patient_identifiers
from pacs_agent.node.admin import job_counts
from pacs_agent.worklist import flag_counts

ACKNOWLEDGED_KIND = STAGE_EVENT_KINDS[Stage.ACKNOWLEDGED]
#: Most events shown for one series.
EVENTS_LIMIT = 500


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass
class IdentifierPolicy:
    """Whether patient identifiers are shown, and a small cache of those read from the spool."""

    show: bool
    spool_root: Path
    _cache: dict[str, dict[str, str] | None] = field(default_factory=dict)

    def for_series(self, session: Session, series_id: int) -> dict[str, str] | None:
        """{"patient_name", "patient_id", "accession_number"} of a series, or None when hidden or gone."""
        if not self.show:
            return None
        path = session.scalars(select(Instance.path).where(Instance.series_id == series_id).order_by(Instance.id).limit(1)).first()
        if path is None:
            return None
        if path in self._cache:
            return self._cache[path]
        root = self.spool_root.resolve()
        absolute = (root / path).resolve()
        found: dict[str, str] | None = None
        if absolute.is_relative_to(root):
            try:
                ids = patient_identifiers(absolute)
                found = {"patient_name": ids.patient_name, "patient_id": ids.patient_id, "accession_number": ids.accession_number}
            except DicomViewError:
                found = None
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[path] = found
        return found


# ---------------------------------------------------------------- shapes


def acknowledgement_dict(event: Event | None) -> dict[str, Any] | None:
    if event is None:
        return None
    return {"by": str(event.detail.get("user", "")), "at": iso(event.at), "note": str(event.detail.get("note", ""))}


def acknowledgements(session: Session, study_uids: Sequence[str]) -> dict[str, Event]:
    """The first acknowledgement event of each study (absent: not acknowledged)."""
    found: dict[str, Event] = {}
    if not study_uids:
        return found
    for event in session.scalars(
        select(Event).where(Event.entity == "study", Event.kind == ACKNOWLEDGED_KIND, Event.entity_id.in_(list(study_uids)))
        .order_by(Event.id)
    ):
        found.setdefault(event.entity_id, event)
    return found


def study_dict(study: Study, *, acknowledged: Event | None, identifiers: dict[str, str] | None, series: Series | None) -> dict[str, Any]:
    """A worklist entry (the CLI's ``worklist --json`` entry, identifiers masked, plus its acknowledgement)."""
    return {
        "study_instance_uid": study.study_instance_uid,
        "flag": study.flag.value,
        "pe_probability": None if study.pe_probability is None else round(study.pe_probability, 6),
        "summary": study.summary,
        "series_instance_uid": study.series_instance_uid,
        "series_description": series.series_description if series is not None else "",
        "modality": series.modality if series is not None else "",
        "job_id": study.job_id,
        "first_received_at": iso(study.first_received_at),
        "updated_at": iso(study.updated_at),
        "accession_number": identifiers["accession_number"] if identifiers else None,
        "patient": {"name": identifiers["patient_name"], "id": identifiers["patient_id"]} if identifiers else None,
        "acknowledged": acknowledgement_dict(acknowledged),
    }


def _iso_values(data: dict[str, Any]) -> dict[str, Any]:
    """The CLI's dict with its datetimes as ISO 8601 strings (JSON has no time type)."""
    return {k: iso(v) if isinstance(v, datetime) else v for k, v in data.items()}


def series_dict(series: Series, *, show_identifiers: bool = False) -> dict[str, Any]:
    """`pe-agent show --json`'s series; its accession number is None unless identifiers are shown."""
    data = _iso_values(admin.series_dict(series))
    if not show_identifiers:
        data["accession_number"] = None
    return data


def job_dict(job: Job) -> dict[str, Any]:
    return _iso_values(admin.job_dict(job))


def input_quality(result: Result) -> dict[str, Any]:
    """The input-quality gate's verdict and measurements stored with a result, flat for display
    (status, summary, then each measurement; {} for results from before the gate)."""
    stored = result.quality
    if not isinstance(stored, dict) or not stored:
        return {}
    shown: dict[str, Any] = {}
    for key, value in stored.items():
        if key in ("thresholds", "passed", "reasons", "unmeasured", "pulmonary_trunk_position_patient"):
            continue
        if value is not None:
            shown[key] = value
    return shown


def result_dict(result: Result | None) -> dict[str, Any] | None:
    base = admin.result_dict(result)
    if result is None or base is None:
        return None
    return {**_iso_values(base), "input_quality": input_quality(result)}


def delivery_dict(delivery: Delivery) -> dict[str, Any]:
    return {**_iso_values(admin.delivery_dict(delivery)), "output_id": delivery.output_id}


def output_dict(output: Output) -> dict[str, Any]:
    return {
        **_iso_values(admin.output_dict(output)),
        "job_id": output.job_id,
        "image_url": f"/outputs/{output.id}/image.png" if output.kind == OutputKind.SC else None,
        "deliveries": [delivery_dict(d) for d in sorted(output.deliveries, key=lambda d: d.id)],
    }


def event_dict(event: Event) -> dict[str, Any]:
    return {"id": event.id, **_iso_values(admin.event_dict(event)), "series_instance_uid": event.series_instance_uid}


def job_detail(job: Job) -> dict[str, Any]:
    return {**job_dict(job), "result": result_dict(job.result), "outputs": [output_dict(o) for o in job.outputs]}


# ---------------------------------------------------------------- queries


def worklist(session: Session, policy: IdentifierPolicy, *, flags: Sequence[Flag] = (), unacknowledged_only: bool = False,
             limit: int = 500) -> list[dict[str, Any]]:
    """Worklist entries, most urgent flag first, then oldest first (as `pe-agent worklist`)."""
    stmt = select(Study).order_by(Study.flag_rank, Study.first_received_at, Study.study_instance_uid)
    if flags:
        stmt = stmt.where(Study.flag.in_(list(flags)))
    studies = list(session.scalars(stmt.limit(limit)))
    acks = acknowledgements(session, [s.study_instance_uid for s in studies])
    if unacknowledged_only:
        studies = [s for s in studies if s.study_instance_uid not in acks]
    flagged = {
        s.series_instance_uid: s
        for s in session.scalars(select(Series).where(Series.series_instance_uid.in_([st.series_instance_uid for st in studies])))
    } if studies else {}
    out = []
    for study in studies:
        series = flagged.get(study.series_instance_uid)
        identifiers = policy.for_series(session, series.id) if series is not None and policy.show else None
        out.append(study_dict(study, acknowledged=acks.get(study.study_instance_uid), identifiers=identifiers, series=series))
    return out


def worklist_counts(session: Session) -> dict[str, int]:
    return flag_counts(session)


def series_detail(session: Session, series: Series, policy: IdentifierPolicy) -> dict[str, Any]:
    events = session.scalars(
        select(Event).where(Event.series_instance_uid == series.series_instance_uid).order_by(Event.id.desc()).limit(EVENTS_LIMIT)
    )
    return {
        **series_dict(series, show_identifiers=policy.show),
        "jobs": [job_detail(j) for j in series.jobs],
        "events": [event_dict(e) for e in reversed(list(events))],
    }


def study_detail(session: Session, policy: IdentifierPolicy, study_instance_uid: str) -> dict[str, Any] | None:
    """{"study": worklist entry or None (not analysed yet), "series": [series detail], "notifications": its alerts and HL7
    results (pe-agent notifications --json), "events": study events}; None if unknown."""
    series_rows = list(session.scalars(select(Series).where(Series.study_instance_uid == study_instance_uid).order_by(Series.id)))
    if not series_rows:
        return None
    study = session.get(Study, study_instance_uid)
    entry = None
    if study is not None:
        acks = acknowledgements(session, [study_instance_uid])
        flagged = next((s for s in series_rows if s.series_instance_uid == study.series_instance_uid), series_rows[0])
        entry = study_dict(study, acknowledged=acks.get(study_instance_uid), identifiers=policy.for_series(session, flagged.id),
                           series=flagged)
    study_events = session.scalars(
        select(Event).where(Event.entity == "study", Event.entity_id == study_instance_uid).order_by(Event.id)
    )
    return {
        "study": entry,
        "series": [series_detail(session, s, policy) for s in series_rows],
        "notifications": list_notifications(session, study_instance_uid=study_instance_uid, limit=100),
        "events": [event_dict(e) for e in study_events],
    }


def jobs(session: Session, *, statuses: Sequence[JobStatus] = (), limit: int = 100) -> list[dict[str, Any]]:
    stmt = select(Job).order_by(Job.id.desc()).limit(limit)
    if statuses:
        stmt = stmt.where(Job.status.in_(list(statuses)))
    return [job_dict(j) for j in session.scalars(stmt)]


def deliveries(session: Session, *, statuses: Sequence[DeliveryStatus] = (), limit: int = 200) -> list[dict[str, Any]]:
    """Deliveries, newest first, each with what it carries (output kind, job, study)."""
    stmt = select(Delivery, Output, Series).join(Output, Delivery.output_id == Output.id).join(Job, Output.job_id == Job.id) \
        .join(Series, Job.series_id == Series.id).order_by(Delivery.id.desc()).limit(limit)
    if statuses:
        stmt = stmt.where(Delivery.status.in_(list(statuses)))
    return [
        {**delivery_dict(d), "output_kind": o.kind.value, "job_id": o.job_id, "study_instance_uid": s.study_instance_uid,
         "series_instance_uid": s.series_instance_uid}
        for d, o, s in session.execute(stmt).all()
    ]


def workers(session: Session, *, heartbeat_seconds: float) -> list[dict[str, Any]]:
    """`pe-agent status --json`'s workers."""
    return [_iso_values(w) for w in admin.live_workers(session, heartbeat_seconds)]


def queue_overview(session: Session, *, heartbeat_seconds: float) -> dict[str, Any]:
    """The queue page: job counts, active and recently failed jobs, workers, deliveries not yet delivered."""
    open_statuses = (DeliveryStatus.PENDING, DeliveryStatus.SENDING, DeliveryStatus.FAILED, DeliveryStatus.CANCELLED)
    return {
        "jobs": job_counts(session),
        "active_jobs": jobs(session, statuses=(JobStatus.QUEUED, JobStatus.RUNNING)),
        "failed_jobs": jobs(session, statuses=(JobStatus.FAILED,), limit=50),
        "workers": workers(session, heartbeat_seconds=heartbeat_seconds),
        "deliveries": admin.delivery_counts(session),
        "open_deliveries": deliveries(session, statuses=open_statuses),
    }
