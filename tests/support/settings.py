"""Settings and a migrated database for node tests: spool and SQLite under a temp folder, free ports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.demo.pacs import free_port as find_free_port
from pacs_agent.settings import Settings, load_settings


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


@dataclass(frozen=True)
class MigratedDB:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
