"""A real node for fault and security tests: `pe-agent serve` as a subprocess, its database and peers.

The node is started exactly as an administrator starts it (``python -m pacs_agent.node.cli serve --config``)
in its own session, so ``kill9`` takes down serve and its worker processes at once, as a power cut or
the kernel's OOM killer would. Tests read the node's SQLite database directly (WAL: readers do not
block the node) and send with pynetdicom or dcmtk over loopback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config
from pynetdicom.dsutils import split_dataset
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.db.models import Event, Job, Series
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.demo.processes import process_group_members
from pacs_agent.delivery.dimse import echo
from pacs_agent.settings import DestinationSettings

AGENT_AE_TITLE = "PE_AGENT"
CALLING_AE_TITLE = "FAULT_SCU"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
T = TypeVar("T")


def wait_until(predicate: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.25) -> T:
    """Poll ``predicate`` until it returns something truthy; TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------- config


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_table(prefix: str, table: Mapping[str, Any], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
    tables = {k: v for k, v in table.items() if isinstance(v, Mapping)}
    if prefix:
        lines.append(f"[{prefix}]")
    lines += [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
    for key, sub in tables.items():
        _toml_table(f"{prefix}.{key}" if prefix else key, sub, lines)


def to_toml(data: Mapping[str, Any]) -> str:
    """The subset of TOML a node config needs: nested tables, scalars, lists, ``[[destinations]]``."""
    lines: list[str] = []
    for section, table in data.items():
        if section == "destinations":
            continue
        _toml_table(section, table, lines)
    for destination in data.get("destinations", ()):
        lines.append("[[destinations]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in destination.items()]
    return "\n".join(lines) + "\n"


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def node_config(
    workdir: Path,
    *,
    port: int,
    checkpoint: Path | str,
    destinations: Sequence[tuple[str, str, int]] = (),
    **overrides: Mapping[str, Any],
) -> dict[str, Any]:
    """A config with short timings for tests; ``overrides`` replace keys per section."""
    base: dict[str, Any] = {
        "node": {"ae_title": AGENT_AE_TITLE, "host": "127.0.0.1", "port": port, "min_free_disk_mb": 1},
        "storage": {"root": str(workdir / "spool")},
        "database": {"url": f"sqlite:///{workdir / 'agent.sqlite'}"},
        "series": {"quiet_seconds": 1.0},
        "model": {"checkpoint": str(checkpoint)},
        "workers": {
            "count": 1, "poll_seconds": 0.2, "heartbeat_seconds": 1.0, "lease_seconds": 6.0,
            "backoff_initial_seconds": 0.5, "backoff_max_seconds": 2.0,
        },
        "dispatch": {"poll_seconds": 0.3, "backoff_initial_seconds": 0.5, "backoff_max_seconds": 2.0},
        "log": {"format": "json", "level": "INFO"},
        "destinations": [
            {"name": name, "ae_title": ae, "host": "127.0.0.1", "port": dest_port} for name, ae, dest_port in destinations
        ],
    }
    return merge(base, overrides)


# ---------------------------------------------------------------- the node process


@dataclass
class Node:
    """`pe-agent serve` in ``workdir`` with ``config``; its output (JSON log lines) goes to ``agent.log``."""

    workdir: Path
    config: dict[str, Any]
    process: subprocess.Popen[bytes] | None = None
    _engine: Engine | None = field(default=None, repr=False)
    starts: int = 0

    @property
    def port(self) -> int:
        return int(self.config["node"]["port"])

    @property
    def config_path(self) -> Path:
        return self.workdir / "agent.toml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "agent.log"

    @property
    def spool(self) -> Path:
        return Path(self.config["storage"]["root"])

    def start(self, *, wait: bool = True, timeout: float = 90.0) -> Node:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(to_toml(self.config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PE_AGENT_")}
        env["PYTHONUNBUFFERED"] = "1"
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts + 1} ---\n".encode())
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pacs_agent.node.cli", "serve", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            )
        self.starts += 1
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.exit_code()
            if code is not None:
                raise RuntimeError(f"the node exited at start with code {code}:\n{self.log_tail()}")
            if c_echo(self.port):
                break
            time.sleep(0.2)
        else:
            raise TimeoutError(f"the node did not answer C-ECHO within {timeout:.0f} s:\n{self.log_tail()}")
        # Wait for the workers to load the model: while they import torch on a small machine the CPU is
        # saturated, and pynetdicom's SCU can then miss a C-STORE response (its reactor thread takes it).
        workers = int(self.config.get("workers", {}).get("count", 1))
        start_marker = f"--- start {self.starts} ---"
        while time.monotonic() < deadline:
            text = self.log_text()
            current = text[text.rfind(start_marker):]
            # serve_ready: also the scheduler and the HTTP server are up (C-ECHO answers before they are).
            if current.count('"event": "worker_started"') >= workers and '"event": "serve_ready"' in current:
                return
            code = self.exit_code()
            if code is not None:
                raise RuntimeError(f"the node exited at start with code {code}:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"the node did not log serve_ready and {workers} worker(s) started within {timeout:.0f} s:\n{self.log_tail()}")

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def group_pids(self) -> list[int]:
        """Live processes of the node's session (serve and its workers)."""
        if self.process is None:
            return []
        return process_group(self.process.pid)

    def kill9(self) -> None:
        """SIGKILL serve and its workers at once (a crash: nothing is flushed or released)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)
        wait_until(lambda: not self.group_pids(), timeout=10, what="the node's processes to die")
        self.process = None

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM the node (it stops its workers), SIGKILL what is left after ``grace`` seconds."""
        if self.process is None:
            return None
        pgid = self.process.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            code = self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            code = None
        try:
            wait_until(lambda: not process_group(pgid), timeout=5, what="the workers to stop")
        except TimeoutError:
            os.killpg(pgid, signal.SIGKILL)
        if code is None:
            self.process.kill()
            self.process.wait()
        self.process = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        return code

    # -- database -------------------------------------------------------------------------
    def sessions(self) -> sessionmaker[Session]:
        if self._engine is None:
            self._engine = make_engine(self.config["database"]["url"])
        return make_session_factory(self._engine)

    def series(self, series_instance_uid: str) -> Series | None:
        with self.sessions()() as session:
            row = session.scalars(select(Series).where(Series.series_instance_uid == series_instance_uid)).first()
            if row is not None:
                session.expunge(row)
            return row

    def jobs(self, series_instance_uid: str) -> list[Job]:
        with self.sessions()() as session:
            rows = list(
                session.scalars(
                    select(Job).join(Series).where(Series.series_instance_uid == series_instance_uid).order_by(Job.id)
                )
            )
            session.expunge_all()
            return rows

    def events(self, *, kind: str | None = None, series_instance_uid: str | None = None) -> list[Event]:
        with self.sessions()() as session:
            query = select(Event).order_by(Event.id)
            if kind is not None:
                query = query.where(Event.kind == kind)
            if series_instance_uid is not None:
                query = query.where(Event.series_instance_uid == series_instance_uid)
            rows = list(session.scalars(query))
            session.expunge_all()
            return rows

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def process_group(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    return process_group_members(pgid)


# ---------------------------------------------------------------- peers


def c_echo(port: int, *, calling_ae_title: str = CALLING_AE_TITLE, ae_title: str = AGENT_AE_TITLE) -> bool:
    """Whether the node on ``port`` answers C-ECHO with success (the node's own C-ECHO SCU)."""
    node = DestinationSettings(name="node", ae_title=ae_title, host="127.0.0.1", port=port)
    return echo(node, calling_ae_title=calling_ae_title, timeout=5).ok


@dataclass(frozen=True)
class SendResult:
    """What a sender saw: association established or not, and a status per dataset sent (None: no answer)."""

    established: bool
    statuses: tuple[int | None, ...]
    rejected: bool = False
    #: How many times the sender opened a new association to finish after one died mid-way.
    resumed: int = 0


def _context_of(item: Dataset | Path) -> tuple[str, str]:
    """(SOP class UID, transfer syntax UID) of a dataset, or of a Part 10 file from its file meta."""
    if isinstance(item, Path):
        file_meta, _offset = split_dataset(item)
        return str(file_meta.get("MediaStorageSOPClassUID", "")), str(file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian))
    meta = getattr(item, "file_meta", None)
    sop_class = str(item.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    return sop_class, str(meta.get("TransferSyntaxUID", ExplicitVRLittleEndian) if meta else ExplicitVRLittleEndian)


def send(
    port: int,
    items: Iterable[Dataset | Path],
    *,
    calling_ae_title: str = CALLING_AE_TITLE,
    ae_title: str = AGENT_AE_TITLE,
    release: bool = True,
    timeout: float = 30.0,
    resume: bool = True,
) -> SendResult:
    """C-STORE datasets or Part 10 files. A file is sent as its raw bytes after the file meta (pynetdicom
    does not decode it), so damaged files reach the peer as they are. Presentation contexts: each SOP
    class with the transfer syntaxes of what is sent plus the uncompressed ones.

    ``resume``: when an association dies mid-way, open another and send the rest from the instance
    that got no status, as a PACS retries (up to 3 times). pynetdicom's SCU can miss a C-STORE
    response on a saturated machine (its reactor thread takes it; the send then waits for the DIMSE
    timeout and aborts), which is a sender problem, not the receiver's. ``release=False`` aborts the
    association after the last item instead of releasing it (a sender that goes away).
    """
    entries = list(items)
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    # One context per (SOP class, transfer syntax): an SCP accepts one transfer syntax per context.
    contexts: set[tuple[str, str]] = set()
    for item in entries:
        sop_class, syntax = _context_of(item)
        for candidate in (syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            contexts.add((sop_class or CT_IMAGE_STORAGE, candidate))
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, syntax)
    statuses: list[int | None] = []
    resumed = 0
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # files go out as their raw bytes, undecoded
    try:
        while True:
            assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
            if not assoc.is_established:
                if not statuses:
                    return SendResult(False, (), rejected=assoc.is_rejected)
                break
            set_nodelay(assoc)
            try:
                for item in entries[len(statuses):]:
                    if not assoc.is_established:
                        break
                    status = assoc.send_c_store(item)
                    if not status or "Status" not in status:
                        break  # no answer: the association is gone
                    statuses.append(int(status.Status))
            finally:
                if assoc.is_established:
                    if release:
                        assoc.release()
                    else:
                        assoc.abort()
            if len(statuses) == len(entries) or not resume or resumed >= 3:
                break
            resumed += 1
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
    return SendResult(True, tuple(statuses) + (None,) * (len(entries) - len(statuses)), resumed=resumed)


def set_nodelay(assoc: Any) -> None:
    """Disable Nagle on the SCU's socket: pynetdicom writes the command and the dataset as separate
    PDUs, and with Nagle the second write waits for the peer's delayed ACK (~40 ms per instance)."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def all_transfer_syntaxes() -> list[str]:
    return [str(uid) for uid in ALL_TRANSFER_SYNTAXES]


def files_outside(root: Path, allowed: Sequence[Path]) -> list[Path]:
    """Files below ``root`` that are not below any of ``allowed`` (spool, database, logs)."""
    allowed_resolved = [a.resolve() for a in allowed]
    out = []
    for path in root.rglob("*"):
        if path.is_file() and not any(path.resolve().is_relative_to(a) for a in allowed_resolved):
            out.append(path)
    return out
