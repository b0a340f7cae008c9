"""Suite-wide fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """A test that configures logging (a CLI run in-process) binds structlog to pytest's captured
    stream, which is closed after that test; later tests must not inherit that configuration."""
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
