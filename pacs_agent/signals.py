"""SIGTERM/SIGINT handling shared by `serve` and the worker processes."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

import structlog


def stop_on_signals(stop: threading.Event, *, event: str = "stopping") -> Callable[[], None]:
    """SIGTERM/SIGINT set ``stop`` (main thread only); returns a function restoring the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    log = structlog.get_logger("pacs_agent.signals")

    def handle(signum: int, _frame: FrameType | None) -> None:
        if not stop.is_set():
            log.info(event, signal=signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
