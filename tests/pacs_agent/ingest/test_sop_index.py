"""The SOP Instance UID index: one claim per UID across threads and processes, stale entries forgotten."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pacs_agent.ingest.sop_index import IN_FLIGHT_SECONDS, ClaimResult, SopIndex, same_dataset
from pacs_agent.ingest.spool import Spool


def _store(spool: Spool, study: str, series: str, sop: str, data: bytes = b"x") -> Path:
    path = spool.instance_path(study, series, sop)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00" * 128 + b"DICM" + data)
    return path


def test_claims(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1)
    index = SopIndex(spool)
    assert index.claim("1.1", "1.2", "1.3").result is ClaimResult.NEW
    assert index.claim("1.1", "1.2", "1.3").result is ClaimResult.IN_FLIGHT  # not yet stored
    _store(spool, "1.1", "1.2", "1.3")
    assert index.claim("1.1", "1.2", "1.3").result is ClaimResult.SAME_SERIES
    other = index.claim("1.1", "1.9", "1.3")
    assert other.result is ClaimResult.OTHER_SERIES and other.stored_series_instance_uid == "1.2"
    index.release("1.3")
    assert index.claim("1.1", "1.9", "1.3").result is ClaimResult.NEW


def test_an_entry_whose_instance_is_gone_is_forgotten(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1)
    index = SopIndex(spool)
    assert index.claim("1.1", "1.2", "1.3").result is ClaimResult.NEW
    entry = next((spool.root / "sop").rglob("1.3"))
    old = time.time() - IN_FLIGHT_SECONDS - 5
    os.utime(entry, (old, old))
    assert index.claim("1.1", "1.9", "1.3").result is ClaimResult.NEW


def test_rebuild_indexes_instances_stored_before_the_index(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1)
    _store(spool, "1.1", "1.2", "1.3")
    _store(spool, "1.1", "1.2", "1.4")
    index = SopIndex(spool)
    assert index.rebuild() == 2 and index.rebuild() == 0
    assert index.claim("1.1", "1.5", "1.4").result is ClaimResult.OTHER_SERIES


def test_same_dataset_ignores_the_file_meta_and_sees_one_changed_byte(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.BitsAllocated = "1.2.840.10008.5.1.4.1.1.2", generate_uid(), 16
    ds.PixelData = b"\x00\x01" * 64
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    ds.file_meta.ImplementationVersionName = "OTHER_SENDER"
    ds.save_as(tmp_path / "b.dcm", enforce_file_format=True)
    assert same_dataset(tmp_path / "a.dcm", tmp_path / "b.dcm")
    ds.PixelData = b"\x00\x02" * 64
    ds.save_as(tmp_path / "c.dcm", enforce_file_format=True)
    assert not same_dataset(tmp_path / "a.dcm", tmp_path / "c.dcm")
