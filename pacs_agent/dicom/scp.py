"""The receiver: a pynetdicom storage SCP that puts acknowledged instances in the spool.

Hot path (one thread per association, run by pynetdicom): the dataset is streamed to a temp file while
it arrives (``STORE_RECV_CHUNKED_DATASET``: pynetdicom writes preamble, file meta and the received bytes,
so the file is already a Part 10 file), its header is read up to the pixel data, the UIDs are validated
and the file is renamed into ``incoming/<study>/<series>/<sop>.dcm``. Only then is 0x0000 returned.
No database work happens there: the handler puts a small record on an in-process queue and one writer
thread commits what accumulates within 100 ms in one transaction (associations opened and closed in order),
so the database sees at most ~10 transactions per second whatever the instance rate. `Receiver.flush` waits
until everything received so far is committed. If the process dies between rename and commit, the
start-up reconciliation finds the spool files that have no Instance row and records them.

Statuses: 0x0000 stored, duplicate (not stored twice) or another storage SOP class (recorded as ignored);
0xA700 below the disk floor or the spool cannot be written; 0xA900 invalid or missing UIDs; 0xC210 a
dataset that cannot be read. Handlers never raise.

Note: ``STORE_RECV_CHUNKED_DATASET`` is a pynetdicom module setting: while a receiver runs it applies to
every SCP in the process (it is restored when the last receiver stops). Other SCPs in the same process
should read ``event.dataset`` (which handles it), not ``event.encoded_dataset()``. If it is off (another
component turned it off), the receiver falls back to writing ``event.encoded_dataset()``.
Likewise, while a receiver runs pynetdicom's 1 ms idle polls are capped at 200 us, and the two reactors
of each incoming association wait for socket data or queued work instead of polling at all
(pacs_agent.dicom.pynetdicom_patches: pynetdicom polls with time.sleep(0.001), ~3.5 ms per instance, and
polling threads of concurrent associations compete for the GIL).
"""

from __future__ import annotations

import dataclasses
import itertools
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import pydicom
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event as DicomEvent
from pynetdicom.sop_class import EnhancedCTImageStorage, CTImageStorage, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.dicom.admission import Admission, SharedCounts
from pacs_agent.dicom.pynetdicom_patches import CheaplyCopiedContexts, SleepCap, make_event_driven, start_handed_over_server
from pacs_agent.dicom.tls import server_ssl_context
from pacs_agent.errors import InvalidUIDError, ReceiverError, StorageError
from pacs_agent.ingest.reconcile import reconcile_spool
from pacs_agent.ingest.records import (
    AssociationClosed,
    AssociationOpened,
    AssociationRejected,
    Flush,
    InstanceNotStored,
    ReceivedInstance,
    Record,
    read_header,
)
from pacs_agent.ingest.records import now as _now
from pacs_agent.ingest.spool import Spool, validate_uid
from pacs_agent.ingest.writer import RecordWriter
from pacs_agent.logs import PATIENT_VALUES, get_logger, protect_patient_values
from pacs_agent.settings import Settings

log = get_logger(__name__)

#: The SOP classes whose instances form the series that are analysed.
ANALYSED_SOP_CLASSES: frozenset[str] = frozenset({str(CTImageStorage), str(EnhancedCTImageStorage)})

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_DOES_NOT_MATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210

#: Acceptance order when a sender proposes several transfer syntaxes in one context: uncompressed first,
#: then lossless compression, then the rest. So a sender is never asked to compress lossily by our choice;
#: a sender that proposes only its native (compressed) syntax gets it, and the instance is stored as received.
_PREFERRED_FIRST = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 Lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K RPCL Lossless
    "1.2.840.10008.1.2.4.110",  # JPEG XL Lossless
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.8.1",  # Deflated Image Frame Compression
)
ACCEPTED_TRANSFER_SYNTAXES: tuple[str, ...] = tuple(
    [ts for ts in _PREFERRED_FIRST if ts in ALL_TRANSFER_SYNTAXES]
    + [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in _PREFERRED_FIRST]
)

#: Patients whose values were handed to the log mask recently (once per patient, not per instance).
_PROTECTED_MAX = 1024
#: How long a closed connection waits for pynetdicom to say whether it was released or aborted (seconds).
_CLOSE_GRACE_SECONDS = 1.0
#: Pending TCP connections the listening socket holds before the kernel refuses more.
LISTEN_BACKLOG = 128
#: pynetdicom's own association limit is set this far above node.max_associations (see `_on_requested`).
_PYNETDICOM_ASSOCIATION_BACKSTOP = 1000


class _ChunkedReceive:
    """Turns pynetdicom's process-wide STORE_RECV_CHUNKED_DATASET on while any Receiver runs, then restores it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._previous = False

    def acquire(self) -> None:
        with self._lock:
            if self._users == 0:
                self._previous = _config.STORE_RECV_CHUNKED_DATASET
                _config.STORE_RECV_CHUNKED_DATASET = True
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users == 0:
                _config.STORE_RECV_CHUNKED_DATASET = self._previous


_CHUNKED_RECEIVE = _ChunkedReceive()
_SLEEP_CAP = SleepCap()


@dataclass(frozen=True)
class _StoreRequest:
    """What is known of a C-STORE request before its dataset is accepted (for refusal records)."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    association_id: str | None


@dataclass
class _AssociationState:
    association_id: str
    calling_ae_title: str
    stored: int = 0
    duplicates: int = 0
    ignored: int = 0
    rejected: int = 0
    closed: bool = False


class Receiver:
    """The node's storage SCP: in `pe-agent serve`'s process (node.receiver_processes 1), or one in each
    receiver process of a `pacs_agent.dicom.scp_pool.ReceiverPool`, serving the connections serve hands over."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        *,
        shared_counts: SharedCounts | None = None,
        process_index: int = 0,
    ) -> None:
        """``shared_counts``/``process_index``: this receiver is process ``process_index`` of a
        `pacs_agent.dicom.scp_pool.ReceiverPool`, whose processes share node.max_associations."""
        self._settings = settings
        self._factory = session_factory
        node = settings.node
        self._spool = Spool(settings.spool_root, node.min_free_disk_mb, fsync=settings.storage.fsync)
        self._ae = AE(ae_title=node.ae_title)
        # node.max_associations is enforced by `_on_requested` (exact, see there); pynetdicom's own
        # count, which also counts associations still winding down after a rejection, only backs it up.
        self._ae.maximum_associations = _PYNETDICOM_ASSOCIATION_BACKSTOP + node.max_associations
        self._ae.acse_timeout = node.acse_timeout
        self._ae.dimse_timeout = node.dimse_timeout
        self._ae.network_timeout = node.network_timeout
        self._ae.maximum_pdu_size = node.maximum_pdu_size
        if node.allowed_calling_ae_titles:
            self._ae.require_calling_aet = list(node.allowed_calling_ae_titles)
        self._ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            self._ae.add_supported_context(cast(str, context.abstract_syntax), list(ACCEPTED_TRANSFER_SYNTAXES))
        self._server: ThreadedAssociationServer | None = None
        self._writer: RecordWriter | None = None
        self._lock = threading.Lock()
        self._associations: dict[int, _AssociationState] = {}
        self._admission = Admission(node.max_associations, shared_counts, process_index)
        self._in_flight: set[Path] = set()
        self._protected: dict[str, None] = {}
        self._counters = {"stored": 0, "duplicates": 0, "ignored": 0, "rejected": 0, "associations": 0}
        self._sequence = itertools.count(1)

    @property
    def spool(self) -> Spool:
        return self._spool

    @property
    def port(self) -> int:
        if self._server is None:
            raise ReceiverError("the receiver is not running")
        return int(self._server.server_address[1])

    @property
    def is_running(self) -> bool:
        return self._server is not None

    def counters(self) -> dict[str, int]:
        """Instances stored, duplicates, ignored, rejected and associations accepted since start."""
        with self._lock:
            return dict(self._counters)

    def start(self, *, handoff: socket.socket | None = None) -> None:
        """Reconcile the spool with the database, then listen (non-blocking).

        ``handoff``: listen on nothing and serve the connections another process accepts and sends over
        this Unix socket (a process of `pacs_agent.dicom.scp_pool.ReceiverPool`; the pool reconciles and
        clears the spool's tmp/ once, before its processes start).
        """
        if self._server is not None:
            return
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        node = self._settings.node
        ssl_context = server_ssl_context(node.tls) if node.tls.enabled else None
        cleared = self._spool.clear_tmp() if handoff is None else 0
        recovered = self.reconcile() if handoff is None else 0
        temp_dir = Path(tempfile.gettempdir())
        if not self._spool.same_file_system(temp_dir):
            log.warning(
                "receiver_temp_on_other_file_system", temp_dir=str(temp_dir),
                advice="each instance is copied once; set TMPDIR to a folder on the spool's file system",
            )
        self._writer = RecordWriter(self._factory, self._spool)
        self._writer.start()
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_connection_opened),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_closed, ["released"]),
            (evt.EVT_ABORTED, self._on_closed, ["aborted"]),
            (evt.EVT_CONN_CLOSE, self._on_connection_closed),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        _CHUNKED_RECEIVE.acquire()
        _SLEEP_CAP.acquire()
        try:
            if handoff is None:
                server = self._ae.start_server((node.host, node.port), block=False, ssl_context=ssl_context, evt_handlers=handlers)
            else:
                server = start_handed_over_server(self._ae, handoff, (node.host, node.port), ssl_context, handlers)
        except OSError as exc:
            _SLEEP_CAP.release()
            _CHUNKED_RECEIVE.release()
            self._writer.stop(timeout=5)
            self._writer = None
            raise ReceiverError(f"cannot listen on {node.host}:{node.port}: {exc.strerror or exc}") from exc
        assert server is not None
        server.contexts = CheaplyCopiedContexts(server.contexts)  # copied for every association
        if handoff is None:
            # socketserver listens with a backlog of 5: in a burst of connections (a PACS flushing its
            # queue) the kernel refuses the rest at TCP level before they can get an A-ASSOCIATE-RJ.
            server.request_queue_size = LISTEN_BACKLOG
            cast(socket.socket, server.socket).listen(LISTEN_BACKLOG)
        self._server = server
        if handoff is None:
            log.info(
                "receiver_started", ae_title=node.ae_title, host=node.host, port=self.port, tls=node.tls.enabled,
                max_associations=node.max_associations, reconciled=recovered, tmp_cleared=cleared,
            )

    def stop(self) -> None:
        """Stop listening, abort open associations, commit what was received."""
        if self._server is None:
            return
        self._server.shutdown()
        self._ae.shutdown()
        self._server = None
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:  # let the abort handlers record their associations as closed
            with self._lock:
                if not self._associations:
                    break
            time.sleep(0.01)
        if self._writer is not None:
            self._writer.stop(timeout=30)
            self._writer = None
        _SLEEP_CAP.release()
        _CHUNKED_RECEIVE.release()
        log.info("receiver_stopped", **self.counters())

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every record received so far is committed to the database."""
        writer = self._writer
        if writer is None or not writer.is_alive():
            return
        done = threading.Event()
        writer.records.put(Flush(done))
        if not done.wait(timeout):
            raise ReceiverError(f"receiver records not committed within {timeout:g} s")

    wait_idle = flush

    def reconcile(self) -> int:
        """Record spool files that have no Instance row (crash between rename and commit); return how many."""
        return reconcile_spool(self._factory, self._spool)

    # -- event handlers (pynetdicom threads; never raise) -------------------------------------------

    def _put(self, record: Record) -> None:
        writer = self._writer
        if writer is not None:
            writer.records.put(record)

    def _state(self, event: DicomEvent) -> _AssociationState | None:
        with self._lock:
            return self._associations.get(id(event.assoc))

    def _on_connection_opened(self, event: DicomEvent) -> None:
        try:
            make_event_driven(event.assoc)
        except Exception:  # noqa: BLE001 - the association still works, polling as pynetdicom does
            log.exception("receiver_event_driven_setup_failed")

    def _on_requested(self, event: DicomEvent) -> None:
        """Admit at most node.max_associations associations at once, exactly.

        pynetdicom's own limit counts every acceptor thread still alive, including ones it has just
        rejected and that are still winding down, and two requests negotiating at the same moment both
        count each other: a burst of 50 against a limit of 10 could then admit only 9. Here requests are
        admitted one at a time under a lock, and only associations admitted here and still running
        count. The excess gets what pynetdicom sends: A-ASSOCIATE-RJ rejected-transient, service
        provider (presentation), local limit exceeded.
        """
        assoc = event.assoc
        try:
            if self._admission.admit(assoc):
                return
            assoc.acse.send_reject(0x02, 0x03, 0x02)
            evt.trigger(assoc, evt.EVT_REJECTED, {})
            assoc.kill()
        except Exception:  # noqa: BLE001 - never raise into pynetdicom; its own limit still applies
            log.exception("receiver_admission_failed")

    def _on_established(self, event: DicomEvent) -> None:
        try:
            requestor = event.assoc.requestor
            state = _AssociationState(
                association_id=f"{uuid.uuid4().hex}-{next(self._sequence)}"[:64],
                calling_ae_title=str(requestor.ae_title).strip(),
            )
            with self._lock:
                self._associations[id(event.assoc)] = state
                self._counters["associations"] += 1
            self._put(AssociationOpened(state.association_id, state.calling_ae_title, f"{requestor.address}:{requestor.port}", _now()))
        except Exception:  # noqa: BLE001 - a handler must never raise into pynetdicom
            log.exception("receiver_established_handler_failed")

    def _on_closed(self, event: DicomEvent, reason: str) -> None:
        try:
            self._record_close(id(event.assoc), None, reason, _now())
        except Exception:  # noqa: BLE001
            log.exception("receiver_close_handler_failed")

    def _on_connection_closed(self, event: DicomEvent) -> None:
        """The connection of an established association closed: if neither EVT_RELEASED nor EVT_ABORTED
        records the end within `_CLOSE_GRACE_SECONDS`, record it as aborted.

        The DUL thread closes the socket right after sending an A-RELEASE-RP, which can be before the
        association thread has announced the release: deciding here at once would call a clean release
        an abort.
        """
        try:
            self._admission.release(event.assoc)
            key = id(event.assoc)
            with self._lock:
                state = self._associations.get(key)
            if state is None:
                return
            timer = threading.Timer(_CLOSE_GRACE_SECONDS, self._record_close, args=(key, state, "aborted", _now()))
            timer.daemon = True
            timer.start()
        except Exception:  # noqa: BLE001
            log.exception("receiver_close_handler_failed")

    def _record_close(self, key: int, expected: _AssociationState | None, reason: str, at: datetime) -> None:
        """Record the end of association ``key`` once (``expected``: only if it is still that state)."""
        try:
            with self._lock:
                state = self._associations.get(key)
                if state is None or (expected is not None and state is not expected):
                    return
                del self._associations[key]
            self._put(
                AssociationClosed(
                    state.association_id, reason, at, state.stored, state.duplicates, state.ignored, state.rejected
                )
            )
        except Exception:  # noqa: BLE001 - runs in pynetdicom's and timer threads
            log.exception("receiver_close_handler_failed")

    def _on_rejected(self, event: DicomEvent) -> None:
        try:
            requestor = event.assoc.requestor
            calling = str(requestor.ae_title).strip()
            log.warning("association_rejected", calling_ae_title=calling, peer_address=requestor.address)
            self._put(AssociationRejected(calling, f"{requestor.address}:{requestor.port}", _now()))
        except Exception:  # noqa: BLE001
            log.exception("receiver_rejected_handler_failed")

    def _on_c_store(self, event: DicomEvent) -> int:
        state = self._state(event)
        try:
            status, kind = self._store(event, state)
        except Exception as exc:  # noqa: BLE001 - boundary: answer with a status, keep the node running
            log.exception("receiver_store_failed", error=str(exc))
            status, kind = STATUS_CANNOT_UNDERSTAND, "rejected"
        with self._lock:
            key = {"stored": "stored", "duplicate": "duplicates", "ignored": "ignored", "rejected": "rejected"}[kind]
            self._counters[key] += 1
            if state is not None:
                setattr(state, key, getattr(state, key) + 1)
        return status

    def _protect(self, header: pydicom.Dataset) -> None:
        """Hand the patient's name, ID and birth date to the log mask, once per patient seen recently."""
        key = "\\".join(str(header.get(k, "")) for k in ("PatientName", "PatientID", "PatientBirthDate"))
        with self._lock:
            if key in self._protected:
                return
            self._protected[key] = None
            while len(self._protected) > _PROTECTED_MAX:
                self._protected.pop(next(iter(self._protected)))
        protect_patient_values(header)

    def _refuse(self, status: int, reason: str, request: _StoreRequest) -> tuple[int, str]:
        reason = PATIENT_VALUES.mask(reason)  # a UID field abused for a patient name must not leak
        log.warning(
            "instance_rejected", status=f"0x{status:04X}", reason=reason,
            series_instance_uid=request.series_instance_uid[:64],
        )
        self._put(
            InstanceNotStored(
                "instance_rejected", request.sop_instance_uid[:64], request.sop_class_uid[:64],
                request.series_instance_uid[:64], request.association_id, status, reason, _now(),
            )
        )
        return status, "rejected"

    def _store(self, event: DicomEvent, state: _AssociationState | None) -> tuple[int, str]:
        primitive = cast(C_STORE, event.request)
        sop_class = str(primitive.AffectedSOPClassUID or "")
        sop_uid = str(primitive.AffectedSOPInstanceUID or "")
        transfer_syntax = str(event.context.transfer_syntax)
        association_id = state.association_id if state else None
        if sop_class not in ANALYSED_SOP_CLASSES:
            name = pydicom.uid.UID(sop_class).name if sop_class else "(none)"
            self._put(
                InstanceNotStored(
                    "instance_ignored", sop_uid[:64], sop_class[:64], "", association_id, STATUS_SUCCESS,
                    f"SOP class {name} is not analysed", _now(),
                )
            )
            return STATUS_SUCCESS, "ignored"
        common = _StoreRequest(sop_uid, sop_class, "", association_id)
        if not self._spool.has_space():
            return self._refuse(STATUS_OUT_OF_RESOURCES, "spool free space is below node.min_free_disk_mb", common)

        try:
            source: Path | None = event.dataset_path
        except AttributeError:
            source = None
        try:
            header = read_header(source if source is not None else event.encoded_dataset())
        except Exception as exc:  # noqa: BLE001 - any parse failure means "cannot understand"
            return self._refuse(STATUS_CANNOT_UNDERSTAND, f"dataset cannot be read ({type(exc).__name__}: {str(exc)[:120]})", common)

        self._protect(header)  # before any value is converted: pydicom may log values it finds invalid
        uids: dict[str, str] = {}
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            value = header.get(keyword)
            if value in (None, ""):
                return self._refuse(STATUS_DATASET_DOES_NOT_MATCH, f"dataset has no {keyword}", common)
            try:
                uids[keyword] = validate_uid(str(value))
            except InvalidUIDError as exc:
                return self._refuse(STATUS_DATASET_DOES_NOT_MATCH, f"{keyword}: {exc}", common)
        common = dataclasses.replace(common, series_instance_uid=uids["SeriesInstanceUID"])
        if uids["SOPInstanceUID"] != sop_uid.rstrip("\x00"):
            return self._refuse(
                STATUS_DATASET_DOES_NOT_MATCH, "SOPInstanceUID of the dataset differs from the request", common
            )
        try:
            path = self._spool.instance_path(uids["StudyInstanceUID"], uids["SeriesInstanceUID"], uids["SOPInstanceUID"])
        except InvalidUIDError as exc:
            return self._refuse(STATUS_DATASET_DOES_NOT_MATCH, str(exc), common)

        with self._lock:
            duplicate = path in self._in_flight or path.exists()
            if not duplicate:
                self._in_flight.add(path)
        if duplicate:
            self._put(
                InstanceNotStored(
                    "duplicate_instance", uids["SOPInstanceUID"], sop_class, uids["SeriesInstanceUID"], association_id,
                    STATUS_SUCCESS, "SOP Instance UID already stored", _now(),
                )
            )
            return STATUS_SUCCESS, "duplicate"
        try:
            if source is not None:
                size = self._spool.move_into_place(Path(source), path)
            else:
                size = self._spool.write_bytes(path, event.encoded_dataset())
        except StorageError as exc:
            return self._refuse(STATUS_OUT_OF_RESOURCES, str(exc), common)
        finally:
            with self._lock:
                self._in_flight.discard(path)
        self._put(
            ReceivedInstance(
                study_instance_uid=uids["StudyInstanceUID"],
                series_instance_uid=uids["SeriesInstanceUID"],
                sop_instance_uid=uids["SOPInstanceUID"],
                sop_class_uid=sop_class,
                transfer_syntax_uid=transfer_syntax,
                path=self._spool.relative(path),
                size_bytes=size,
                received_at=_now(),
                association_id=association_id,
                calling_ae_title=state.calling_ae_title if state else "",
                modality=str(header.get("Modality", "")),
                series_description=str(header.get("SeriesDescription", "")),
                accession_number=str(header.get("AccessionNumber", "")),
            )
        )
        return STATUS_SUCCESS, "stored"


__all__ = [
    "ANALYSED_SOP_CLASSES",
    "LISTEN_BACKLOG",
    "Receiver",
    "ReceiverError",
]
