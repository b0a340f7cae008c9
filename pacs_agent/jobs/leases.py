"""Lease helpers shared by the job queue and the dispatcher: owner names, whether an owner still lives, backoff."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: initial * 2**(attempt - 1), capped at maximum (seconds)."""

    initial_seconds: float
    max_seconds: float

    def delay(self, attempt: int) -> float:
        exponent = max(attempt - 1, 0)
        if exponent > 60:
            return self.max_seconds
        return min(self.max_seconds, self.initial_seconds * (2**exponent))


def default_owner() -> str:
    """A worker id unique on this network: host, pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_process(owner: str) -> tuple[str, int] | None:
    """(hostname, pid) of a lease owner written by default_owner (``host:pid`` plus an optional
    ``/suffix``: ``/w0`` for a pool's worker, ``/dispatch``), or None for any other format."""
    host, sep, pid = owner.split("/", 1)[0].rpartition(":")
    if not sep or not host or not pid.isdigit() or int(pid) <= 0:
        return None
    return host, int(pid)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0 checks without sending)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True
