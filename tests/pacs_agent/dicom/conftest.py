"""Fixtures of the receiver tests: a running receiver, in this process or as a pool of two processes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pacs_agent.db.migrate import upgrade_database
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.dicom.scp import Receiver, ReceiverService
from pacs_agent.dicom.scp_pool import ReceiverPool
from pacs_agent.settings import Settings
from tests.support.receiver import Peer


@pytest.fixture(
    params=[(1, True), (2, True), (1, False)], ids=["in-process", "2-processes", "in-process-stock-pynetdicom"]
)
def start_receiver(request: pytest.FixtureRequest, settings_factory: Callable[..., Settings]) -> Iterator[Callable[..., Peer]]:
    """Every test that uses it runs three times: the receiver in the test's process (node.receiver_processes 1),
    a pool of two receiver processes fed by one listener (pacs_agent.dicom.scp_pool), and in the test's
    process on stock pynetdicom (node.pynetdicom_patches false)."""
    processes, patches = request.param
    started: list[tuple[ReceiverService, Any]] = []

    def start(**overrides: Any) -> Peer:
        settings = settings_factory(**overrides)
        settings = dataclasses.replace(settings, node=dataclasses.replace(settings.node, pynetdicom_patches=patches))
        engine = make_engine(settings.database.url)
        upgrade_database(settings.database.url, engine)
        factory = make_session_factory(engine)
        receiver: ReceiverService
        receiver = ReceiverPool(settings, factory, processes) if processes > 1 else Receiver(settings, factory)
        receiver.start()
        started.append((receiver, engine))
        return Peer(receiver, factory, settings)

    yield start
    for receiver, engine in started:
        receiver.stop()
        engine.dispose()
