"""A stand-in PACS: a pynetdicom storage SCP on 127.0.0.1 that records what it receives.

Used by dispatcher tests, the end-to-end test and Orthanc-free integration tests. It keeps one
port for its whole life, so a test can configure a destination first and then bring the PACS up
or down (``start`` / ``stop``) to simulate an outage; ``status`` makes it answer every C-STORE
with a given status (a refusal such as 0xA700, or a warning such as 0xB000).

    with PacsSCP(ae_title="PACS") as pacs:
        ...                              # send to 127.0.0.1:pacs.port
        pacs.wait_for(4, timeout=10)
        pacs.received[0].SOPInstanceUID
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from pacs_agent.demo.pacs import free_port

SUCCESS = 0x0000


@dataclass(frozen=True)
class StoreRecord:
    """One C-STORE request as the SCP saw it, with the status it answered."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    calling_ae_title: str
    status: int


class PacsSCP:
    """Storage + Verification SCP on loopback with a fixed port; see the module docstring."""

    def __init__(
        self,
        *,
        ae_title: str = "PACS",
        port: int | None = None,
        store_dir: Path | None = None,
        status: int = SUCCESS,
        sop_classes: Sequence[str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.ae_title = ae_title
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port()
        self.store_dir = store_dir
        #: Status answered to every C-STORE; change it at any time.
        self.status = status
        self._sop_classes = list(sop_classes) if sop_classes is not None else None
        #: Server-side TLS (see tests.support.tls.LoopbackPKI.server_context); None: plain TCP.
        self.ssl_context = ssl_context
        self._lock = threading.Condition()
        self._server: ThreadedAssociationServer | None = None
        #: Datasets stored with a success or warning status, in arrival order.
        self.received: list[Dataset] = []
        #: Every C-STORE request, stored or refused.
        self.requests: list[StoreRecord] = []
        #: Calling AE title of each association that was accepted.
        self.associations: list[str] = []
        self.echoes = 0

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> PacsSCP:
        if self._server is not None:
            return self
        ae = AE(ae_title=self.ae_title)
        if self._sop_classes is None:
            for context in AllStoragePresentationContexts:
                ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        else:
            for uid in self._sop_classes:
                ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.maximum_associations = 10
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ACCEPTED, self._on_accepted),
        ]
        self._server = ae.start_server(
            (self.host, self.port), block=False, evt_handlers=handlers, ssl_context=self.ssl_context
        )
        return self

    def stop(self) -> None:
        """Shut the listener down (an outage); ``start`` brings it back on the same port."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()

    @property
    def running(self) -> bool:
        return self._server is not None

    def __enter__(self) -> PacsSCP:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- waiting --------------------------------------------------------------------------
    def wait_for(self, count: int, timeout: float = 10.0) -> list[Dataset]:
        """Block until at least ``count`` datasets were stored; raises TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.received) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"PACS got {len(self.received)} of {count} objects within {timeout} s")
                self._lock.wait(left)
            return list(self.received)

    @property
    def received_uids(self) -> list[str]:
        with self._lock:
            return [str(ds.SOPInstanceUID) for ds in self.received]

    # -- handlers (never raise: return a status) ---------------------------------------------
    def _on_accepted(self, event: Any) -> None:
        with self._lock:
            self.associations.append(str(event.assoc.requestor.ae_title))

    def _on_echo(self, event: Any) -> int:
        with self._lock:
            self.echoes += 1
        return SUCCESS

    def _on_store(self, event: Any) -> int:
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
        except Exception:  # a dataset pydicom cannot decode: "cannot understand"
            return 0xC210
        status = self.status
        record = StoreRecord(
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            transfer_syntax_uid=str(event.context.transfer_syntax),
            calling_ae_title=str(event.assoc.requestor.ae_title),
            status=status,
        )
        stored = status == SUCCESS or 0xB000 <= status <= 0xBFFF
        if stored and self.store_dir is not None:
            try:
                self.store_dir.mkdir(parents=True, exist_ok=True)
                ds.save_as(self.store_dir / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            except OSError:
                return 0xA700
        with self._lock:
            self.requests.append(record)
            if stored:
                self.received.append(ds)
            self._lock.notify_all()
        return status
