"""What one incoming association may cost the node, and how a peer that exceeds it is refused.

pynetdicom trusts its peer: it reads a PDU of whatever length the 6-byte header declares, writes a
dataset of any size to a temporary file in the system temp folder (left there when the peer aborts),
inflates a deflated dataset without bound, answers a garbage command set or a C-FIND on a storage
context with a traceback. `guard_association` (called for each incoming connection, before its threads
start) bounds each of these for one association:

- every read and write on the connection waits at most ``node.idle_association_seconds`` (a peer that
  stops in the middle of a PDU does not hold a thread and an association slot);
- PDUs are read in pieces into a buffer no larger than the cap for their type: a P-DATA-TF may be as long
  as the maximum PDU size the node announced (``node.maximum_pdu_size``, or `UNANNOUNCED_PDU_CAP` when that
  is 0, "unlimited"), anything else `NEGOTIATION_PDU_CAP`. A longer declared length is answered with an
  A-ABORT (service provider, invalid PDU parameter value) before a byte of its body is read;
- the dataset of a C-STORE is written into the spool's ``tmp/`` (never the system temp folder) and stops
  being written once it exceeds ``node.max_instance_bytes``: the request is then answered with 0xA700 by
  the C-STORE handler (`oversized`), and the partial file of an association that ends mid-dataset is
  removed (`discard_partial_dataset`);
- a P-DATA-TF that cannot be decoded as a DIMSE message aborts the association with one warning line;
- DIMSE requests other than C-STORE and C-ECHO (C-FIND, C-GET, C-MOVE, N-...) get a failure status, a
  C-CANCEL is ignored: one warning line each, no traceback.

`inflate_bounded` inflates a Deflated Explicit VR Little Endian file into an Explicit VR Little Endian
file, stopping at a size limit.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynetdicom.dimse_messages
import pynetdicom.transport
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dimse_primitives import C_CANCEL, C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import split_dataset

from pacs_agent.logs import get_logger, quiet_library_lines_in_this_thread

log = get_logger(__name__)

#: Longest A-ASSOCIATE-RQ/AC/RJ, A-RELEASE or A-ABORT PDU accepted (a request with 128 presentation
#: contexts of 20 transfer syntaxes each is about 70 kB).
NEGOTIATION_PDU_CAP = 1024 * 1024
#: Longest P-DATA-TF accepted when node.maximum_pdu_size is 0 (announced as "no limit").
UNANNOUNCED_PDU_CAP = 64 * 1024 * 1024
_P_DATA_TF = 0x04
_READ_PIECE = 1024 * 1024
#: A-ABORT reasons (PS3.8 9.3.8): invalid PDU parameter value.
ABORT_INVALID_PDU_PARAMETER = 0x06
#: DIMSE statuses for requests the node does not serve.
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_UNRECOGNIZED_OPERATION = 0x0211
_THREAD_TEMP_DIR = "_pe_agent_temp_dir"
_GUARDED = "_pe_agent_guard"


@dataclass(frozen=True)
class AssociationLimits:
    """The per-association bounds of `guard_association`.

    ``maximum_pdu_size``: what the node announces (0: no limit announced, `UNANNOUNCED_PDU_CAP` applies).
    ``max_instance_bytes``: largest dataset a C-STORE may carry (as received, and inflated).
    ``temp_dir``: where partial datasets are written (the spool's tmp/).
    ``idle_seconds``: longest a read or write on the connection may wait (node.idle_association_seconds).
    """

    maximum_pdu_size: int
    max_instance_bytes: int
    temp_dir: Path
    idle_seconds: float = 15.0

    @property
    def p_data_cap(self) -> int:
        return self.maximum_pdu_size if self.maximum_pdu_size > 0 else UNANNOUNCED_PDU_CAP


def pdu_cap(limits: AssociationLimits, pdu_type: int) -> int:
    """Longest PDU body of ``pdu_type`` this association reads."""
    return limits.p_data_cap if pdu_type == _P_DATA_TF else NEGOTIATION_PDU_CAP


def abort_bytes(source: int = 0x02, reason: int = ABORT_INVALID_PDU_PARAMETER) -> bytes:
    """An A-ABORT PDU (PS3.8 9.3.8)."""
    return struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, source, reason)


def _bounded_recv(transport: Any, limits: AssociationLimits, peer: str, reader: Any = None) -> Callable[[int], bytearray]:
    """``AssociationSocket.recv`` for pynetdicom's DUL, which asks for a 6-byte PDU header and then for
    the body's declared length: the body is read in pieces up to the cap of its PDU type; a longer
    declared length is aborted at once and returned as a short read (pynetdicom closes the connection).
    ``reader``: the association's DUL thread, whose pynetdicom log lines about that short read are dropped."""
    state = {"header": True, "pdu_type": 0}

    def read_into(view: memoryview, wanted: int) -> int:
        raw = transport.socket
        read = 0
        while read < wanted:
            count = raw.recv_into(view[read:], min(wanted - read, _READ_PIECE))
            if not count:
                break  # connection broken: return what was read, as pynetdicom does
            read += count
        return read

    def recv(nr_bytes: int) -> bytearray:
        raw = transport.socket
        if raw is not None and raw.gettimeout() is None:
            # A connection handed over by the receiver pool is blocking: a peer that stops in the middle
            # of a PDU header would hold this thread, and its association slot, forever.
            raw.settimeout(limits.idle_seconds)
        if state["header"] and nr_bytes == 6:
            buffer = bytearray(6)
            with memoryview(buffer) as view:
                read = read_into(view, 6)
            del buffer[read:]
            if read == 6:
                state["pdu_type"] = buffer[0]
                state["header"] = False
            return buffer
        state["header"] = True
        cap = pdu_cap(limits, int(state["pdu_type"]))
        if nr_bytes > cap:
            if reader is not None and threading.current_thread() is reader:
                quiet_library_lines_in_this_thread()  # pynetdicom's lines about the short read would repeat it
            log.warning(
                "pdu_too_large", peer=peer, pdu_type=f"0x{int(state['pdu_type']):02X}", declared_bytes=nr_bytes,
                limit_bytes=cap, action="A-ABORT",
            )
            _abort_and_drain(transport.socket)
            return bytearray()
        buffer = bytearray(nr_bytes)
        with memoryview(buffer) as view:
            read = read_into(view, nr_bytes)
        if read < nr_bytes:
            del buffer[read:]
        return buffer

    return recv


def _abort_and_drain(raw: Any) -> None:
    """Send an A-ABORT, then read and drop what the peer already sent (at most 1 MiB, 0.5 s): closing a
    socket with unread data resets the connection, and a reset can discard the A-ABORT at the peer."""
    with contextlib.suppress(OSError):
        raw.sendall(abort_bytes())
        raw.shutdown(socket.SHUT_WR)
        raw.settimeout(0.1)
        deadline = time.monotonic() + 0.5
        drained = 0
        while drained < _READ_PIECE and time.monotonic() < deadline:
            chunk = raw.recv(65536)
            if not chunk:
                break
            drained += len(chunk)


class _CappedDatasetFile:
    """Stands in for pynetdicom's temporary dataset file once the dataset passed the size limit: what
    arrives is counted and dropped, so the disk and memory cost stay bounded; the file keeps what came
    before (removed by the C-STORE handler, which answers 0xA700)."""

    def __init__(self, real: Any, written: int) -> None:
        self._real = real
        self.name = real.name
        self.written = written
        self.file = self

    def write(self, data: bytes) -> int:
        self.written += len(data)
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered."""

    def close(self) -> None:
        self._real.close()

    def __bool__(self) -> bool:
        return True


#: Temporary dataset paths whose dataset passed node.max_instance_bytes, with the bytes that arrived.
_OVERSIZED: dict[str, int] = {}
_OVERSIZED_LOCK = threading.Lock()


def oversized(path: Path | str | None) -> int | None:
    """Bytes received for a C-STORE whose dataset passed the size limit (None: within the limit)."""
    if path is None:
        return None
    with _OVERSIZED_LOCK:
        return _OVERSIZED.pop(str(path), None)


def _spool_temporary_file(*args: Any, **kwargs: Any) -> Any:
    """pynetdicom's NamedTemporaryFile, in the spool's tmp/ when the calling DUL thread belongs to a
    guarded association (elsewhere: unchanged)."""
    folder = getattr(threading.current_thread(), _THREAD_TEMP_DIR, None)
    if folder is not None and "dir" not in kwargs:
        kwargs["dir"] = str(folder)
        kwargs.setdefault("prefix", ".partial-")
    return tempfile.NamedTemporaryFile(*args, **kwargs)


def missing_guard_names() -> tuple[str, ...]:
    """The pynetdicom internals `guard_association` and `install_spool_temp_files` replace or read that the
    installed pynetdicom lacks (empty: all there). The receiver checks this at start-up and refuses to
    start without them: an association it cannot bound is one a hostile peer can use to exhaust it."""
    from pynetdicom import AE
    from pynetdicom.association import Association

    missing: list[str] = []
    if not hasattr(pynetdicom.dimse_messages, "NamedTemporaryFile"):
        missing.append("pynetdicom.dimse_messages.NamedTemporaryFile")
    for name in ("_serve_request",):
        if not callable(getattr(Association, name, None)):
            missing.append(f"Association.{name}")
    try:
        assoc = Association(AE(), "acceptor")
    except Exception as exc:  # noqa: BLE001 - a pynetdicom whose Association cannot be made here
        return (*missing, f"pynetdicom.association.Association ({type(exc).__name__}: {exc})")
    for owner_name, owner, names in (
        ("DULServiceProvider", getattr(assoc, "dul", None), ("socket", "event_queue")),
        ("DIMSEServiceProvider", getattr(assoc, "dimse", None), ("receive_primitive", "message", "cancel_req")),
    ):
        missing += [f"{owner_name}.{name}" for name in names if owner is None or not hasattr(owner, name)]
    if not callable(getattr(pynetdicom.transport.AssociationSocket, "recv", None)):
        missing.append("AssociationSocket.recv")
    return tuple(missing)


def install_spool_temp_files() -> None:
    """Route pynetdicom's temporary dataset files through `_spool_temporary_file` (idempotent)."""
    pynetdicom.dimse_messages.NamedTemporaryFile = _spool_temporary_file  # type: ignore[attr-defined]


def _respond_refused(assoc: Any, request: Any, context_id: int) -> None:
    """Answer a DIMSE request the node does not serve with a failure status (C-CANCEL: nothing)."""
    kind = type(request).__name__.replace("_", "-")
    if isinstance(request, C_CANCEL):
        log.warning("dimse_cancel_ignored", message_id=getattr(request, "MessageIDBeingRespondedTo", None))
        return
    response = type(request)()
    status = STATUS_SOP_CLASS_NOT_SUPPORTED if isinstance(request, C_FIND | C_GET | C_MOVE) else STATUS_UNRECOGNIZED_OPERATION
    log.warning("dimse_request_refused", request=kind, status=f"0x{status:04X}",
                sop_class_uid=str(getattr(request, "AffectedSOPClassUID", "") or "")[:64])
    try:
        response.MessageIDBeingRespondedTo = request.MessageID
        if getattr(request, "AffectedSOPClassUID", None):
            response.AffectedSOPClassUID = request.AffectedSOPClassUID
        response.Status = status
        assoc.dimse.send_msg(response, context_id)
    except Exception as exc:  # noqa: BLE001 - an unanswerable request: end the association instead
        log.warning("dimse_request_unanswerable", request=kind, error=f"{type(exc).__name__}: {exc}"[:200])
        assoc.abort()


def guard_association(assoc: Any, limits: AssociationLimits) -> None:
    """Bound one not-yet-started incoming pynetdicom association (see the module docstring).

    Call after `pacs_agent.dicom.pynetdicom_patches.make_event_driven` (this replaces the socket read it
    installs with a bounded one that reads as few pieces).
    """
    dul = assoc.dul
    dimse = assoc.dimse
    transport = dul.socket
    peer = ""
    if transport is not None and transport.socket is not None:
        with contextlib.suppress(OSError):
            host, port = transport.socket.getpeername()[:2]
            peer = f"{host}:{port}"
        transport.recv = _bounded_recv(transport, limits, peer, reader=dul)
    setattr(dul, _THREAD_TEMP_DIR, limits.temp_dir)
    install_spool_temp_files()
    receive = dimse.receive_primitive

    def receive_bounded(primitive: Any) -> None:
        try:
            receive(primitive)
        except Exception as exc:  # noqa: BLE001 - a command set that is not DICOM: abort with one line
            log.warning("dimse_message_undecodable", peer=peer, error=f"{type(exc).__name__}: {exc}"[:200], action="A-ABORT")
            dimse.message = None
            dul.event_queue.put("Evt19")  # invalid PDU: the state machine answers A-ABORT
            return
        if dimse.cancel_req:
            # A C-CANCEL has no response (PS3.7 9.3.2.3) and the node runs nothing it could cancel.
            log.warning("dimse_cancel_ignored", peer=peer, message_ids=sorted(dimse.cancel_req)[:10])
            dimse.cancel_req = {}
        message = dimse.message
        handle = getattr(message, "_data_set_file", None) if message is not None else None
        if handle is None or isinstance(handle, _CappedDatasetFile):
            return
        with contextlib.suppress(OSError, ValueError):
            written = handle.tell()
            if written > limits.max_instance_bytes:
                message._data_set_file = _CappedDatasetFile(handle, written)
                with _OVERSIZED_LOCK:
                    _OVERSIZED[str(handle.name)] = written
                handle.truncate(0)  # keep nothing of an instance that will be refused

    dimse.receive_primitive = receive_bounded
    serve = assoc._serve_request

    def serve_known(msg: Any, context_id: int) -> None:
        if isinstance(msg, C_STORE | C_ECHO) or not getattr(msg, "is_valid_request", False):
            serve(msg, context_id)
            return
        _respond_refused(assoc, msg, context_id)

    assoc._serve_request = serve_known
    setattr(assoc, _GUARDED, limits)


def discard_partial_dataset(assoc: Any) -> Path | None:
    """Remove the temporary file of a dataset still arriving when the association ended (aborted or
    closed mid-dataset); returns its path, or None when there was none."""
    message: Any = getattr(getattr(assoc, "dimse", None), "message", None)
    handle = getattr(message, "_data_set_file", None)
    if message is None or handle is None:
        return None
    path = Path(str(handle.name))
    with contextlib.suppress(OSError):
        handle.close()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with _OVERSIZED_LOCK:
        _OVERSIZED.pop(str(path), None)
    message._data_set_file = None
    return path


class InflateError(Exception):
    """A deflated dataset that cannot be inflated, or (``too_large``) inflates beyond the limit."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def inflate_bounded(source: Path, target_dir: Path, limit: int) -> Path:
    """Inflate a Deflated Explicit VR Little Endian Part 10 file into an Explicit VR Little Endian file in
    ``target_dir`` (same file meta, transfer syntax changed), never holding or writing more than ``limit``
    bytes of dataset. Raises InflateError (the partial output is removed)."""
    file_meta, offset = split_dataset(source)
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    fd, name = tempfile.mkstemp(prefix=".inflated-", suffix=".dcm", dir=target_dir)
    out_path = Path(name)
    written = 0
    too_large = f"the deflated dataset inflates to more than {limit} bytes (node.max_instance_bytes)"
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as raw:
            out.write(b"\x00" * 128 + b"DICM")
            write_file_meta_info(out, file_meta, enforce_standard=False)  # type: ignore[arg-type]
            raw.seek(offset)
            while chunk := raw.read(_READ_PIECE):
                pending = chunk
                while pending:
                    data = inflater.decompress(pending, _READ_PIECE)  # at most one piece of output per call
                    written += len(data)
                    if written > limit:
                        raise InflateError(too_large, too_large=True)
                    out.write(data)
                    if not data and inflater.unconsumed_tail == pending:
                        break
                    pending = inflater.unconsumed_tail
            tail = inflater.flush()
            written += len(tail)
            if written > limit:
                raise InflateError(too_large, too_large=True)
            out.write(tail)
    except zlib.error as exc:
        out_path.unlink(missing_ok=True)
        raise InflateError(f"error: {exc}") from None
    except BaseException:
        out_path.unlink(missing_ok=True)
        raise
    return out_path
