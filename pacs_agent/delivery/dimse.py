"""The DIMSE transport: C-STORE SCU for produced objects and C-ECHO, the node's one C-ECHO implementation.

DICOM statuses are recorded as answered: success and warnings (0xB000 range) deliver; failures and
refusals come back retryable (a PACS that refuses while it is misconfigured may accept later); no answer
(connection refused, timeout, abort) records no status and is retryable. Only a file that is missing
or unreadable is permanent. One `DimseTarget.send` call opens one association for all its objects.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, UID
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import code_to_category

from pacs_agent.delivery.target import EchoOutcome, ObjectOutcome
from pacs_agent.dicom.pynetdicom_patches import hold_requestor_reactor
from pacs_agent.dicom.tls import client_ssl_context
from pacs_agent.logs import get_logger
from pacs_agent.settings import DestinationSettings, Settings, TLSSettings

log = get_logger(__name__)

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


def calling_ae_title_of(settings: Settings) -> str:
    """The AE title this node calls destinations with."""
    return settings.dispatch.calling_ae_title or settings.node.ae_title


def _no_association_reason(assoc: Association) -> str:
    """Why an association did not come up (pynetdicom reports a refused connection as an abort)."""
    if assoc.is_rejected:
        return "association rejected by the peer"
    return "no association (connection refused, timed out or aborted)"


def echo(
    destination: DestinationSettings,
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
            tls_args = (client_ssl_context(tls), destination.host)
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


def no_delay(assoc: Association) -> None:
    """Turn Nagle off on the association's socket: otherwise each C-STORE stalls ~40 ms on a delayed ACK."""
    transport = assoc.dul.socket
    raw = transport.socket if transport is not None else None
    if raw is None:
        return
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        log.warning("tcp_nodelay_not_set", error=str(exc))


def _status_outcome(path: Path, sop_instance_uid: str, status: Dataset) -> ObjectOutcome:
    if "Status" not in status:
        return ObjectOutcome(path, sop_instance_uid, False, None, "no C-STORE response (timeout or association aborted)", True)
    code = int(status.Status)
    category = code_to_category(code)
    if category in ("Success", "Warning"):
        return ObjectOutcome(path, sop_instance_uid, True, code, "", False)
    comment = str(status.get("ErrorComment", "") or "")
    reason = f"C-STORE {category.lower()} 0x{code:04X}" + (f": {comment}" if comment else "")
    return ObjectOutcome(path, sop_instance_uid, False, code, reason, True)


@dataclass(frozen=True)
class _Ready:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


class DimseTarget:
    """A destination reached with C-STORE (objects) and C-ECHO (test) over one association per call."""

    def __init__(
        self,
        destination: DestinationSettings,
        *,
        calling_ae_title: str,
        acse_timeout: float,
        dimse_timeout: float,
        network_timeout: float,
        maximum_pdu_size: int,
        tls: TLSSettings | None,
    ) -> None:
        self.name = destination.name
        self._destination = destination
        self._calling_ae_title = calling_ae_title
        self._acse_timeout = acse_timeout
        self._dimse_timeout = dimse_timeout
        self._network_timeout = network_timeout
        self._maximum_pdu_size = maximum_pdu_size
        self._tls = tls

    @classmethod
    def from_settings(cls, destination: DestinationSettings, settings: Settings) -> DimseTarget:
        node = settings.node
        return cls(
            destination,
            calling_ae_title=calling_ae_title_of(settings),
            acse_timeout=node.acse_timeout,
            dimse_timeout=node.dimse_timeout,
            network_timeout=node.network_timeout,
            maximum_pdu_size=node.maximum_pdu_size,
            tls=node.tls,
        )

    def echo(self) -> EchoOutcome:
        result = echo(self._destination, calling_ae_title=self._calling_ae_title, timeout=self._acse_timeout, tls=self._tls)
        return EchoOutcome(ok=result.ok, detail=result.message)

    def send(self, paths: Sequence[Path]) -> list[ObjectOutcome]:
        outcomes: dict[int, ObjectOutcome] = {}
        ready: list[tuple[int, _Ready]] = []
        for index, path in enumerate(paths):
            try:
                meta = read_file_meta_info(path)
                ready.append((index, _Ready(
                    path, str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID), str(meta.TransferSyntaxUID)
                )))
            except FileNotFoundError:
                outcomes[index] = ObjectOutcome(path, "", False, None, f"output file {path} is missing", False)
            except (InvalidDicomError, OSError, AttributeError) as exc:
                outcomes[index] = ObjectOutcome(path, "", False, None, f"output file {path} cannot be read: {exc}", False)
        if ready:
            outcomes.update(self._send_ready(ready))
        return [outcomes[index] for index in range(len(paths))]

    def _send_ready(self, ready: Sequence[tuple[int, _Ready]]) -> dict[int, ObjectOutcome]:
        destination = self._destination

        def all_failed(reason: str) -> dict[int, ObjectOutcome]:
            return {i: ObjectOutcome(r.path, r.sop_instance_uid, False, None, reason, True) for i, r in ready}

        ae = AE(ae_title=self._calling_ae_title)
        ae.acse_timeout = self._acse_timeout
        ae.dimse_timeout = self._dimse_timeout
        ae.network_timeout = self._network_timeout
        tls_args = None
        if destination.tls:
            if self._tls is None:
                return all_failed(f"{destination.name} needs TLS but no TLS settings were given")
            try:
                tls_args = (client_ssl_context(self._tls), destination.host)
            except (OSError, ssl.SSLError) as exc:
                return all_failed(f"TLS set-up failed: {exc}")
        contexts = _contexts([(r.sop_class_uid, r.transfer_syntax_uid) for _, r in ready])
        try:
            assoc = ae.associate(
                destination.host,
                destination.port,
                contexts=contexts,
                ae_title=destination.ae_title,
                max_pdu=self._maximum_pdu_size,
                tls_args=tls_args,
            )
        except (OSError, ValueError, RuntimeError) as exc:
            return all_failed(f"cannot associate with {destination.name}: {exc}")
        if not assoc.is_established:
            return all_failed(f"{destination.name} at {destination.host}:{destination.port}: {_no_association_reason(assoc)}")
        no_delay(assoc)
        outcomes: dict[int, ObjectOutcome] = {}
        try:
            for index, item in ready:
                if not assoc.is_established:
                    outcomes[index] = ObjectOutcome(item.path, item.sop_instance_uid, False, None, "association ended before the object was sent", True)
                    continue
                try:
                    hold_requestor_reactor(assoc)  # a pynetdicom race that can steal the response, see there
                    status = assoc.send_c_store(item.path)
                except ValueError as exc:  # no accepted presentation context for this SOP class / transfer syntax
                    outcomes[index] = ObjectOutcome(
                        item.path, item.sop_instance_uid, False, None, f"{destination.name} did not accept the object: {exc}", True
                    )
                    continue
                except (OSError, RuntimeError, InvalidDicomError) as exc:
                    outcomes[index] = ObjectOutcome(item.path, item.sop_instance_uid, False, None, f"C-STORE failed: {exc}", True)
                    continue
                outcomes[index] = _status_outcome(item.path, item.sop_instance_uid, status)
        finally:
            if assoc.is_established:
                assoc.release()
        return outcomes


__all__ = ["DimseTarget", "EchoResult", "calling_ae_title_of", "echo", "no_delay"]
