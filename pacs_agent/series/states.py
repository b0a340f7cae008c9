"""The one writer of a series' state: every change of `Series.state` goes through here with its event.

RECEIVING (first instance recorded) -> COMPLETE (quiet, no open association) -> QUEUED (a job) or
IGNORED (not a CTPA) -> ANALYSED / FAILED (its latest job finished).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from pacs_agent.db.events import record_event
from pacs_agent.db.models import Series, SeriesState


def set_series_state(session: Session, series: Series, state: SeriesState, **detail: Any) -> bool:
    """Move ``series`` to ``state`` and record the change (inside the caller's transaction).

    Nothing happens when it is in ``state`` already; returns whether it changed. A ``reason`` in
    ``detail`` is also kept as the series' ignore reason when ``state`` is IGNORED.
    """
    if series.state == state:
        return False
    record_event(
        session, entity="series", entity_id=series.id, kind="series_state", from_state=series.state, to_state=state,
        series_instance_uid=series.series_instance_uid, **detail,
    )
    series.state = state
    if state == SeriesState.IGNORED and detail.get("reason"):
        series.ignore_reason = str(detail["reason"])
    return True


def open_series(
    session: Session,
    *,
    study_instance_uid: str,
    series_instance_uid: str,
    calling_ae_title: str,
    modality: str,
    series_description: str,
    accession_number: str,
    received_at: datetime,
) -> Series:
    """Create the Series row of a series' first recorded instance, in RECEIVING (values already clipped)."""
    series = Series(
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        calling_ae_title=calling_ae_title,
        modality=modality,
        series_description=series_description,
        accession_number=accession_number,
        instance_count=0,
        first_received_at=received_at,
        last_received_at=received_at,
        state=SeriesState.RECEIVING,
    )
    session.add(series)
    session.flush()
    record_event(
        session, entity="series", entity_id=series.id, kind="series_state", to_state=SeriesState.RECEIVING,
        series_instance_uid=series.series_instance_uid, calling_ae_title=series.calling_ae_title,
    )
    return series


__all__ = ["open_series", "set_series_state"]
