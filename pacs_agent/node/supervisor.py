"""Supervision of the node's child processes (analysis workers, receiver processes): one restart policy.

A child that dies is restarted, at most `MAX_RESTARTS` times per slot; an exit code that says restarting
cannot help (a model that cannot be loaded) stops that slot at once. ``fatal`` says why the node must stop.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.context import SpawnProcess
from typing import Protocol

from pacs_agent.logs import get_logger
from pacs_agent.settings import Settings

log = get_logger(__name__)

#: Restarts per child slot before the supervisor gives that slot up.
MAX_RESTARTS = 5


class Supervised(Protocol):
    """A set of child processes that restarts its own dead ones when checked."""

    @property
    def fatal(self) -> str: ...

    def check(self) -> None: ...


def watch(
    stop: threading.Event,
    children: Mapping[str, Supervised],
    *,
    event: str,
    interval: float = 0.5,
    until: Callable[[], bool] | None = None,
) -> str:
    """Check each set of ``children`` every ``interval`` seconds until ``stop`` is set (returns "") or one
    becomes fatal (logs ``<event>_on_<name>_failure`` and returns why), or ``until()`` holds (returns so)."""
    while not stop.wait(interval):
        for name, child in children.items():
            child.check()
            if child.fatal:
                log.error(f"{event}_on_{name}_failure", reason=child.fatal)
                return child.fatal
        if until is not None and until():
            return f"{event}: every child was given up"
    return ""


class RestartPolicy:
    """Restart bookkeeping of ``slots`` child processes of one ``kind`` ("worker", "receiver_process")."""

    def __init__(
        self,
        kind: str,
        slots: int,
        *,
        max_restarts: int = MAX_RESTARTS,
        fatal_exit_codes: Mapping[int, str] | None = None,
        fatal_when_given_up: bool = False,
    ) -> None:
        """``fatal_exit_codes``: exit code -> what the child could not do (the node stops at once);
        ``fatal_when_given_up``: a slot given up after its restarts also stops the node."""
        self._kind = kind
        self._max = max_restarts
        self._fatal_codes = dict(fatal_exit_codes or {})
        self._fatal_when_given_up = fatal_when_given_up
        self._restarts = [0] * slots
        self._given_up = [False] * slots
        self.fatal = ""

    def restarts(self, index: int) -> int:
        return self._restarts[index]

    def given_up(self, index: int) -> bool:
        return self._given_up[index]

    def all_given_up(self) -> bool:
        return all(self._given_up)

    def should_restart(self, index: int, exit_code: int | None) -> bool:
        """Record that child ``index`` exited with ``exit_code``; True when it is to be started again."""
        if self._given_up[index]:
            return False
        cannot = self._fatal_codes.get(exit_code) if exit_code is not None else None
        if cannot is not None:
            self._given_up[index] = True
            self.fatal = self.fatal or f"{self._kind} {index} could not {cannot}; see its log line above"
            log.error(f"{self._kind}_cannot_start", index=index, exit_code=exit_code)
            return False
        if self._restarts[index] >= self._max:
            self._given_up[index] = True
            log.error(f"{self._kind}_given_up", index=index, exit_code=exit_code, restarts=self._restarts[index])
            if self._fatal_when_given_up and not self.fatal:
                self.fatal = f"{self._kind} {index} died {self._restarts[index] + 1} times (exit code {exit_code})"
            return False
        self._restarts[index] += 1
        if exit_code == 0:  # it was told to stop (SIGTERM of the whole service, usually): not a crash
            log.warning(f"{self._kind}_exited", index=index, exit_code=exit_code, restart=self._restarts[index])
        else:
            log.error(f"{self._kind}_died", index=index, exit_code=exit_code, restart=self._restarts[index])
        return True


@dataclass
class _Slot:
    index: int
    process: SpawnProcess | None = None
    started_at: float = field(default_factory=time.monotonic)


class WorkerPool:
    """``count`` worker processes, restarted when they die, stopped with SIGTERM."""

    def __init__(self, settings: Settings, count: int, *, grace_seconds: float | None = None) -> None:
        from pacs_agent.analysis.worker import DEFAULT_GRACE_SECONDS, EXIT_MODEL_ERROR, EXIT_STARTUP_ERROR
        from pacs_agent.jobs.leases import default_owner

        self._settings = settings
        self._context = multiprocessing.get_context("spawn")
        self._slots = [_Slot(index=i) for i in range(count)]
        self._grace = DEFAULT_GRACE_SECONDS if grace_seconds is None else grace_seconds
        self._prefix = default_owner()
        self._restarts = RestartPolicy(
            "worker", count,
            fatal_exit_codes={EXIT_MODEL_ERROR: "load the model", EXIT_STARTUP_ERROR: "start (database schema)"},
        )

    @property
    def fatal(self) -> str:
        """Why the node must stop (a worker cannot load the model or start), or empty."""
        return self._restarts.fatal

    @property
    def expected(self) -> int:
        return len(self._slots)

    def all_given_up(self) -> bool:
        return self._restarts.all_given_up()

    def alive(self) -> int:
        return sum(1 for s in self._slots if s.process is not None and s.process.is_alive())

    def _spawn(self, slot: _Slot) -> None:
        from pacs_agent.analysis.worker import worker_process_main

        worker_id = f"{self._prefix}/w{slot.index}"
        process = self._context.Process(
            target=worker_process_main, args=(self._settings, worker_id, self._grace), name=f"pe-agent-worker-{slot.index}",
        )
        process.start()
        slot.process = process
        slot.started_at = time.monotonic()
        log.info("worker_process_started", worker_id=worker_id, pid=process.pid)

    def start(self) -> None:
        for slot in self._slots:
            self._spawn(slot)

    def check(self) -> None:
        """Restart dead workers (RestartPolicy); a model or start-up failure becomes ``fatal``."""
        for slot in self._slots:
            process = slot.process
            if process is None or process.is_alive() or self._restarts.given_up(slot.index):
                continue
            if self._restarts.should_restart(slot.index, process.exitcode):
                self._spawn(slot)

    def stop(self) -> None:
        """SIGTERM every worker, wait for them to finish or release their job, then kill stragglers."""
        for slot in self._slots:
            if slot.process is not None and slot.process.is_alive():
                slot.process.terminate()
        deadline = time.monotonic() + self._grace + 15
        for slot in self._slots:
            if slot.process is None:
                continue
            slot.process.join(timeout=max(deadline - time.monotonic(), 0.1))
            if slot.process.is_alive():
                log.error("worker_killed", slot=slot.index, pid=slot.process.pid)
                slot.process.kill()
                slot.process.join(timeout=5)
        log.info("workers_stopped", exit_codes=[s.process.exitcode if s.process else None for s in self._slots])
