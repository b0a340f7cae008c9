"""Several receiver processes behind one port (``node.receiver_processes`` > 1).

One process's receiver cannot use a second core: with four concurrent senders its pynetdicom threads
spend their time handing the GIL to each other (docs/BENCHMARKS.md). Here `pe-agent serve` listens,
accepts each TCP connection and hands it (``SCM_RIGHTS`` over a Unix socket pair) to the receiver
process with the fewest associations at that moment; that process runs the usual `Receiver` on the
connection (TLS, calling-AE check, C-STORE into the spool, its own database writer), exactly as if it
had accepted it. What stays exact across processes:

- node.max_associations: each process keeps its admitted count in one shared array and admits under
  the array's lock (`pacs_agent.dicom.scp.Admission`), so the limit is global and the excess still gets
  A-ASSOCIATE-RJ (rejected-transient, local limit exceeded).
- The spool's tmp/ is cleared and the spool reconciled with the database once, by this process, before
  any receiver process starts. Duplicates are still detected by the destination file's existence;
  two processes creating the same series meanwhile is resolved by the writer's one-by-one retry.
- A receiver process that dies is restarted (`MAX_RESTARTS` per slot; then the pool is ``fatal`` and
  serve stops with exit code 1). What it had acknowledged but not yet committed (at most ~100 ms of
  records) is recorded by a reconciliation `RECONCILE_DELAY_SECONDS` later, of the files older than
  `SETTLED_SECONDS` (the other processes' writers commit theirs within ~100 ms).
- The receiver processes stop when told (serve's SIGTERM/SIGINT path), on SIGTERM, or when this process
  disappears (their control pipe reaches end-of-file): they never outlive the node holding the port.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import multiprocessing
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.errors import AgentError
from pacs_agent.logs import configure_logging, get_logger
from pacs_agent.dicom.admission import SharedCounts
from pacs_agent.dicom.scp import LISTEN_BACKLOG, Receiver
from pacs_agent.dicom.tls import server_ssl_context
from pacs_agent.errors import ReceiverError
from pacs_agent.ingest.reconcile import reconcile_spool
from pacs_agent.settings import Settings
from pacs_agent.ingest.spool import Spool

log = get_logger(__name__)

MAX_RESTARTS = 5
#: How long a new receiver process may take to import, connect to the database and report ready (s).
START_TIMEOUT_SECONDS = 60.0
#: After a receiver process died: wait this long, then record the spool files it left without a row (s).
RECONCILE_DELAY_SECONDS = 5.0
#: ... and leave out files younger than this: the live processes are still committing those (s).
SETTLED_SECONDS = 2.0
#: A hand-over to a process that does not take it within this time goes to the next one (s).
HANDOFF_TIMEOUT_SECONDS = 5.0
_CONTROL_TIMEOUT_SECONDS = 10.0


@dataclass
class _Child:
    index: int
    process: SpawnProcess
    handoff: socket.socket
    control: Connection
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    ready: bool = False
    failed: str = ""
    restarts: int = 0


class ReceiverPool:
    """``processes`` receiver processes fed by one listening socket in this process."""

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session], processes: int) -> None:
        if processes < 1:
            raise ValueError("a receiver pool needs at least one process")
        self._settings = settings
        self._factory = session_factory
        self._count = processes
        self._context = multiprocessing.get_context("spawn")
        self._counts: SharedCounts = self._context.Array("i", processes)
        self._children: list[_Child] = []
        self._children_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._stopping = threading.Event()
        self._reconcile_at: float | None = None
        self._child_settings = settings
        self._spool = Spool(settings.spool_root, settings.node.min_free_disk_mb, fsync=settings.storage.fsync)
        self.fatal = ""

    # -- what serve and the tests use, as for Receiver ------------------------------------------------

    @property
    def spool(self) -> Spool:
        return self._spool

    @property
    def port(self) -> int:
        if self._listener is None:
            raise ReceiverError("the receiver is not running")
        return int(self._listener.getsockname()[1])

    @property
    def is_running(self) -> bool:
        return self._listener is not None and any(c.process.is_alive() for c in self._snapshot())

    def start(self) -> None:
        """Clear tmp/ and reconcile, listen, start the processes and wait until each is ready."""
        if self._listener is not None:
            return
        node = self._settings.node
        if node.tls.enabled:
            server_ssl_context(node.tls)  # unreadable certificate or key: fail here, with the reason, not in each process
        cleared = self.spool.clear_tmp()
        recovered = reconcile_spool(self._factory, self._spool)
        family = socket.AF_INET6 if ":" in node.host else socket.AF_INET
        try:
            listener = socket.create_server((node.host, node.port), family=family, backlog=LISTEN_BACKLOG)
        except OSError as exc:
            raise ReceiverError(f"cannot listen on {node.host}:{node.port}: {exc.strerror or exc}") from exc
        self._listener = listener
        # The processes log and record the node's real port (node.port 0 asks for a free one).
        self._child_settings = dataclasses.replace(
            self._settings, node=dataclasses.replace(node, port=int(listener.getsockname()[1]))
        )
        self._stopping.clear()
        try:
            with self._children_lock:
                self._children = [self._spawn(i) for i in range(self._count)]
            for child in self._snapshot():
                self._wait_ready(child, START_TIMEOUT_SECONDS)
                if not child.ready:
                    raise ReceiverError(f"receiver process {child.index} did not start: {child.failed or 'no answer'}")
        except BaseException:
            self.stop()
            raise
        self._acceptor = threading.Thread(target=self._accept_loop, name="pe-agent-receiver-accept", daemon=True)
        self._acceptor.start()
        log.info(
            "receiver_started", ae_title=node.ae_title, host=node.host, port=self.port, tls=node.tls.enabled,
            max_associations=node.max_associations, processes=self._count, reconciled=recovered, tmp_cleared=cleared,
        )

    def stop(self) -> None:
        """Stop accepting, tell every process to stop (they abort open associations and commit), wait."""
        listener = self._listener
        if listener is None:
            return
        self._stopping.set()
        with contextlib.suppress(OSError):  # wakes the accept loop (Linux: accept() fails with EINVAL)
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        if self._acceptor is not None:
            self._acceptor.join(timeout=10)
            self._acceptor = None
        children = self._snapshot()
        for child in children:
            with contextlib.suppress(OSError, ValueError), child.lock:  # a process already gone needs no telling
                child.control.send(("stop",))
        for child in children:
            child.process.join(timeout=45)  # its Receiver.stop: 5 s for aborts, up to 30 s to commit
            if child.process.is_alive():
                log.error("receiver_process_killed", index=child.index, pid=child.process.pid)
                child.process.kill()
                child.process.join(timeout=5)
            self._close(child)
        self._listener = None
        log.info("receiver_pool_stopped", exit_codes=[c.process.exitcode for c in children])

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every record each process has received so far is committed to the database."""
        for child in self._snapshot():
            if child.ready and child.process.is_alive():
                reply = self._ask(child, ("flush", timeout), timeout + 5)
                if reply != ("flushed", True):
                    raise ReceiverError(f"receiver process {child.index} did not commit within {timeout:g} s: {reply!r}")

    wait_idle = flush

    def counters(self) -> dict[str, int]:
        """The processes' counters added up (processes that died took theirs with them)."""
        total: dict[str, int] = {}
        for child in self._snapshot():
            if not (child.ready and child.process.is_alive()):
                continue
            try:
                reply = self._ask(child, ("counters",), _CONTROL_TIMEOUT_SECONDS)
            except ReceiverError:
                continue
            if isinstance(reply, tuple) and reply[0] == "counters":
                for key, value in reply[1].items():
                    total[key] = total.get(key, 0) + int(value)
        return total

    def admitted(self) -> int:
        """Associations admitted across the processes now."""
        return sum(self.admitted_by_process())

    def admitted_by_process(self) -> list[int]:
        with self._counts.get_lock():
            return [int(n) for n in self._counts[:]]

    def pids(self) -> list[int]:
        return [c.process.pid for c in self._snapshot() if c.process.pid is not None]

    def check(self) -> None:
        """Called by serve every half second: take ready reports, restart dead processes, reconcile."""
        if self._listener is None or self._stopping.is_set():
            return
        for child in self._snapshot():
            if not child.ready and child.process.is_alive():
                self._wait_ready(child, 0)
            if child.process.is_alive():
                continue
            code = child.process.exitcode
            with self._counts.get_lock():
                self._counts[child.index] = 0
            self._close(child)
            if child.restarts >= MAX_RESTARTS:
                if not self.fatal:
                    self.fatal = f"receiver process {child.index} died {child.restarts + 1} times (exit code {code})"
                    log.error("receiver_process_given_up", index=child.index, exit_code=code)
                continue
            if code == 0:  # it was told to stop (SIGTERM of the whole service, usually): not a crash
                log.warning("receiver_process_exited", index=child.index, exit_code=code, restart=child.restarts + 1)
            else:
                log.error("receiver_process_died", index=child.index, exit_code=code, restart=child.restarts + 1)
            replacement = self._spawn(child.index)
            replacement.restarts = child.restarts + 1
            with self._children_lock:
                self._children[child.index] = replacement
            self._reconcile_at = time.monotonic() + RECONCILE_DELAY_SECONDS
        if self._reconcile_at is not None and time.monotonic() >= self._reconcile_at:
            self._reconcile_at = None
            try:
                recorded = reconcile_spool(self._factory, self._spool, settled_s=SETTLED_SECONDS)
            except (AgentError, OSError, SQLAlchemyError) as exc:
                log.error("receiver_reconcile_failed", error=f"{type(exc).__name__}: {exc}")
                self._reconcile_at = time.monotonic() + RECONCILE_DELAY_SECONDS
            else:
                log.info("receiver_reconciled_after_process_death", instances=recorded)

    # -- internals ------------------------------------------------------------------------------------

    def _snapshot(self) -> list[_Child]:
        with self._children_lock:
            return list(self._children)

    def _spawn(self, index: int) -> _Child:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.settimeout(HANDOFF_TIMEOUT_SECONDS)
        control, their_control = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=receiver_process_main,
            args=(self._child_settings, index, theirs, their_control, self._counts),
            name=f"pe-agent-receiver-{index}",
        )
        try:
            process.start()
        finally:
            theirs.close()  # the child has its own copy now (or never will)
            their_control.close()
        log.info("receiver_process_started", index=index, pid=process.pid)
        return _Child(index=index, process=process, handoff=ours, control=control)

    def _wait_ready(self, child: _Child, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with child.lock:
            while not child.ready and not child.failed:
                remaining = deadline - time.monotonic()
                try:
                    if not child.control.poll(max(remaining, 0)):
                        if remaining <= 0 or not child.process.is_alive():
                            return
                        continue
                    message = child.control.recv()
                except (EOFError, OSError):
                    child.failed = f"exited (code {child.process.exitcode})"
                    return
                if message[0] == "ready":
                    child.ready = True
                elif message[0] == "error":
                    child.failed = str(message[1])
                    log.error("receiver_process_failed", index=child.index, error=child.failed)

    def _ask(self, child: _Child, request: tuple[Any, ...], timeout: float) -> Any:
        try:
            with child.lock:
                child.control.send(request)
                if not child.control.poll(timeout):
                    raise ReceiverError(f"receiver process {child.index} did not answer {request[0]!r}")
                return child.control.recv()
        except (EOFError, OSError, ValueError) as exc:
            raise ReceiverError(f"receiver process {child.index} is gone ({type(exc).__name__})") from exc

    def _close(self, child: _Child) -> None:
        for closable in (child.handoff, child.control):
            with contextlib.suppress(OSError):
                closable.close()

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        turns = itertools.count()
        while not self._stopping.is_set():
            try:
                connection, _address = listener.accept()
            except OSError as exc:
                if self._stopping.is_set():
                    return
                log.error("receiver_accept_failed", error=str(exc))  # e.g. out of file descriptors
                time.sleep(0.1)
                continue
            try:
                self._hand_over(connection, next(turns))
            finally:
                connection.close()  # the receiving process holds its own descriptor

    def _hand_over(self, connection: socket.socket, turn: int) -> None:
        """Give the connection to the ready process with the fewest associations (round robin on ties)."""
        children = [c for c in self._snapshot() if c.process.is_alive()]
        counts = list(self._counts[:])
        n = max(len(self._children), 1)
        children.sort(key=lambda c: (not c.ready, counts[c.index], (c.index - turn) % n))
        for child in children:
            try:
                socket.send_fds(child.handoff, [b"c"], [connection.fileno()])
                return
            except OSError as exc:
                log.warning("receiver_handoff_failed", index=child.index, error=str(exc))
        log.error("receiver_no_process_for_connection", processes_alive=len(children))


def receiver_process_main(
    settings: Settings, index: int, handoff: socket.socket, control: Connection, counts: SharedCounts,
) -> None:
    """One receiver process: serve the connections handed over until told to stop or orphaned."""
    from pacs_agent.db.session import make_engine, make_session_factory

    configure_logging(settings.log)
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    engine = make_engine(settings.database.url)
    receiver = Receiver(settings, make_session_factory(engine), shared_counts=counts, process_index=index)
    try:
        receiver.start(handoff=handoff)
    except (AgentError, OSError, SQLAlchemyError) as exc:
        control.send(("error", f"{type(exc).__name__}: {exc}"))
        engine.dispose()
        raise SystemExit(1) from None
    log.info("receiver_process_ready", index=index, pid=os.getpid())
    control.send(("ready", os.getpid()))
    try:
        while not stop.is_set():
            if not control.poll(0.5):
                continue
            message = control.recv()
            if message[0] == "stop":
                break
            if message[0] == "flush":
                try:
                    receiver.flush(float(message[1]))
                    control.send(("flushed", True))
                except ReceiverError as exc:
                    control.send(("flushed", False, str(exc)))
            elif message[0] == "counters":
                control.send(("counters", receiver.counters()))
    except (EOFError, OSError):
        log.warning("receiver_process_orphaned", index=index, note="serve is gone; stopping")
    finally:
        receiver.stop()
        engine.dispose()


__all__ = ["ReceiverPool", "receiver_process_main"]
