"""Fixtures for fault tests: the `faults` marker, a tiny random checkpoint, a running node, a stand-in PACS."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.node import Node, node_config
from pacs_agent.demo.pacs import free_port
from tests.support.pacs_scp import PacsSCP


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: long fault-injection tests, run by `make faults` (pytest -m faults)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long fault tests run only when asked for (`-m faults`, or PE_RUN_FAULTS=1): `make test` stays short."""
    import os

    if "faults" in (config.getoption("markexpr") or "") or os.environ.get("PE_RUN_FAULTS") == "1":
        return
    skip = pytest.mark.skip(reason="long fault test: run with `make faults` (pytest -m faults)")
    for item in items:
        if item.get_closest_marker("faults") is not None:
            item.add_marker(skip)


@pytest.fixture
def pacs() -> Iterator[PacsSCP]:
    """A pynetdicom storage SCP standing in for PACS (its port is fixed; stop/start for outages)."""
    scp = PacsSCP(ae_title="PACS")
    scp.start()
    try:
        yield scp
    finally:
        scp.stop()


@pytest.fixture
def make_node(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[Callable[..., Node]]:
    """``make_node(destinations=[...], **sections) -> Node`` (not started); every node is stopped at the end."""
    nodes: list[Node] = []

    def make(*, name: str = "node", destinations: Any = (), **sections: Any) -> Node:
        workdir = tmp_path / name
        node = Node(workdir, node_config(workdir, port=free_port(), checkpoint=tiny_checkpoint, destinations=destinations, **sections))
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()
