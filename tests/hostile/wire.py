"""A DICOM Upper Layer peer written byte by byte (PS3.8 section 9.3), for hostile tests.

pynetdicom refuses to send what a hostile or broken modality sends: a PDU header that declares 4 GB, garbage
before the A-ASSOCIATE-RQ, a P-DATA-TF whose command set is noise, a C-FIND on a storage context, an
A-ABORT between two fragments of a dataset. `RawPeer` sends exactly the bytes it is given over a plain
TCP socket and reads back whole PDUs (type, body), so a test can check the node's answer to the byte:
A-ASSOCIATE-RJ result/source/reason, A-ABORT source/reason, a DIMSE status.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dsutils import encode

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = b"1.2.826.0.1.3680043.9.9999.17"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF = 0x01, 0x02, 0x03, 0x04
A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x05, 0x06, 0x07

C_STORE_RQ, C_FIND_RQ, C_GET_RQ, C_MOVE_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0001, 0x0020, 0x0010, 0x0021, 0x0030, 0x0FFF


def _ae(title: str) -> bytes:
    return title.encode("ascii")[:16].ljust(16, b" ")


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def associate_rq(
    called: str,
    calling: str,
    contexts: Sequence[tuple[int, str, Sequence[str]]] = ((1, CT_IMAGE_STORAGE, (ExplicitVRLittleEndian,)),),
    *,
    max_pdu: int = 16384,
) -> bytes:
    """A-ASSOCIATE-RQ: ``contexts`` as (context ID, abstract syntax, transfer syntaxes)."""
    body = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + b"\x00" * 32
    body += _item(0x10, APPLICATION_CONTEXT)
    for context_id, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, str(ts).encode()) for ts in syntaxes)
        body += _item(0x20, struct.pack(">BBBB", context_id, 0, 0, 0) + sub)
    user = _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, IMPLEMENTATION_CLASS_UID)
    body += _item(0x50, user)
    return pdu(A_ASSOCIATE_RQ, body)


def p_data(context_id: int, fragments: Iterable[tuple[bool, bool, bytes]]) -> bytes:
    """P-DATA-TF with one PDV per fragment (is_command, is_last, bytes)."""
    body = b""
    for is_command, is_last, data in fragments:
        header = (1 if is_command else 0) | (2 if is_last else 0)
        body += struct.pack(">LBB", len(data) + 2, context_id, header) + data
    return pdu(P_DATA_TF, body)


def release_rq() -> bytes:
    return pdu(A_RELEASE_RQ, b"\x00" * 4)


def abort_pdu(source: int = 0, reason: int = 0) -> bytes:
    return pdu(A_ABORT, struct.pack(">BBBB", 0, 0, source, reason))


def encode_dataset(ds: Dataset, *, implicit: bool) -> bytes:
    """``ds`` encoded as a DIMSE message carries it (no preamble, no file meta)."""
    encoded = encode(ds, implicit, True)
    assert encoded is not None, "pydicom cannot encode the dataset"
    return bytes(encoded)


def command(
    command_field: int,
    *,
    sop_class: str = CT_IMAGE_STORAGE,
    sop_instance: str | None = None,
    message_id: int = 1,
    has_dataset: bool = True,
) -> bytes:
    """A DIMSE command set, Implicit VR Little Endian, with its group length."""
    ds = Dataset()
    if command_field == C_CANCEL_RQ:
        ds.MessageIDBeingRespondedTo = message_id
    else:
        ds.AffectedSOPClassUID = sop_class
        ds.MessageID = message_id
    ds.CommandField = command_field
    ds.CommandDataSetType = 0x0000 if has_dataset else 0x0101
    if command_field in (C_STORE_RQ, C_FIND_RQ, C_GET_RQ, C_MOVE_RQ):
        ds.Priority = 0
    if command_field == C_MOVE_RQ:
        ds.MoveDestination = "ELSEWHERE"
    if sop_instance is not None:
        ds.AffectedSOPInstanceUID = sop_instance
    body = encode_dataset(ds, implicit=True)
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


@dataclass(frozen=True)
class Answer:
    """A PDU the node sent: its type and body (None type: the node closed the connection)."""

    pdu_type: int | None
    body: bytes = b""

    @property
    def reject(self) -> tuple[int, int, int]:
        """A-ASSOCIATE-RJ (result, source, reason)."""
        assert self.pdu_type == A_ASSOCIATE_RJ, self
        return self.body[1], self.body[2], self.body[3]

    @property
    def abort(self) -> tuple[int, int]:
        """A-ABORT (source, reason)."""
        assert self.pdu_type == A_ABORT, self
        return self.body[2], self.body[3]

    def accepted_contexts(self) -> dict[int, int]:
        """A-ASSOCIATE-AC: context ID -> result (0 acceptance)."""
        assert self.pdu_type == A_ASSOCIATE_AC, self
        out: dict[int, int] = {}
        offset = 68
        while offset + 4 <= len(self.body):
            item_type, _, length = struct.unpack(">BBH", self.body[offset : offset + 4])
            if item_type == 0x21:
                out[self.body[offset + 4]] = self.body[offset + 6]
            offset += 4 + length
        return out

    def dimse_status(self) -> int | None:
        """The Status (0000,0900) of the command set in a P-DATA-TF, if it holds one whole."""
        if self.pdu_type != P_DATA_TF:
            return None
        offset, data = 0, b""
        while offset + 6 <= len(self.body):
            length, _context, header = struct.unpack(">LBB", self.body[offset : offset + 6])
            if header & 1:
                data += self.body[offset + 6 : offset + 4 + length]
            offset += 4 + length
        index = data.find(struct.pack("<HHL", 0x0000, 0x0900, 2))
        return None if index < 0 else int(struct.unpack("<H", data[index + 8 : index + 10])[0])


class RawPeer:
    """One TCP connection to the node; sends raw bytes and reads PDUs."""

    def __init__(self, port: int, *, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> bool:
        """Send; False when the node has already closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def _exactly(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            try:
                chunk = self.sock.recv(n - len(data))
            except (TimeoutError, socket.timeout):
                raise
            except OSError:
                return None
            if not chunk:
                return None
            data += chunk
        return data

    def read(self, timeout: float = 10.0) -> Answer:
        """The next PDU, or Answer(None) when the node closed the connection. TimeoutError if silent."""
        self.sock.settimeout(timeout)
        header = self._exactly(6)
        if header is None:
            return Answer(None)
        pdu_type, _, length = struct.unpack(">BBL", header)
        body = self._exactly(length) if length else b""
        return Answer(pdu_type, body or b"")

    def read_until_closed(self, timeout: float = 10.0) -> list[Answer]:
        """Every PDU until the node closes the connection (at most ``timeout`` seconds)."""
        answers: list[Answer] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                answer = self.read(max(0.05, deadline - time.monotonic()))
            except (TimeoutError, socket.timeout):
                break
            answers.append(answer)
            if answer.pdu_type is None:
                break
        return answers

    def closed_within(self, timeout: float) -> bool:
        """True when the node closes the connection (possibly after PDUs) within ``timeout`` seconds."""
        answers = self.read_until_closed(timeout)
        return bool(answers) and answers[-1].pdu_type is None

    def associate(
        self,
        called: str,
        calling: str,
        contexts: Sequence[tuple[int, str, Sequence[str]]] = ((1, CT_IMAGE_STORAGE, (ExplicitVRLittleEndian,)),),
    ) -> Answer:
        self.send(associate_rq(called, calling, contexts))
        return self.read()

    def c_store(
        self, context_id: int, ds: Dataset, *, message_id: int = 1, split: int = 4096, stop_after: int | None = None
    ) -> Answer | None:
        """Send a C-STORE-RQ and ``ds`` (Explicit VR Little Endian) in fragments of ``split`` bytes;
        ``stop_after`` fragments: send only those (the dataset stays incomplete) and return None."""
        self.send(p_data(context_id, [(True, True, command(C_STORE_RQ, sop_instance=str(ds.SOPInstanceUID), message_id=message_id))]))
        data = encode_dataset(ds, implicit=False)
        pieces = [data[i : i + split] for i in range(0, len(data), split)] or [b""]
        for index, piece in enumerate(pieces):
            if stop_after is not None and index >= stop_after:
                return None
            self.send(p_data(context_id, [(False, index == len(pieces) - 1, piece)]))
        return self.read(30.0)
