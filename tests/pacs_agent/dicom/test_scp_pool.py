"""Several receiver processes behind one port (pacs_agent.dicom.scp_pool), with real peers on loopback.

The behaviour every receiver has (statuses, TLS, AE check, limits, duplicates) is tested in
test_receiver.py, whose tests run against the pool too. Here: what only the pool has.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

import pacs_agent.dicom.scp_pool as receiver_pool
from pacs_agent.db.migrate import upgrade_database
from pacs_agent.db.models import Instance, Series
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.dicom.scp_pool import ReceiverPool
from pacs_agent.settings import Settings
from tests.support.ct_series import CTSeriesSpec, write_ct_series


@pytest.fixture
def pool_factory(settings_factory: Callable[..., Settings]) -> Iterator[Callable[..., tuple[ReceiverPool, sessionmaker[Session]]]]:
    started: list[tuple[ReceiverPool, Any]] = []

    def start(processes: int = 2, **overrides: Any) -> tuple[ReceiverPool, sessionmaker[Session]]:
        settings = settings_factory(**overrides)
        engine = make_engine(settings.database.url)
        upgrade_database(settings.database.url, engine)
        factory = make_session_factory(engine)
        pool = ReceiverPool(settings, factory, processes)
        pool.start()
        started.append((pool, engine))
        return pool, factory

    yield start
    for pool, engine in started:
        pool.stop()
        engine.dispose()


def _scu(title: str) -> AE:
    ae = AE(ae_title=title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage)
    return ae


def _storescu(port: int, files: list[Path]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["storescu", "-aec", "PE_AGENT", "-aet", "SCANNER", "127.0.0.1", str(port), *map(str, files)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "TCP_NODELAY": "1"},
    )


def _instances(factory: sessionmaker[Session]) -> tuple[int, list[int]]:
    with factory() as session:
        rows = session.scalar(select(func.count()).select_from(Instance)) or 0
        counts = list(session.scalars(select(Series.instance_count)))
    return rows, counts


def test_associations_are_spread_and_counted_across_processes(pool_factory: Callable[..., Any]) -> None:
    pool, _factory = pool_factory(2, node={"max_associations": 3})
    held = [_scu(f"HOLD{i}").associate("127.0.0.1", pool.port, ae_title="PE_AGENT") for i in range(3)]
    assert all(a.is_established for a in held)
    # Least busy first: the second connection went to the other process, the third to either.
    assert sorted(pool.admitted_by_process()) == [1, 2]
    extra = _scu("EXTRA").associate("127.0.0.1", pool.port, ae_title="PE_AGENT")
    assert extra.is_rejected  # the limit is global, not per process
    held[0].release()
    deadline = time.monotonic() + 5
    while pool.admitted() != 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pool.admitted() == 2
    again = _scu("AGAIN").associate("127.0.0.1", pool.port, ae_title="PE_AGENT")
    assert again.is_established
    for assoc in (*held[1:], again):
        assoc.release()


def test_concurrent_senders_of_one_series_count_every_instance(
    pool_factory: Callable[..., Any], tmp_path: Path,
) -> None:
    """Four dcmtk senders split one series over two processes, whose writers add to the same Series row."""
    pool, factory = pool_factory(2, node={"max_associations": 8})
    files = write_ct_series(tmp_path / "series", CTSeriesSpec(n_slices=120, rows=32, columns=32))
    senders = [_storescu(pool.port, files[i::4]) for i in range(4)]
    for sender in senders:
        _out, err = sender.communicate(timeout=120)
        assert sender.returncode == 0, err.decode(errors="replace")
    pool.flush()
    assert _instances(factory) == (120, [120])
    assert pool.counters()["stored"] == 120
    assert pool.counters()["associations"] == 4
    assert sum(1 for _ in pool.spool.incoming_dir.rglob("*.dcm")) == 120


def test_a_dead_process_is_replaced_and_what_it_left_is_recorded(
    pool_factory: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(receiver_pool, "RECONCILE_DELAY_SECONDS", 0.0)
    pool, factory = pool_factory(2)
    before = pool.pids()
    os.kill(before[0], signal.SIGKILL)
    # What a process killed between rename and commit leaves: an acknowledged file without a row.
    study = generate_uid()
    orphan = write_ct_series(tmp_path / "orphan", CTSeriesSpec(n_slices=1, study_instance_uid=study))[0]
    import pydicom

    ds = pydicom.dcmread(orphan)
    target = pool.spool.instance_path(study, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(orphan.read_bytes())
    written = time.time() - 10  # received before the kill; files younger than SETTLED_SECONDS wait
    os.utime(target, (written, written))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pool.check()  # what serve does every half second
        if before[0] not in pool.pids() and _instances(factory)[0] == 1 and pool.is_running:
            break
        time.sleep(0.1)
    assert before[0] not in pool.pids() and before[1] in pool.pids()
    assert _instances(factory) == (1, [1])
    assert not pool.fatal
    # Both processes serve again: four associations one after the other all succeed.
    files = write_ct_series(tmp_path / "after", CTSeriesSpec(n_slices=4))
    for file in files:
        sender = _storescu(pool.port, [file])
        assert sender.wait(timeout=60) == 0
    pool.flush()
    assert _instances(factory)[0] == 5


def test_receiver_processes_exit_when_serve_is_killed(settings_factory: Callable[..., Settings], tmp_path: Path) -> None:
    """kill -9 of the process that listens: its receiver processes stop and the port is free again."""
    settings = settings_factory()
    upgrade_database(settings.database.url)
    script = textwrap.dedent(
        f"""
        import sys, time
        from pacs_agent.db.session import make_engine, make_session_factory
        from pacs_agent.dicom.scp_pool import ReceiverPool
        from tests.support.settings import make_test_settings
        from pathlib import Path

        if __name__ == "__main__":
            settings = make_test_settings(Path({str(tmp_path)!r}))
            pool = ReceiverPool(settings, make_session_factory(make_engine(settings.database.url)), 2)
            pool.start()
            print("POOL", pool.port, *pool.pids(), flush=True)
            time.sleep(600)
        """
    )
    (tmp_path / "run_pool.py").write_text(script)
    root = Path(__file__).resolve().parents[3]
    with (tmp_path / "run_pool.log").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, str(tmp_path / "run_pool.py")], stdout=subprocess.PIPE, stderr=log, text=True,
            cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
        )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        while line and not line.startswith("POOL "):  # log lines come first
            line = process.stdout.readline()
        assert line, (tmp_path / "run_pool.log").read_text()[-2000:]
        port, *children = map(int, line.split()[1:])
        assert len(children) == 2
        process.kill()
        process.wait(timeout=10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(pid) for pid in children):
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in children)
        with socket.create_server(("127.0.0.1", port)) as again:  # nobody holds the port any more
            assert again.getsockname()[1] == port
    finally:
        process.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_process_that_cannot_start_fails_the_pool_with_its_reason(settings_factory: Callable[..., Settings], tmp_path: Path) -> None:
    settings = settings_factory(node={"tls": {"enabled": True, "certificate": str(tmp_path / "missing.pem"),
                                              "private_key": str(tmp_path / "missing.key")}})
    upgrade_database(settings.database.url)
    engine = make_engine(settings.database.url)
    pool = ReceiverPool(settings, make_session_factory(engine), 2)
    with pytest.raises(receiver_pool.ReceiverError, match="TLS certificate, key or CA cannot be loaded"):
        pool.start()
    assert not pool.is_running
    engine.dispose()
