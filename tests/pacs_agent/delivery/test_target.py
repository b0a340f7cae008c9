"""The Target protocol and its DIMSE transport against a real storage SCP on loopback: one outcome per
object in order, what is retryable, C-ECHO, and build_target by destinations[].kind."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacs_agent.delivery.dimse import DimseTarget
from pacs_agent.delivery.target import EchoOutcome, ObjectOutcome, Target, build_target
from pacs_agent.errors import DeliveryError
from pacs_agent.settings import DestinationSettings, Settings
from tests.support.ct_series import CTSeriesSpec, write_ct_series
from tests.support.pacs_scp import PacsSCP, free_port


def _destination(port: int, **extra: object) -> DestinationSettings:
    return DestinationSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=port, **extra)  # type: ignore[arg-type]


def test_build_target_picks_the_transport_by_kind() -> None:
    target: Target = build_target(_destination(104))
    assert isinstance(target, DimseTarget) and target.name == "pacs"
    with pytest.raises(DeliveryError, match="unknown kind 'carrier-pigeon'"):
        build_target(_destination(104, kind="carrier-pigeon"))


def test_send_gives_one_outcome_per_object_in_order(tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "series", CTSeriesSpec(n_slices=3, rows=16, columns=16))
    missing = tmp_path / "gone.dcm"
    with PacsSCP(ae_title="PACS") as pacs:
        target = build_target(_destination(pacs.port), Settings())
        outcomes = target.send([files[0], missing, files[1], files[2]])
        pacs.wait_for(3, timeout=10)
    assert [o.path for o in outcomes] == [files[0], missing, files[1], files[2]]
    assert [(o.ok, o.status) for o in outcomes] == [(True, 0), (False, None), (True, 0), (True, 0)]
    assert outcomes[0].sop_instance_uid == pacs.received[0].SOPInstanceUID and outcomes[0].reason == ""
    assert not outcomes[1].retryable and "missing" in outcomes[1].reason  # a retry cannot bring the file back
    assert pacs.associations == ["PE_AGENT"]  # one association for the whole call


def test_refusals_and_an_absent_peer_are_retryable(tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "series", CTSeriesSpec(n_slices=2, rows=16, columns=16))
    with PacsSCP(ae_title="PACS", status=0xA700) as pacs:
        refused = build_target(_destination(pacs.port)).send(files)
    assert [(o.ok, o.status, o.retryable) for o in refused] == [(False, 0xA700, True)] * 2
    assert all("0xA700" in o.reason for o in refused)
    absent = build_target(_destination(free_port())).send(files)
    assert [(o.ok, o.status, o.retryable) for o in absent] == [(False, None, True)] * 2
    assert all(isinstance(o, ObjectOutcome) and "no association" in o.reason for o in absent)


def test_echo_says_whether_the_destination_answers() -> None:
    with PacsSCP(ae_title="PACS") as pacs:
        answered = build_target(_destination(pacs.port)).echo()
        assert pacs.echoes == 1
    assert answered == EchoOutcome(ok=True, detail=f"PACS@127.0.0.1:{pacs.port}: C-ECHO success")
    silent = build_target(_destination(free_port())).echo()
    assert not silent.ok and "no association" in silent.detail
