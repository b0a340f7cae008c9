"""The database writer: the one thread that turns receiver records into rows, a batch per transaction.

C-STORE handlers only put records on its queue; it commits what accumulates within 100 ms in one
transaction (associations opened and closed in order), so the database sees at most ~10 transactions
per second whatever the instance rate.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import case, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.db.events import record_event
from pacs_agent.db.models import Association, Instance, Series
from pacs_agent.db.session import transaction
from pacs_agent.errors import StorageError
from pacs_agent.ingest.records import (
    AssociationClosed,
    AssociationOpened,
    AssociationRejected,
    Flush,
    InstanceNotStored,
    ReceivedInstance,
    Record,
    clip,
)
from pacs_agent.ingest.spool import Spool
from pacs_agent.logs import get_logger
from pacs_agent.series.states import open_series

log = get_logger(__name__)

_BATCH_MAX = 1000
#: How long the database writer gathers records before committing them in one transaction (seconds).
_BATCH_WINDOW_SECONDS = 0.1
_RETRY_MAX_SECONDS = 5.0


class RecordWriter(threading.Thread):
    """The one thread that turns receiver records into database rows, a batch per transaction."""

    def __init__(self, session_factory: sessionmaker[Session], spool: Spool) -> None:
        super().__init__(name="pe-agent-receiver-writer", daemon=True)
        self._factory = session_factory
        self._spool = spool
        self.records: queue.SimpleQueue[Record | None] = queue.SimpleQueue()
        self._stopping = threading.Event()

    def run(self) -> None:
        while True:
            first = self.records.get()
            if first is None:
                return
            batch: list[Record] = [first]
            stop_after = False
            # Collect for a short window instead of committing each record as it comes: one ORM
            # transaction per instance held the GIL for 64 % of a single sender's time (py-spy --gil),
            # slowing the pynetdicom threads that receive. A flush request ends the window at once.
            deadline = time.monotonic() + _BATCH_WINDOW_SECONDS
            while len(batch) < _BATCH_MAX and not isinstance(batch[-1], Flush):
                remaining = deadline - time.monotonic()
                try:
                    item = self.records.get(timeout=remaining) if remaining > 0 else self.records.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop_after = True
                    break
                batch.append(item)
            self._commit_with_retry(batch)
            if stop_after:
                return

    def stop(self, timeout: float) -> None:
        self._stopping.set()
        self.records.put(None)
        self.join(timeout)

    def _commit_with_retry(self, batch: list[Record]) -> None:
        flushes = [r for r in batch if isinstance(r, Flush)]
        work = [r for r in batch if not isinstance(r, Flush)]
        delay = 0.1
        while work:
            try:
                apply_records(self._factory, self._spool, work)
                break
            except (IntegrityError, StorageError, ValueError):
                # A row another process wrote meanwhile, or one bad record: take them one at a time.
                self._commit_one_by_one(work)
                break
            except SQLAlchemyError as exc:
                if self._stopping.is_set() and delay >= _RETRY_MAX_SECONDS:
                    log.error("receiver_records_not_committed", count=len(work), error=str(exc))
                    break
                log.warning("receiver_database_unavailable", retry_in_s=delay, error=str(exc))
                time.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_SECONDS)
            except Exception:  # noqa: BLE001 - the writer thread must outlive any single batch
                log.exception("receiver_batch_failed", count=len(work))
                self._commit_one_by_one(work)
                break
        for flush in flushes:
            flush.done.set()

    def _commit_one_by_one(self, records: Sequence[Record]) -> None:
        """Commit each record alone; one that still fails is logged and dropped (the file stays in the spool)."""
        for record in records:
            for attempt in range(1, 6):
                try:
                    apply_records(self._factory, self._spool, [record])
                    break
                except IntegrityError as exc:
                    log.error("receiver_record_dropped", record=type(record).__name__, error=str(exc.orig))
                    break
                except SQLAlchemyError as exc:
                    if attempt == 5:
                        log.error("receiver_record_dropped", record=type(record).__name__, error=str(exc))
                    else:
                        time.sleep(0.1 * 2**attempt)
                except Exception as exc:  # noqa: BLE001 - reconciliation at the next start picks up stored files
                    log.error("receiver_record_dropped", record=type(record).__name__, error=str(exc))
                    break


def apply_records(session_factory: sessionmaker[Session], spool: Spool, records: Sequence[Record]) -> None:
    """Commit a batch of receiver records in one transaction, in the order they were received."""
    with transaction(session_factory) as session:
        _apply(session, spool, records)


def _apply(session: Session, spool: Spool, records: Sequence[Record]) -> None:
    instances = [r for r in records if isinstance(r, ReceivedInstance)]
    series_by_uid: dict[str, Series] = {}
    known_sops: dict[str, str] = {}
    added: dict[int, tuple[int, datetime]] = {}  # series id -> (instances added, latest received_at)
    if instances:
        series_uids = {r.series_instance_uid for r in instances}
        for series in session.scalars(select(Series).where(Series.series_instance_uid.in_(series_uids))):
            series_by_uid[series.series_instance_uid] = series
        sop_uids = {r.sop_instance_uid for r in instances}
        for sop, path in session.execute(
            select(Instance.sop_instance_uid, Instance.path).where(Instance.sop_instance_uid.in_(sop_uids))
        ):
            known_sops[sop] = path
    for record in records:
        if isinstance(record, AssociationOpened):
            session.add(
                Association(
                    id=record.association_id,
                    calling_ae_title=clip(record.calling_ae_title, 16),
                    peer_address=clip(record.peer_address, 64),
                    opened_at=record.at,
                )
            )
            session.flush()
            record_event(
                session, entity="association", entity_id=record.association_id, kind="association_opened",
                to_state="OPEN", calling_ae_title=record.calling_ae_title, peer_address=record.peer_address,
            )
        elif isinstance(record, AssociationClosed):
            association = session.get(Association, record.association_id)
            if association is not None and association.closed_at is None:
                association.closed_at = record.at
                association.close_reason = record.reason
            record_event(
                session, entity="association", entity_id=record.association_id, kind="association_closed",
                from_state="OPEN", to_state=record.reason.upper(), stored=record.stored,
                duplicates=record.duplicates, ignored=record.ignored, rejected=record.rejected,
            )
        elif isinstance(record, AssociationRejected):
            record_event(
                session, entity="association", entity_id="-", kind="association_rejected",
                calling_ae_title=record.calling_ae_title, peer_address=record.peer_address,
            )
        elif isinstance(record, ReceivedInstance):
            _apply_instance(session, spool, record, series_by_uid, known_sops, added)
        elif isinstance(record, InstanceNotStored):
            record_event(
                session, entity="instance", entity_id=record.sop_instance_uid[:64] or "-", kind=record.kind,
                series_instance_uid=record.series_instance_uid[:64], sop_class_uid=record.sop_class_uid,
                status=record.status, reason=record.reason, association_id=record.association_id,
            )
    # Counted in SQL, not read-modify-written through the ORM: several receiver processes (or nodes)
    # may add instances to the same series in overlapping transactions.
    for series_id, (count, latest) in added.items():
        session.execute(
            update(Series)
            .where(Series.id == series_id)
            .values(
                instance_count=Series.instance_count + count,
                last_received_at=case((Series.last_received_at < latest, latest), else_=Series.last_received_at),
            )
            .execution_options(synchronize_session=False)
        )


def _apply_instance(
    session: Session,
    spool: Spool,
    record: ReceivedInstance,
    series_by_uid: dict[str, Series],
    known_sops: dict[str, str],
    added: dict[int, tuple[int, datetime]],
) -> None:
    existing_path = known_sops.get(record.sop_instance_uid)
    if existing_path is not None:
        if existing_path != record.path:
            # Same SOP Instance UID under another study/series: keep the first, drop this copy.
            spool.absolute(record.path).unlink(missing_ok=True)
        record_event(
            session, entity="instance", entity_id=record.sop_instance_uid, kind="duplicate_instance",
            series_instance_uid=record.series_instance_uid, sop_class_uid=record.sop_class_uid, status=0,
            reason="SOP Instance UID already stored", association_id=record.association_id,
        )
        return
    series = series_by_uid.get(record.series_instance_uid)
    if series is None:
        series = open_series(
            session,
            study_instance_uid=record.study_instance_uid,
            series_instance_uid=record.series_instance_uid,
            calling_ae_title=clip(record.calling_ae_title, 16),
            modality=clip(record.modality, 16),
            series_description=clip(record.series_description, 128),
            accession_number=clip(record.accession_number, 16),
            received_at=record.received_at,
        )
        series_by_uid[record.series_instance_uid] = series
    count, latest = added.get(series.id, (0, record.received_at))
    added[series.id] = (count + 1, max(latest, record.received_at))
    session.add(
        Instance(
            series_id=series.id,
            sop_instance_uid=record.sop_instance_uid,
            sop_class_uid=record.sop_class_uid,
            transfer_syntax_uid=record.transfer_syntax_uid,
            path=record.path,
            size_bytes=record.size_bytes,
            received_at=record.received_at,
            association_id=record.association_id,
        )
    )
    known_sops[record.sop_instance_uid] = record.path
