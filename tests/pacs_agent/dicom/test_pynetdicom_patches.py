"""pynetdicom tuning: idle polls capped while a Receiver runs (restored when it stops), the receiver's
associations event-driven, cheap context copies and whole-PDU reads."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import socket
import subprocess
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pynetdicom.association
import pynetdicom.dul
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts

from pacs_agent.db.migrate import upgrade_database
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.dicom.pynetdicom_patches import (
    EVENT_WAIT_MAX_SECONDS,
    CheaplyCopiedContexts,
    SleepCap,
    _whole_reads,
    hold_requestor_reactor,
    cap_pynetdicom_sleeps,
    pynetdicom_sleeps_capped,
    restore_pynetdicom_sleeps,
)
from pacs_agent.dicom.scp import Receiver
from pacs_agent.settings import Settings
from tests.support.receiver import ct_slice, scu


@pytest.fixture
def running_receiver(settings_factory: Callable[..., Settings]) -> Iterator[Receiver]:
    """A started Receiver on a migrated SQLite database; stopped afterwards."""
    settings = settings_factory()
    engine = make_engine(settings.database.url)
    upgrade_database(settings.database.url, engine)
    receiver = Receiver(settings, make_session_factory(engine))
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()
        engine.dispose()


def _sleep_seconds(module: object, seconds: float, repeat: int = 20) -> float:
    """Mean wall time of ``module.time.sleep(seconds)``."""
    started = time.perf_counter()
    for _ in range(repeat):
        module.time.sleep(seconds)  # type: ignore[attr-defined]
    return (time.perf_counter() - started) / repeat


@pytest.fixture(autouse=True)
def _restored() -> object:
    yield
    restore_pynetdicom_sleeps()


def test_cap_shortens_pynetdicom_sleeps_and_keeps_the_rest_of_time() -> None:
    assert not pynetdicom_sleeps_capped()
    assert _sleep_seconds(pynetdicom.dul, 0.01, repeat=3) >= 0.009
    cap_pynetdicom_sleeps(0.0002)
    assert pynetdicom_sleeps_capped()
    for module in (pynetdicom.dul, pynetdicom.association):
        assert _sleep_seconds(module, 0.01) < 0.004
        assert module.time.monotonic() == pytest.approx(time.monotonic(), abs=1.0)  # type: ignore[attr-defined]
    assert time.sleep is not pynetdicom.dul.time.sleep  # type: ignore[attr-defined]  # the real module is untouched
    restore_pynetdicom_sleeps()
    assert pynetdicom.dul.time is time and pynetdicom.association.time is time  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        cap_pynetdicom_sleeps(0)


def test_sleep_cap_is_on_while_any_user_holds_it() -> None:
    cap = SleepCap(0.0002)
    cap.acquire()
    cap.acquire()
    assert pynetdicom_sleeps_capped()
    cap.release()
    assert pynetdicom_sleeps_capped()
    cap.release()
    assert not pynetdicom_sleeps_capped()


def test_receiver_caps_while_running_and_restores_on_stop(settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory()
    engine = make_engine(settings.database.url)
    upgrade_database(settings.database.url, engine)
    receiver = Receiver(settings, make_session_factory(engine))
    assert not pynetdicom_sleeps_capped()
    receiver.start()
    try:
        assert pynetdicom_sleeps_capped()
        assoc = scu().associate("127.0.0.1", receiver.port, ae_title="PE_AGENT")
        assert assoc.is_established
        study, series = generate_uid(), generate_uid()
        assert [assoc.send_c_store(ct_slice(study, series, i)).Status for i in range(3)] == [0, 0, 0]
        assoc.release()
    finally:
        receiver.stop()
        engine.dispose()
    assert not pynetdicom_sleeps_capped()


def _voluntary_switches(thread: threading.Thread) -> int:
    """Voluntary context switches of one thread of this process so far (every sleep or wait is one)."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("voluntary_ctxt_switches")))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_an_idle_association_waits_instead_of_polling(running_receiver: Receiver) -> None:
    """Both threads of an open, idle association wake a few times a second (their bounded waits),
    not thousands of times (pynetdicom's polling, even capped); the association still works after."""
    receiver = running_receiver
    assoc = scu().associate("127.0.0.1", receiver.port, ae_title="PE_AGENT")
    assert assoc.is_established
    deadline = time.monotonic() + 5
    while not receiver._ae.active_associations and time.monotonic() < deadline:
        time.sleep(0.01)
    (acceptor,) = receiver._ae.active_associations
    threads = (acceptor, acceptor.dul)
    before = [_voluntary_switches(t) for t in threads]
    time.sleep(1.0)
    woken = [_voluntary_switches(t) - b for t, b in zip(threads, before, strict=True)]
    # 1 s / EVENT_WAIT_MAX_SECONDS = 20 bounded waits each; polling at the 200 us cap would be ~5,000.
    assert all(count <= 4 / EVENT_WAIT_MAX_SECONDS for count in woken), woken
    study, series = generate_uid(), generate_uid()
    assert [assoc.send_c_store(ct_slice(study, series, i)).Status for i in range(3)] == [0, 0, 0]
    assoc.release()
    assert assoc.is_released


def test_cheaply_copied_contexts_equal_a_deep_copy_and_share_no_lists() -> None:
    ae = AE()
    for context in AllStoragePresentationContexts[:5]:
        ae.add_supported_context(str(context.abstract_syntax), [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    original = CheaplyCopiedContexts(ae.supported_contexts)
    cheap = copy.deepcopy(original)
    reference = copy.deepcopy(list(original))
    assert type(cheap) is CheaplyCopiedContexts and len(cheap) == len(reference) == 5
    for ours, theirs, source in zip(cheap, reference, original, strict=True):
        assert vars(ours) == vars(theirs)
        assert ours is not source and ours.transfer_syntax is not source.transfer_syntax
    cheap[0].transfer_syntax.append(JPEGBaseline8Bit)
    assert JPEGBaseline8Bit not in original[0].transfer_syntax


def test_make_event_driven_reads_a_whole_pdu_with_few_reads() -> None:
    """The socket's recv keeps pynetdicom's contract: all requested bytes, fewer only when the peer closes."""
    local, remote = socket.socketpair()
    try:
        transport = types.SimpleNamespace(socket=local)
        recv = _whole_reads(transport)
        payload = bytes(range(256)) * 2048  # 512 KiB, more than one kernel buffer
        sender = threading.Thread(target=remote.sendall, args=(payload,))
        sender.start()
        assert recv(len(payload)) == payload
        sender.join()
        remote.sendall(b"abc")
        remote.close()
        assert recv(10) == b"abc"  # peer closed: what was read, as AssociationSocket.recv returns
    finally:
        local.close()


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs iproute2's ss")
def test_receiver_listens_with_a_backlog_for_bursts(running_receiver: Receiver) -> None:
    """socketserver's default backlog of 5 would make the kernel refuse a burst of connections before
    they could be answered with an A-ASSOCIATE-RJ; ss shows a listening socket's backlog as Send-Q."""
    receiver = running_receiver
    shown = subprocess.run(["ss", "-ltnH", f"sport = :{receiver.port}"], capture_output=True, text=True, check=True)
    (row,) = shown.stdout.strip().splitlines()
    assert int(row.split()[2]) >= 128, row


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")
def test_finished_associations_leave_no_file_descriptors_behind(running_receiver: Receiver) -> None:
    """Each event-driven association opens a wake-up socket pair; it is closed when the connection ends,
    not whenever the garbage collector runs (a busy node would otherwise run out of descriptors)."""
    import gc

    receiver = running_receiver
    gc.disable()
    try:
        def open_fds() -> int:
            """Open sockets of this process (database files come and go with the connection pool)."""
            count = 0
            for fd in Path("/proc/self/fd").iterdir():
                with contextlib.suppress(OSError):
                    count += os.readlink(fd).startswith("socket:")
            return count

        ae = scu()
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PE_AGENT")
        assoc.release()
        time.sleep(0.5)
        before = open_fds()
        for _ in range(30):
            assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PE_AGENT")
            assert assoc.is_established
            assoc.release()
        deadline = time.monotonic() + 5
        while open_fds() > before + 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert open_fds() <= before + 4, (before, open_fds())  # 30 leaked pairs would be 60
    finally:
        gc.enable()


def test_holding_a_requestors_reactor_parks_it_until_the_send_has_its_response(running_receiver: Receiver) -> None:
    receiver = running_receiver
    assoc = scu().associate("127.0.0.1", receiver.port, ae_title="PE_AGENT")
    assert assoc.is_established
    study, series = generate_uid(), generate_uid()
    for i in range(5):
        hold_requestor_reactor(assoc)
        assert assoc._is_paused and not assoc._reactor_checkpoint.is_set()
        assert assoc.send_c_store(ct_slice(study, series, i)).Status == 0
        assert assoc._reactor_checkpoint.is_set()  # send_c_store lets the reactor run again
    assoc.release()
    assert assoc.is_released