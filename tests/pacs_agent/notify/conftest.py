"""Fixtures of the notification tests: a node's database, settings and Notifier."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pacs_agent.settings import Settings
from tests.support.notify_node import KEY, Node

@pytest.fixture
def node_factory(settings_factory: Callable[..., Settings], tmp_path: Path) -> Iterator[Callable[..., Node]]:
    key_file = tmp_path / "ack.key"
    key_file.write_bytes(KEY + b"\n")
    made: list[Node] = []

    def make(notifications: list[dict[str, Any]], **overrides: Any) -> Node:
        alerts = {"signing_key_file": str(key_file), "backoff_initial_seconds": 10.0, "backoff_max_seconds": 40.0, "max_attempts": 4}
        alerts.update(overrides.pop("alerts", {}))
        settings = settings_factory(notifications=notifications, alerts=alerts, http={"public_url": "https://pe.example.org/"}, **overrides)
        node = Node(settings)
        made.append(node)
        return node

    yield make
    for node in made:
        node.engine.dispose()
