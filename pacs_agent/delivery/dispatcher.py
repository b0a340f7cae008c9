"""Delivery bookkeeping: claim due deliveries, send them through each destination's Target, record outcomes.

A report is never half sent: each output x destination is a Delivery row that
moves PENDING -> SENDING (leased to one dispatcher) -> DELIVERED, or back to PENDING with
``next_attempt_at = now + initial * 2**(attempts - 1)`` (capped), or to FAILED after
``dispatch.max_attempts``; FAILED rows stay visible and `retry_deliveries` re-queues them.
The transport (pacs_agent.delivery.target.build_target) decides what is retryable; an outcome that is
not retryable is FAILED at once. Each round makes one `Target.send` call per destination with all of its
due objects (one association, for DIMSE).
"""

from __future__ import annotations

import socket
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.db.events import record_event
from pacs_agent.db.models import Delivery, DeliveryStatus, Job, Output, utcnow
from pacs_agent.db.session import transaction
from pacs_agent.delivery.target import Target, build_target
from pacs_agent.errors import DeliveryError
from pacs_agent.jobs.leases import Backoff, owner_process, process_alive
from pacs_agent.logs import get_logger
from pacs_agent.settings import Settings

log = get_logger(__name__)

#: A claimed delivery returns to the pool if its dispatcher has not finished within this time.
LEASE_SECONDS = 300.0
#: At most this many deliveries are claimed per round (a few associations' worth).
BATCH_SIZE = 200


@dataclass(frozen=True)
class _Item:
    """One claimed delivery with what is needed to send it (read inside the claim transaction)."""

    delivery_id: int
    destination: str
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    job_id: int
    series_instance_uid: str
    attempts: int


@dataclass(frozen=True)
class _Outcome:
    """What happened to one item: ``delivered`` or not, the DICOM status (None: no answer), why."""

    delivered: bool
    status: int | None
    error: str = ""
    #: A condition no retry can fix by itself (e.g. the file is gone): FAILED at once.
    permanent: bool = False


def retry_deliveries(
    session: Session, *, delivery_ids: Sequence[int] | None = None, all_failed: bool = False, force: bool = False
) -> int:
    """Re-queue deliveries for an immediate attempt with a fresh attempt count; returns how many.

    ``delivery_ids``: those deliveries if FAILED, CANCELLED or PENDING, and with ``force`` also if
    DELIVERED (an object the PACS lost is sent again); SENDING ones are left to their dispatcher.
    ``all_failed``: every FAILED delivery.
    """
    if delivery_ids is None and not all_failed:
        raise DeliveryError("say which deliveries to retry: delivery ids or all failed ones")
    conditions = []
    if delivery_ids:
        conditions.append(
            and_(
                Delivery.id.in_(list(delivery_ids)),
                Delivery.status.in_(
                    [DeliveryStatus.FAILED, DeliveryStatus.CANCELLED, DeliveryStatus.PENDING]
                    + ([DeliveryStatus.DELIVERED] if force else [])
                ),
            )
        )
    if all_failed:
        conditions.append(Delivery.status == DeliveryStatus.FAILED)
    if not conditions:
        return 0
    now = utcnow()
    rows = session.execute(
        select(Delivery, Output.job_id, Output.series_instance_uid).join(Output).where(or_(*conditions)).order_by(Delivery.id)
    ).all()
    for delivery, job_id, _ in rows:
        previous = delivery.status
        delivery.status = DeliveryStatus.PENDING
        delivery.attempts = 0
        delivery.next_attempt_at = now
        delivery.lease_owner = None
        delivery.lease_expires_at = None
        record_event(
            session, entity="delivery", entity_id=delivery.id, kind="delivery_retry", from_state=previous,
            to_state=DeliveryStatus.PENDING, series_instance_uid=_source_series_uid(session, job_id), job_id=job_id,
            destination=delivery.destination, forced=previous == DeliveryStatus.DELIVERED,
        )
    return len(rows)


def _source_series_uid(session: Session, job_id: int) -> str:
    job = session.get(Job, job_id)
    return job.series.series_instance_uid if job is not None and job.series is not None else ""


def release_deliveries_of_dead_local_dispatchers(
    session_factory: sessionmaker[Session],
    *,
    now: datetime | None = None,
    hostname: str | None = None,
    alive: Callable[[int], bool] = process_alive,
) -> list[int]:
    """SENDING deliveries leased to a dispatcher process of THIS host that no longer exists -> PENDING.

    Run at serve start-up: without it a crash leaves its reports waiting LEASE_SECONDS. Owners are
    ``host:pid/dispatch`` (queue.default_owner of the serve process); other hosts' leases are never
    touched (scale-out: they expire as usual). The interrupted attempt is not counted.
    """
    now = now or utcnow()
    host = hostname or socket.gethostname()
    released: list[int] = []
    with transaction(session_factory) as session:
        sending = select(Delivery).where(Delivery.status == DeliveryStatus.SENDING).order_by(Delivery.id)
        if session.get_bind().dialect.name == "postgresql":
            sending = sending.with_for_update(skip_locked=True)
        for delivery in session.scalars(sending).all():
            owner = delivery.lease_owner or ""
            parsed = owner_process(owner)
            if parsed is None or parsed[0] != host or alive(parsed[1]):
                continue
            # The guarded UPDATE skips a row another process took over since it was read.
            moved = session.execute(
                update(Delivery)
                .where(Delivery.id == delivery.id, Delivery.status == DeliveryStatus.SENDING, Delivery.lease_owner == owner)
                .values(status=DeliveryStatus.PENDING, lease_owner=None, lease_expires_at=None, next_attempt_at=now)
                .execution_options(synchronize_session=False)
            )
            if not int(moved.rowcount or 0):  # type: ignore[attr-defined]
                continue
            output = session.get(Output, delivery.output_id)
            job_id = output.job_id if output is not None else None
            record_event(
                session, entity="delivery", entity_id=delivery.id, kind="delivery_lease_released",
                from_state=DeliveryStatus.SENDING, to_state=DeliveryStatus.PENDING,
                series_instance_uid=_source_series_uid(session, job_id) if job_id is not None else "",
                job_id=job_id, destination=delivery.destination, owner=owner,
                reason="dispatcher process is gone",
            )
            released.append(delivery.id)
    return released


# -- dispatching ---------------------------------------------------------------------------------
def _claim(session_factory: sessionmaker[Session], owner: str, now: datetime, lease_seconds: float) -> list[_Item]:
    """Atomically lease due deliveries (PENDING and due, or SENDING with an expired lease) to ``owner``."""
    with transaction(session_factory) as session:
        due_condition = or_(
            and_(Delivery.status == DeliveryStatus.PENDING, Delivery.next_attempt_at <= now),
            and_(Delivery.status == DeliveryStatus.SENDING, Delivery.lease_expires_at < now),
        )
        due = select(Delivery.id, Delivery.status).where(due_condition).order_by(Delivery.next_attempt_at, Delivery.id).limit(BATCH_SIZE)
        if session.get_bind().dialect.name == "postgresql":
            due = due.with_for_update(skip_locked=True)
        previous = {row.id: row.status for row in session.execute(due)}
        if not previous:
            return []
        # The UPDATE re-checks the condition, so a row another dispatcher took in between is skipped.
        claimed = session.execute(
            update(Delivery)
            .where(Delivery.id.in_(list(previous)), due_condition)
            .values(status=DeliveryStatus.SENDING, lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_seconds))
            .returning(Delivery.id)
            .execution_options(synchronize_session=False)
        ).scalars().all()
        if not claimed:
            return []
        rows = session.execute(
            select(Delivery, Output).join(Output).where(Delivery.id.in_(claimed)).order_by(Delivery.id)
        ).all()
        items: list[_Item] = []
        for delivery, output in rows:
            series_uid = _source_series_uid(session, output.job_id)
            record_event(
                session, entity="delivery", entity_id=delivery.id, kind="delivery_sending",
                from_state=previous[delivery.id], to_state=DeliveryStatus.SENDING, series_instance_uid=series_uid,
                job_id=output.job_id, destination=delivery.destination, attempt=delivery.attempts + 1, owner=owner,
            )
            items.append(
                _Item(
                    delivery_id=delivery.id,
                    destination=delivery.destination,
                    path=Path(output.path),
                    sop_class_uid=output.sop_class_uid,
                    sop_instance_uid=output.sop_instance_uid,
                    job_id=output.job_id,
                    series_instance_uid=series_uid,
                    attempts=delivery.attempts,
                )
            )
        return items


def _send_to(target: Target, items: Sequence[_Item], spool_root: Path) -> dict[int, _Outcome]:
    """Send ``items`` with ``target`` in one call and map each object's outcome back to its delivery."""
    paths = [spool_root / item.path for item in items]
    try:
        sent = target.send(paths)
    except Exception as exc:  # noqa: BLE001 - a transport bug must not lose the leases: retry later
        log.exception("delivery_target_failed", destination=target.name)
        return {item.delivery_id: _Outcome(False, None, f"{target.name}: {type(exc).__name__}: {exc}") for item in items}
    outcomes: dict[int, _Outcome] = {}
    for index, item in enumerate(items):
        if index >= len(sent):
            outcomes[item.delivery_id] = _Outcome(False, None, f"{target.name} gave no outcome for the object")
            continue
        result = sent[index]
        outcomes[item.delivery_id] = _Outcome(
            delivered=result.ok, status=result.status, error=result.reason, permanent=not result.ok and not result.retryable
        )
    return outcomes


def _record(
    session_factory: sessionmaker[Session],
    items: Sequence[_Item],
    outcomes: dict[int, _Outcome],
    settings: Settings,
    owner: str,
    now: datetime,
) -> None:
    """Write each outcome: DELIVERED, PENDING with backoff, or FAILED; only for rows this owner still holds."""
    backoff = Backoff(settings.dispatch.backoff_initial_seconds, settings.dispatch.backoff_max_seconds)
    with transaction(session_factory) as session:
        for item in items:
            outcome = outcomes[item.delivery_id]
            delivery = session.get(Delivery, item.delivery_id)
            if delivery is None or delivery.status != DeliveryStatus.SENDING or delivery.lease_owner != owner:
                log.warning("delivery_lease_lost", delivery_id=item.delivery_id, job_id=item.job_id)
                continue
            delivery.attempts += 1
            delivery.last_dicom_status = outcome.status
            delivery.lease_owner = None
            delivery.lease_expires_at = None
            common: dict[str, Any] = dict(
                entity="delivery", entity_id=delivery.id, from_state=DeliveryStatus.SENDING,
                series_instance_uid=item.series_instance_uid, job_id=item.job_id,
                destination=item.destination, attempt=delivery.attempts, dicom_status=outcome.status,
            )
            if outcome.delivered:
                delivery.status = DeliveryStatus.DELIVERED
                delivery.delivered_at = now
                delivery.last_error = ""
                record_event(session, kind="delivery_delivered", to_state=DeliveryStatus.DELIVERED, **common)
                log.info("delivery_delivered", delivery_id=delivery.id, job_id=item.job_id, destination=item.destination,
                         dicom_status=outcome.status, series_instance_uid=item.series_instance_uid)
                continue
            delivery.last_error = outcome.error
            if outcome.permanent or delivery.attempts >= settings.dispatch.max_attempts:
                delivery.status = DeliveryStatus.FAILED
                record_event(session, kind="delivery_failed", to_state=DeliveryStatus.FAILED, error=outcome.error, **common)
                log.error("delivery_failed", delivery_id=delivery.id, job_id=item.job_id, destination=item.destination,
                          attempts=delivery.attempts, error=outcome.error, series_instance_uid=item.series_instance_uid)
                continue
            delay = backoff.delay(delivery.attempts)
            delivery.status = DeliveryStatus.PENDING
            delivery.next_attempt_at = now + timedelta(seconds=delay)
            record_event(
                session, kind="delivery_retry_scheduled", to_state=DeliveryStatus.PENDING, error=outcome.error,
                retry_in_seconds=delay, **common,
            )
            log.warning("delivery_retry_scheduled", delivery_id=delivery.id, job_id=item.job_id, destination=item.destination,
                        attempts=delivery.attempts, retry_in_seconds=delay, error=outcome.error,
                        series_instance_uid=item.series_instance_uid)


def dispatch_due(
    session_factory: sessionmaker[Session],
    settings: Settings,
    *,
    owner: str,
    now: datetime | None = None,
    lease_seconds: float = LEASE_SECONDS,
) -> int:
    """One dispatch round: claim due deliveries, one association per destination, record outcomes.

    Returns the number of deliveries attempted in this round (0: nothing was due).
    ``now`` fixes the clock for claiming and backoff (tests); the network is real.
    """
    now = now or utcnow()
    items = _claim(session_factory, owner, now, lease_seconds)
    if not items:
        return 0
    destinations = {d.name: d for d in settings.destinations}
    by_destination: dict[str, list[_Item]] = defaultdict(list)
    for item in items:
        by_destination[item.destination].append(item)
    outcomes: dict[int, _Outcome] = {}
    for name, group in by_destination.items():
        destination = destinations.get(name)
        if destination is None:
            for item in group:
                outcomes[item.delivery_id] = _Outcome(False, None, f"destination {name!r} is not configured", permanent=True)
            continue
        outcomes.update(_send_to(build_target(destination, settings), group, settings.spool_root))
    _record(session_factory, items, outcomes, settings, owner, now)
    return len(items)
