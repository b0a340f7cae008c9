"""Alembic environment of the node's database (see pacs_agent.db.migrate)."""
