"""Database: SQLAlchemy 2.0 models, engine/session set-up, Alembic migrations."""
