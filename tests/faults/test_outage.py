"""The PACS destination is down for a while: deliveries back off, then all complete once it is back."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from pacs_agent.db.models import Delivery, DeliveryStatus, Output
from phantoms import PhantomSpec, write_phantom_series
from tests.faults.node import Node, send, wait_until
from tests.support.pacs_scp import PacsSCP

pytestmark = pytest.mark.slow

OUTAGE_S = 8.0


def _deliveries(node: Node) -> list[Delivery]:
    with node.sessions()() as session:
        rows = list(session.scalars(select(Delivery).join(Output).order_by(Delivery.id)))
        session.expunge_all()
        return rows


def test_deliveries_back_off_while_the_pacs_is_down_and_complete_when_it_returns(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    pacs = PacsSCP(ae_title="PACS")  # configured but not started: the PACS is down
    node = make_node(
        destinations=[("pacs", "PACS", pacs.port)],
        dispatch={"poll_seconds": 0.2, "backoff_initial_seconds": 0.5, "backoff_max_seconds": 2.0, "max_attempts": 30},
    ).start()
    truth = write_phantom_series(tmp_path / "series", PhantomSpec(rows=64, columns=64, n_slices=48, seed=77, patient_id="OUTAGE-1"))
    assert set(send(node.port, list(truth.files)).statuses) == {0}

    wait_until(lambda: _deliveries(node) and all(d.attempts >= 3 for d in _deliveries(node)), timeout=90,
               what="three failed delivery attempts each")
    down = _deliveries(node)
    assert all(d.status == DeliveryStatus.PENDING for d in down), [d.status for d in down]
    assert all(d.last_dicom_status is None and d.last_error for d in down), "a refused connection is recorded as an error without DICOM status"
    # Backoff: the next attempt is scheduled in the future, not immediately.
    assert all(d.next_attempt_at > d.created_at + timedelta(seconds=0.4) for d in down)
    attempts_before = {d.id: d.attempts for d in down}

    time.sleep(OUTAGE_S)
    still_down = _deliveries(node)
    # Capped exponential backoff (0.5, 1, 2, 2, ... s): at most ~OUTAGE_S/0.5 + 2 attempts in the outage, never a busy loop.
    for d in still_down:
        assert d.attempts - attempts_before[d.id] <= OUTAGE_S / 2.0 + 3, f"delivery {d.id}: {d.attempts} attempts, not backing off"
        assert d.status == DeliveryStatus.PENDING

    pacs.start()
    try:
        wait_until(lambda: all(d.status == DeliveryStatus.DELIVERED for d in _deliveries(node)), timeout=60,
                   what="every delivery DELIVERED after the PACS returned")
        delivered = _deliveries(node)
        with node.sessions()() as session:
            output_uids = set(session.scalars(select(Output.sop_instance_uid)))
        received = pacs.received_uids
        assert set(received) == output_uids, "the PACS got exactly the produced objects"
        assert len(received) == len(set(received)), "no object was stored twice"
        assert {d.last_dicom_status for d in delivered} == {0}
        kinds = [e.kind for e in node.events() if e.entity == "delivery"]
        assert kinds.count("delivery_retry_scheduled") >= 3 * len(delivered), "each refused attempt is an event"
        assert kinds.count("delivery_delivered") == len(delivered)
    finally:
        pacs.stop()
