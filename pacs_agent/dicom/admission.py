"""The association limit: at most node.max_associations at once, in one process or across a receiver pool."""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import SynchronizedArray

    SharedCounts = SynchronizedArray[int]
else:
    SharedCounts = Any


class Admission:
    """At most ``limit`` associations admitted at once: in this process, or across the processes of a
    receiver pool when ``shared`` (one count per process in shared memory, ``slot`` is this process's).

    An association counts from its admission until its connection closes (or its thread has ended, for
    one whose close was never announced). Requests are admitted one at a time under a lock.
    """

    def __init__(self, limit: int, shared: SharedCounts | None = None, slot: int = 0) -> None:
        self._limit = limit
        self._shared = shared
        self._slot = slot
        self._lock = threading.Lock()
        self._admitted: weakref.WeakSet[Any] = weakref.WeakSet()

    def admit(self, assoc: Any) -> bool:
        with self._lock:
            for finished in [a for a in self._admitted if not a.is_alive()]:
                self._admitted.discard(finished)  # do not wait for the garbage collector
            if self._shared is None:
                if len(self._admitted) >= self._limit:
                    return False
                self._admitted.add(assoc)
                return True
            with self._shared.get_lock():
                self._shared[self._slot] = len(self._admitted)
                if sum(self._shared[:]) >= self._limit:
                    return False
                self._admitted.add(assoc)
                self._shared[self._slot] = len(self._admitted)
                return True

    def release(self, assoc: Any) -> None:
        with self._lock:
            if assoc not in self._admitted:
                return
            self._admitted.discard(assoc)
            if self._shared is not None:
                with self._shared.get_lock():
                    self._shared[self._slot] = len(self._admitted)
