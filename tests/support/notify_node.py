"""A node's notification side for tests: migrated database, settings and a Notifier."""

from __future__ import annotations

from sqlalchemy import select

from pacs_agent.db.migrate import upgrade_database
from pacs_agent.db.models import Event, Notification
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.notify import Notifier
from pacs_agent.settings import Settings

#: The acknowledgement-link signing key the fixture writes.
KEY = b"k" * 40


class Node:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = make_engine(settings.database.url)
        upgrade_database(settings.database.url, self.engine)
        self.session_factory = make_session_factory(self.engine)
        self.notifier = Notifier(settings, self.session_factory, owner="test:1/notify")

    def notifications(self) -> list[Notification]:
        with self.session_factory() as session:
            return list(session.scalars(select(Notification).order_by(Notification.id)))

    def events(self, kind: str) -> list[Event]:
        with self.session_factory() as session:
            return list(session.scalars(select(Event).where(Event.kind == kind).order_by(Event.id)))
