"""A scaled-out node on one machine: one receiver, several worker "hosts", a shared spool, one database.

Each process gets its own folder and config file, as a separate machine would: the receiver runs
`pe-agent serve` with ``workers.count = 0``; every worker host runs `pe-agent worker --config FILE`
(a supervisor and one spawned worker process, in their own session so that a SIGKILL of the group is
a machine that dies). Every config names the same spool folder (the shared mount) and the same
database URL (SQLite for one machine, PostgreSQL for several). Used by tests/scaleout and by
benchmarks/workers_throughput.py.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.db.models import Delivery, DeliveryStatus, Job, JobStatus
from pacs_agent.db.session import make_engine, make_session_factory
from tests.faults.node import Node, merge, node_config, process_group, to_toml, wait_until
from pacs_agent.demo.pacs import free_port

#: Lease settings short enough that a dead worker's job is back in the queue within seconds.
FAST_LEASES: dict[str, Any] = {
    "count": 1, "poll_seconds": 0.2, "heartbeat_seconds": 0.5, "lease_seconds": 4.0,
    "backoff_initial_seconds": 0.5, "backoff_max_seconds": 2.0, "max_attempts": 3,
}

#: Small phantoms: 64 x 64, 48 slices (passes the CTPA selection rule of 40 slices or more).
PHANTOM_SLICES = 48
PHANTOM_SIZE = 64
SERIES_COUNT = 12


def clean_environment() -> dict[str, str]:
    """This process's environment without PE_AGENT_* variables (a developer's settings must not leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PE_AGENT_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def pe_agent(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run one `pe-agent` command to its end (as an administrator would), capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "pacs_agent.node.cli", *args],
        capture_output=True, text=True, env=clean_environment(), timeout=timeout, check=False,
    )


@dataclass
class WorkerHost:
    """`pe-agent worker --config FILE` in ``workdir``: one scale-out machine with one worker process."""

    name: str
    workdir: Path
    config: dict[str, Any]
    process: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "agent.toml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "worker.log"

    @property
    def owner(self) -> str:
        """The lease owner of this host's worker process (``WorkerPool``: supervisor host:pid, slot 0)."""
        if self.process is None:
            raise RuntimeError(f"worker host {self.name} is not running")
        return f"{socket.gethostname()}:{self.process.pid}/w0"

    def start(self) -> WorkerHost:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(to_toml(self.config))
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pacs_agent.node.cli", "worker", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=clean_environment(),
                start_new_session=True,
            )
        return self

    def started(self) -> bool:
        """True once the worker process has loaded the model and registered (its ``worker_started`` line)."""
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"worker host {self.name} exited with code {self.process.returncode}:\n{self.log_tail()}")
        return '"event": "worker_started"' in self.log_text()

    def signal_group(self, signum: signal.Signals) -> None:
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                pass

    def pause(self) -> None:
        """SIGSTOP the whole host (a hung machine: its connections stay open, nothing runs)."""
        self.signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal_group(signal.SIGCONT)

    def kill9(self) -> None:
        """SIGKILL supervisor and worker at once (a machine that dies: no restart, no release)."""
        if self.process is None:
            return
        pgid = self.process.pid
        self.signal_group(signal.SIGKILL)
        self.process.wait(timeout=10)
        wait_until(lambda: not process_group(pgid), timeout=10, what=f"worker host {self.name} to die")

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM (the worker finishes or releases its job), SIGKILL what is left after ``grace``."""
        if self.process is None:
            return None
        pgid = self.process.pid
        self.signal_group(signal.SIGCONT)
        self.signal_group(signal.SIGTERM)
        try:
            code: int | None = self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            code = None
        if process_group(pgid):
            self.signal_group(signal.SIGKILL)
            self.process.wait(timeout=10)
        return code

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


@dataclass
class Cluster:
    """One receiver and ``len(hosts)`` worker hosts sharing ``spool`` and ``database_url``."""

    root: Path
    database_url: str
    checkpoint: Path | str
    destination_port: int
    workers: int = 3
    worker_settings: Mapping[str, Any] = field(default_factory=lambda: dict(FAST_LEASES))
    model: Mapping[str, Any] = field(default_factory=dict)
    outputs: Mapping[str, Any] = field(default_factory=lambda: {"key_slices": 1})
    receiver: Node | None = None
    hosts: list[WorkerHost] = field(default_factory=list)
    _engine: Engine | None = field(default=None, repr=False)

    @property
    def spool(self) -> Path:
        return self.root / "shared-spool"

    def config_for(self, workdir: Path, *, workers_count: int, port: int, spool: Path | None = None) -> dict[str, Any]:
        """The config of one machine: its own port and log, the shared spool (where this machine mounts
        it: ``spool``, default the receiver's path) and the database."""
        config = node_config(
            workdir, port=port, checkpoint=self.checkpoint, destinations=[("pacs", "PACS", self.destination_port)],
        )
        return merge(config, {
            "storage": {"root": str(spool or self.spool)},
            "database": {"url": self.database_url},
            "workers": {**self.worker_settings, "count": workers_count},
            "dispatch": {"poll_seconds": 0.2},
            "model": dict(self.model),
            "outputs": dict(self.outputs),
        })

    def upgrade(self) -> str:
        """`pe-agent db upgrade --config` on the receiver's config; returns what it printed."""
        workdir = self.root / "receiver"
        workdir.mkdir(parents=True, exist_ok=True)
        config = self.config_for(workdir, workers_count=0, port=0)
        path = workdir / "upgrade.toml"
        path.write_text(to_toml(config))
        result = pe_agent("db", "upgrade", "--config", str(path))
        if result.returncode != 0:
            raise RuntimeError(f"pe-agent db upgrade failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout.strip()

    def start_receiver(self) -> Node:
        workdir = self.root / "receiver"
        self.receiver = Node(workdir, self.config_for(workdir, workers_count=0, port=free_port()))
        self.receiver.start(timeout=60)
        return self.receiver

    def start_workers(
        self, count: int | None = None, *, wait: bool = True, timeout: float = 120.0, spools: Sequence[Path] = ()
    ) -> list[WorkerHost]:
        """Start ``count`` (default ``workers``) more worker hosts; wait until each has loaded the model.

        ``spools``: where each new host mounts the shared spool (default: the receiver's path).
        """
        new = []
        for i in range(self.workers if count is None else count):
            index = len(self.hosts) + 1
            workdir = self.root / f"worker-{index}"
            spool = spools[i] if i < len(spools) else None
            host = WorkerHost(f"worker-{index}", workdir, self.config_for(workdir, workers_count=1, port=0, spool=spool))
            self.hosts.append(host.start())
            new.append(host)
        if wait:
            wait_until(lambda: all(h.started() for h in new), timeout=timeout, what="the worker hosts to load the model")
        return new

    def host_of(self, owner: str) -> WorkerHost | None:
        for host in self.hosts:
            if host.process is not None and host.owner == owner:
                return host
        return None

    def stop(self) -> None:
        """SIGTERM every host at once (each finishes or releases its job), then the receiver."""
        for host in self.hosts:
            host.signal_group(signal.SIGCONT)
            host.signal_group(signal.SIGTERM)
        for host in self.hosts:
            host.stop()
        if self.receiver is not None:
            self.receiver.stop()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # -- database -------------------------------------------------------------------------
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.database_url)
        return self._engine

    def sessions(self) -> sessionmaker[Session]:
        return make_session_factory(self.engine())

    def jobs(self) -> list[Job]:
        with self.sessions()() as session:
            rows = list(session.scalars(select(Job).order_by(Job.id)))
            session.expunge_all()
            return rows

    def job(self, job_id: int) -> Job | None:
        with self.sessions()() as session:
            row = session.get(Job, job_id)
            if row is not None:
                session.expunge(row)
            return row

    def job_row_free(self, job_id: int) -> bool:
        """Whether a lease recovery could update job ``job_id`` now (no other transaction holds its lock).

        PostgreSQL: ``SELECT ... FOR NO KEY UPDATE NOWAIT`` (the lock an UPDATE of the job takes);
        SQLite: ``BEGIN IMMEDIATE`` (the database-wide write lock) with a short timeout.
        """
        engine = self.engine()
        if engine.dialect.name == "postgresql":
            with engine.connect() as connection:
                try:
                    connection.execute(text("SELECT id FROM jobs WHERE id = :id FOR NO KEY UPDATE NOWAIT"), {"id": job_id})
                except OperationalError:
                    return False
                finally:
                    connection.rollback()
                return True
        database = engine.url.database or ""
        raw = sqlite3.connect(database, timeout=0.2, isolation_level=None)
        try:
            raw.execute("BEGIN IMMEDIATE")
            raw.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError:
            return False
        finally:
            raw.close()

    def deliveries(self) -> list[Delivery]:
        with self.sessions()() as session:
            rows = list(session.scalars(select(Delivery).order_by(Delivery.id)))
            session.expunge_all()
            return rows

    def all_done(self, series_count: int) -> bool:
        """``series_count`` jobs SUCCEEDED and every delivery DELIVERED (nothing left to do)."""
        jobs = self.jobs()
        succeeded = sum(1 for j in jobs if j.status == JobStatus.SUCCEEDED)
        deliveries = self.deliveries()
        return succeeded >= series_count and bool(deliveries) and all(d.status == DeliveryStatus.DELIVERED for d in deliveries)

    def logs(self) -> str:
        parts = [f"--- receiver ---\n{self.receiver.log_tail()}"] if self.receiver is not None else []
        parts += [f"--- {h.name} ---\n{h.log_tail()}" for h in self.hosts]
        return "\n".join(parts)


def pause_a_running_job(
    cluster: Cluster, *, timeout: float, exclude: Sequence[WorkerHost] = (), exclude_jobs: Sequence[int] = ()
) -> tuple[int, WorkerHost]:
    """Wait for a job (not in ``exclude_jobs``) to be RUNNING on a host not in ``exclude`` and freeze
    (SIGSTOP) that host mid-job.

    A job can finish between the read and the SIGSTOP, or the host can be frozen inside a transaction
    (holding locks); then the host is resumed and another moment is tried, so the host returned is
    frozen with the job still RUNNING under its lease and no lock held.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = [j for j in cluster.jobs() if j.status == JobStatus.RUNNING and j.lease_owner and j.id not in exclude_jobs]
        for job in running:
            host = cluster.host_of(str(job.lease_owner))
            if host is None or any(host is other for other in exclude):
                continue
            host.pause()
            again = cluster.job(job.id)
            if again is not None and again.status == JobStatus.RUNNING and again.lease_owner == job.lease_owner:
                # Frozen inside a transaction, the host would hold its locks (SQLite: the whole database)
                # and nothing could take its job over: that is a different failure, not this one.
                if cluster.job_row_free(job.id):
                    return job.id, host
            host.resume()
        time.sleep(0.02)
    raise TimeoutError(f"no job was seen running within {timeout:.0f} s:\n{cluster.logs()}")


def send_series(port: int, series: Sequence[Sequence[Path]]) -> None:
    """C-STORE each series over its own association, one after another (a scanner's auto-route)."""
    from tests.faults.node import send

    for files in series:
        result = send(port, files, calling_ae_title="SCANNER")
        if not result.established or any(s != 0 for s in result.statuses):
            raise RuntimeError(f"sending a series failed: established={result.established} statuses={set(result.statuses)}")
