"""The demo's embedded PACS: Orthanc when its binary is installed, otherwise a pynetdicom storage SCP run here."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import pydicom
from pynetdicom import AE, evt
from pynetdicom.events import Event as NetworkEvent
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs_agent.demo.processes import stop_process_group
from pacs_agent.errors import AgentError


class DemoError(AgentError):
    """The demo could not finish (agent or PACS would not start, a series timed out)."""


@dataclass(frozen=True)
class PacsObject:
    """One object the PACS holds; ``locator`` is an Orthanc instance id or a file path."""

    sop_instance_uid: str
    locator: str


class EmbeddedPACS(Protocol):
    ae_title: str
    port: int
    name: str
    log_path: Path

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def study_objects(self, study_instance_uid: str) -> dict[str, PacsObject]: ...

    def read(self, item: PacsObject) -> pydicom.Dataset: ...


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def orthanc_binary() -> str | None:
    found = shutil.which("Orthanc")
    if found:
        return found
    return "/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None


class StorageSCP:
    """A pynetdicom storage SCP standing in for PACS: every instance lands in ``<root>/<study>/<sop>.dcm``."""

    name = "pynetdicom storage SCP"

    def __init__(self, root: Path, log_path: Path, *, ae_title: str = "DEMO_PACS") -> None:
        self.root = root
        self.log_path = log_path
        self.ae_title = ae_title
        self.port = 0
        self._server: Any = None
        self._lock = threading.Lock()

    def _on_store(self, event: NetworkEvent) -> int:
        try:
            dataset = event.dataset
            study = str(dataset.StudyInstanceUID)
            sop = str(dataset.SOPInstanceUID)
            if not all(part.isdigit() for part in (study + "." + sop).split(".")):
                return 0xC210  # not a UID: never a path
            folder = self.root / study
            folder.mkdir(parents=True, exist_ok=True)
            temporary = folder / f".{sop}.part"
            temporary.write_bytes(event.encoded_dataset())
            temporary.replace(folder / f"{sop}.dcm")
            with self._lock, self.log_path.open("a") as log:
                log.write(f"{datetime.now(timezone.utc).isoformat()} stored {dataset.SOPClassUID} {sop}\n")
        except (OSError, AttributeError, ValueError) as exc:
            with self._lock, self.log_path.open("a") as log:
                log.write(f"{datetime.now(timezone.utc).isoformat()} refused: {exc}\n")
            return 0xA700
        return 0x0000

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def study_objects(self, study_instance_uid: str) -> dict[str, PacsObject]:
        folder = self.root / study_instance_uid
        if not folder.is_dir():
            return {}
        return {p.stem: PacsObject(p.stem, str(p)) for p in folder.glob("*.dcm")}

    def read(self, item: PacsObject) -> pydicom.Dataset:
        return pydicom.dcmread(item.locator)


class OrthancPACS:
    """The Debian ``Orthanc`` binary on loopback ports, with a config written in the work folder."""

    name = "Orthanc"

    def __init__(
        self, workdir: Path, log_path: Path, *, binary: str, agent_port: int, ae_title: str = "ORTHANC",
        agent_ae_title: str = "PE_AGENT",
    ) -> None:
        self.workdir = workdir
        self.agent_ae_title = agent_ae_title
        self.log_path = log_path
        self.binary = binary
        self.agent_port = agent_port
        self.ae_title = ae_title
        self.port = 0
        self.http_port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port, self.http_port = free_port(), free_port()
        config = {
            "Name": "PE-TRIAGE-DEMO-PACS",
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "UnknownSopClassAccepted": True,
            "StorageCompression": False,
            "StableAge": 1,
            "Plugins": [],
            "LuaScripts": [],
            "DicomModalities": {"agent": [self.agent_ae_title, "127.0.0.1", self.agent_port]},
            "SaveJobs": False,
            "OverwriteInstances": True,
            "DefaultEncoding": "Utf8",
        }
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [self.binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise DemoError(f"Orthanc stopped at start (exit code {self._process.returncode}); see {self.log_path}")
            try:
                self._get("/system")
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        raise DemoError(f"Orthanc did not answer within 30 s; see {self.log_path}")

    def stop(self) -> None:
        if self._process is not None:
            stop_process_group(self._process, grace_s=15)
            self._process = None

    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            return bytes(response.read())

    def _get(self, path: str) -> Any:
        return json.loads(self._request("GET", path))

    def study_objects(self, study_instance_uid: str) -> dict[str, PacsObject]:
        found = json.loads(self._request("POST", "/tools/lookup", study_instance_uid.encode()))
        studies = [item["ID"] for item in found if item.get("Type") == "Study"]
        if not studies:
            return {}
        instances = self._get(f"/studies/{studies[0]}/instances")
        return {
            str(item["MainDicomTags"]["SOPInstanceUID"]): PacsObject(str(item["MainDicomTags"]["SOPInstanceUID"]), str(item["ID"]))
            for item in instances
        }

    def read(self, item: PacsObject) -> pydicom.Dataset:
        return pydicom.dcmread(io.BytesIO(self._request("GET", f"/instances/{item.locator}/file")))
