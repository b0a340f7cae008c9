"""A real Orthanc server on loopback ports for end-to-end tests (Debian package `orthanc`).

Started with a configuration written from ``tests/orthanc/orthanc.json`` with free ports, a temporary
storage folder, the agent declared as a DICOM modality and, optionally, the auto-routing Lua script of
``deploy/orthanc/autoroute.lua`` as a hospital would set it up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pacs_agent.demo.pacs import free_port

ROOT = Path(__file__).resolve().parents[2]
CONFIG_TEMPLATE = ROOT / "tests" / "orthanc" / "orthanc.json"
AUTOROUTE_LUA = ROOT / "deploy" / "orthanc" / "autoroute.lua"


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or (os.path.exists("/usr/sbin/Orthanc") and "/usr/sbin/Orthanc") or None


@dataclass
class Orthanc:
    """Run Orthanc in a folder; use as a context manager."""

    workdir: Path
    aet: str = "ORTHANC"
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    autoroute: bool = False
    stable_age: int = 1
    dicom_port: int = 0
    http_port: int = 0
    process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Orthanc:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        binary = orthanc_binary()
        if binary is None:
            raise RuntimeError("Orthanc is not installed (Debian package orthanc)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dicom_port = self.dicom_port or free_port()
        self.http_port = self.http_port or free_port()
        config: dict[str, Any] = json.loads(CONFIG_TEMPLATE.read_text())
        config.update(
            {
                "DicomAet": self.aet,
                "DicomPort": self.dicom_port,
                "HttpPort": self.http_port,
                "StorageDirectory": str(self.workdir / "storage"),
                "IndexDirectory": str(self.workdir / "storage"),
                "StableAge": self.stable_age,
                "DicomModalities": {name: list(v) for name, v in self.modalities.items()},
                "LuaScripts": [str(AUTOROUTE_LUA)] if self.autoroute else [],
            }
        )
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        log = (self.workdir / "orthanc.log").open("wb")
        env = dict(os.environ, TCP_NODELAY="1")
        self.process = subprocess.Popen([binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start:\n{self.log_tail()}")
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within 30 s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log_tail(self, n: int = 40) -> str:
        path = self.workdir / "orthanc.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json") -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read()

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post(self, path: str, payload: Any) -> Any:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        out = self.request("POST", path, data)
        return json.loads(out) if out else None

    def upload(self, dicom_file: Path) -> Any:
        return self.post("/instances", dicom_file.read_bytes())

    def find_study(self, study_instance_uid: str) -> str | None:
        found = self.post("/tools/lookup", study_instance_uid.encode())
        for item in found or []:
            if item.get("Type") == "Study":
                return str(item["ID"])
        return None

    def study_series(self, study_id: str) -> list[dict[str, Any]]:
        return list(self.get(f"/studies/{study_id}/series"))

    def instance_file(self, instance_id: str) -> bytes:
        return self.request("GET", f"/instances/{instance_id}/file")
