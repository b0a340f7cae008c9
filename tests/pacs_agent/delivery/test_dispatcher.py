"""The dispatcher against a real pynetdicom SCP on loopback (PacsSCP): delivery, outage, refusals, retry."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import SecondaryCaptureImageStorage
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.db.models import Delivery, DeliveryStatus, Event, Job, JobStatus, Output, OutputKind, Series, SeriesState, utcnow
from pacs_agent.db.session import transaction
from pacs_agent.delivery.dispatcher import dispatch_due, retry_deliveries
from pacs_agent.delivery.dimse import echo
from pacs_agent.delivery.outbox import queue_deliveries
from pacs_agent.errors import DeliveryError
from pacs_agent.reports import ProducedObject, write_reports
from pacs_agent.settings import Destination, OutputSettings, Settings
from tests.support.settings import MigratedDB
from tests.support.ct_series import CTSeriesSpec, make_ct_series
from tests.support.pacs_scp import PacsSCP, free_port
from tests.support.predictions import make_prediction
from tests.support.tls import make_test_pki, openssl_available

OWNER = "test-dispatcher"


def _settings(db: MigratedDB, settings_factory: Callable[..., Settings], *ports: int, **dispatch: Any) -> Settings:
    destinations = [{"name": f"pacs{i}", "ae_title": f"PACS{i}", "host": "127.0.0.1", "port": p} for i, p in enumerate(ports)]
    settings = settings_factory(
        destinations=destinations,
        dispatch={"backoff_initial_seconds": 1.0, "backoff_max_seconds": 4.0, "max_attempts": 5, **dispatch},
    )
    assert settings.database.url == db.settings.database.url  # same test folder, same database
    return settings


def _job_with_outputs(
    factory: sessionmaker[Session], settings: Settings, *, key_slices: int = 2
) -> tuple[int, list[ProducedObject]]:
    """A succeeded job of a small series, its SR + SCs written into the spool's outbox and queued."""
    datasets = make_ct_series(CTSeriesSpec(n_slices=6, rows=32, columns=32))
    prediction = make_prediction(datasets, n_key_images=key_slices)
    with transaction(factory) as session:
        series = Series(
            study_instance_uid=str(datasets[0].StudyInstanceUID),
            series_instance_uid=str(datasets[0].SeriesInstanceUID),
            state=SeriesState.ANALYSED,
            instance_count=len(datasets),
        )
        session.add(series)
        session.flush()
        job = Job(series_id=series.id, status=JobStatus.SUCCEEDED, reason="received")
        session.add(job)
        session.flush()
        out_dir = settings.spool_root / "outbox" / str(job.id)
        produced = write_reports(prediction, datasets, OutputSettings(key_slices=key_slices), out_dir)
        queue_deliveries(session, job, produced, settings.destinations, settings.spool_root)
        return job.id, produced


def _deliveries(factory: sessionmaker[Session]) -> list[Delivery]:
    with factory() as session:
        return list(session.scalars(select(Delivery).order_by(Delivery.id)))


def _event_kinds(factory: sessionmaker[Session], delivery_id: int) -> list[str]:
    with factory() as session:
        return list(
            session.scalars(select(Event.kind).where(Event.entity == "delivery", Event.entity_id == str(delivery_id)).order_by(Event.id))
        )


def test_queue_deliveries_records_outputs_relative_to_the_spool(migrated_db: MigratedDB, settings_factory: Callable[..., Settings]) -> None:
    settings = _settings(migrated_db, settings_factory, free_port(), free_port())
    job_id, produced = _job_with_outputs(migrated_db.session_factory, settings)
    with migrated_db.session_factory() as session:
        outputs = list(session.scalars(select(Output).order_by(Output.id)))
        assert [o.kind for o in outputs] == [OutputKind.SR, OutputKind.SC, OutputKind.SC]
        assert [o.sop_instance_uid for o in outputs] == [p.sop_instance_uid for p in produced]
        assert all(o.job_id == job_id and not Path(o.path).is_absolute() for o in outputs)
        assert all((settings.spool_root / o.path).is_file() for o in outputs)
    deliveries = _deliveries(migrated_db.session_factory)
    assert len(deliveries) == 6  # 3 outputs x 2 destinations
    assert {d.destination for d in deliveries} == {"pacs0", "pacs1"}
    assert all(d.status == DeliveryStatus.PENDING and d.attempts == 0 for d in deliveries)
    assert _event_kinds(migrated_db.session_factory, deliveries[0].id) == ["delivery_queued"]


def test_queue_deliveries_refuses_a_file_outside_the_spool(
    migrated_db: MigratedDB, settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = _settings(migrated_db, settings_factory, free_port())
    stray = ProducedObject(OutputKind.SR, tmp_path / "elsewhere" / "x.dcm", "1.2", "1.2.3", "1.2.4")
    with transaction(migrated_db.session_factory) as session:
        series = Series(study_instance_uid="1.2.9", series_instance_uid="1.2.9.1")
        session.add(series)
        session.flush()
        job = Job(series_id=series.id)
        session.add(job)
        session.flush()
        with pytest.raises(DeliveryError, match="not inside the spool"):
            queue_deliveries(session, job, [stray], settings.destinations, settings.spool_root)


def test_all_objects_delivered_over_one_association(migrated_db: MigratedDB, settings_factory: Callable[..., Settings]) -> None:
    with PacsSCP(ae_title="PACS0") as pacs:
        settings = _settings(migrated_db, settings_factory, pacs.port)
        _, produced = _job_with_outputs(migrated_db.session_factory, settings)
        assert dispatch_due(migrated_db.session_factory, settings, owner=OWNER) == 3
        received = pacs.wait_for(3, timeout=5)
    assert sorted(str(ds.SOPInstanceUID) for ds in received) == sorted(p.sop_instance_uid for p in produced)
    assert pacs.associations == [settings.node.ae_title]  # one association, our calling AE
    sr = next(ds for ds in received if ds.Modality == "SR")
    assert sr.StudyInstanceUID == pydicom.dcmread(produced[0].path).StudyInstanceUID
    for delivery in _deliveries(migrated_db.session_factory):
        assert delivery.status == DeliveryStatus.DELIVERED
        assert (delivery.attempts, delivery.last_dicom_status, delivery.last_error) == (1, 0x0000, "")
        assert delivery.delivered_at is not None and delivery.lease_owner is None
        assert _event_kinds(migrated_db.session_factory, delivery.id) == ["delivery_queued", "delivery_sending", "delivery_delivered"]
    assert dispatch_due(migrated_db.session_factory, settings, owner=OWNER) == 0  # nothing left


def test_pacs_down_backs_off_exponentially_then_delivers_when_up(
    migrated_db: MigratedDB, settings_factory: Callable[..., Settings]
) -> None:
    pacs = PacsSCP(ae_title="PACS0")  # port reserved, not listening: an outage
    settings = _settings(migrated_db, settings_factory, pacs.port, backoff_initial_seconds=1.0, backoff_max_seconds=4.0)
    _job_with_outputs(migrated_db.session_factory, settings, key_slices=1)
    factory = migrated_db.session_factory
    t0 = utcnow()
    expected_delays = [1.0, 2.0, 4.0, 4.0]  # initial * 2**(attempts-1), capped at 4
    now = t0
    for attempt, delay in enumerate(expected_delays, start=1):
        assert dispatch_due(factory, settings, owner=OWNER, now=now) == 2
        for d in _deliveries(factory):
            assert d.status == DeliveryStatus.PENDING
            assert d.attempts == attempt
            assert d.last_dicom_status is None
            assert "no association" in d.last_error
            assert d.next_attempt_at == now + timedelta(seconds=delay)
        assert dispatch_due(factory, settings, owner=OWNER, now=now + timedelta(seconds=delay / 2)) == 0  # not due yet
        now = now + timedelta(seconds=delay)
    with pacs:
        assert dispatch_due(factory, settings, owner=OWNER, now=now) == 2
        pacs.wait_for(2, timeout=5)
    for d in _deliveries(factory):
        assert (d.status, d.attempts, d.last_dicom_status) == (DeliveryStatus.DELIVERED, 5, 0)
        kinds = _event_kinds(factory, d.id)
        assert kinds.count("delivery_retry_scheduled") == 4 and kinds[-1] == "delivery_delivered"


def test_refusal_status_is_recorded_and_retried(migrated_db: MigratedDB, settings_factory: Callable[..., Settings]) -> None:
    factory = migrated_db.session_factory
    with PacsSCP(ae_title="PACS0", status=0xA700) as pacs:
        settings = _settings(migrated_db, settings_factory, pacs.port)
        _job_with_outputs(factory, settings, key_slices=1)
        now = utcnow()
        assert dispatch_due(factory, settings, owner=OWNER, now=now) == 2
        assert pacs.received == [] and [r.status for r in pacs.requests] == [0xA700, 0xA700]
        for d in _deliveries(factory):
            assert (d.status, d.attempts, d.last_dicom_status) == (DeliveryStatus.PENDING, 1, 0xA700)
            assert "0xA700" in d.last_error
        pacs.status = 0x0000
        assert dispatch_due(factory, settings, owner=OWNER, now=now + timedelta(seconds=1)) == 2
        pacs.wait_for(2, timeout=5)
    assert all(d.status == DeliveryStatus.DELIVERED and d.last_dicom_status == 0 for d in _deliveries(factory))


def test_warning_status_counts_as_delivered_and_is_recorded(migrated_db: MigratedDB, settings_factory: Callable[..., Settings]) -> None:
    factory = migrated_db.session_factory
    with PacsSCP(ae_title="PACS0", status=0xB000) as pacs:
        settings = _settings(migrated_db, settings_factory, pacs.port)
        _job_with_outputs(factory, settings, key_slices=1)
        dispatch_due(factory, settings, owner=OWNER)
        pacs.wait_for(2, timeout=5)
    assert [(d.status, d.last_dicom_status) for d in _deliveries(factory)] == [(DeliveryStatus.DELIVERED, 0xB000)] * 2


def test_max_attempts_fail_for_good_and_retry_requeues(migrated_db: MigratedDB, settings_factory: Callable[..., Settings]) -> None:
    factory = migrated_db.session_factory
    pacs = PacsSCP(ae_title="PACS0")
    settings = _settings(migrated_db, settings_factory, pacs.port, max_attempts=2)
    _job_with_outputs(factory, settings, key_slices=1)
    now = utcnow()
    dispatch_due(factory, settings, owner=OWNER, now=now)
    dispatch_due(factory, settings, owner=OWNER, now=now + timedelta(seconds=10))
    deliveries = _deliveries(factory)
    assert [(d.status, d.attempts) for d in deliveries] == [(DeliveryStatus.FAILED, 2)] * 2
    assert _event_kinds(factory, deliveries[0].id)[-1] == "delivery_failed"
    assert dispatch_due(factory, settings, owner=OWNER, now=now + timedelta(hours=1)) == 0  # failed stays failed

    with transaction(factory) as session:
        assert retry_deliveries(session, delivery_ids=[deliveries[0].id]) == 1
    assert [d.status for d in _deliveries(factory)] == [DeliveryStatus.PENDING, DeliveryStatus.FAILED]
    with transaction(factory) as session:
        assert retry_deliveries(session, all_failed=True) == 1
    assert all(d.status == DeliveryStatus.PENDING and d.attempts == 0 for d in _deliveries(factory))
    assert _event_kinds(factory, deliveries[0].id)[-1] == "delivery_retry"
    with pacs:
        assert dispatch_due(factory, settings, owner=OWNER) == 2
        pacs.wait_for(2, timeout=5)
    assert all(d.status == DeliveryStatus.DELIVERED for d in _deliveries(factory))
    with transaction(factory) as session:
        assert retry_deliveries(session, delivery_ids=[d.id for d in deliveries]) == 0  # delivered ones are left alone
        with pytest.raises(DeliveryError):
            retry_deliveries(session)


def test_missing_output_file_fails_at_once(migrated_db: MigratedDB, settings_factory: Callable[..., Settings]) -> None:
    factory = migrated_db.session_factory
    with PacsSCP(ae_title="PACS0") as pacs:
        settings = _settings(migrated_db, settings_factory, pacs.port)
        _, produced = _job_with_outputs(factory, settings, key_slices=1)
        produced[0].path.unlink()
        assert dispatch_due(factory, settings, owner=OWNER) == 2
        pacs.wait_for(1, timeout=5)
    sr, sc = _deliveries(factory)
    assert (sr.status, sr.attempts) == (DeliveryStatus.FAILED, 1) and "missing" in sr.last_error
    assert sc.status == DeliveryStatus.DELIVERED


def test_each_destination_is_served_on_its_own(migrated_db: MigratedDB, settings_factory: Callable[..., Settings]) -> None:
    factory = migrated_db.session_factory
    down = PacsSCP(ae_title="PACS1")
    with PacsSCP(ae_title="PACS0") as up:
        settings = _settings(migrated_db, settings_factory, up.port, down.port)
        _job_with_outputs(factory, settings, key_slices=1)
        assert dispatch_due(factory, settings, owner=OWNER) == 4
        up.wait_for(2, timeout=5)
    status = {(d.destination, d.status) for d in _deliveries(factory)}
    assert status == {("pacs0", DeliveryStatus.DELIVERED), ("pacs1", DeliveryStatus.PENDING)}


def test_unconfigured_destination_fails(migrated_db: MigratedDB, settings_factory: Callable[..., Settings]) -> None:
    factory = migrated_db.session_factory
    settings = _settings(migrated_db, settings_factory, free_port())
    _job_with_outputs(factory, settings, key_slices=1)
    other = settings_factory(destinations=[{"name": "elsewhere", "ae_title": "X", "host": "127.0.0.1", "port": free_port()}])
    assert dispatch_due(factory, other, owner=OWNER) == 2
    assert all(d.status == DeliveryStatus.FAILED and "not configured" in d.last_error for d in _deliveries(factory))


def test_expired_lease_is_taken_over_and_a_live_one_is_not(migrated_db: MigratedDB, settings_factory: Callable[..., Settings]) -> None:
    factory = migrated_db.session_factory
    with PacsSCP(ae_title="PACS0") as pacs:
        settings = _settings(migrated_db, settings_factory, pacs.port)
        _job_with_outputs(factory, settings, key_slices=1)
        now = utcnow()
        first, second = _deliveries(factory)
        with transaction(factory) as session:
            for delivery_id, expires in ((first.id, now - timedelta(seconds=1)), (second.id, now + timedelta(minutes=5))):
                d = session.get(Delivery, delivery_id)
                assert d is not None
                d.status, d.lease_owner, d.lease_expires_at = DeliveryStatus.SENDING, "crashed-dispatcher", expires
        assert dispatch_due(factory, settings, owner=OWNER, now=now) == 1
        pacs.wait_for(1, timeout=5)
    first, second = _deliveries(factory)
    assert first.status == DeliveryStatus.DELIVERED
    assert (second.status, second.lease_owner) == (DeliveryStatus.SENDING, "crashed-dispatcher")


def test_echo_ok_and_failed() -> None:
    with PacsSCP(ae_title="PACS") as pacs:
        destination = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=pacs.port)
        result = echo(destination, calling_ae_title="PE_AGENT", timeout=5)
        assert (result.ok, result.status) == (True, 0)
        assert pacs.echoes == 1 and pacs.associations == ["PE_AGENT"]
    result = echo(destination, calling_ae_title="PE_AGENT", timeout=5)
    assert (result.ok, result.status) == (False, None)
    assert "no association" in result.message and result.seconds >= 0


def test_sop_class_the_destination_does_not_accept_is_retried(
    migrated_db: MigratedDB, settings_factory: Callable[..., Settings]
) -> None:
    factory = migrated_db.session_factory
    with PacsSCP(ae_title="PACS0", sop_classes=[SecondaryCaptureImageStorage]) as pacs:
        settings = _settings(migrated_db, settings_factory, pacs.port)
        _job_with_outputs(factory, settings, key_slices=1)
        assert dispatch_due(factory, settings, owner=OWNER) == 2
        pacs.wait_for(1, timeout=5)
    sr, sc = _deliveries(factory)
    assert (sr.status, sr.attempts, sr.last_dicom_status) == (DeliveryStatus.PENDING, 1, None)
    assert "did not accept" in sr.last_error
    assert sc.status == DeliveryStatus.DELIVERED


def test_two_dispatchers_never_send_the_same_delivery_twice(
    migrated_db: MigratedDB, settings_factory: Callable[..., Settings]
) -> None:
    factory = migrated_db.session_factory
    with PacsSCP(ae_title="PACS0") as pacs:
        settings = _settings(migrated_db, settings_factory, pacs.port)
        for _ in range(3):
            _job_with_outputs(factory, settings, key_slices=2)
        counts: dict[str, int] = {}
        barrier = threading.Barrier(2)

        def run(owner: str) -> None:
            barrier.wait()
            counts[owner] = dispatch_due(factory, settings, owner=owner)

        threads = [threading.Thread(target=run, args=(f"dispatcher-{i}",)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        pacs.wait_for(9, timeout=10)
    assert sum(counts.values()) == 9
    assert len(pacs.requests) == 9 and len(set(pacs.received_uids)) == 9
    assert all(d.status == DeliveryStatus.DELIVERED and d.attempts == 1 for d in _deliveries(factory))


@pytest.mark.skipif(not openssl_available(), reason="openssl is not installed")
def test_tls_destination_gets_objects_over_verified_tls(
    migrated_db: MigratedDB, settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    factory = migrated_db.session_factory
    pki = make_test_pki(tmp_path / "pki")
    with PacsSCP(ae_title="PACS0", ssl_context=pki.server_context()) as pacs:
        destinations = [{"name": "pacs0", "ae_title": "PACS0", "host": "127.0.0.1", "port": pacs.port, "tls": True}]
        trusted = settings_factory(
            destinations=destinations,
            node={"port": 0, "min_free_disk_mb": 1, "tls": {
                "certificate": str(pki.client_certificate), "private_key": str(pki.client_key),
                "ca_certificate": str(pki.ca_certificate),
            }},
        )
        untrusted = settings_factory(destinations=destinations)  # no CA: the PACS certificate cannot be verified
        _job_with_outputs(factory, trusted, key_slices=1)
        now = utcnow()
        assert dispatch_due(factory, untrusted, owner=OWNER, now=now) == 2
        assert pacs.received == []
        assert all(d.status == DeliveryStatus.PENDING and d.last_dicom_status is None for d in _deliveries(factory))
        assert dispatch_due(factory, trusted, owner=OWNER, now=now + timedelta(minutes=1)) == 2
        pacs.wait_for(2, timeout=5)
        destination = trusted.destinations[0]
        assert echo(destination, calling_ae_title="PE_AGENT", timeout=5, tls=trusted.node.tls).ok
        assert not echo(destination, calling_ae_title="PE_AGENT", timeout=5).ok  # TLS destination, no TLS settings
    assert all(d.status == DeliveryStatus.DELIVERED for d in _deliveries(factory))
