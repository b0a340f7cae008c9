"""Supervision of the node's child processes: start them, restart the ones that die, stop them with SIGTERM."""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass, field
from multiprocessing.context import SpawnProcess

from pacs_agent.analysis.worker import DEFAULT_GRACE_SECONDS, EXIT_MODEL_ERROR, EXIT_STARTUP_ERROR, worker_process_main
from pacs_agent.jobs.leases import default_owner
from pacs_agent.logs import get_logger
from pacs_agent.settings import Settings

log = get_logger(__name__)

MAX_RESTARTS = 5


@dataclass
class _Slot:
    index: int
    process: SpawnProcess | None = None
    restarts: int = 0
    gave_up: bool = False
    started_at: float = field(default_factory=time.monotonic)


class WorkerPool:
    """``count`` worker processes, restarted when they die, stopped with SIGTERM."""

    def __init__(self, settings: Settings, count: int, *, grace_seconds: float = DEFAULT_GRACE_SECONDS) -> None:
        self._settings = settings
        self._context = multiprocessing.get_context("spawn")
        self._slots = [_Slot(index=i) for i in range(count)]
        self._grace = grace_seconds
        self._prefix = default_owner()
        self.fatal: str = ""

    @property
    def expected(self) -> int:
        return len(self._slots)

    def all_given_up(self) -> bool:
        return all(s.gave_up for s in self._slots)

    def alive(self) -> int:
        return sum(1 for s in self._slots if s.process is not None and s.process.is_alive())

    def _spawn(self, slot: _Slot) -> None:
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
        """Restart dead workers; a model or start-up failure becomes ``fatal`` (restarting cannot help)."""
        for slot in self._slots:
            process = slot.process
            if process is None or process.is_alive() or slot.gave_up:
                continue
            code = process.exitcode
            if code in (EXIT_MODEL_ERROR, EXIT_STARTUP_ERROR):
                what = "load the model" if code == EXIT_MODEL_ERROR else "start (database schema)"
                self.fatal = f"worker {slot.index} could not {what}; see its log line above"
                log.error("worker_cannot_start", slot=slot.index, exit_code=code)
                slot.gave_up = True
                continue
            if slot.restarts >= MAX_RESTARTS:
                log.error("worker_given_up", slot=slot.index, exit_code=code, restarts=slot.restarts)
                slot.gave_up = True
                continue
            slot.restarts += 1
            log.warning("worker_died", slot=slot.index, exit_code=code, restart=slot.restarts)
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
