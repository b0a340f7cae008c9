"""The audit trail: every state change is one row in `events` (no patient identifiers)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from pacs_agent.db.models import Event, utcnow


def record_event(
    session: Session,
    *,
    entity: str,
    entity_id: str | int,
    kind: str,
    from_state: str = "",
    to_state: str = "",
    series_instance_uid: str = "",
    job_id: int | None = None,
    **detail: Any,
) -> Event:
    """Add an event row to the session's transaction and return it."""
    event = Event(
        at=utcnow(),
        entity=entity,
        entity_id=str(entity_id),
        kind=kind,
        from_state=str(from_state or ""),
        to_state=str(to_state or ""),
        series_instance_uid=series_instance_uid,
        job_id=job_id,
        detail=detail,
    )
    session.add(event)
    return event
