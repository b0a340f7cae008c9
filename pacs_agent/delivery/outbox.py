"""The outbox in the database: each produced object becomes an Output row with one PENDING Delivery per destination.

Called by the analysis worker inside the transaction that completes the job, so a report is never half queued.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.orm import Session

from pacs_agent.db.events import record_event
from pacs_agent.db.models import Delivery, DeliveryStatus, Job, Output, OutputKind, utcnow
from pacs_agent.errors import DeliveryError
from pacs_agent.reports import ProducedObject
from pacs_agent.settings import DestinationSettings


def queue_deliveries(
    session: Session,
    job: Job,
    produced: Sequence[ProducedObject],
    destinations: Sequence[DestinationSettings],
    spool_root: Path,
) -> list[Output]:
    """Record produced objects (paths relative to the spool root) and one PENDING delivery per destination."""
    root = spool_root.resolve()
    series_uid = job.series.series_instance_uid if job.series is not None else ""
    outputs: list[Output] = []
    now = utcnow()
    for obj in produced:
        try:
            relative = obj.path.resolve().relative_to(root)
        except ValueError:
            raise DeliveryError(f"output {obj.path} is not inside the spool {root}") from None
        output = Output(
            job_id=job.id,
            kind=OutputKind(obj.kind.value),
            sop_class_uid=obj.sop_class_uid,
            sop_instance_uid=obj.sop_instance_uid,
            series_instance_uid=obj.series_instance_uid,
            path=relative.as_posix(),
            created_at=now,
        )
        session.add(output)
        session.flush()
        outputs.append(output)
        for destination in destinations:
            delivery = Delivery(
                output_id=output.id,
                destination=destination.name,
                status=DeliveryStatus.PENDING,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
            session.add(delivery)
            session.flush()
            record_event(
                session, entity="delivery", entity_id=delivery.id, kind="delivery_queued",
                to_state=DeliveryStatus.PENDING, series_instance_uid=series_uid, job_id=job.id,
                destination=destination.name, output_kind=obj.kind.value, sop_instance_uid=obj.sop_instance_uid,
            )
    return outputs
