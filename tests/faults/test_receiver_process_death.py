"""kill -9 of one receiver process of a running node, mid-transfer: the node keeps running, serve starts a
replacement, the sender's retry completes the series, and every instance is recorded exactly once (also
those the dead process acknowledged but had not committed: serve reconciles the spool after the death)."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select

from pacs_agent.db.models import Instance, Series
from phantoms import PhantomSpec, write_phantom_series
from tests.faults.node import Node, SendResult, c_echo, send, wait_until

pytestmark = pytest.mark.slow

SLICES = 300


def _receiver_pids(node: Node) -> dict[int, int]:
    """index -> pid of the receiver processes serve started, newest last (from its JSON log)."""
    pids: dict[int, int] = {}
    for line in node.log_text().splitlines():
        if '"receiver_process_started"' in line:
            entry = json.loads(line)
            pids[int(entry["index"])] = int(entry["pid"])
    return pids


def _holder_of_connection(pids: list[int], port: int) -> int | None:
    """The process among ``pids`` that holds an established TCP connection on local ``port``."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # ESTABLISHED
                    inodes.add(fields[9])
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        if any(link.startswith("socket:[") and link[8:-1] in inodes for link in links):
            return pid
    return None


def _recorded(node: Node) -> tuple[int, int | None]:
    with node.sessions()() as session:
        rows = session.scalar(select(func.count()).select_from(Instance)) or 0
        count = session.scalar(select(Series.instance_count))
    return rows, count


def test_killing_a_receiver_process_mid_transfer_loses_nothing(make_node: Callable[..., Node], tmp_path: Path) -> None:
    node = make_node(node={"receiver_processes": 2}, workers={"count": 0}, series={"quiet_seconds": 60.0}).start()
    first = _receiver_pids(node)
    assert sorted(first) == [0, 1]
    truth = write_phantom_series(tmp_path / "series", PhantomSpec(rows=256, columns=256, n_slices=SLICES, seed=31, patient_id="RCVKILL-1"))
    result: list[SendResult] = []
    sender = threading.Thread(target=lambda: result.append(send(node.port, list(truth.files))))
    sender.start()
    # Kill the process that holds the sender's association, a few instances into the series.
    wait_until(lambda: sum(1 for _ in (node.spool / "incoming").rglob("*.dcm")) >= 10, timeout=60,
               what="the first instances received", interval=0.01)
    victim = _holder_of_connection(list(first.values()), node.port)
    assert victim is not None, "no receiver process holds the connection"
    os.kill(victim, signal.SIGKILL)
    sender.join(timeout=120)
    assert not sender.is_alive()

    sent = result[0]
    assert sent.resumed >= 1, "the kill did not interrupt the association"
    assert sent.statuses == (0,) * SLICES
    index = next(i for i, pid in first.items() if pid == victim)
    wait_until(lambda: _receiver_pids(node)[index] != victim, timeout=30, what="a replacement receiver process")
    assert node.alive() and c_echo(node.port)
    # Every instance once: rows, the series count and the files agree (reconciliation runs ~5 s after the death).
    wait_until(lambda: _recorded(node) == (SLICES, SLICES), timeout=30, what="every instance recorded once")
    assert sum(1 for _ in (node.spool / "incoming").rglob("*.dcm")) == SLICES
    log = node.log_text()
    assert '"receiver_process_died"' in log
    # The node still receives on both processes afterwards.
    again = write_phantom_series(tmp_path / "again", PhantomSpec(rows=32, columns=32, n_slices=8, seed=32, patient_id="RCVKILL-2"))
    assert send(node.port, list(again.files)).statuses == (0,) * 8
    assert node.stop() == 0
