"""The receiver against real peers on loopback: pynetdicom and dcmtk SCUs, a real SQLite database."""

from __future__ import annotations

import io
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, _config
from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from pacs_agent.db.migrate import upgrade_database
from pacs_agent.db.models import Association, Event, Instance, Series, SeriesState
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.dicom.scp import Receiver
from pacs_agent.errors import ReceiverError
from pacs_agent.logs import configure_logging
from pacs_agent.settings import LogSettings, Settings
from tests.support.receiver import PATIENT_NAME, Peer, ct_slice, files_under, scu, send

def test_c_echo(start_receiver: Callable[..., Peer]) -> None:
    peer = start_receiver()
    assoc = scu().associate("127.0.0.1", peer.port, ae_title="PE_AGENT")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_series_lands_in_the_spool_with_rows_and_counts(start_receiver: Callable[..., Peer]) -> None:
    peer = start_receiver()
    study, series = generate_uid(), generate_uid()
    datasets = [ct_slice(study, series, i) for i in range(6)]
    assert send(peer, datasets) == [0] * 6
    closed = peer.wait_closed()
    assert [a.close_reason for a in closed] == ["released"]
    assert closed[0].calling_ae_title == "SCANNER"

    spool = peer.receiver.spool
    for ds in datasets:
        path = spool.instance_path(study, series, ds.SOPInstanceUID)
        stored = pydicom.dcmread(path)  # a valid Part 10 file: preamble, meta, dataset
        assert stored.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        assert stored.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert np.array_equal(stored.pixel_array, ds.pixel_array)
    assert list(spool.tmp_dir.iterdir()) == []

    with peer.session() as session:
        row = session.scalars(select(Series)).one()
        assert (row.study_instance_uid, row.series_instance_uid) == (study, series)
        assert row.instance_count == 6
        assert row.state == SeriesState.RECEIVING
        assert (row.modality, row.series_description, row.calling_ae_title) == ("CT", "CTA CHEST PE", "SCANNER")
        instances = session.scalars(select(Instance).order_by(Instance.id)).all()
        assert [i.sop_instance_uid for i in instances] == [ds.SOPInstanceUID for ds in datasets]
        assert {i.association_id for i in instances} == {closed[0].id}
        assert all(i.size_bytes == (spool.root / i.path).stat().st_size for i in instances)
        assert row.last_received_at >= row.first_received_at
    kinds = [e.kind for e in peer.events("association_opened") + peer.events("association_closed")]
    assert kinds == ["association_opened", "association_closed"]
    assert peer.receiver.counters()["stored"] == 6


def test_patient_identifiers_are_not_in_events_or_logs(
    start_receiver: Callable[..., Peer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
) -> None:
    """Logs of this process (in-process receiver) and of the receiver processes (their stdout: fd-level capture)."""
    study, series = generate_uid(), generate_uid()
    files = []
    for i, overrides in enumerate([{}, {"SeriesInstanceUID": "../x"}, {"SeriesInstanceUID": PATIENT_NAME}]):
        files.append(tmp_path / f"{i}.dcm")  # the third abuses a UID field for the patient's name
        ct_slice(study, series, i, **overrides).save_as(files[-1], enforce_file_format=True)
    peer = start_receiver(log={"format": "json", "level": "DEBUG"})
    capfd.readouterr()
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # the sender does not parse: logs are ours
    stream = io.StringIO()
    configure_logging(LogSettings(format="json", level="DEBUG"), stream=stream)
    try:
        assoc = scu(transfer_syntaxes=[ExplicitVRLittleEndian]).associate("127.0.0.1", peer.port, ae_title="PE_AGENT")
        assert [assoc.send_c_store(f).Status for f in files] == [0, 0xA900, 0xA900]
        assoc.release()
        peer.wait_closed()
        with peer.session() as session:
            events = repr([(e.kind, e.detail) for e in session.scalars(select(Event))])
        peer.receiver.stop()
    finally:
        configure_logging(LogSettings(format="json", level="WARNING"), stream=io.StringIO())
    captured = capfd.readouterr()
    logs = stream.getvalue() + captured.out + captured.err
    assert events.count("instance_rejected") == 2
    assert logs.count('"instance_rejected"') == 2 and "receiver_stopped" in logs
    for text in (events, logs):
        for value in (PATIENT_NAME, "Doe^Jane", "RCV-0001", "19700101"):
            assert value not in text


@pytest.mark.dcmtk
def test_dcmtk_storescu_as_an_independent_sender(start_receiver: Callable[..., Peer], tmp_path: Path) -> None:
    if shutil.which("storescu") is None:
        pytest.skip("dcmtk storescu is not installed")
    peer = start_receiver()
    study, series = generate_uid(), generate_uid()
    folder = tmp_path / "send"
    folder.mkdir()
    for i in range(4):
        ct_slice(study, series, i).save_as(folder / f"{i}.dcm", enforce_file_format=True)
    result = subprocess.run(
        ["storescu", "-aet", "DCMTK", "-aec", "PE_AGENT", "127.0.0.1", str(peer.port), *map(str, sorted(folder.iterdir()))],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    peer.wait_closed()
    with peer.session() as session:
        row = session.scalars(select(Series)).one()
        assert row.instance_count == 4 and row.calling_ae_title == "DCMTK"
    assert len(list(peer.receiver.spool.series_dir(study, series).iterdir())) == 4


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_transfer_syntax_is_stored_as_received(start_receiver: Callable[..., Peer], syntax: str) -> None:
    peer = start_receiver()
    study, series = generate_uid(), generate_uid()
    ds = ct_slice(study, series, 0, size=32)
    original = ds.pixel_array.copy()
    ds.compress(syntax)
    sent_pixel_data = bytes(ds.PixelData)
    assert send(peer, [ds], ae=scu(transfer_syntaxes=[syntax])) == [0]
    peer.wait_closed()
    stored = pydicom.dcmread(peer.receiver.spool.instance_path(study, series, ds.SOPInstanceUID))
    assert stored.file_meta.TransferSyntaxUID == syntax
    assert bytes(stored.PixelData) == sent_pixel_data  # not decoded, not re-encoded
    assert np.array_equal(stored.pixel_array, original)
    with peer.session() as session:
        assert session.scalars(select(Instance.transfer_syntax_uid)).one() == syntax


@pytest.mark.parametrize("offered", [[JPEGBaseline8Bit, ExplicitVRLittleEndian], [RLELossless, ImplicitVRLittleEndian, ExplicitVRLittleEndian]])
def test_uncompressed_is_preferred_when_offered_with_others(start_receiver: Callable[..., Peer], offered: list[str]) -> None:
    """A sender is never asked to compress (lossily or not) by our choice of transfer syntax."""
    peer = start_receiver()
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage, offered)
    assoc = ae.associate("127.0.0.1", peer.port, ae_title="PE_AGENT")
    assert assoc.is_established
    [context] = assoc.accepted_contexts
    assert context.transfer_syntax == [ExplicitVRLittleEndian]
    assoc.release()


def test_every_pydicom_transfer_syntax_is_accepted(start_receiver: Callable[..., Peer]) -> None:
    peer = start_receiver()
    for syntax in ALL_TRANSFER_SYNTAXES:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(CTImageStorage, [syntax])
        assoc = ae.associate("127.0.0.1", peer.port, ae_title="PE_AGENT")
        assert assoc.is_established
        assert [cx.transfer_syntax for cx in assoc.accepted_contexts] == [[syntax]], syntax
        assoc.release()


def test_duplicate_sop_instance_is_stored_once(start_receiver: Callable[..., Peer]) -> None:
    peer = start_receiver()
    study, series = generate_uid(), generate_uid()
    ds = ct_slice(study, series, 0)
    assert send(peer, [ds, ds]) == [0, 0]
    assert send(peer, [ds]) == [0]
    peer.wait_closed(2)
    assert len(list(peer.receiver.spool.series_dir(study, series).iterdir())) == 1
    with peer.session() as session:
        assert session.scalars(select(Instance)).all().__len__() == 1
        assert session.scalars(select(Series.instance_count)).one() == 1
    assert len(peer.events("duplicate_instance")) == 2


def test_same_sop_under_another_series_is_not_stored_twice(start_receiver: Callable[..., Peer]) -> None:
    peer = start_receiver()
    study = generate_uid()
    first = ct_slice(study, generate_uid(), 0)
    second = ct_slice(study, generate_uid(), 0, sop=first.SOPInstanceUID)
    assert send(peer, [first, second]) == [0, 0]
    peer.wait_closed()
    with peer.session() as session:
        rows = session.scalars(select(Instance)).all()
        assert len(rows) == 1 and rows[0].path.endswith(f"{first.SeriesInstanceUID}/{first.SOPInstanceUID}.dcm")
    assert not peer.receiver.spool.series_dir(study, second.SeriesInstanceUID).joinpath(f"{first.SOPInstanceUID}.dcm").exists()
    assert len(peer.events("duplicate_instance")) == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("SeriesInstanceUID", "../../x"),
        ("StudyInstanceUID", "../../../../etc"),
        ("StudyInstanceUID", "/tmp/abs"),
        ("SeriesInstanceUID", "1.2.abc"),
        ("SeriesInstanceUID", "1.02.3"),
        ("SeriesInstanceUID", ""),
    ],
)
def test_invalid_uids_are_refused_with_nothing_written(
    start_receiver: Callable[..., Peer], tmp_path: Path, field: str, value: str
) -> None:
    peer = start_receiver()
    before = files_under(tmp_path)
    ds = ct_slice(generate_uid(), generate_uid(), 0, **{field: value})
    assert send(peer, [ds]) == [0xA900]
    peer.wait_closed()
    after = {p for p in files_under(tmp_path) if not p.name.startswith("pe_agent.sqlite")}
    assert after - before == set()
    with peer.session() as session:
        assert session.scalars(select(Instance)).all() == []
    rejected = peer.events("instance_rejected")
    assert len(rejected) == 1 and rejected[0].detail["status"] == 0xA900
    assert field in rejected[0].detail["reason"]


def test_sop_instance_uid_differing_from_the_request_is_refused(
    start_receiver: Callable[..., Peer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A traversal in the dataset's SOP Instance UID while the request's UID is valid."""
    peer = start_receiver()
    study, series = generate_uid(), generate_uid()
    ds = ct_slice(study, series, 0)
    ds.SOPInstanceUID = "../../../evil"
    path = tmp_path / "evil.dcm"
    ds.save_as(path, enforce_file_format=True)  # file meta keeps the valid UID
    # Chunked sending takes the request's Affected SOP Instance UID from the file meta.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    assoc = scu(transfer_syntaxes=[ExplicitVRLittleEndian]).associate("127.0.0.1", peer.port, ae_title="PE_AGENT")
    status = assoc.send_c_store(path)
    assoc.release()
    assert status.Status == 0xA900
    assert not (peer.receiver.spool.incoming_dir / study).exists()
    assert not (tmp_path / "evil").exists() and not (tmp_path / "evil.dcm.dcm").exists()
    peer.wait_closed()
    assert "SOPInstanceUID" in peer.events("instance_rejected")[0].detail["reason"]


def test_unreadable_dataset_gets_c210(start_receiver: Callable[..., Peer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deflated transfer syntax whose bytes are not a deflate stream: pydicom cannot read it."""
    peer = start_receiver()
    ds = ct_slice(generate_uid(), generate_uid(), 0)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    broken = tmp_path / "broken.dcm"
    with broken.open("wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fh, ds.file_meta)  # type: ignore[arg-type]
        fh.write(b"this is not a deflate stream" * 10)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = scu(transfer_syntaxes=[DeflatedExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", peer.port, ae_title="PE_AGENT")
    status = assoc.send_c_store(broken)
    assoc.release()
    assert status.Status == 0xC210
    assert list(peer.receiver.spool.incoming_dir.iterdir()) == []
    peer.wait_closed()
    rejected = peer.events("instance_rejected")
    assert rejected[0].detail["reason"].startswith("dataset cannot be read (error: Error -3 while decompressing")


def test_other_storage_classes_are_accepted_and_recorded_as_ignored(start_receiver: Callable[..., Peer]) -> None:
    peer = start_receiver()
    ds = ct_slice(generate_uid(), generate_uid(), 0, Modality="MR")
    ds.SOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    assert send(peer, [ds]) == [0]
    peer.wait_closed()
    assert list(peer.receiver.spool.incoming_dir.iterdir()) == []
    with peer.session() as session:
        assert session.scalars(select(Series)).all() == []
        assert session.scalars(select(Instance)).all() == []
    ignored = peer.events("instance_ignored")
    assert len(ignored) == 1
    assert ignored[0].detail["sop_class_uid"] == MRImageStorage
    assert "MR Image Storage" in ignored[0].detail["reason"]
    closed = peer.events("association_closed")
    assert closed[0].detail["ignored"] == 1


def test_disk_floor_answers_a700_and_writes_nothing(start_receiver: Callable[..., Peer]) -> None:
    peer = start_receiver(node={"port": 0, "min_free_disk_mb": 10**12})
    ds = ct_slice(generate_uid(), generate_uid(), 0)
    assert send(peer, [ds]) == [0xA700]
    peer.wait_closed()
    spool = peer.receiver.spool
    assert files_under(spool.root) == set()
    rejected = peer.events("instance_rejected")
    assert rejected[0].detail["status"] == 0xA700


def test_unknown_calling_ae_is_rejected_at_association(start_receiver: Callable[..., Peer]) -> None:
    peer = start_receiver(node={"port": 0, "allowed_calling_ae_titles": ["ER_CT", "PACS"]})
    assoc = scu("INTRUDER").associate("127.0.0.1", peer.port, ae_title="PE_AGENT")
    assert assoc.is_rejected
    # A-ASSOCIATE-RJ: rejected-permanent (1), service-user (1), calling AE title not recognised (3)
    assert (assoc.acceptor.primitive.result, assoc.acceptor.primitive.result_source,
            assoc.acceptor.primitive.diagnostic) == (0x01, 0x01, 0x03)
    allowed = scu("ER_CT").associate("127.0.0.1", peer.port, ae_title="PE_AGENT")
    assert allowed.is_established
    allowed.release()
    rejected = peer.events("association_rejected")
    assert [e.detail["calling_ae_title"] for e in rejected] == ["INTRUDER"]


def test_maximum_associations(start_receiver: Callable[..., Peer]) -> None:
    peer = start_receiver(node={"port": 0, "max_associations": 2})
    first = scu("A").associate("127.0.0.1", peer.port, ae_title="PE_AGENT")
    second = scu("B").associate("127.0.0.1", peer.port, ae_title="PE_AGENT")
    third = scu("C").associate("127.0.0.1", peer.port, ae_title="PE_AGENT")
    assert first.is_established and second.is_established
    assert third.is_rejected
    # rejected-transient (2), service-provider presentation (3), local limit exceeded (2)
    assert (third.acceptor.primitive.result, third.acceptor.primitive.result_source,
            third.acceptor.primitive.diagnostic) == (0x02, 0x03, 0x02)
    study, series = generate_uid(), generate_uid()
    assert first.send_c_store(ct_slice(study, series, 0)).Status == 0
    first.release()
    second.release()
    peer.wait_closed(2)
    assert send(peer, [ct_slice(study, series, 1)]) == [0]


def test_reconcile_records_spool_files_without_rows(settings_factory: Callable[..., Settings]) -> None:
    """A crash between rename and commit: the file is in the spool, the database never heard of it."""
    settings = settings_factory()
    engine = make_engine(settings.database.url)
    upgrade_database(settings.database.url, engine)
    factory = make_session_factory(engine)
    receiver = Receiver(settings, factory)
    study, series = generate_uid(), generate_uid()
    orphans = [ct_slice(study, series, i) for i in range(3)]
    for ds in orphans:
        path = receiver.spool.instance_path(study, series, ds.SOPInstanceUID)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
    (receiver.spool.tmp_dir / "half-written.part").write_bytes(b"\x00" * 10)
    receiver.start()
    try:
        with factory() as session:
            row = session.scalars(select(Series)).one()
            assert row.instance_count == 3 and row.series_instance_uid == series
            assert {i.association_id for i in row.instances} == {None}
        assert list(receiver.spool.tmp_dir.iterdir()) == []
        assert receiver.reconcile() == 0  # idempotent
        # one more orphan in a series the database knows: found too
        extra = ct_slice(study, series, 3)
        extra.save_as(receiver.spool.instance_path(study, series, extra.SOPInstanceUID), enforce_file_format=True)
        assert receiver.reconcile() == 1
        with factory() as session:
            assert session.scalars(select(Series.instance_count)).one() == 4
    finally:
        receiver.stop()
        engine.dispose()


def test_port_in_use_is_a_clear_error(start_receiver: Callable[..., Peer], settings_factory: Callable[..., Settings]) -> None:
    peer = start_receiver()
    settings = settings_factory(node={"port": peer.port})
    engine = make_engine(settings.database.url)
    receiver = Receiver(settings, make_session_factory(engine))
    with pytest.raises(ReceiverError, match="cannot listen"):
        receiver.start()
    engine.dispose()


# -- TLS -------------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Test CA",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)
        ext = ["-extfile", "server.ext"] if name == "server" else []
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-out", f"{name}.pem", *ext, cwd=d)
    return {name: d / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def _tls_settings(certificates: dict[str, Path]) -> dict[str, Any]:
    return {
        "port": 0,
        "tls": {
            "enabled": True,
            "certificate": str(certificates["server.pem"]),
            "private_key": str(certificates["server.key"]),
            "ca_certificate": str(certificates["ca.pem"]),
            "require_client_certificate": True,
        },
    }


def _client_context(certificates: dict[str, Path], *, with_certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certificates["ca.pem"]))
    if with_certificate:
        context.load_cert_chain(str(certificates["client.pem"]), str(certificates["client.key"]))
    return context


def test_tls_with_client_certificate(start_receiver: Callable[..., Peer], certificates: dict[str, Path]) -> None:
    peer = start_receiver(node=_tls_settings(certificates))
    study, series = generate_uid(), generate_uid()
    context = _client_context(certificates, with_certificate=True)
    statuses = send(peer, [ct_slice(study, series, 0)], tls_args=(context, "127.0.0.1"))
    assert statuses == [0]
    peer.wait_closed()
    assert peer.receiver.spool.instance_path(study, series, "1.2").parent.is_dir()


def test_tls_refuses_a_client_without_certificate_and_plain_tcp(
    start_receiver: Callable[..., Peer], certificates: dict[str, Path]
) -> None:
    peer = start_receiver(node=_tls_settings(certificates))
    context = _client_context(certificates, with_certificate=False)
    no_cert = scu().associate("127.0.0.1", peer.port, ae_title="PE_AGENT", tls_args=(context, "127.0.0.1"))
    assert not no_cert.is_established
    plain = scu().associate("127.0.0.1", peer.port, ae_title="PE_AGENT")
    assert not plain.is_established
    # the listener is still up for a proper client
    good = scu().associate("127.0.0.1", peer.port, ae_title="PE_AGENT",
                           tls_args=(_client_context(certificates, with_certificate=True), "127.0.0.1"))
    assert good.is_established
    assert good.send_c_echo().Status == 0
    good.release()


def test_tls_client_certificate_required_needs_a_ca(settings_factory: Callable[..., Settings], certificates: dict[str, Path]) -> None:
    tls = _tls_settings(certificates)
    tls["tls"]["ca_certificate"] = ""
    settings = settings_factory(node=tls)
    engine = make_engine(settings.database.url)
    receiver = Receiver(settings, make_session_factory(engine))
    with pytest.raises(ReceiverError, match="ca_certificate"):
        receiver.start()
    engine.dispose()


@pytest.mark.dcmtk
def test_dcmtk_storescu_over_tls(start_receiver: Callable[..., Peer], certificates: dict[str, Path], tmp_path: Path) -> None:
    if shutil.which("storescu") is None:
        pytest.skip("dcmtk storescu is not installed")
    peer = start_receiver(node=_tls_settings(certificates))
    study, series = generate_uid(), generate_uid()
    file = tmp_path / "0.dcm"
    ct_slice(study, series, 0).save_as(file, enforce_file_format=True)
    base = ["storescu", "-aet", "DCMTK", "-aec", "PE_AGENT", "+cf", str(certificates["ca.pem"])]
    with_cert = subprocess.run(
        [*base, "+tls", str(certificates["client.key"]), str(certificates["client.pem"]), "127.0.0.1", str(peer.port), str(file)],
        capture_output=True, text=True, timeout=60,
    )
    assert with_cert.returncode == 0, with_cert.stderr
    anonymous = subprocess.run(
        [*base, "+tla", "127.0.0.1", str(peer.port), str(file)], capture_output=True, text=True, timeout=60,
    )
    assert anonymous.returncode != 0
    peer.wait_closed()
    with peer.session() as session:
        assert session.scalars(select(Series.instance_count)).one() == 1


def test_aborted_association_is_recorded_and_stored_instances_kept(start_receiver: Callable[..., Peer]) -> None:
    peer = start_receiver()
    study, series = generate_uid(), generate_uid()
    assoc = scu().associate("127.0.0.1", peer.port, ae_title="PE_AGENT")
    assert assoc.send_c_store(ct_slice(study, series, 0)).Status == 0
    assoc.abort()
    [closed] = peer.wait_closed()
    assert closed.close_reason == "aborted"
    with peer.session() as session:
        assert session.scalars(select(Series.instance_count)).one() == 1


def test_concurrent_senders_of_one_series(start_receiver: Callable[..., Peer]) -> None:
    peer = start_receiver()
    study, series = generate_uid(), generate_uid()
    datasets = [ct_slice(study, series, i) for i in range(24)]
    results: list[list[int]] = []

    def sender(part: list[Dataset]) -> None:
        results.append(send(peer, part, ae=scu(f"SENDER{len(part)}")))

    threads = [threading.Thread(target=sender, args=(datasets[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(s for r in results for s in r) == [0] * 24
    closed = peer.wait_closed(4)
    assert len(closed) == 4
    with peer.session() as session:
        assert session.scalars(select(Series.instance_count)).one() == 24
        instances = session.scalars(select(Instance)).all()
        assert len({i.association_id for i in instances}) == 4
    assert len(list(peer.receiver.spool.series_dir(study, series).iterdir())) == 24


def test_enhanced_ct_phantom_is_stored(start_receiver: Callable[..., Peer], tmp_path: Path) -> None:
    from phantoms import PhantomSpec, write_phantom_series
    from pynetdicom.sop_class import EnhancedCTImageStorage  # type: ignore[attr-defined]

    truth = write_phantom_series(tmp_path / "p", PhantomSpec(n_slices=12, rows=32, columns=32), enhanced=True)
    peer = start_receiver()
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(EnhancedCTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", peer.port, ae_title="PE_AGENT")
    assert assoc.send_c_store(truth.files[0]).Status == 0
    assoc.release()
    peer.wait_closed()
    stored = pydicom.dcmread(peer.receiver.spool.instance_path(
        truth.study_instance_uid, truth.series_instance_uid, truth.sop_instance_uids[0]))
    assert stored.SOPClassUID == EnhancedCTImageStorage and int(stored.NumberOfFrames) == 12
    with peer.session() as session:
        assert session.scalars(select(Instance.sop_class_uid)).one() == EnhancedCTImageStorage


def test_a_silent_tls_client_does_not_block_other_clients(
    start_receiver: Callable[..., Peer], certificates: dict[str, Path]
) -> None:
    """A peer that connects and never starts the TLS handshake (a probe, a stuck sender) holds only itself."""
    import socket

    peer = start_receiver(node=_tls_settings(certificates))
    with socket.create_connection(("127.0.0.1", peer.port)) as _silent:
        time.sleep(0.2)  # the listener has accepted it
        started = time.monotonic()
        ae = scu()
        ae.acse_timeout = ae.network_timeout = 5
        good = ae.associate("127.0.0.1", peer.port, ae_title="PE_AGENT",
                            tls_args=(_client_context(certificates, with_certificate=True), "127.0.0.1"))
        assert good.is_established
        assert time.monotonic() - started < 3
        good.release()


def test_stop_closes_open_associations_in_the_database(start_receiver: Callable[..., Peer]) -> None:
    peer = start_receiver()
    study, series = generate_uid(), generate_uid()
    assoc = scu().associate("127.0.0.1", peer.port, ae_title="PE_AGENT")
    assert assoc.send_c_store(ct_slice(study, series, 0)).Status == 0
    peer.receiver.stop()
    with peer.factory() as session:
        association = session.scalars(select(Association)).one()
        assert association.closed_at is not None and association.close_reason == "aborted"
        assert session.scalars(select(Series.instance_count)).one() == 1
    assert not peer.receiver.is_running
    assert _config.STORE_RECV_CHUNKED_DATASET is False  # pynetdicom's process-wide setting is restored
    with pytest.raises(ReceiverError, match="not running"):
        _ = peer.receiver.port


@pytest.mark.parametrize("start_receiver", [1], ids=["in-process"], indirect=True)  # patches this process
def test_without_chunked_receive_the_encoded_dataset_is_stored(
    start_receiver: Callable[..., Peer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another component may turn pynetdicom's chunked receive off; instances are still stored whole."""
    peer = start_receiver()
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", False)
    study, series = generate_uid(), generate_uid()
    ds = ct_slice(study, series, 0)
    assert send(peer, [ds]) == [0]
    stored = pydicom.dcmread(peer.receiver.spool.instance_path(study, series, ds.SOPInstanceUID))
    assert np.array_equal(stored.pixel_array, ds.pixel_array)
    assert list(peer.receiver.spool.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("start_receiver", [1], ids=["in-process"], indirect=True)  # patches this process
@pytest.mark.parametrize("fsync", [False, True])
def test_storage_fsync_setting_decides_whether_instances_are_synced(
    start_receiver: Callable[..., Peer], monkeypatch: pytest.MonkeyPatch, fsync: bool
) -> None:
    import os

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    peer = start_receiver(storage={"fsync": fsync})
    assert peer.receiver.spool.fsync_enabled is fsync
    study, series = generate_uid(), generate_uid()
    assert send(peer, [ct_slice(study, series, i) for i in range(3)]) == [0, 0, 0]
    assert (len(synced) >= 3) is fsync


def test_a_connection_closed_before_the_release_is_announced_is_recorded_as_released(
    settings_factory: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom's DUL closes the socket right after the A-RELEASE-RP, sometimes before the association
    thread announces the release: the close waits for that; without any announcement it counts as aborted."""
    import pacs_agent.dicom.scp as receiver_module

    monkeypatch.setattr(receiver_module, "_CLOSE_GRACE_SECONDS", 0.2)
    receiver = Receiver(settings_factory(), sessionmaker())
    records: list[Any] = []
    monkeypatch.setattr(receiver, "_put", records.append)

    released, dropped = object(), object()
    for assoc, ae_title in ((released, "SCANNER"), (dropped, "OTHER")):
        state = receiver_module._AssociationState(association_id=f"id-{ae_title}", calling_ae_title=ae_title)
        receiver._associations[id(assoc)] = state

    def event(assoc: object) -> Any:
        return type("Event", (), {"assoc": assoc})()

    receiver._on_connection_closed(event(released))
    receiver._on_closed(event(released), "released")  # announced after the socket closed
    receiver._on_connection_closed(event(dropped))  # never announced
    time.sleep(0.6)
    assert [(r.association_id, r.reason) for r in records] == [("id-SCANNER", "released"), ("id-OTHER", "aborted")]
    assert receiver._associations == {}
