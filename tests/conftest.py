"""Suite-wide fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """A test that configures logging (a CLI run in-process) binds structlog to pytest's captured
    stream, which is closed after that test; later tests must not inherit that configuration."""
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


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
