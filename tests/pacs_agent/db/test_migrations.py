"""Alembic migrations create exactly the schema of the models, and the head check guards start-up."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from pacs_agent.db.migrate import (
    SchemaOutOfDateError,
    check_schema_at_head,
    current_revision,
    head_revision,
    upgrade_database,
)
from pacs_agent.db.models import Base
from pacs_agent.db.session import make_engine


def test_upgrade_matches_models_exactly(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = make_engine(url)
    assert upgrade_database(url, engine) == head_revision()
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diffs = compare_metadata(context, Base.metadata)
    assert diffs == []
    tables = set(inspect(engine).get_table_names())
    assert set(Base.metadata.tables) <= tables
    engine.dispose()


def test_upgrade_is_idempotent_and_check_passes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade_database(url)
    upgrade_database(url)
    engine = make_engine(url)
    check_schema_at_head(engine)
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_unmigrated_database_is_refused_with_the_fix(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.sqlite'}")
    with pytest.raises(SchemaOutOfDateError, match=r"run `pe-agent db upgrade`"):
        check_schema_at_head(engine)
    engine.dispose()


def test_downgrade_to_base_removes_every_table(tmp_path: Path) -> None:
    from alembic import command

    from pacs_agent.db.migrate import alembic_config

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = make_engine(url)
    upgrade_database(url, engine)
    command.downgrade(alembic_config(url, engine), "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()


@pytest.mark.postgres
def test_upgrade_matches_models_on_postgresql(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    assert upgrade_database(postgres_url, engine) == head_revision()
    with engine.connect() as connection:
        diffs = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
    assert diffs == []
    check_schema_at_head(engine)
    engine.dispose()


@pytest.mark.postgres
def test_postgresql_sessions_cannot_hold_locks_for_ever(postgres_url: str) -> None:
    from sqlalchemy import text

    from pacs_agent.db.session import make_engine

    engine = make_engine(postgres_url)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SHOW idle_in_transaction_session_timeout")).scalar() == "1min"
            assert connection.execute(text("SHOW lock_timeout")).scalar() == "30s"
    finally:
        engine.dispose()
