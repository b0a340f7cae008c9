"""Fixtures for pacs_agent tests: settings on temp folders, a migrated SQLite database, free ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pacs_agent.db.migrate import upgrade_database
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.settings import Settings
from tests.support.settings import MigratedDB, find_free_port, make_test_settings


@pytest.fixture
def free_port() -> Callable[[], int]:
    """Call it for a free loopback TCP port."""
    return find_free_port


@pytest.fixture
def settings_factory(tmp_path: Path) -> Callable[..., Settings]:
    """``settings_factory(**overrides) -> Settings`` on this test's tmp_path (see make_test_settings)."""

    def make(**overrides: Any) -> Settings:
        return make_test_settings(tmp_path, **overrides)

    return make


@pytest.fixture
def migrated_db(settings_factory: Callable[..., Settings]) -> Iterator[MigratedDB]:
    """A SQLite database at the newest schema revision, with its settings, engine and session factory."""
    settings = settings_factory()
    engine = make_engine(settings.database.url)
    upgrade_database(settings.database.url, engine)
    try:
        yield MigratedDB(settings=settings, engine=engine, session_factory=make_session_factory(engine))
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def tiny_predictor(tiny_checkpoint: Path) -> Any:
    """The tiny checkpoint loaded once for the session (pe_model.predictor.Predictor)."""
    from pe_model.predictor import Predictor

    return Predictor.from_checkpoint(tiny_checkpoint, gradcam_top_k=2, num_threads=1)


@pytest.fixture
def node_factory(settings_factory: Callable[..., Settings], tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``node_factory(notifications, **overrides) -> tests.support.notify_node.Node``: a migrated database,
    settings with those [[notifications]], an acknowledgement-link key (notify_node.KEY) and a Notifier."""
    from tests.support.notify_node import KEY, Node

    key_file = tmp_path / "ack.key"
    key_file.write_bytes(KEY + b"\n")
    made: list[Any] = []

    def make(notifications: list[dict[str, Any]], **overrides: Any) -> Any:
        alerts = {"signing_key_file": str(key_file), "backoff_initial_seconds": 10.0, "backoff_max_seconds": 40.0, "max_attempts": 4}
        alerts.update(overrides.pop("alerts", {}))
        settings = settings_factory(notifications=notifications, alerts=alerts, http={"public_url": "https://pe.example.org/"}, **overrides)
        node = Node(settings)
        made.append(node)
        return node

    yield make
    for node in made:
        node.engine.dispose()
