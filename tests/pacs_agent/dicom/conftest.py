"""Fixtures of the receiver tests: a running receiver, in this process or as a pool of two processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pacs_agent.db.migrate import upgrade_database
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.dicom.scp import Receiver
from pacs_agent.dicom.scp_pool import ReceiverPool
from pacs_agent.settings import Settings
from tests.support.receiver import Peer


@pytest.fixture(params=[1, 2], ids=["in-process", "2-processes"])
def start_receiver(request: pytest.FixtureRequest, settings_factory: Callable[..., Settings]) -> Iterator[Callable[..., Peer]]:
    """Every test that uses it runs twice: the receiver in the test's process (node.receiver_processes 1)
    and a pool of two receiver processes fed by one listener (pacs_agent.dicom.scp_pool)."""
    processes: int = request.param
    started: list[tuple[Receiver | ReceiverPool, Any]] = []

    def start(**overrides: Any) -> Peer:
        settings = settings_factory(**overrides)
        engine = make_engine(settings.database.url)
        upgrade_database(settings.database.url, engine)
        factory = make_session_factory(engine)
        receiver: Receiver | ReceiverPool
        receiver = ReceiverPool(settings, factory, processes) if processes > 1 else Receiver(settings, factory)
        receiver.start()
        started.append((receiver, engine))
        return Peer(receiver, factory, settings)

    yield start
    for receiver, engine in started:
        receiver.stop()
        engine.dispose()
