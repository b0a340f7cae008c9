"""Read-side queries for operators, shared by the command line and the HTTP endpoints: counts and rows as dicts."""

from __future__ import annotations

import enum
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacs_agent.db.models import Delivery, DeliveryStatus, Event, Job, JobStatus, Output, Result, Series, SeriesState, Worker, utcnow


def _counts(session: Session, column: Any, states: type[enum.StrEnum]) -> dict[str, int]:
    """Rows by ``column``'s value, every one of ``states`` present (zero included)."""
    counts = {state.value: 0 for state in states}
    for state, count in session.execute(select(column, func.count()).group_by(column)):
        counts[states(state).value] = int(count)
    return counts


def job_counts(session: Session) -> dict[str, int]:
    """Number of jobs by status (the queue depth)."""
    return _counts(session, Job.status, JobStatus)


def series_counts(session: Session) -> dict[str, int]:
    """Number of series by state."""
    return _counts(session, Series.state, SeriesState)


def delivery_counts(session: Session) -> dict[str, int]:
    """Number of deliveries by status."""
    return _counts(session, Delivery.status, DeliveryStatus)


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


def _columns(row: Any, names: str) -> dict[str, Any]:
    """The attributes ``names`` (space separated) of ``row``, in that order."""
    return {name: getattr(row, name) for name in names.split()}


def job_dict(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "series_instance_uid": job.series.series_instance_uid,
        "study_instance_uid": job.series.study_instance_uid,
        "status": job.status.value,
        **_columns(job, "priority reason attempts max_attempts not_before lease_owner lease_expires_at error "
                        "model_version supersedes_job_id created_at started_at finished_at"),
    }


def result_dict(result: Result | None) -> dict[str, Any] | None:
    """A stored result; ``summary`` is the worklist line ("non-diagnostic: ..." when the input-quality
    gate failed the series) and ``quality`` the gate's report (empty for results from before it)."""
    if result is None:
        return None
    from pacs_agent.worklist import summarize

    return {
        "flag": result.flag.value,
        "summary": summarize(result),
        **_columns(result, "pe_present pe_probability probabilities labels key_images skipped_images"),
        "model": {"name": result.model_name, "version": result.model_version, "sha256": result.model_sha256,
                  "precision": result.model_precision},
        **_columns(result, "timings_s quality created_at"),
    }


def delivery_dict(delivery: Delivery) -> dict[str, Any]:
    return {
        **_columns(delivery, "id destination"),
        "status": delivery.status.value,
        **_columns(delivery, "attempts next_attempt_at"),
        "last_dicom_status": None if delivery.last_dicom_status is None else f"0x{delivery.last_dicom_status:04X}",
        **_columns(delivery, "last_error delivered_at"),
    }


def output_dict(output: Output) -> dict[str, Any]:
    return {
        "id": output.id,
        "kind": output.kind.value,
        **_columns(output, "sop_class_uid sop_instance_uid series_instance_uid path"),
        "deliveries": [delivery_dict(d) for d in output.deliveries],
    }


def event_dict(event: Event) -> dict[str, Any]:
    return _columns(event, "at entity entity_id kind from_state to_state job_id detail")


def series_dict(series: Series) -> dict[str, Any]:
    return {
        **_columns(series, "id study_instance_uid series_instance_uid calling_ae_title modality series_description "
                           "accession_number instance_count"),
        "state": series.state.value,
        **_columns(series, "ignore_reason input_priority first_received_at last_received_at"),
    }


def job_detail(session: Session, job: Job) -> dict[str, Any]:
    return {**job_dict(job), "result": result_dict(job.result), "outputs": [output_dict(o) for o in job.outputs]}
