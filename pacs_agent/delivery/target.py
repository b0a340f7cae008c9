"""The Target protocol: how the dispatcher sends produced objects to one destination, whatever the transport.

A transport (``dimse`` today) implements `Target`; `build_target` picks it by ``destination.kind``.
The dispatcher (pacs_agent.delivery.dispatcher) keeps the bookkeeping: an object whose outcome is not
``ok`` is retried with backoff while ``retryable``, and fails at once otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pacs_agent.errors import DeliveryError
from pacs_agent.settings import DestinationSettings, Settings


@dataclass(frozen=True)
class ObjectOutcome:
    """One object sent to one target."""

    path: Path
    sop_instance_uid: str
    ok: bool
    #: DICOM status (DIMSE status, or the STOW-RS per-instance status / HTTP status); None: no answer.
    status: int | None
    #: Empty when ok.
    reason: str
    #: Transient (connection refused, 5xx, 0xA7xx) vs permanent (0xA9xx, 4xx, a file that is gone).
    retryable: bool


@dataclass(frozen=True)
class EchoOutcome:
    """A connectivity test of one target."""

    ok: bool
    #: "C-ECHO 0x0000" / "QIDO-RS 200" / the error.
    detail: str


class Target(Protocol):
    """One destination reached over one transport."""

    name: str

    def send(self, paths: Sequence[Path]) -> list[ObjectOutcome]:
        """Send the Part 10 files ``paths``: one call = one association / request batch; one outcome per
        path, in the order given; never raises for network or peer trouble."""
        ...

    def echo(self) -> EchoOutcome:
        """Test that the destination answers; never raises for network or peer trouble."""
        ...


def build_target(destination: DestinationSettings, settings: Settings | None = None) -> Target:
    """The Target for ``destination`` by ``destination.kind``; ``settings`` gives the node-wide values a
    transport needs (calling AE title, timeouts, TLS); None: the defaults."""
    settings = settings if settings is not None else Settings()
    if destination.kind == "dimse":
        from pacs_agent.delivery.dimse import DimseTarget

        return DimseTarget.from_settings(destination, settings)
    raise DeliveryError(f"destination {destination.name!r}: unknown kind {destination.kind!r}")


__all__ = ["EchoOutcome", "ObjectOutcome", "Target", "build_target"]
