"""A throw-away PostgreSQL server on a loopback port for the multi-worker tests (Debian package postgresql).

The cluster lives in a temporary folder. PostgreSQL refuses to run as root, so when the tests run as
root (as CI does) the server runs as the `postgres` system user that the Debian package creates; give it
a folder that user can reach (``tempfile.mkdtemp()`` under /tmp, not pytest's 0700 ``tmp_path``).
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def postgres_bindir() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    workdir: Path
    port: int = 0
    user: str = "pe_agent"
    database: str = "pe_agent"

    def __post_init__(self) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL server binaries are not installed (Debian package postgresql)")
        self.bindir = bindir
        self.datadir = self.workdir / "pgdata"
        self.port = self.port or _free_port()
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no 'postgres' user to run the server") from None
            self._as_user = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self._as_user, *args], capture_output=True, text=True, check=False, timeout=120)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._as_user:
            shutil.chown(self.workdir, user="postgres")
        result = self._run(
            str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync"
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed: {result.stderr.strip()}")
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories='{self.workdir}' -c fsync=off -c max_connections=100"
        result = self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.workdir / "postgres.log"), "-o", options, "-w", "-t", "60", "start"
        )
        if result.returncode != 0:
            log = (self.workdir / "postgres.log").read_text(errors="replace") if (self.workdir / "postgres.log").exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr.strip()}\n{log[-2000:]}")
        result = self._run(str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, self.database)
        if result.returncode != 0:
            self.stop()
            raise RuntimeError(f"createdb failed: {result.stderr.strip()}")

    def stop(self) -> None:
        if self.datadir.exists():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "-w", "stop")

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError("PostgreSQL is not accepting connections")

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def session_server(prefix: str) -> Iterator[PostgresServer]:
    """A server for a whole test session in a fresh folder under /tmp (removed afterwards); the calling
    test is skipped when the Debian binaries are missing."""
    import pytest

    if postgres_bindir() is None:
        pytest.skip("PostgreSQL server binaries are not installed (Debian package postgresql)")
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    server = PostgresServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def create_database(server: PostgresServer, name: str) -> str:
    """Create an empty database ``name`` on ``server`` (dropping an old one of that name); return its URL."""
    from sqlalchemy import text

    from pacs_agent.db.session import make_engine

    admin = make_engine(server.url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return str(server.url.rsplit("/", 1)[0] + "/" + name)


def fresh_database(server: PostgresServer, test_name: str, *, prefix: str) -> str:
    """An empty database for one test on ``server``, named after the test; return its URL."""
    return create_database(server, prefix + re.sub(r"[^a-z0-9]", "_", test_name.lower())[:50])
