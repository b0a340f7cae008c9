"""kill -9 the whole node (serve and its workers) at 12 random points during receive, analysis and
delivery; restart it each time. In the end every series has exactly one analysis and one delivered
report set at the PACS, no received instance is lost, and no report of a killed job reaches the PACS.

A sender whose association died with the node sends the series again after the restart, as PACS
and modalities do; duplicates are not stored twice. Run by `make faults` (pytest -m faults).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from pacs_agent.db.models import Delivery, DeliveryStatus, Instance, Job, JobStatus, Output, Series
from phantoms import PhantomSpec, PhantomTruth, write_phantom_series
from tests.faults.node import Node, send, wait_until
from tests.support.pacs_scp import PacsSCP

pytestmark = [pytest.mark.faults, pytest.mark.slow]

KILL_POINTS = 12
N_SERIES = 6
SLICES = 48
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
DISPATCH_LEASE_S = 300.0


class SlowPACS(PacsSCP):
    """A PACS that takes ``delay`` seconds per object, so that a kill can land in the middle of a delivery."""

    delay = 0.3

    def _on_store(self, event: Any) -> int:
        time.sleep(self.delay)
        return super()._on_store(event)


def _jobs(node: Node) -> list[Job]:
    with node.sessions()() as session:
        rows = list(session.scalars(select(Job).order_by(Job.id)))
        session.expunge_all()
        return rows


def _deliveries(node: Node) -> list[Delivery]:
    with node.sessions()() as session:
        rows = list(session.scalars(select(Delivery).order_by(Delivery.id)))
        session.expunge_all()
        return rows


def _wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_kill_nine_at_random_points_loses_nothing_and_reports_once(make_node: Callable[..., Node], tmp_path: Path) -> None:
    rng = random.Random(20261126)
    pacs = SlowPACS(ae_title="PACS").start()
    node = make_node(
        destinations=[("pacs", "PACS", pacs.port)],
        # Kills land on the same running job again and again on purpose; max_attempts (the poison-job
        # guard, tested in tests/pacs_agent) must not turn this test's own kills into FAILED series.
        workers={"count": 1, "lease_seconds": 4.0, "heartbeat_seconds": 1.0, "poll_seconds": 0.2, "max_attempts": 50},
        dispatch={"poll_seconds": 0.2, "backoff_initial_seconds": 0.5, "backoff_max_seconds": 1.0, "max_attempts": 50},
    ).start()
    series: list[PhantomTruth] = [
        write_phantom_series(tmp_path / f"s{i}", PhantomSpec(rows=64, columns=64, n_slices=SLICES, seed=700 + i, patient_id=f"CRASH-{i}"))
        for i in range(N_SERIES)
    ]
    complete: set[int] = set()  # series whose send finished with every instance acknowledged
    next_series = 0
    kills: list[str] = []

    def send_all(index: int) -> None:
        result = send(node.port, list(series[index].files))
        if result.statuses and all(s == 0 for s in result.statuses):
            complete.add(index)

    try:
        for point in range(KILL_POINTS):
            phase = ("receive", "analysis", "delivery")[point % 3]
            if phase == "receive" and next_series < N_SERIES:
                sender = threading.Thread(target=send_all, args=(next_series,))
                next_series += 1
                sender.start()
                time.sleep(rng.uniform(0.05, 0.3))  # 48 instances take ~0.6 s: the kill lands mid-series, before 40 arrived
                node.kill9()
                sender.join(timeout=60)
            elif phase == "analysis":
                if next_series < N_SERIES:
                    send_all(next_series)
                    next_series += 1
                _wait_for(lambda: any(j.status == JobStatus.RUNNING for j in _jobs(node)), timeout=30)
                time.sleep(rng.uniform(0.0, 0.8))
                node.kill9()
            else:
                _wait_for(lambda: any(d.status == DeliveryStatus.SENDING for d in _deliveries(node)), timeout=30)
                time.sleep(rng.uniform(0.0, 0.5))
                node.kill9()
            kills.append(phase)
            node.start()
            for index in range(next_series):
                if index not in complete:
                    send_all(index)  # the sender retries what the crash interrupted
        for index in range(next_series, N_SERIES):
            send_all(index)
        for index in range(N_SERIES):
            if index not in complete:
                send_all(index)
        assert complete == set(range(N_SERIES))

        def settled() -> bool:
            with node.sessions()() as session:
                states = set(session.scalars(select(Series.state)))
                pending = session.scalars(select(Delivery.id).where(Delivery.status != DeliveryStatus.DELIVERED).limit(1)).first()
            return states == {"ANALYSED"} and pending is None

        # A delivery claimed when the node died stays SENDING until its lease (dispatcher.LEASE_SECONDS,
        # 300 s) expires; see test_delivery_interrupted_by_a_crash_resumes_promptly.
        wait_until(settled, timeout=DISPATCH_LEASE_S + 120, what="every series analysed and every delivery delivered")
        time.sleep(2.0)  # let a stray re-analysis show up if there were one

        with node.sessions()() as session:
            rows = list(session.scalars(select(Series)))
            assert len(rows) == N_SERIES
            by_uid = {s.series_instance_uid: s for s in rows}
            for truth in series:
                s = by_uid[truth.series_instance_uid]
                stored = set(session.scalars(select(Instance.sop_instance_uid).where(Instance.series_id == s.id)))
                assert stored == set(truth.sop_instance_uids), f"series {truth.series_instance_uid}: instances lost"
                for rel in session.scalars(select(Instance.path).where(Instance.series_id == s.id)):
                    assert (node.spool / rel).is_file()
                jobs = list(session.scalars(select(Job).where(Job.series_id == s.id)))
                succeeded = [j for j in jobs if j.status == JobStatus.SUCCEEDED]
                assert len(succeeded) == 1, f"series {truth.series_instance_uid}: {[(j.id, j.status, j.reason) for j in jobs]}"
            good_outputs = {
                o.sop_instance_uid: o.job_id
                for o in session.scalars(select(Output).join(Job).where(Job.status == JobStatus.SUCCEEDED))
            }
            all_outputs = set(session.scalars(select(Output.sop_instance_uid)))
        received = pacs.received
        received_uids = {str(ds.SOPInstanceUID) for ds in received}
        assert set(good_outputs) <= received_uids, "a report of a succeeded job never reached the PACS"
        assert received_uids <= all_outputs, "the PACS got an object the node has no record of (a killed job's output)"
        assert received_uids == set(good_outputs), "the PACS got outputs of a job that did not succeed"
        for truth in series:
            srs = {str(ds.SOPInstanceUID) for ds in received if str(ds.SOPClassUID) == SR_CLASS and str(ds.StudyInstanceUID) == truth.study_instance_uid}
            assert len(srs) == 1, f"study {truth.study_instance_uid}: {len(srs)} different SRs at the PACS"
        assert len(kills) == KILL_POINTS and {"receive", "analysis", "delivery"} <= set(kills)
    finally:
        pacs.stop()


def test_delivery_interrupted_by_a_crash_resumes_promptly(make_node: Callable[..., Node], tmp_path: Path) -> None:
    pacs = SlowPACS(ae_title="PACS")
    pacs.delay = 1.0
    pacs.start()
    node = make_node(destinations=[("pacs", "PACS", pacs.port)],
                     dispatch={"poll_seconds": 0.2, "backoff_initial_seconds": 0.5, "backoff_max_seconds": 1.0}).start()
    truth = write_phantom_series(tmp_path / "s", PhantomSpec(rows=64, columns=64, n_slices=SLICES, seed=790, patient_id="CRASH-D"))
    try:
        assert set(send(node.port, list(truth.files)).statuses) == {0}
        assert _wait_for(lambda: any(d.status == DeliveryStatus.SENDING for d in _deliveries(node)), timeout=120)
        node.kill9()
        node.start()
        restarted = time.monotonic()
        delivered = _wait_for(lambda: all(d.status == DeliveryStatus.DELIVERED for d in _deliveries(node)), timeout=45)
        assert delivered, f"deliveries still {[d.status.value for d in _deliveries(node)]} {time.monotonic() - restarted:.0f} s after the restart"
    finally:
        pacs.stop()
