"""Schema migrations with Alembic, driven from code (no alembic.ini needed).

`upgrade_database(url)` brings a database to the newest revision; `check_schema_at_head(engine)`
refuses to run against an old schema with a message that says how to fix it.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from pacs_agent.db.session import make_engine
from pacs_agent.errors import AgentError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


class SchemaOutOfDateError(AgentError):
    """The database schema is older (or newer) than this build expects."""


def alembic_config(url: str, engine: Engine | None = None) -> Config:
    """An Alembic Config pointing at the package's migrations; ``engine`` is reused when given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if engine is not None:
        config.attributes["engine"] = engine
    return config


def head_revision() -> str:
    """The newest revision this build knows."""
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    if head is None:
        raise SchemaOutOfDateError("the migration scripts of this build have no head revision")
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None: never migrated)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade_database(url: str, engine: Engine | None = None, revision: str = "head") -> str:
    """Apply every pending migration and return the revision the database is now at."""
    own = engine is None
    engine = engine if engine is not None else make_engine(url)
    try:
        command.upgrade(alembic_config(url, engine), revision)
        return current_revision(engine) or ""
    finally:
        if own:
            engine.dispose()


def check_schema_at_head(engine: Engine) -> None:
    """Raise SchemaOutOfDateError unless the database is at this build's head revision."""
    current = current_revision(engine)
    head = head_revision()
    if current != head:
        raise SchemaOutOfDateError(
            f"database schema is out of date (at {current or 'no revision'}, this build needs {head}); "
            "run `pe-agent db upgrade`"
        )
