"""Free disk below the floor: 0xA700 to the sender, no partial file anywhere, and recovery once the
floor is met again (here: a restart with a lower ``node.min_free_disk_mb``, as an administrator who
freed space or resized the volume would do)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from phantoms import PhantomSpec, write_phantom_series
from tests.faults.node import Node, send, wait_until
from tests.support.pacs_scp import PacsSCP

pytestmark = pytest.mark.slow

OUT_OF_RESOURCES = 0xA700


def test_below_the_disk_floor_the_sender_gets_a700_and_nothing_is_written(make_node: Callable[..., Node], tmp_path: Path, pacs: PacsSCP) -> None:
    free_mb = shutil.disk_usage(tmp_path).free // (1024 * 1024)
    node = make_node(node={"min_free_disk_mb": int(free_mb) + 100_000}, destinations=[("pacs", "PACS", pacs.port)]).start()
    truth = write_phantom_series(tmp_path / "series", PhantomSpec(rows=64, columns=64, n_slices=48, seed=91, patient_id="FLOOR-1"))

    refused = send(node.port, list(truth.files))
    assert refused.established
    assert set(refused.statuses) == {OUT_OF_RESOURCES}, refused.statuses
    assert not [p for p in (node.spool / "incoming").rglob("*") if p.is_file()], "a refused instance was stored"
    assert not list((node.spool / "tmp").iterdir()), "a partial file was left in spool/tmp"
    assert node.series(truth.series_instance_uid) is None
    reasons = {e.detail.get("reason", "") for e in node.events(kind="instance_rejected")}
    assert any("min_free_disk_mb" in r for r in reasons), reasons
    assert node.alive()

    # Space returns: the administrator lowers the floor and restarts; the sender retries the series.
    node.stop()
    node.config["node"]["min_free_disk_mb"] = 1
    node.start()
    accepted = send(node.port, list(truth.files))
    assert set(accepted.statuses) == {0}
    wait_until(lambda: (s := node.series(truth.series_instance_uid)) is not None and s.state.value == "ANALYSED", timeout=120,
               what="the series to be analysed after recovery")
    assert len(list((node.spool / "incoming").rglob("*.dcm"))) == 48
    pacs.wait_for(2, timeout=60)
