"""The spool: UID validation, paths that cannot leave the root, atomic moves, the disk floor."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacs_agent.errors import InvalidUIDError, StorageError
from pacs_agent.ingest.spool import Spool, validate_uid


@pytest.mark.parametrize(
    "uid",
    ["1.2.840.10008.5.1.4.1.1.2", "0", "1.0.3", "2.25.329800735698586629295641978511506172918", "9" * 64],
)
def test_valid_uids_pass_unchanged(uid: str) -> None:
    assert validate_uid(uid) == uid


def test_trailing_nul_padding_is_removed() -> None:
    assert validate_uid("1.2.3\x00") == "1.2.3"


@pytest.mark.parametrize(
    ("uid", "message"),
    [
        ("", "empty"),
        ("../../x", "not a valid UID"),
        ("1.2/../../3", "not a valid UID"),
        ("1.2.03", "not a valid UID"),
        ("1..2", "not a valid UID"),
        (".1.2", "not a valid UID"),
        ("1.2.", "not a valid UID"),
        ("1.2.a", "not a valid UID"),
        ("1.2 3", "not a valid UID"),
        ("9" * 65, "at most 64"),
        ("/etc/passwd", "not a valid UID"),
    ],
)
def test_invalid_uids_are_refused(uid: str, message: str) -> None:
    with pytest.raises(InvalidUIDError, match=message):
        validate_uid(uid)


def test_layout_is_created(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    assert spool.incoming_dir == (tmp_path / "spool" / "incoming").resolve()
    for folder in (spool.incoming_dir, spool.tmp_dir, spool.outbox_dir):
        assert folder.is_dir()


def test_instance_path_is_study_series_sop_below_incoming(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 0)
    path = spool.instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert path == spool.incoming_dir / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    assert spool.relative(path) == "incoming/1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    assert spool.absolute(spool.relative(path)) == path


@pytest.mark.parametrize("bad", ["..", "../../x", "1.2/3", ""])
def test_instance_path_refuses_traversal(tmp_path: Path, bad: str) -> None:
    spool = Spool(tmp_path / "spool", 0)
    for args in [(bad, "1.2", "1.3"), ("1.2", bad, "1.3"), ("1.2", "1.3", bad)]:
        with pytest.raises(InvalidUIDError):
            spool.instance_path(*args)


def test_absolute_refuses_paths_leaving_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    with pytest.raises(InvalidUIDError, match="outside the spool"):
        spool.absolute("../outside.dcm")
    (tmp_path / "elsewhere").mkdir()
    (spool.incoming_dir / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InvalidUIDError, match="outside the spool"):
        spool.absolute("incoming/link/x.dcm")


def test_outbox_path(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 0)
    assert spool.outbox_path(7, "1.2.3") == spool.outbox_dir / "7" / "1.2.3.dcm"
    with pytest.raises(StorageError):
        spool.outbox_path(-1, "1.2.3")
    with pytest.raises(InvalidUIDError):
        spool.outbox_path(7, "../1")


@pytest.mark.parametrize("fsync", [False, True])
def test_move_into_place_is_a_rename_and_leaves_no_temp(tmp_path: Path, fsync: bool) -> None:
    spool = Spool(tmp_path / "spool", 0, fsync=fsync)
    source = spool.tmp_dir / "incoming.part"
    source.write_bytes(b"DICM" * 100)
    target = spool.instance_path("1.2", "1.2.3", "1.2.3.4")
    assert spool.move_into_place(source, target) == 400
    assert target.read_bytes() == b"DICM" * 100
    assert not source.exists()
    assert list(spool.tmp_dir.iterdir()) == []


def test_move_into_place_refuses_destinations_outside(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    source = tmp_path / "x.part"
    source.write_bytes(b"x")
    with pytest.raises(InvalidUIDError):
        spool.move_into_place(source, tmp_path / "outside.dcm")
    assert not (tmp_path / "outside.dcm").exists()


def test_write_bytes_replaces_atomically(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 0)
    target = spool.outbox_path(1, "1.2.3")
    spool.write_bytes(target, b"first")
    spool.write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert list(spool.tmp_dir.iterdir()) == []


def test_disk_floor(tmp_path: Path) -> None:
    assert Spool(tmp_path, 0).has_space()
    assert not Spool(tmp_path, 10**12).has_space()  # an exabyte floor is never met


def test_clear_tmp_and_iter_incoming(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 0)
    (spool.tmp_dir / "a.part").write_bytes(b"a")
    (spool.tmp_dir / "b.part").write_bytes(b"b")
    assert spool.clear_tmp() == 2
    assert list(spool.tmp_dir.iterdir()) == []
    spool.series_dir("1.2", "1.2.3").mkdir(parents=True)
    (spool.incoming_dir / "not-a-uid" / "1.2").mkdir(parents=True)
    assert [(s, r) for s, r, _ in spool.iter_incoming()] == [("1.2", "1.2.3")]
