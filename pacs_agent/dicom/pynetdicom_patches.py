"""Make pynetdicom's reactors wait for events instead of polling, while a receiver runs.

pynetdicom's reactor loops (``pynetdicom.dul`` reading the socket, ``pynetdicom.association``
waiting for DIMSE messages) poll with ``time.sleep(0.001)`` when idle. Between two C-STOREs of a
series both loops go idle several times, which costs about 3.5 ms per instance on the SCP side;
capping each sleep made a 400-slice series arrive 23 % faster (docs/BENCHMARKS.md, measured with a
100 us cap by benchmarks/receivers.py); 200 us is used here (half the idle wake-ups; each poll
still waits a fifth of what it did). pynetdicom has no setting for it, so the module-level
``time`` name of those two modules is replaced by a shim whose ``sleep`` is ``min(seconds, cap)``;
everything else is the real ``time`` module. The shim is process-wide: `SleepCap` installs it while at least one
user holds it and puts the real module back after the last one leaves.

Capped polls still spin: every idle association keeps two threads waking thousands of times a second,
and with several senders at once those wake-ups fight for the GIL and the CPU (on 2 cores four
concurrent senders took 3.1 times Orthanc's time). `make_event_driven` goes further for one association
(the receiver calls it from ``EVT_CONN_OPEN``, before the association's threads start): the two idle polls
of that association become waits that end as soon as there is work.

- The DUL thread's idle poll (in ``DULServiceProvider.run_reactor``) becomes ``select()`` on the
  association's socket and a wake-up socket pair; putting a primitive on its ``to_provider_queue`` or an
  event on its ``event_queue`` from another thread, or ``kill_dul()``, writes a byte to the pair.
- The association thread's idle poll (in ``Association._run_reactor``) becomes a wait on a
  `threading.Event` that is set whenever the DUL completes a DIMSE message (``dimse.msg_queue``) or
  hands the association an ACSE primitive (``dul.to_user_queue``: release, abort).

The same call also makes the association's socket read a PDU with as few ``recv_into`` calls as the
kernel allows, into one buffer of the PDU's size: pynetdicom's ``AssociationSocket.recv`` reads 4,096
bytes per call and appends each piece to a bytearray, ~130 Python-level reads and copies for every
512 x 512 CT instance.

Every new association also starts with a deep copy of the server's presentation contexts, and each of
the ~5,000 UIDs in them (every storage class times every transfer syntax) is re-validated against a
regular expression by pydicom on the way: ~75 ms of the GIL per association. `CheaplyCopiedContexts`
makes that copy share the (immutable) UIDs and copy only the lists.

Both waits end after at most `EVENT_WAIT_MAX_SECONDS` anyway, so everything pynetdicom checks on a
timer (ARTIM and idle timeouts, a kill flag) is still seen within that time. Only those two call sites
change (recognised by the calling function's name); every other sleep in pynetdicom keeps the capped
behaviour. The wrappers are instance attributes of that association's queues, so nothing outside it is
touched.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any, cast

import pynetdicom.association
import pynetdicom.dul
from pynetdicom.transport import ThreadedAssociationServer

#: Longest idle poll pynetdicom may sleep while a receiver runs (seconds).
DEFAULT_SLEEP_CAP_SECONDS = 0.0002
#: Longest an event-driven reactor waits before it looks at its timers and flags again (seconds).
EVENT_WAIT_MAX_SECONDS = 0.05
#: The functions whose idle polls become event waits (pynetdicom 3.0: DUL and acceptor reactors).
_DUL_REACTOR = "run_reactor"
_ASSOCIATION_REACTOR = "_run_reactor"
#: Attribute under which an event-driven association or DUL thread keeps its wait function.
_WAIT_ATTRIBUTE = "_pe_agent_wait"
_PATCHED_MODULES: tuple[ModuleType, ...] = (pynetdicom.association, pynetdicom.dul)


def _capped_time(cap: float) -> types.SimpleNamespace:
    """A stand-in for the ``time`` module whose ``sleep`` never sleeps longer than ``cap``."""
    real_sleep = time.sleep
    current_thread = threading.current_thread

    def sleep(seconds: float) -> None:
        wait: Callable[[str], bool] | None = getattr(current_thread(), _WAIT_ATTRIBUTE, None)
        if wait is not None and wait(sys._getframe(1).f_code.co_name):
            return
        real_sleep(min(seconds, cap))

    shim = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("__")})
    shim.sleep = sleep
    return shim


def cap_pynetdicom_sleeps(cap: float) -> None:
    """Make pynetdicom's reactor loops sleep at most ``cap`` seconds per idle poll (until restored)."""
    if cap <= 0:
        raise ValueError(f"the sleep cap must be positive, not {cap}")
    shim = _capped_time(cap)
    for module in _PATCHED_MODULES:
        module.time = shim  # type: ignore[attr-defined]


def restore_pynetdicom_sleeps() -> None:
    """Give pynetdicom its real ``time`` module back."""
    for module in _PATCHED_MODULES:
        module.time = time  # type: ignore[attr-defined]


def pynetdicom_sleeps_capped() -> bool:
    return any(module.time is not time for module in _PATCHED_MODULES)  # type: ignore[attr-defined]


class SleepCap:
    """Reference-counted `cap_pynetdicom_sleeps`: on while any user (a running Receiver) holds it."""

    def __init__(self, cap: float = DEFAULT_SLEEP_CAP_SECONDS) -> None:
        self._cap = cap
        self._lock = threading.Lock()
        self._users = 0

    def acquire(self) -> None:
        with self._lock:
            if self._users == 0:
                cap_pynetdicom_sleeps(self._cap)
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users == 0:
                restore_pynetdicom_sleeps()


def _wrap_put(target: queue.Queue[Any], after: Callable[[], None]) -> None:
    """Make ``target.put`` (and so ``put_nowait``) call ``after()`` once the item is queued."""
    put = target.put

    def put_then_signal(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        after()

    target.put = put_then_signal  # type: ignore[method-assign]


class CheaplyCopiedContexts(list):  # type: ignore[type-arg]
    """A list of pynetdicom ``PresentationContext`` whose ``deepcopy`` shares the UID strings (``str``
    subclasses, immutable) and copies each context's own attributes and lists: equal to a deep copy,
    without re-validating every UID."""

    def __deepcopy__(self, memo: dict[int, Any]) -> CheaplyCopiedContexts:
        copies = CheaplyCopiedContexts()
        for context in self:
            clone = object.__new__(type(context))
            clone.__dict__.update(
                {name: list(value) if isinstance(value, list) else value for name, value in vars(context).items()}
            )
            copies.append(clone)
        return copies


def _whole_reads(transport: Any) -> Callable[[int], bytearray]:
    """``AssociationSocket.recv`` (same contract: up to ``nr_bytes``, fewer only if the peer closed)
    reading straight into one buffer of the requested size."""

    def recv(nr_bytes: int) -> bytearray:
        raw = transport.socket
        buffer = bytearray(nr_bytes)
        read = 0
        with memoryview(buffer) as view:
            while read < nr_bytes:
                count = raw.recv_into(view[read:], nr_bytes - read)
                if not count:
                    break  # connection broken: return what was read, as pynetdicom does
                read += count
        if read < nr_bytes:
            del buffer[read:]
        return buffer

    return recv


def _close_pair(closed: threading.Event, *pair: socket.socket) -> None:
    closed.set()
    for end in pair:
        end.close()


def make_event_driven(assoc: Any, max_wait: float = EVENT_WAIT_MAX_SECONDS) -> None:
    """Turn the idle polls of one not-yet-started pynetdicom association (and its DUL) into event waits.

    Takes effect while the sleep shim is installed (`SleepCap`); without it pynetdicom sleeps as usual.
    The wake-up socket pair is closed with the association's socket (at the latest when the DUL object
    is collected).
    """
    dul = assoc.dul
    dimse = assoc.dimse
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    closed = threading.Event()
    association_ready = threading.Event()

    def wake_dul() -> None:
        if threading.current_thread() is dul or closed.is_set():
            return  # the DUL thread looks at its own queues before it waits
        # A full pair means a wake-up is already pending; a closed one, that the reactor is gone.
        with contextlib.suppress(OSError):
            writer.send(b"\0")

    def wake_association() -> None:
        association_ready.set()

    def drain() -> None:
        try:
            while reader.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def dul_wait(caller: str) -> bool:
        if caller != _DUL_REACTOR:
            return False
        transport = getattr(dul.socket, "socket", None)
        if transport is None or dul.state_machine.current_state == "Sta1":
            # No connection (any more): the association is ending and will stop this thread by
            # setting a flag that no queue announces, so keep pynetdicom's short (capped) poll:
            # a rejected or finished association must leave at once, or it keeps counting
            # against the maximum number of associations.
            return False
        drain()
        if dul._kill_thread or dul.to_provider_queue.qsize() or dul.event_queue.qsize():
            return True
        pending = getattr(transport, "pending", None)
        if pending is not None and pending():
            return True  # TLS bytes already decrypted: select() cannot see them
        try:
            select.select([reader, transport], [], [], max_wait)
        except (OSError, ValueError):
            return False  # the transport was closed under us: pynetdicom notices on its next look
        return True

    def association_wait(caller: str) -> bool:
        if caller != _ASSOCIATION_REACTOR:
            return False
        association_ready.clear()
        if assoc._kill or dimse.msg_queue.qsize() or dul.to_user_queue.qsize():
            return True
        association_ready.wait(max_wait)
        return True

    _wrap_put(dul.to_provider_queue, wake_dul)
    _wrap_put(dul.event_queue, wake_dul)
    _wrap_put(dul.to_user_queue, wake_association)
    _wrap_put(dimse.msg_queue, wake_association)
    kill_dul = dul.kill_dul

    def kill_and_wake() -> None:
        kill_dul()
        wake_dul()

    dul.kill_dul = kill_and_wake
    weakref.finalize(dul, _close_pair, closed, reader, writer)
    transport = dul.socket
    if transport is not None:
        transport.recv = _whole_reads(transport)
        close_transport = transport.close

        def close_with_pair() -> None:
            # The connection is gone, so is the need for wake-ups: close the pair now rather than
            # when the garbage collector gets to the DUL (a busy node would run out of descriptors).
            try:
                close_transport()
            finally:
                _close_pair(closed, reader, writer)

        transport.close = close_with_pair
    setattr(dul, _WAIT_ATTRIBUTE, dul_wait)
    setattr(assoc, _WAIT_ATTRIBUTE, association_wait)


def hold_requestor_reactor(assoc: Any, settle_s: float = 0.005, timeout_s: float = 5.0) -> None:
    """Hold a pynetdicom *requestor*'s reactor thread before ``send_c_store`` (or another send).

    pynetdicom 3.0's ``send_c_store`` pauses the reactor by clearing a checkpoint and then checking
    ``_is_paused``, which the reactor sets just *before* it waits on that checkpoint. If the check lands
    after the reactor's wait already returned (the checkpoint was still set) but before it cleared
    ``_is_paused``, the reactor goes on, takes the peer's C-STORE-RSP off the queue ("Received
    unexpected C-STORE service message") and the sender waits for that response until its DIMSE
    timeout and aborts. A fast peer and a busy process (many threads wanting the GIL) make it likely
    enough to matter. Clearing the checkpoint here and giving the reactor ``settle_s`` to come round to
    its (now blocking) wait closes that window; ``send_c_store`` sets the checkpoint again when it has
    the response.
    """
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if checkpoint is None or not hasattr(assoc, "_is_paused"):
        return  # not the pynetdicom this was written for: send as pynetdicom does
    checkpoint.clear()
    time.sleep(settle_s)
    deadline = time.monotonic() + timeout_s
    while not assoc._is_paused and time.monotonic() < deadline:
        time.sleep(0.0005)


class HandedOverAssociationServer(ThreadedAssociationServer):
    """A pynetdicom server that does not listen: another process accepts the TCP connections and
    sends each one over a Unix socket (``SCM_RIGHTS``); this server's ``serve_forever`` loop waits on
    that socket instead of a listening one and handles each received connection exactly as an accepted
    one (TLS wrap, one association thread). Used by the processes of `pacs_agent.dicom.scp_pool`.
    """

    def __init__(self, *args: Any, handoff: socket.socket, public_address: tuple[str, int], **kwargs: Any) -> None:
        self._handoff = handoff
        self._public_address = public_address
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        # socketserver made a TCP socket for us: use the hand-over socket instead, bind nothing.
        if self.socket is not None:
            self.socket.close()
        self.socket = self._handoff
        self.server_address = self._public_address

    def server_activate(self) -> None:
        """Nothing to listen on: the pool's listener accepts."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        _message, fds, _flags, _address = socket.recv_fds(self._handoff, 64, 1)
        if not fds:
            raise OSError("the receiver pool closed the hand-over socket")
        client = socket.socket(fileno=fds[0])
        try:
            peer = client.getpeername()
            if self.ssl_context:
                client = self.ssl_context.wrap_socket(client, server_side=True)
        except OSError:
            client.close()  # the peer went away before we got to it
            raise
        return client, (str(peer[0]), int(peer[1]))


def start_handed_over_server(
    ae: Any,
    handoff: socket.socket,
    public_address: tuple[str, int],
    ssl_context: Any,
    evt_handlers: list[Any],
) -> HandedOverAssociationServer:
    """What ``AE.start_server(block=False)`` does, with a `HandedOverAssociationServer`."""
    server = ae.make_server(
        public_address, ssl_context=ssl_context, evt_handlers=evt_handlers,
        server_class=HandedOverAssociationServer, handoff=handoff, public_address=public_address,
    )
    thread = threading.Thread(target=server.serve_forever, name="AcceptorServer-handoff", daemon=True)
    thread.start()
    ae._servers.append(server)  # so that AE.shutdown() stops it, as for start_server
    return cast(HandedOverAssociationServer, server)
