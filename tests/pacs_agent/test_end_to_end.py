"""The whole node on loopback: `pe-agent serve` as a subprocess, a pynetdicom SCU as the scanner,
a pynetdicom storage SCP as PACS, the tiny random model.

One long scenario (the node starts once; starting torch in a spawned worker is the slow part):
CTPA in -> SR + SC back in the source study, dciodvfy-clean; a path-traversal UID refused with
nothing written outside the spool; the same series sent twice gives one
job; a head CT without contrast is ignored with its reason; an unknown calling AE is rejected;
PACS down -> deliveries retried and completed once it is back; reprocess -> a new SR that
references the old one; worklist flag consistent with the stored labels; HTTP endpoints; SIGTERM
-> exit 0; the phantoms' patient names and IDs never appear in the node's logs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.node.cli import main as cli_main
from pacs_agent.db.models import Delivery, DeliveryStatus, Job, JobStatus, Output, OutputKind, Result, Series, SeriesState, Study
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.worklist import flag_for
from phantoms import PhantomSpec, PhantomTruth, write_phantom_series
from tests.support.dciodvfy import dciodvfy_available, run_dciodvfy
from tests.support.pacs_scp import PacsSCP

from tests.support.settings import find_free_port

pytestmark = pytest.mark.slow

T = TypeVar("T")
CTPA_NAME, CTPA_ID = "PHANTOM^ENDTOEND", "E2E-PATIENT-0042"
HEAD_NAME, HEAD_ID = "PHANTOM^HEADONLY", "E2E-PATIENT-0043"
KEY_SLICES = 2
OBJECTS_PER_REPORT = 1 + KEY_SLICES  # one SR, one SC per key slice


@dataclass(frozen=True)
class Node:
    process: subprocess.Popen[bytes]
    config: Path
    log: Path
    dicom_port: int
    http_port: int
    factory: sessionmaker[Session]


def wait_until(predicate: Callable[[], T | None], timeout: float, what: str, node: Node | None = None) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if node is not None and node.process.poll() is not None:
            raise AssertionError(f"pe-agent serve exited ({node.process.returncode}) while waiting for {what}:\n{node.log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            tail = node.log.read_text()[-4000:] if node is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{tail}")
        time.sleep(0.2)


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def send(port: int, files: tuple[Path, ...], *, calling_ae_title: str = "SCANNER") -> list[int]:
    """C-STORE files to the node in one association; returns the status of each."""
    ae = AE(ae_title=calling_ae_title)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="PE_AGENT")
    assert assoc.is_established, f"association from {calling_ae_title} was not accepted"
    statuses = []
    try:
        for file in files:
            status = assoc.send_c_store(pydicom.dcmread(file))
            statuses.append(int(status.Status) if status else -1)
    finally:
        assoc.release()
    return statuses


def write_config(tmp_path: Path, checkpoint: Path, pacs_port: int) -> tuple[Path, int, int]:
    dicom_port, http_port = find_free_port(), find_free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        f"""
[node]
ae_title = "PE_AGENT"
port = {dicom_port}
allowed_calling_ae_titles = ["SCANNER"]
min_free_disk_mb = 1

[storage]
root = "{tmp_path / 'spool'}"

[database]
url = "sqlite:///{tmp_path / 'agent.sqlite'}"

[series]
quiet_seconds = 1.0

[model]
checkpoint = "{checkpoint}"
torch_threads = 1

[workers]
count = 1
lease_seconds = 30.0
heartbeat_seconds = 1.0
poll_seconds = 0.2

[outputs]
key_slices = {KEY_SLICES}

[dispatch]
backoff_initial_seconds = 0.5
backoff_max_seconds = 1.0
poll_seconds = 0.3
max_attempts = 30

[http]
enabled = true
port = {http_port}

[log]
format = "json"
level = "INFO"

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = {pacs_port}
"""
    )
    return config, dicom_port, http_port


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[PacsSCP]:
    with PacsSCP(ae_title="PACS", store_dir=tmp_path / "pacs") as scp:
        yield scp


@pytest.fixture
def node(tmp_path: Path, tiny_checkpoint: Path, pacs: PacsSCP) -> Iterator[Node]:
    config, dicom_port, http_port = write_config(tmp_path, tiny_checkpoint, pacs.port)
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PE_AGENT")}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "pacs_agent.node.cli", "serve", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=tmp_path,
        )
    engine = make_engine(f"sqlite:///{tmp_path / 'agent.sqlite'}")
    running = Node(process, config, log, dicom_port, http_port, make_session_factory(engine))
    try:
        wait_until(lambda: http_get(http_port, "/healthz")[0] == 200, 90, "the node to be healthy", running)
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        engine.dispose()


def phantom(tmp_path: Path, name: str, spec: PhantomSpec) -> PhantomTruth:
    return write_phantom_series(tmp_path / name, spec)


def series_row(factory: sessionmaker[Session], uid: str) -> Series | None:
    with factory() as session:
        return session.scalars(select(Series).where(Series.series_instance_uid == uid)).first()


def jobs_for(factory: sessionmaker[Session], uid: str) -> list[Job]:
    with factory() as session:
        return list(session.scalars(select(Job).join(Series).where(Series.series_instance_uid == uid).order_by(Job.id)))


def deliveries_of(factory: sessionmaker[Session], job_id: int) -> list[Delivery]:
    with factory() as session:
        return list(session.scalars(select(Delivery).join(Output).where(Output.job_id == job_id).order_by(Delivery.id)))


def sr_output(factory: sessionmaker[Session], job_id: int) -> Output:
    with factory() as session:
        return session.scalars(select(Output).where(Output.job_id == job_id, Output.kind == OutputKind.SR)).one()


def cli(node: Node, *args: str) -> int:
    return cli_main([*args, "--config", str(node.config)])


def test_node_end_to_end(tmp_path: Path, node: Node, pacs: PacsSCP, capsys: pytest.CaptureFixture[str]) -> None:
    ctpa = phantom(tmp_path, "ctpa", PhantomSpec(n_slices=48, rows=64, columns=64, patient_name=CTPA_NAME, patient_id=CTPA_ID,
                                                 locations=("central", "right"), rv_lv_ratio=1.3))
    head = phantom(tmp_path, "head", PhantomSpec(kind="head", pe=False, contrast=False, n_slices=48, rows=64, columns=64,
                                                 patient_name=HEAD_NAME, patient_id=HEAD_ID, series_description="HEAD W/O"))

    # An unknown calling AE is refused at association.
    intruder = AE(ae_title="INTRUDER")
    intruder.add_requested_context(CTImageStorage)
    refused = intruder.associate("127.0.0.1", node.dicom_port, ae_title="PE_AGENT")
    assert not refused.is_established and refused.is_rejected

    # A path-traversal UID is refused, and nothing lands outside the spool.
    evil = pydicom.dcmread(ctpa.files[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UID: that is the point
        evil.StudyInstanceUID = "../../../../evil"
    evil.SOPInstanceUID = "1.2.3.4.5.6.7.8.9"
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title="PE_AGENT")
    assert assoc.is_established
    status = assoc.send_c_store(evil)
    assoc.release()
    assert status and int(status.Status) != 0
    escaped = (tmp_path / "spool" / "incoming" / "../../../../evil").resolve()
    assert not escaped.exists()
    assert not [p for p in tmp_path.rglob("*") if "evil" in p.name or "1.2.3.4.5.6.7.8.9" in p.name]

    # CTPA and head CT arrive from the scanner.
    assert send(node.dicom_port, ctpa.files) == [0] * len(ctpa.files)
    assert send(node.dicom_port, head.files) == [0] * len(head.files)

    # SR + SCs come back to PACS, in the source study, dciodvfy-clean.
    received = pacs.wait_for(OBJECTS_PER_REPORT, timeout=120)
    assert {str(ds.StudyInstanceUID) for ds in received} == {ctpa.study_instance_uid}
    modalities = sorted(str(ds.Modality) for ds in received)
    assert modalities.count("SR") == 1 and len(modalities) == OBJECTS_PER_REPORT
    sc_series = {str(ds.SeriesInstanceUID) for ds in received if ds.Modality != "SR"}
    assert len(sc_series) == 1 and ctpa.series_instance_uid not in sc_series
    if dciodvfy_available():
        for ds in received:
            check = run_dciodvfy(tmp_path / "pacs" / f"{ds.SOPInstanceUID}.dcm")
            assert check.errors == [], f"{ds.Modality}: {check.errors}"
    first_sr = next(ds for ds in received if ds.Modality == "SR")

    # The head CT is ignored with a reason a person understands.
    def head_ignored() -> Series | None:
        row = series_row(node.factory, head.series_instance_uid)
        return row if row is not None and row.state == SeriesState.IGNORED else None

    head_series = wait_until(head_ignored, 30, "the head CT to be ignored", node)
    assert head_series.ignore_reason and jobs_for(node.factory, head.series_instance_uid) == []

    # The flag of the study is consistent with the stored labels (a random model: not with the truth).
    (job,) = jobs_for(node.factory, ctpa.series_instance_uid)
    assert job.status == JobStatus.SUCCEEDED
    with node.factory() as session:
        result = session.scalars(select(Result).where(Result.job_id == job.id)).one()
        study = session.get(Study, ctpa.study_instance_uid)
        assert study is not None and study.flag == result.flag == flag_for(result, review_margin=0.1)
    wait_until(lambda: all(d.status == DeliveryStatus.DELIVERED for d in deliveries_of(node.factory, job.id)), 30, "deliveries recorded", node)

    # The same series sent again (duplicates) gives no second job.
    assert send(node.dicom_port, ctpa.files) == [0] * len(ctpa.files)
    time.sleep(1.0 + 3.0)  # quiet period + sweeps
    assert [j.id for j in jobs_for(node.factory, ctpa.series_instance_uid)] == [job.id]

    # PACS goes down; a reprocess is analysed, its deliveries fail and are retried...
    pacs.stop()
    capsys.readouterr()
    assert cli(node, "reprocess", ctpa.series_instance_uid, "--json") == 0
    created = json.loads(capsys.readouterr().out)["created"][0]
    assert created["supersedes_job_id"] == job.id
    new_job_id = created["job_id"]
    def retried_twice() -> list[Delivery] | None:
        rows = deliveries_of(node.factory, new_job_id)
        return rows if rows and all(d.attempts >= 2 for d in rows) else None

    retried = wait_until(retried_twice, 120, "delivery attempts while PACS is down", node)
    assert all(d.status == DeliveryStatus.PENDING and d.last_error for d in retried)
    # ... and delivered once PACS is back.
    pacs.start()
    after = pacs.wait_for(2 * OBJECTS_PER_REPORT, timeout=60)
    wait_until(lambda: all(d.status == DeliveryStatus.DELIVERED for d in deliveries_of(node.factory, new_job_id)), 30, "redelivery", node)

    # The new SR references (and supersedes) the first one.
    new_sr_uid = sr_output(node.factory, new_job_id).sop_instance_uid
    new_sr = next(ds for ds in after if str(ds.SOPInstanceUID) == new_sr_uid)
    predecessors = [
        ref.ReferencedSOPInstanceUID
        for study_item in new_sr.PredecessorDocumentsSequence
        for series_item in study_item.ReferencedSeriesSequence
        for ref in series_item.ReferencedSOPSequence
    ]
    assert predecessors == [first_sr.SOPInstanceUID]

    # The admin views and HTTP endpoints agree.
    assert cli(node, "worklist", "--json") == 0
    worklist = json.loads(capsys.readouterr().out)
    assert [e["study_instance_uid"] for e in worklist] == [ctpa.study_instance_uid]
    code, body = http_get(node.http_port, "/worklist")
    assert code == 200 and json.loads(body)[0]["flag"] == worklist[0]["flag"]
    code, metrics = http_get(node.http_port, "/metrics")
    assert code == 200 and 'pe_agent_jobs{status="SUCCEEDED"} 2.0' in metrics
    assert cli(node, "show", ctpa.series_instance_uid, "--json") == 0
    shown = json.loads(capsys.readouterr().out)["series"][0]
    assert [j["status"] for j in shown["jobs"]] == ["SUCCEEDED", "SUCCEEDED"]

    # SIGTERM: a clean stop.
    node.process.send_signal(signal.SIGTERM)
    assert node.process.wait(timeout=90) == 0

    # No patient name or ID anywhere in the node's logs.
    logs = node.log.read_text()
    assert "serve_stopped" in logs
    for secret in (CTPA_NAME, CTPA_ID, HEAD_NAME, HEAD_ID, CTPA_NAME.replace("^", " "), HEAD_NAME.replace("^", " ")):
        assert secret not in logs, f"{secret} leaked into the logs"
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    job_events = [line for line in lines if line.get("event") == "job_succeeded"]
    assert {line["job_id"] for line in job_events} == {job.id, new_job_id}
    assert all(line["series_instance_uid"] == ctpa.series_instance_uid for line in job_events)


def test_serve_with_an_unloadable_model_stops_with_a_clear_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"this is not a checkpoint")
    config, _, _ = write_config(tmp_path, broken, find_free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PE_AGENT")}
    completed = subprocess.run(
        [sys.executable, "-m", "pacs_agent.node.cli", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path, check=False,
    )
    assert completed.returncode == 1
    events = [json.loads(line) for line in completed.stderr.splitlines() if line.startswith("{")]
    failed = [e for e in events if e["event"] == "model_load_failed"]
    assert len(failed) == 1 and str(broken) == failed[0]["checkpoint"] and failed[0]["error"]
    assert any(e["event"] == "serve_stopping_on_worker_failure" for e in events)
