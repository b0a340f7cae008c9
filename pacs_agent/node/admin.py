"""Read-side queries for operators, shared by the command line and the HTTP endpoints: counts and rows as dicts."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacs_agent.db.models import Delivery, DeliveryStatus, Event, Job, Output, Result, Series, SeriesState, Worker, utcnow


def series_counts(session: Session) -> dict[str, int]:
    """Number of series by state (every state present, zero included)."""
    counts = {s.value: 0 for s in SeriesState}
    for state, count in session.execute(select(Series.state, func.count()).group_by(Series.state)):
        counts[SeriesState(state).value] = int(count)
    return counts


def delivery_counts(session: Session) -> dict[str, int]:
    """Number of deliveries by status (every status present, zero included)."""
    counts = {s.value: 0 for s in DeliveryStatus}
    for status, count in session.execute(select(Delivery.status, func.count()).group_by(Delivery.status)):
        counts[DeliveryStatus(status).value] = int(count)
    return counts


def live_workers(session: Session, heartbeat_seconds: float) -> list[dict[str, Any]]:
    """Workers not stopped, oldest first; ``alive`` when the last heartbeat is recent."""
    alive_after = utcnow() - timedelta(seconds=max(3 * heartbeat_seconds, 30.0))
    return [
        {
            "id": w.id, "hostname": w.hostname, "pid": w.pid, "started_at": w.started_at, "heartbeat_at": w.heartbeat_at,
            "current_job_id": w.current_job_id, "alive": w.stopped_at is None and w.heartbeat_at >= alive_after,
        }
        for w in session.scalars(select(Worker).where(Worker.stopped_at.is_(None)).order_by(Worker.started_at))
    ]


def job_dict(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "series_instance_uid": job.series.series_instance_uid,
        "study_instance_uid": job.series.study_instance_uid,
        "status": job.status.value,
        "priority": job.priority,
        "reason": job.reason,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "not_before": job.not_before,
        "lease_owner": job.lease_owner,
        "lease_expires_at": job.lease_expires_at,
        "error": job.error,
        "model_version": job.model_version,
        "supersedes_job_id": job.supersedes_job_id,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
    }


def result_dict(result: Result | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {
        "flag": result.flag.value,
        "pe_present": result.pe_present,
        "pe_probability": result.pe_probability,
        "probabilities": result.probabilities,
        "labels": result.labels,
        "key_images": result.key_images,
        "model": {"name": result.model_name, "version": result.model_version, "sha256": result.model_sha256},
        "timings_s": result.timings_s,
        "created_at": result.created_at,
    }


def delivery_dict(delivery: Delivery) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "destination": delivery.destination,
        "status": delivery.status.value,
        "attempts": delivery.attempts,
        "next_attempt_at": delivery.next_attempt_at,
        "last_dicom_status": None if delivery.last_dicom_status is None else f"0x{delivery.last_dicom_status:04X}",
        "last_error": delivery.last_error,
        "delivered_at": delivery.delivered_at,
    }


def output_dict(output: Output) -> dict[str, Any]:
    return {
        "id": output.id,
        "kind": output.kind.value,
        "sop_class_uid": output.sop_class_uid,
        "sop_instance_uid": output.sop_instance_uid,
        "series_instance_uid": output.series_instance_uid,
        "path": output.path,
        "deliveries": [delivery_dict(d) for d in output.deliveries],
    }


def event_dict(event: Event) -> dict[str, Any]:
    return {
        "at": event.at,
        "entity": event.entity,
        "entity_id": event.entity_id,
        "kind": event.kind,
        "from_state": event.from_state,
        "to_state": event.to_state,
        "job_id": event.job_id,
        "detail": event.detail,
    }


def series_dict(series: Series) -> dict[str, Any]:
    return {
        "id": series.id,
        "study_instance_uid": series.study_instance_uid,
        "series_instance_uid": series.series_instance_uid,
        "calling_ae_title": series.calling_ae_title,
        "modality": series.modality,
        "series_description": series.series_description,
        "accession_number": series.accession_number,
        "instance_count": series.instance_count,
        "state": series.state.value,
        "ignore_reason": series.ignore_reason,
        "input_priority": series.input_priority,
        "first_received_at": series.first_received_at,
        "last_received_at": series.last_received_at,
    }


def job_detail(session: Session, job: Job) -> dict[str, Any]:
    return {**job_dict(job), "result": result_dict(job.result), "outputs": [output_dict(o) for o in job.outputs]}
