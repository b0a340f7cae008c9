"""Fixtures for pacs_agent tests: settings on temp folders, a migrated SQLite database, free ports."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.db.migrate import upgrade_database
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.settings import Settings, load_settings


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def make_test_settings(root: Path, **overrides: Any) -> Settings:
    """Settings for a test: spool and SQLite under ``root``, ephemeral DICOM port, short timings.

    ``overrides`` are sections as dicts (``series={"quiet_seconds": 0.5}``) or ``destinations=[...]``;
    the environment is ignored so a developer's PE_AGENT__* variables cannot leak in.
    """
    base: dict[str, Any] = {
        "node": {"port": 0, "min_free_disk_mb": 1},
        "storage": {"root": str(root / "spool")},
        "database": {"url": f"sqlite:///{root / 'pe_agent.sqlite'}"},
        "series": {"quiet_seconds": 1.0},
        "workers": {
            "count": 1, "lease_seconds": 30.0, "heartbeat_seconds": 1.0, "poll_seconds": 0.2,
            "backoff_initial_seconds": 1.0, "backoff_max_seconds": 8.0,
        },
        "dispatch": {"backoff_initial_seconds": 0.5, "backoff_max_seconds": 2.0, "poll_seconds": 0.3},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": find_free_port()}],
        "log": {"format": "json", "level": "INFO"},
        "http": {"enabled": False, "host": "127.0.0.1", "port": 0},
    }
    return load_settings(None, environ={}, overrides=_merge(base, overrides))


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


@dataclass(frozen=True)
class MigratedDB:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]


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
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised, tiny checkpoint (R3D-18 width 4, input 32): fast, outputs meaningless."""
    from pe_model.checkpoint import build_initial_checkpoint, small_sequence_config
    from pe_model.preprocessing import PreprocessConfig

    path = tmp_path_factory.mktemp("checkpoint") / "tiny.pt"
    build_initial_checkpoint(
        path, encoder_width=4, sequence=small_sequence_config(4, hidden=16), preprocess_config=PreprocessConfig(input_size=32), seed=0,
    )
    return path


@pytest.fixture(scope="session")
def tiny_predictor(tiny_checkpoint: Path) -> Any:
    """The tiny checkpoint loaded once for the session (pe_model.predictor.Predictor)."""
    from pe_model.predictor import Predictor

    return Predictor.from_checkpoint(tiny_checkpoint, gradcam_top_k=2, num_threads=1)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """One throw-away PostgreSQL server for the session (tests.support.postgres); skipped without the binaries."""
    from tests.support.postgres import session_server

    with session_server("pe-agent-pg-") as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: Any, request: pytest.FixtureRequest) -> str:
    """URL of a fresh, empty database on the session's PostgreSQL server."""
    from tests.support.postgres import fresh_database

    return fresh_database(postgres_server, request.node.name, prefix="t_")


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
