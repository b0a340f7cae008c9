"""AI results reach a real Orthanc (with its DICOMweb plugin) by DIMSE C-STORE and by DICOMweb STOW-RS.

A result (Grad-CAM SCs, AIR SR, key-image KOS) goes by one transport; the re-analysis (new SCs, SR
with Predecessor Documents, KOS, IOCM rejection note of the old result) by the other; then the test
reads everything back over Orthanc's REST API and QIDO-RS and checks that, once rejection notes are
honoured, exactly one result per source series is left.
"""

from __future__ import annotations

import io
import json
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from typing import Any

import highdicom
import pydicom
import pytest
from pydicom.dataset import Dataset

from datetime import timedelta

from pacs_agent.db.models import Delivery, DeliveryStatus, Job, JobStatus, OutputKind, Series, SeriesState, utcnow
from pacs_agent.db.session import transaction
from pacs_agent.delivery.stowrs import StowRsTarget, credentials
from pacs_agent.delivery.dispatcher import dispatch_due, retry_deliveries
from pacs_agent.delivery.outbox import queue_deliveries
from pacs_agent.node.cli import main as cli_main
from pacs_agent.reports import ProducedObject, RejectedInstance, write_reports
from pacs_agent.settings import OutputSettings, Settings
from tests.support.settings import MigratedDB
from tests.support.ct_series import CTSeriesSpec, make_ct_series
from tests.support.orthanc import Orthanc, dicomweb_plugin, free_port, orthanc_binary
from tests.support.predictions import make_prediction

pytestmark = [
    pytest.mark.orthanc,
    pytest.mark.skipif(orthanc_binary() is None, reason="Orthanc is not installed"),
    pytest.mark.skipif(dicomweb_plugin() is None, reason="the Orthanc DICOMweb plugin is not installed"),
]
#: IOCM rejection reasons (CID 7031) a KOS title may carry.
_REJECTION_TITLES = {"113001", "113037", "113038", "113039"}


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    with Orthanc(tmp_path / "orthanc", dicomweb=True) as server:
        yield server


def _deliver(db: MigratedDB, settings_factory: Callable[..., Settings], destination: dict[str, Any],
             series: Series | None, produced: list[ProducedObject]) -> Settings:
    """Queue ``produced`` for ``destination`` and run the node's dispatcher until nothing is due."""
    settings = settings_factory(destinations=[destination])
    factory = db.session_factory
    with transaction(factory) as session:
        job = Job(series_id=series.id if series is not None else None, status=JobStatus.SUCCEEDED, reason="received")
        session.add(job)
        session.flush()
        queue_deliveries(session, job, produced, settings.destinations, settings.spool_root)
    while dispatch_due(factory, settings, owner="orthanc-test"):
        pass
    with factory() as session:
        statuses = {d.status for d in session.query(Delivery).all()}
    assert statuses == {DeliveryStatus.DELIVERED}
    return settings


def _dimse(orthanc: Orthanc) -> dict[str, Any]:
    return {"name": "orthanc", "kind": "dimse", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}


def _stow_rs(orthanc: Orthanc, **extra: Any) -> dict[str, Any]:
    return {"name": "orthanc-web", "kind": "stow-rs", "url": orthanc.dicomweb_url, **extra}


def _instance(orthanc: Orthanc, sop_instance_uid: str) -> Dataset:
    found = orthanc.post("/tools/lookup", sop_instance_uid.encode())
    [instance_id] = [item["ID"] for item in found if item["Type"] == "Instance"]
    return pydicom.dcmread(io.BytesIO(orthanc.instance_file(instance_id)))


def _study_instances(orthanc: Orthanc, study_instance_uid: str) -> list[Dataset]:
    study_id = orthanc.find_study(study_instance_uid)
    assert study_id is not None
    return [
        pydicom.dcmread(io.BytesIO(orthanc.instance_file(item["ID"])))
        for item in orthanc.get(f"/studies/{study_id}/instances")
    ]


def _write(tmp: Path, spool: Path, datasets: list[Dataset], *, pe_present: bool, previous: Dataset | None = None,
           superseded: Sequence[ProducedObject] = ()) -> list[ProducedObject]:
    return write_reports(
        make_prediction(datasets, pe_present=pe_present, n_key_images=2),
        datasets,
        OutputSettings(key_slices=2, manufacturer="PE Triage Test"),
        spool / "outbox" / tmp.name,
        previous_report=previous,
        superseded=[RejectedInstance(p.sop_class_uid, p.sop_instance_uid, p.series_instance_uid) for p in superseded],
    )


@pytest.mark.parametrize(("first", "second"), [("dimse", "stow-rs"), ("stow-rs", "dimse")])
def test_results_and_their_retraction_reach_orthanc_by_both_transports(
    tmp_path: Path, migrated_db: MigratedDB, settings_factory: Callable[..., Settings], orthanc: Orthanc, first: str, second: str
) -> None:
    datasets = make_ct_series(CTSeriesSpec(n_slices=8, rows=48, columns=48))
    source_dir = tmp_path / "ct"
    source_dir.mkdir()
    for ds in datasets:
        path = source_dir / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        orthanc.upload(path)
    study_uid = str(datasets[0].StudyInstanceUID)
    with transaction(migrated_db.session_factory) as session:
        series = Series(study_instance_uid=study_uid, series_instance_uid=str(datasets[0].SeriesInstanceUID),
                        state=SeriesState.ANALYSED, instance_count=len(datasets))
        session.add(series)
        session.flush()
        session.expunge(series)
    spool = migrated_db.settings.spool_root

    def deliver(transport: str, produced: list[ProducedObject]) -> None:
        destination = _dimse(orthanc) if transport == "dimse" else _stow_rs(orthanc)
        _deliver(migrated_db, settings_factory, destination, series, produced)

    original = _write(tmp_path / "a", spool, datasets, pe_present=True)
    assert [p.kind for p in original] == [OutputKind.SC, OutputKind.SC, OutputKind.SR, OutputKind.KOS]
    deliver(first, original)
    old_sr = next(p for p in original if p.kind == OutputKind.SR)
    redo = _write(tmp_path / "b", spool, datasets, pe_present=True, previous=pydicom.dcmread(old_sr.path), superseded=original)
    assert [p.kind for p in redo] == [OutputKind.SC, OutputKind.SC, OutputKind.SR, OutputKind.KOS, OutputKind.REJECTION]
    deliver(second, redo)

    # Every object is in Orthanc, byte-identical in its identity, read back over REST.
    for produced in original + redo:
        at_pacs = _instance(orthanc, produced.sop_instance_uid)
        assert (at_pacs.SOPClassUID, at_pacs.StudyInstanceUID) == (produced.sop_class_uid, study_uid)
        assert at_pacs.SpecificCharacterSet == "ISO_IR 192"
    new_sr = next(p for p in redo if p.kind == OutputKind.SR)
    sr_file = tmp_path / "sr-from-orthanc.dcm"
    _instance(orthanc, new_sr.sop_instance_uid).save_as(sr_file)
    sr = highdicom.sr.srread(sr_file)
    assert isinstance(sr, highdicom.sr.Comprehensive3DSR)
    assert sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old_sr.sop_instance_uid
    assert sr.ContentSequence[0].TextValue.startswith("NOT FOR CLINICAL USE (synthetic demo model). Suspected central and right-sided pulmonary embolism")

    # QIDO-RS sees the AI series in the study: SR, SC (OT), two KOs.
    request = urllib.request.Request(f"{orthanc.dicomweb_url}/studies/{study_uid}/series", headers={"Accept": "application/dicom+json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        modalities = sorted(item["00080060"]["Value"][0] for item in json.loads(response.read()))
    assert modalities.count("SR") == 2 and modalities.count("KO") == 3 and "CT" in modalities

    # Honour the rejection notes as an IOCM archive would: one result left per source series.
    instances = _study_instances(orthanc, study_uid)
    notes = [ds for ds in instances if ds.Modality == "KO" and ds.ConceptNameCodeSequence[0].CodeValue in _REJECTION_TITLES]
    assert len(notes) == 1 and notes[0].ConceptNameCodeSequence[0].CodeValue == "113001"
    rejected = {
        str(item.ReferencedSOPInstanceUID)
        for note in notes
        for study in note.CurrentRequestedProcedureEvidenceSequence
        for s in study.ReferencedSeriesSequence
        for item in s.ReferencedSOPSequence
    }
    assert rejected == {p.sop_instance_uid for p in original}
    visible_results = [
        ds for ds in instances
        if ds.Modality == "SR" and str(ds.SOPInstanceUID) not in rejected
        and str(ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID) == str(datasets[0].SeriesInstanceUID)
    ]
    assert [str(ds.SOPInstanceUID) for ds in visible_results] == [new_sr.sop_instance_uid]
    visible_ai = {str(ds.SOPInstanceUID) for ds in instances if ds.Modality != "CT" and str(ds.SOPInstanceUID) not in rejected}
    assert visible_ai == {p.sop_instance_uid for p in redo}


def test_stowrs_to_orthanc_with_basic_auth_from_the_environment(tmp_path: Path) -> None:
    """Credentials from an environment variable reach Orthanc; wrong ones are a permanent failure (no retry)."""
    datasets = make_ct_series(CTSeriesSpec(n_slices=6, rows=32, columns=32))
    produced = write_reports(make_prediction(datasets, n_key_images=2), datasets, OutputSettings(key_slices=1), tmp_path / "out")
    with Orthanc(tmp_path / "orthanc", dicomweb=True, users={"agent": "s3cret"}) as server:
        good = StowRsTarget("web", server.dicomweb_url,
                            credentials=credentials("basic", username="agent", password_env="PACS_PW", environ={"PACS_PW": "s3cret"}))
        assert good.echo().ok
        assert [o.ok for o in good.send([p.path for p in produced])] == [True] * len(produced)
        for p in produced:
            assert _instance(server, p.sop_instance_uid).SOPInstanceUID == p.sop_instance_uid
        wrong = StowRsTarget("web", server.dicomweb_url,
                             credentials=credentials("basic", username="agent", password_env="PACS_PW", environ={"PACS_PW": "nope"}))
        [refused] = wrong.send([produced[0].path])
        assert (refused.ok, refused.status, refused.retryable) == (False, 401, False)
        assert wrong.echo().detail.startswith("QIDO-RS 401")
        assert not StowRsTarget("web", server.dicomweb_url).echo().ok  # no credentials at all


def _queue(db: MigratedDB, settings: Settings, produced: list[ProducedObject], datasets: list[Dataset]) -> None:
    with transaction(db.session_factory) as session:
        series = Series(study_instance_uid=str(datasets[0].StudyInstanceUID), series_instance_uid=str(datasets[0].SeriesInstanceUID),
                        state=SeriesState.ANALYSED, instance_count=len(datasets))
        session.add(series)
        session.flush()
        job = Job(series_id=series.id, status=JobStatus.SUCCEEDED, reason="received")
        session.add(job)
        session.flush()
        queue_deliveries(session, job, produced, settings.destinations, settings.spool_root)


def _deliveries(db: MigratedDB) -> list[Delivery]:
    with db.session_factory() as session:
        return list(session.query(Delivery).order_by(Delivery.id))


def test_stow_rs_deliveries_back_off_dead_letter_and_retry_like_dimse(
    tmp_path: Path, migrated_db: MigratedDB, settings_factory: Callable[..., Settings]
) -> None:
    port = free_port()
    destination = {"name": "web", "kind": "stow-rs", "url": f"http://127.0.0.1:{port}/dicom-web", "timeout_seconds": 5}
    settings = settings_factory(destinations=[destination], dispatch={"max_attempts": 2, "backoff_initial_seconds": 30.0, "backoff_max_seconds": 60.0})
    datasets = make_ct_series(CTSeriesSpec(n_slices=6, rows=32, columns=32))
    produced = write_reports(make_prediction(datasets), datasets, OutputSettings(key_slices=1), settings.spool_root / "outbox" / "1")
    _queue(migrated_db, settings, produced, datasets)
    factory = migrated_db.session_factory

    # Nothing listens: every object is retried after the backoff, then dead-lettered.
    start = utcnow()
    assert dispatch_due(factory, settings, owner="t", now=start) == len(produced)
    first = _deliveries(migrated_db)
    assert {(d.status, d.attempts) for d in first} == {(DeliveryStatus.PENDING, 1)}
    assert all("STOW-RS to web failed" in d.last_error for d in first), [d.last_error for d in first]
    assert all(d.next_attempt_at >= start + timedelta(seconds=29) for d in first)  # type: ignore[operator]
    assert dispatch_due(factory, settings, owner="t", now=start + timedelta(seconds=10)) == 0  # not due yet
    assert dispatch_due(factory, settings, owner="t", now=start + timedelta(seconds=31)) == len(produced)
    assert {(d.status, d.attempts) for d in _deliveries(migrated_db)} == {(DeliveryStatus.FAILED, 2)}

    # The archive comes up on that port; `retry` re-queues the dead letters and they are stored.
    with Orthanc(tmp_path / "orthanc", dicomweb=True, http_port=port) as orthanc:
        with transaction(factory) as session:
            assert retry_deliveries(session, all_failed=True) == len(produced)
        assert dispatch_due(factory, settings, owner="t") == len(produced)
        assert {d.status for d in _deliveries(migrated_db)} == {DeliveryStatus.DELIVERED}
        for p in produced:
            assert _instance(orthanc, p.sop_instance_uid).SOPInstanceUID == p.sop_instance_uid


def test_a_stow_rs_secret_that_cannot_be_read_is_retried_with_the_reason(
    migrated_db: MigratedDB, settings_factory: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PE_TEST_PACS_TOKEN", raising=False)
    destination = {"name": "web", "kind": "stow-rs", "url": f"http://127.0.0.1:{free_port()}/dicom-web",
                   "auth": "bearer", "token_env": "PE_TEST_PACS_TOKEN"}
    settings = settings_factory(destinations=[destination])
    datasets = make_ct_series(CTSeriesSpec(n_slices=6, rows=32, columns=32))
    produced = write_reports(make_prediction(datasets), datasets, OutputSettings(key_slices=1, secondary_capture="never"),
                             settings.spool_root / "outbox" / "1")
    _queue(migrated_db, settings, produced, datasets)
    assert dispatch_due(migrated_db.session_factory, settings, owner="t") == len(produced)
    rows = _deliveries(migrated_db)
    assert {(d.status, d.attempts) for d in rows} == {(DeliveryStatus.PENDING, 1)}
    assert all("PE_TEST_PACS_TOKEN is not set" in d.last_error for d in rows)


def test_pe_agent_echo_of_a_stow_rs_destination_is_a_qido_search(
    tmp_path: Path, orthanc: Orthanc, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "agent.toml"
    closed = free_port()
    config.write_text(
        f'[storage]\nroot = "{tmp_path / "spool"}"\n'
        f'[database]\nurl = "sqlite:///{tmp_path / "db.sqlite"}"\n'
        f'[[destinations]]\nname = "web"\nkind = "stow-rs"\nurl = "{orthanc.dicomweb_url}"\n'
        f'[[destinations]]\nname = "down"\nkind = "stow-rs"\nurl = "http://127.0.0.1:{closed}/dicom-web"\n'
    )
    assert cli_main(["echo", "web", "--config", str(config), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["ok"], result["message"], result["url"]) == (True, "QIDO-RS 200", orthanc.dicomweb_url)
    assert cli_main(["echo", "down", "--config", str(config)]) == 1
    assert "FAILED - QIDO-RS" in capsys.readouterr().out
