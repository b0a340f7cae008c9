"""Deliver produced objects to every destination: C-STORE SCU with retry and exponential backoff.

A report is never half sent (ARCHITECTURE.md): each output x destination is a Delivery row that
moves PENDING -> SENDING (leased to one dispatcher) -> DELIVERED, or back to PENDING with
``next_attempt_at = now + initial * 2**(attempts - 1)`` (capped), or to FAILED after
``dispatch.max_attempts``; FAILED rows stay visible and `retry_deliveries` re-queues them.
DICOM statuses are recorded as answered: success and warnings (0xB000 range) deliver, failures
and refusals retry; no answer (connection refused, timeout, abort) records no status and retries.
Each round opens one association per destination and sends all of its due objects over it.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, UID
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import code_to_category
from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.db.models import Delivery, DeliveryStatus, Job, Output, utcnow
from pacs_agent.db.session import transaction
from pacs_agent.errors import DeliveryError
from pacs_agent.events import record_event
from pacs_agent.logging import get_logger
from pacs_agent.pynetdicom_tuning import hold_requestor_reactor
from pacs_agent.queue import Backoff, owner_process, process_alive
from pacs_agent.reports import ProducedObject
from pacs_agent.settings import Destination, Settings, TLSSettings

log = get_logger(__name__)

#: A claimed delivery returns to the pool if its dispatcher has not finished within this time.
LEASE_SECONDS = 300.0
#: At most this many deliveries are claimed per round (a few associations' worth).
BATCH_SIZE = 200
#: pynetdicom proposes at most 128 presentation contexts per association.
_MAX_CONTEXTS = 128
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True)
class EchoResult:
    """Outcome of a C-ECHO: ``status`` is None when no DICOM answer came back."""

    ok: bool
    status: int | None
    message: str
    seconds: float


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


# -- queueing -----------------------------------------------------------------------------------
def queue_deliveries(
    session: Session,
    job: Job,
    produced: Sequence[ProducedObject],
    destinations: Sequence[Destination],
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
            kind=obj.kind,
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


def _ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """Client-side TLS from the node's certificate settings (the CA verifies the PACS)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_certificate or None)
    if tls.certificate and tls.private_key:
        context.load_cert_chain(tls.certificate, tls.private_key)
    return context


def _contexts(files: Sequence[tuple[str, str]]) -> list[PresentationContext]:
    """Presentation contexts for (SOP class, transfer syntax) pairs; uncompressed ones may convert."""
    syntaxes: dict[str, list[str]] = defaultdict(list)
    for sop_class, transfer_syntax in files:
        wanted = [transfer_syntax]
        if UID(transfer_syntax) in _UNCOMPRESSED:
            wanted += [str(ts) for ts in _UNCOMPRESSED]
        for ts in wanted:
            if ts not in syntaxes[sop_class]:
                syntaxes[sop_class].append(ts)
    return [build_context(sop_class, ts_list) for sop_class, ts_list in syntaxes.items()][:_MAX_CONTEXTS]


def _make_ae(settings: Settings, calling_ae_title: str) -> AE:
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = settings.node.acse_timeout
    ae.dimse_timeout = settings.node.dimse_timeout
    ae.network_timeout = settings.node.network_timeout
    return ae


def calling_ae_title_of(settings: Settings) -> str:
    """The AE title this node calls destinations with."""
    return settings.dispatch.calling_ae_title or settings.node.ae_title


def _no_association_reason(assoc: Association) -> str:
    """Why an association did not come up (pynetdicom reports a refused connection as an abort)."""
    if assoc.is_rejected:
        return "association rejected by the peer"
    return "no association (connection refused, timed out or aborted)"


def _status_outcome(status: Dataset) -> _Outcome:
    if "Status" not in status:
        return _Outcome(delivered=False, status=None, error="no C-STORE response (timeout or association aborted)")
    code = int(status.Status)
    category = code_to_category(code)
    if category in ("Success", "Warning"):
        return _Outcome(delivered=True, status=code)
    comment = str(status.get("ErrorComment", "") or "")
    return _Outcome(delivered=False, status=code, error=f"C-STORE {category.lower()} 0x{code:04X}" + (f": {comment}" if comment else ""))


def _no_delay(assoc: Association) -> None:
    """Turn Nagle off on the association's socket: otherwise each C-STORE stalls ~40 ms on a delayed ACK."""
    transport = assoc.dul.socket
    raw = transport.socket if transport is not None else None
    if raw is None:
        return
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        log.warning("tcp_nodelay_not_set", error=str(exc))


def _send_to(
    destination: Destination, items: Sequence[_Item], settings: Settings, spool_root: Path
) -> dict[int, _Outcome]:
    """Send ``items`` over one association to ``destination``; never raises."""
    outcomes: dict[int, _Outcome] = {}
    ready: list[tuple[_Item, Path, str]] = []
    for item in items:
        path = spool_root / item.path
        try:
            transfer_syntax = str(read_file_meta_info(path).TransferSyntaxUID)
        except FileNotFoundError:
            outcomes[item.delivery_id] = _Outcome(False, None, f"output file {item.path} is missing from the spool", permanent=True)
            continue
        except (InvalidDicomError, OSError, AttributeError) as exc:
            outcomes[item.delivery_id] = _Outcome(False, None, f"output file {item.path} cannot be read: {exc}", permanent=True)
            continue
        ready.append((item, path, transfer_syntax))
    if not ready:
        return outcomes
    ae = _make_ae(settings, calling_ae_title_of(settings))
    tls_args = None
    if destination.tls:
        try:
            tls_args = (_ssl_context(settings.node.tls), destination.host)
        except (OSError, ssl.SSLError) as exc:
            for item, _, _ in ready:
                outcomes[item.delivery_id] = _Outcome(False, None, f"TLS set-up failed: {exc}")
            return outcomes
    contexts = _contexts([(item.sop_class_uid, ts) for item, _, ts in ready])
    try:
        assoc = ae.associate(
            destination.host,
            destination.port,
            contexts=contexts,
            ae_title=destination.ae_title,
            max_pdu=settings.node.maximum_pdu_size,
            tls_args=tls_args,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        for item, _, _ in ready:
            outcomes[item.delivery_id] = _Outcome(False, None, f"cannot associate with {destination.name}: {exc}")
        return outcomes
    if not assoc.is_established:
        reason = _no_association_reason(assoc)
        for item, _, _ in ready:
            outcomes[item.delivery_id] = _Outcome(False, None, f"{destination.name} at {destination.host}:{destination.port}: {reason}")
        return outcomes
    _no_delay(assoc)
    try:
        for item, path, _ in ready:
            if not assoc.is_established:
                outcomes[item.delivery_id] = _Outcome(False, None, "association ended before the object was sent")
                continue
            try:
                hold_requestor_reactor(assoc)  # a pynetdicom race that can steal the response, see there
                status = assoc.send_c_store(path)
            except ValueError as exc:  # no accepted presentation context for this SOP class / transfer syntax
                outcomes[item.delivery_id] = _Outcome(False, None, f"{destination.name} did not accept the object: {exc}")
                continue
            except (OSError, RuntimeError, InvalidDicomError) as exc:
                outcomes[item.delivery_id] = _Outcome(False, None, f"C-STORE failed: {exc}")
                continue
            outcomes[item.delivery_id] = _status_outcome(status)
    finally:
        if assoc.is_established:
            assoc.release()
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
        outcomes.update(_send_to(destination, group, settings, settings.spool_root))
    _record(session_factory, items, outcomes, settings, owner, now)
    return len(items)


def echo(
    destination: Destination,
    *,
    calling_ae_title: str,
    timeout: float = 10,
    tls: TLSSettings | None = None,
) -> EchoResult:
    """C-ECHO ``destination``; never raises for network trouble (the result says what happened)."""
    started = time.monotonic()
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)

    def result(ok: bool, status: int | None, message: str) -> EchoResult:
        return EchoResult(ok=ok, status=status, message=message, seconds=round(time.monotonic() - started, 3))

    tls_args = None
    if destination.tls:
        if tls is None:
            return result(False, None, f"{destination.name} needs TLS but no TLS settings were given")
        try:
            tls_args = (_ssl_context(tls), destination.host)
        except (OSError, ssl.SSLError) as exc:
            return result(False, None, f"TLS set-up failed: {exc}")
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    try:
        assoc: Association = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    except (OSError, ValueError, RuntimeError) as exc:
        return result(False, None, f"cannot associate with {where}: {exc}")
    if not assoc.is_established:
        return result(False, None, f"{where}: {_no_association_reason(assoc)}")
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in status:
        return result(False, None, f"{where}: no C-ECHO response")
    code = int(status.Status)
    if code == 0:
        return result(True, code, f"{where}: C-ECHO success")
    return result(False, code, f"{where}: C-ECHO status 0x{code:04X}")
