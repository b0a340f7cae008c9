"""pacs_agent.dicom.limits on its own: bounded PDU reads, bounded inflate, the capped dataset file."""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from pacs_agent.dicom.limits import (
    NEGOTIATION_PDU_CAP,
    UNANNOUNCED_PDU_CAP,
    AssociationLimits,
    InflateError,
    _bounded_recv,
    abort_bytes,
    inflate_bounded,
    pdu_cap,
)


def _deflated_file(path: Path, inflated_bytes: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "Deflated^Test"
    ds.add_new(0x00091010, "OB", b"\x00" * inflated_bytes)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_a_deflated_file_inflates_to_an_explicit_little_endian_file(tmp_path: Path) -> None:
    _deflated_file(tmp_path / "in.dcm", 3 * 1024 * 1024)
    out = inflate_bounded(tmp_path / "in.dcm", tmp_path, 8 * 1024 * 1024)
    ds = pydicom.dcmread(out)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert str(ds.PatientName) == "Deflated^Test" and len(ds[0x00091010].value) == 3 * 1024 * 1024


def test_a_deflate_bomb_stops_at_the_limit_and_leaves_nothing(tmp_path: Path) -> None:
    _deflated_file(tmp_path / "bomb.dcm", 40 * 1024 * 1024)
    assert (tmp_path / "bomb.dcm").stat().st_size < 100_000
    with pytest.raises(InflateError, match="inflates to more than") as info:
        inflate_bounded(tmp_path / "bomb.dcm", tmp_path, 4 * 1024 * 1024)
    assert info.value.too_large
    assert [p.name for p in tmp_path.iterdir()] == ["bomb.dcm"]


def test_garbage_that_claims_to_be_deflated_is_refused(tmp_path: Path) -> None:
    from pynetdicom.dsutils import split_dataset

    _deflated_file(tmp_path / "in.dcm", 10)
    _meta, offset = split_dataset(tmp_path / "in.dcm")
    raw = (tmp_path / "in.dcm").read_bytes()
    (tmp_path / "in.dcm").write_bytes(raw[:offset] + b"\xff" * 64)  # a deflate block of the reserved type
    with pytest.raises(InflateError, match="error: Error -3"):
        inflate_bounded(tmp_path / "in.dcm", tmp_path, 1024 * 1024)
    assert [p.name for p in tmp_path.iterdir()] == ["in.dcm"]


def test_caps_per_pdu_type(tmp_path: Path) -> None:
    assert pdu_cap(AssociationLimits(16384, 1, tmp_path), 0x04) == 16384
    assert pdu_cap(AssociationLimits(0, 1, tmp_path), 0x04) == UNANNOUNCED_PDU_CAP
    assert pdu_cap(AssociationLimits(16384, 1, tmp_path), 0x01) == NEGOTIATION_PDU_CAP


@pytest.mark.parametrize("declared", [16385, 0x7FFFFFFF, 0xFFFFFFFF])
def test_a_declared_length_above_the_cap_is_aborted_without_reading(tmp_path: Path, declared: int) -> None:
    ours, theirs = socket.socketpair()
    try:
        recv = _bounded_recv(SimpleNamespace(socket=ours), AssociationLimits(16384, 1, tmp_path), "peer")
        theirs.sendall(struct.pack(">BBL", 0x04, 0, declared) + b"x" * 100)
        assert bytes(recv(6)) == struct.pack(">BBL", 0x04, 0, declared)
        assert recv(declared) == bytearray()
        theirs.settimeout(2)
        assert theirs.recv(64) == abort_bytes() == b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"
    finally:
        ours.close()
        theirs.close()


def test_a_pdu_within_the_cap_is_read_whole_from_pieces(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    try:
        recv = _bounded_recv(SimpleNamespace(socket=ours), AssociationLimits(16384, 1, tmp_path), "peer")
        body = bytes(range(256)) * 40
        theirs.sendall(struct.pack(">BBL", 0x04, 0, len(body)) + body)
        assert len(recv(6)) == 6
        assert bytes(recv(len(body))) == body
    finally:
        ours.close()
        theirs.close()


def test_the_installed_pynetdicom_has_every_internal_the_guard_replaces() -> None:
    from pacs_agent.dicom.limits import missing_guard_names

    assert missing_guard_names() == ()


def test_a_receiver_without_the_guards_internals_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch, settings_factory: Any
) -> None:
    import pynetdicom.dimse_messages

    from pacs_agent.db.session import make_engine, make_session_factory
    from pacs_agent.db.migrate import upgrade_database
    from pacs_agent.dicom.limits import missing_guard_names
    from pacs_agent.dicom.scp import Receiver
    from pacs_agent.errors import ReceiverError

    monkeypatch.delattr(pynetdicom.dimse_messages, "NamedTemporaryFile")
    assert "pynetdicom.dimse_messages.NamedTemporaryFile" in missing_guard_names()
    settings = settings_factory()
    engine = make_engine(settings.database.url)
    upgrade_database(settings.database.url, engine)
    receiver = Receiver(settings, make_session_factory(engine))
    try:
        with pytest.raises(ReceiverError, match="NamedTemporaryFile"):
            receiver.start()
    finally:
        receiver.stop()
        engine.dispose()
