"""The association limits: at most node.max_associations at once, in one process or across a receiver pool,
and at most node.max_associations_per_calling_ae of them from one calling AE title (so one sender, or one
peer holding idle associations, cannot take every slot)."""

from __future__ import annotations

import math
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

    ``per_calling_ae`` (0: no limit of its own): at most that many from one calling AE title. In a pool
    of ``processes`` each process admits its share, ``ceil(per_calling_ae / processes)`` (the pool hands
    each connection to the least busy process, so one sender's associations spread over all of them).

    An association counts from its admission until its connection closes (or its thread has ended, for
    one whose close was never announced). Requests are admitted one at a time under a lock.
    """

    def __init__(
        self, limit: int, shared: SharedCounts | None = None, slot: int = 0, *, per_calling_ae: int = 0, processes: int = 1
    ) -> None:
        self._limit = limit
        self._shared = shared
        self._slot = slot
        self._per_calling_ae = math.ceil(per_calling_ae / max(processes, 1)) if per_calling_ae > 0 else 0
        self._lock = threading.Lock()
        self._admitted: weakref.WeakSet[Any] = weakref.WeakSet()
        self._by_calling_ae: dict[str, weakref.WeakSet[Any]] = {}

    def _prune(self) -> None:
        for finished in [a for a in self._admitted if not a.is_alive()]:
            self._admitted.discard(finished)  # do not wait for the garbage collector
        for title, members in list(self._by_calling_ae.items()):
            for finished in [a for a in members if not a.is_alive() or a not in self._admitted]:
                members.discard(finished)
            if not members:
                del self._by_calling_ae[title]

    def refusal(self, assoc: Any, calling_ae_title: str = "") -> str | None:
        """Admit ``assoc`` (None), or say which limit refuses it."""
        with self._lock:
            self._prune()
            same_ae = self._by_calling_ae.get(calling_ae_title)
            if self._per_calling_ae and same_ae is not None and len(same_ae) >= self._per_calling_ae:
                return "per calling AE title"
            if self._shared is None:
                if len(self._admitted) >= self._limit:
                    return "association"
                self._add(assoc, calling_ae_title)
                return None
            with self._shared.get_lock():
                self._shared[self._slot] = len(self._admitted)
                if sum(self._shared[:]) >= self._limit:
                    return "association"
                self._add(assoc, calling_ae_title)
                self._shared[self._slot] = len(self._admitted)
                return None

    def _add(self, assoc: Any, calling_ae_title: str) -> None:
        self._admitted.add(assoc)
        self._by_calling_ae.setdefault(calling_ae_title, weakref.WeakSet()).add(assoc)

    def admit(self, assoc: Any, calling_ae_title: str = "") -> bool:
        return self.refusal(assoc, calling_ae_title) is None

    def release(self, assoc: Any) -> None:
        with self._lock:
            if assoc not in self._admitted:
                return
            self._admitted.discard(assoc)
            for members in self._by_calling_ae.values():
                members.discard(assoc)
            if self._shared is not None:
                with self._shared.get_lock():
                    self._shared[self._slot] = len(self._admitted)
