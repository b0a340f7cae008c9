"""Hostile bytes on the wire against a running node: each is answered as PS3.8 says (A-ASSOCIATE-RJ, A-ABORT
or a DIMSE status) with one warning line and no traceback, costs the receiver no memory beyond its limits,
leaves nothing behind, and never stops a legitimate sender from being served."""

from __future__ import annotations

import copy
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from phantoms import PhantomSpec, write_phantom_series
from tests.faults.node import AGENT_AE_TITLE, c_echo, send, wait_until
from tests.hostile.conftest import IDLE_SECONDS, MAX_ASSOCIATIONS, MAX_INSTANCE_BYTES, HostileNode
from tests.hostile.wire import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    C_CANCEL_RQ,
    C_FIND_RQ,
    C_GET_RQ,
    C_MOVE_RQ,
    CT_IMAGE_STORAGE,
    P_DATA_TF,
    RawPeer,
    abort_pdu,
    associate_rq,
    command,
    encode_dataset,
    p_data,
    pdu,
)

pytestmark = pytest.mark.slow

CALLING = "HOSTILE"
#: A receiver may grow by this much while it refuses a hostile case (Python's own allocations).
MEMORY_SLACK_MB = 40.0


@pytest.fixture
def node(hostile: HostileNode) -> Iterator[HostileNode]:
    """The shared node; after each case it must still answer C-ECHO and must have logged no traceback."""
    before = hostile.tracebacks()
    yield hostile
    assert hostile.node.alive(), hostile.node.log_tail()
    assert wait_until(lambda: c_echo(hostile.port), timeout=10, what="C-ECHO after the case")
    assert hostile.tracebacks() == before, "a traceback was logged:\n" + hostile.node.log_tail(60)


def _small_dataset(patient_name: str = "HOSTILE^PATIENT") -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = "HOSTILE-1"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = b"\x00\x00" * 64 * 64
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _warned(node: HostileNode, event: str, since: int) -> list[str]:
    return [line for line in node.node.log_text()[since:].splitlines() if f'"event": "{event}"' in line]


def test_garbage_before_the_association_is_aborted(node: HostileNode) -> None:
    for garbage in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(256), b"\x01\x00\x00\x00\x00\x10" + os.urandom(16)):
        with RawPeer(node.port) as peer:
            peer.send(garbage)
            answers = peer.read_until_closed(5.0)
        assert answers and answers[-1].pdu_type is None, f"the node kept the connection open after {garbage[:8]!r}"
        kinds = {a.pdu_type for a in answers[:-1]}
        assert kinds <= {A_ABORT, A_ASSOCIATE_RJ}, kinds
    node.tally.record("garbage_before_association", refused_with_reason=True)


@pytest.mark.parametrize("declared", [0x7FFFFFFF, 0xFFFFFFFF, 64 * 1024 * 1024])
def test_a_huge_declared_pdu_length_aborts_without_allocating(node: HostileNode, declared: int) -> None:
    peak_before = node.peak_rss_mb()
    since = len(node.node.log_text())
    # Before the association: an A-ASSOCIATE-RQ header that declares gigabytes.
    with RawPeer(node.port) as peer:
        peer.send(struct.pack(">BBL", 0x01, 0, declared) + b"\x00" * 64)
        answers = peer.read_until_closed(5.0)
    assert answers and answers[-1].pdu_type is None
    assert answers[0].pdu_type == A_ABORT, answers
    # After it: a P-DATA-TF header above the negotiated maximum PDU size.
    with RawPeer(node.port) as peer:
        assert peer.associate(AGENT_AE_TITLE, CALLING).pdu_type == A_ASSOCIATE_AC
        peer.send(struct.pack(">BBL", P_DATA_TF, 0, declared) + b"\x00" * 64)
        answers = peer.read_until_closed(5.0)
    assert answers and answers[0].pdu_type == A_ABORT and answers[-1].pdu_type is None, answers
    assert answers[0].abort[0] == 2  # source: service provider
    peak_after = node.peak_rss_mb()
    for pid, mb in peak_after.items():
        assert mb - peak_before.get(pid, mb) < MEMORY_SLACK_MB, f"receiver {pid} grew from {peak_before.get(pid)} to {mb} MB"
    assert _warned(node, "pdu_too_large", since), node.node.log_tail()
    node.tally.record(f"huge_pdu_length_{declared:#x}", refused_with_reason=True)


def test_garbage_p_data_is_aborted_with_a_reason(node: HostileNode) -> None:
    since = len(node.node.log_text())
    with RawPeer(node.port) as peer:
        assert peer.associate(AGENT_AE_TITLE, CALLING).pdu_type == A_ASSOCIATE_AC
        peer.send(p_data(1, [(True, True, os.urandom(200))]))
        answers = peer.read_until_closed(5.0)
    assert answers and answers[-1].pdu_type is None
    assert answers[0].pdu_type == A_ABORT, answers
    assert _warned(node, "dimse_message_undecodable", since), node.node.log_tail()
    # A P-DATA-TF on a presentation context that was never negotiated.
    with RawPeer(node.port) as peer:
        assert peer.associate(AGENT_AE_TITLE, CALLING).pdu_type == A_ASSOCIATE_AC
        peer.send(p_data(77, [(True, True, command(0x0030, sop_class="1.2.840.10008.1.1", has_dataset=False))]))
        answers = peer.read_until_closed(5.0)
    assert answers and answers[0].pdu_type == A_ABORT, answers
    node.tally.record("garbage_p_data", refused_with_reason=True)
    node.tally.record("p_data_on_unknown_context", refused_with_reason=True)


@pytest.mark.parametrize("field", [C_FIND_RQ, C_GET_RQ, C_MOVE_RQ])
def test_query_retrieve_on_a_storage_context_gets_a_failure_status(node: HostileNode, field: int) -> None:
    since = len(node.node.log_text())
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    with RawPeer(node.port) as peer:
        assert peer.associate(AGENT_AE_TITLE, CALLING).pdu_type == A_ASSOCIATE_AC
        peer.send(p_data(1, [(True, True, command(field))]))
        peer.send(p_data(1, [(False, True, encode_dataset(identifier, implicit=False))]))
        answer = peer.read(10.0)
        assert answer.pdu_type == P_DATA_TF, answer
        status = answer.dimse_status()
        assert status is not None and status >= 0xA000 or status in (0x0122, 0x0211), hex(status or 0)
        # The association is still usable: a C-STORE on it is stored.
        ds = _small_dataset()
        stored = peer.c_store(1, ds, message_id=2)
        assert stored is not None and stored.dimse_status() == 0x0000
    assert _warned(node, "dimse_request_refused", since), node.node.log_tail()
    node.tally.record(f"dimse_{field:#06x}_on_storage_context", refused_with_reason=True)


def test_c_cancel_on_a_storage_context_is_ignored_with_a_warning(node: HostileNode) -> None:
    since = len(node.node.log_text())
    with RawPeer(node.port) as peer:
        assert peer.associate(AGENT_AE_TITLE, CALLING).pdu_type == A_ASSOCIATE_AC
        peer.send(p_data(1, [(True, True, command(C_CANCEL_RQ, has_dataset=False, message_id=9))]))
        stored = peer.c_store(1, _small_dataset(), message_id=3)
        assert stored is not None and stored.dimse_status() == 0x0000
    assert _warned(node, "dimse_request_refused", since) or _warned(node, "dimse_cancel_ignored", since)
    node.tally.record("c_cancel_on_storage_context", refused_with_reason=True)


def test_wrong_called_ae_title_is_rejected_with_the_standard_reason(node: HostileNode) -> None:
    with RawPeer(node.port) as peer:
        answer = peer.associate("NOT_THE_NODE", CALLING)
    assert answer.pdu_type == A_ASSOCIATE_RJ, answer
    assert answer.reject == (1, 1, 7)  # rejected-permanent, service user, called AE title not recognized
    node.tally.record("wrong_called_ae_title", refused_with_reason=True)


def test_abort_in_the_middle_of_a_dataset_leaves_nothing_behind(node: HostileNode) -> None:
    temp_before = sorted(p.name for p in node.system_temp.iterdir())
    ds = _small_dataset(patient_name="PARTIAL^ABORTED")
    ds.PixelData = os.urandom(64 * 64 * 2)
    with RawPeer(node.port) as peer:
        assert peer.associate(AGENT_AE_TITLE, CALLING).pdu_type == A_ASSOCIATE_AC
        assert peer.c_store(1, ds, split=1024, stop_after=3) is None
        time.sleep(0.3)
        peer.send(abort_pdu())
        peer.read_until_closed(3.0)
    spool_tmp = node.node.spool / "tmp"
    wait_until(lambda: not any(spool_tmp.iterdir()) or None, timeout=5, what="the partial file to be removed")
    assert sorted(p.name for p in node.system_temp.iterdir()) == temp_before
    for path in node.node.spool.rglob("*"):
        assert not (path.is_file() and b"PARTIAL^ABORTED" in path.read_bytes()), f"{path} holds the partial dataset"
    assert node.node.series(str(ds.SeriesInstanceUID)) is None
    node.tally.record("abort_mid_dataset", refused_with_reason=True)


def test_an_instance_above_the_size_limit_gets_a_failure_status(node: HostileNode) -> None:
    ds = _small_dataset()
    ds.Rows = ds.Columns = 1500
    ds.PixelData = b"\x00\x00" * 1500 * 1500  # 4.5 MB > 4 MiB
    assert len(ds.PixelData) > MAX_INSTANCE_BYTES
    with RawPeer(node.port) as peer:
        assert peer.associate(AGENT_AE_TITLE, CALLING).pdu_type == A_ASSOCIATE_AC
        answer = peer.c_store(1, ds, split=16000)
        assert answer is not None and answer.dimse_status() == 0xA700, answer
    assert node.node.series(str(ds.SeriesInstanceUID)) is None
    assert not list((node.node.spool / "tmp").iterdir())
    node.tally.record("instance_above_size_limit", refused_with_reason=True)


def _deflated(ds: Dataset, inflated_bytes: int) -> Dataset:
    """``ds`` with a private element of ``inflated_bytes`` zeros: a few kB deflated, megabytes inflated."""
    ds.add_new(0x00091010, "OB", b"\x00" * inflated_bytes)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return ds


def test_a_deflate_bomb_is_refused_with_bounded_memory(node: HostileNode) -> None:
    peak_before = node.peak_rss_mb()
    ds = _deflated(_small_dataset(), 200 * 1024 * 1024)  # 200 MB of zeros deflate to ~200 kB
    raw = encode_dataset(ds, implicit=False)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = compressor.compress(raw) + compressor.flush()
    assert len(body) < 1024 * 1024
    with RawPeer(node.port) as peer:
        answer = peer.associate(AGENT_AE_TITLE, CALLING, contexts=((1, CT_IMAGE_STORAGE, (DeflatedExplicitVRLittleEndian,)),))
        assert answer.pdu_type == A_ASSOCIATE_AC and answer.accepted_contexts()[1] == 0
        peer.send(p_data(1, [(True, True, command(0x0001, sop_instance=str(ds.SOPInstanceUID)))]))
        chunks = [body[i : i + 16000] for i in range(0, len(body), 16000)]
        for index, chunk in enumerate(chunks):
            peer.send(p_data(1, [(False, index == len(chunks) - 1, chunk)]))
        reply = peer.read(30.0)
    assert reply.dimse_status() in (0xA700, 0xC210), reply
    for pid, mb in node.peak_rss_mb().items():
        assert mb - peak_before.get(pid, mb) < MEMORY_SLACK_MB + MAX_INSTANCE_BYTES / 2**20, f"receiver {pid}: {mb} MB"
    assert node.node.series(str(ds.SeriesInstanceUID)) is None
    node.tally.record("deflate_bomb", refused_with_reason=True)


def test_a_legitimate_sender_is_served_while_idle_associations_hold_every_slot(node: HostileNode, tmp_path: Path) -> None:
    idle: list[RawPeer] = []
    try:
        for index in range(MAX_ASSOCIATIONS):
            peer = RawPeer(node.port)
            peer.associate(AGENT_AE_TITLE, f"IDLER{index}")  # distinct AE titles: the per-AE limit does not help
            idle.append(peer)
        silent = [RawPeer(node.port) for _ in range(10)]  # TCP connections that never send a byte
        idle += silent
        truth = write_phantom_series(tmp_path / "legit", PhantomSpec(rows=32, columns=32, n_slices=2, seed=1700))
        started = time.monotonic()
        served = None
        while time.monotonic() - started < 5.0:
            result = send(node.port, list(truth.files), calling_ae_title="LEGIT", timeout=5.0)
            if result.established and set(result.statuses) == {0}:
                served = time.monotonic() - started
                break
            time.sleep(0.2)
        assert served is not None, "the legitimate sender was not served within 5 s"
        # The idle ones were dropped (released or aborted), not kept forever.
        for peer in idle[:MAX_ASSOCIATIONS]:
            assert peer.closed_within(IDLE_SECONDS + 5.0)
    finally:
        for peer in idle:
            peer.close()
    node.tally.record("idle_associations_lockout", refused_with_reason=True, detail=f"served after {served:.1f} s")


def test_one_calling_ae_cannot_take_every_slot(node: HostileNode) -> None:
    peers: list[RawPeer] = []
    try:
        answers = []
        for _ in range(MAX_ASSOCIATIONS):
            peer = RawPeer(node.port)
            answers.append(peer.associate(AGENT_AE_TITLE, "GREEDY"))
            peers.append(peer)
        accepted = [a for a in answers if a.pdu_type == A_ASSOCIATE_AC]
        rejected = [a for a in answers if a.pdu_type == A_ASSOCIATE_RJ]
        assert len(accepted) < MAX_ASSOCIATIONS and rejected
        assert all(r.reject == (2, 3, 2) for r in rejected)  # transient, provider (presentation), local limit
        assert c_echo(node.port, calling_ae_title="OTHER")
    finally:
        for peer in peers:
            peer.close()
    node.tally.record("one_calling_ae_floods", refused_with_reason=True)


def test_an_instance_sent_twice_with_different_pixels_is_surfaced(node: HostileNode, tmp_path: Path) -> None:
    first = _small_dataset()
    second = copy.deepcopy(first)
    second.PixelData = b"\x01\x00" * 64 * 64
    assert send(node.port, [first], calling_ae_title=CALLING).statuses == (0,)
    status = send(node.port, [second], calling_ae_title=CALLING).statuses[0]
    assert status is not None and status != 0, "a conflicting re-send was acknowledged and dropped"
    sop = str(first.SOPInstanceUID)
    wait_until(lambda: [e for e in node.node.events(kind="instance_conflict") if e.entity_id == sop], timeout=10, what="the conflict event")
    # The same bytes again are a harmless duplicate.
    assert send(node.port, [first], calling_ae_title=CALLING).statuses == (0,)
    node.tally.record("conflicting_resend", refused_with_reason=True)


def test_an_instance_uid_reused_in_another_series_is_never_acknowledged_and_lost(node: HostileNode) -> None:
    first = _small_dataset()
    moved = copy.deepcopy(first)
    moved.SeriesInstanceUID = generate_uid()
    assert send(node.port, [first], calling_ae_title=CALLING).statuses == (0,)
    status = send(node.port, [moved], calling_ae_title=CALLING).statuses[0]
    if status == 0:
        wait_until(lambda: node.node.series(str(moved.SeriesInstanceUID)), timeout=10, what="the second series")
        lost = False
    else:
        lost = False
        sop = str(first.SOPInstanceUID)
        conflict = wait_until(
            lambda: [e for e in node.node.events(kind="instance_conflict") if e.entity_id == sop], timeout=10, what="the conflict event"
        )
        assert conflict[-1].series_instance_uid == str(first.SeriesInstanceUID)
        assert str(moved.SeriesInstanceUID) in conflict[-1].detail["reason"]
    node.tally.record("sop_instance_uid_in_another_series", refused_with_reason=status != 0, data_lost=lost)
