"""No patient identifiers in the node's logs or audit events after full runs.

Everything the node prints (serve and worker processes, stdout and stderr, JSON lines) is captured in
one file; after series went through receive, analysis and delivery, it is searched for the phantoms'
patient name (and its components), patient ID and birth date. The same holds for the events table.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from pacs_agent.db.models import Event
from phantoms import PhantomSpec, write_phantom_series
from tests.faults.node import Node, send, wait_until
from tests.support.pacs_scp import PacsSCP

pytestmark = pytest.mark.slow

NAME = "Quixotebrand^Wilhelmina^Ottoline"
PATIENT_ID = "ZX-81726354"
BIRTH_DATE = "19471103"


def _needles(name: str, patient_id: str, birth_date: str) -> list[str]:
    parts = [p for p in name.replace("=", "^").split("^") if len(p) >= 4]
    return [name, patient_id, birth_date, *parts, name.replace("^", " ")]


def _leaks(node: Node, needles: list[str]) -> list[str]:
    found = []
    text = node.log_text()
    for needle in needles:
        if needle.lower() in text.lower():
            line = next(line for line in text.splitlines() if needle.lower() in line.lower())
            found.append(f"log: {needle!r} in {line[:240]}")
    with node.sessions()() as session:
        for event in session.scalars(select(Event)):
            blob = json.dumps({"detail": event.detail, "entity_id": event.entity_id, "kind": event.kind})
            found += [f"event {event.kind}: {needle!r}" for needle in needles if needle.lower() in blob.lower()]
    return found


def _run(node: Node, pacs: PacsSCP, tmp_path: Path, *, seed: int, birth_date: str, patient_id: str, name: str, report: bool = True) -> None:
    truth = write_phantom_series(tmp_path / f"s{seed}", PhantomSpec(rows=64, columns=64, n_slices=48, seed=seed, patient_name=name, patient_id=patient_id))
    datasets = [pydicom.dcmread(p) for p in truth.files]
    for ds in datasets:
        ds.PatientBirthDate = birth_date
    assert set(send(node.port, datasets).statuses) == {0}
    wait_until(lambda: (s := node.series(truth.series_instance_uid)) is not None and s.state.value in ("ANALYSED", "FAILED"),
               timeout=120, what="the series to be analysed")
    if not report:
        return
    wait_until(lambda: any(str(ds.StudyInstanceUID) == truth.study_instance_uid and str(ds.Modality) == "SR" for ds in pacs.received),
               timeout=60, what="the SR at the PACS")


@pytest.fixture
def node_and_pacs(make_node: Callable[..., Node]) -> Iterator[tuple[Node, PacsSCP]]:
    pacs = PacsSCP(ae_title="PACS").start()
    node = make_node(destinations=[("pacs", "PACS", pacs.port)], log={"format": "json", "level": "DEBUG"}).start()
    yield node, pacs
    pacs.stop()


def test_no_patient_identifiers_in_logs_after_a_full_run(node_and_pacs: tuple[Node, PacsSCP], tmp_path: Path) -> None:
    node, pacs = node_and_pacs
    _run(node, pacs, tmp_path, seed=61, birth_date=BIRTH_DATE, patient_id=PATIENT_ID, name=NAME)
    node.stop()  # flush everything the processes print
    assert '"event": "job_succeeded"' in node.log_text()
    assert _leaks(node, _needles(NAME, PATIENT_ID, BIRTH_DATE)) == []


def test_no_patient_identifiers_in_logs_when_values_are_malformed(node_and_pacs: tuple[Node, PacsSCP], tmp_path: Path) -> None:
    """Scanners send malformed values; pydicom's validation warnings ("Invalid value for VR DA: '...'")
    and error messages must not carry them into the log. (Whether such a series is still reported is a
    case of the bad-input corpus.)"""
    node, pacs = node_and_pacs
    bad_date = "19471399"  # month 13, day 99: an invalid DA
    name = "Brackenbury^" + "Hortensia" * 8  # a PN component longer than 64 characters
    patient_id = "QV-" + "7" * 70  # an LO longer than 64 characters
    _run(node, pacs, tmp_path, seed=62, birth_date=bad_date, patient_id=patient_id, name=name, report=False)
    assert '"event": "job_started"' in node.log_text()
    node.stop()
    assert _leaks(node, [bad_date, "Brackenbury", patient_id]) == []
