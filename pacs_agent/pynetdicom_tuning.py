"""Cap pynetdicom's fixed 1 ms polling sleeps while a receiver runs.

pynetdicom's reactor loops (``pynetdicom.dul`` reading the socket, ``pynetdicom.association``
waiting for DIMSE messages) poll with ``time.sleep(0.001)`` when idle. Between two C-STOREs of a
series both loops go idle several times, which costs about 3.5 ms per instance on the SCP side;
capping each sleep made a 400-slice series arrive 23 % faster (docs/BENCHMARKS.md, measured with a
100 us cap by benchmarks/receivers.py); 200 us is used here (half the idle wake-ups; each poll
still waits a fifth of what it did). pynetdicom has no setting for it, so the module-level
``time`` name of those two modules is replaced by a shim whose ``sleep`` is ``min(seconds, cap)``;
everything else is the real ``time`` module. The shim is process-wide: `SleepCap` installs it while at least one
user holds it and puts the real module back after the last one leaves.
"""

from __future__ import annotations

import threading
import time
import types
from types import ModuleType

import pynetdicom.association
import pynetdicom.dul

#: Longest idle poll pynetdicom may sleep while a receiver runs (seconds).
DEFAULT_SLEEP_CAP_SECONDS = 0.0002
_PATCHED_MODULES: tuple[ModuleType, ...] = (pynetdicom.association, pynetdicom.dul)


def _capped_time(cap: float) -> types.SimpleNamespace:
    """A stand-in for the ``time`` module whose ``sleep`` never sleeps longer than ``cap``."""
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
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
