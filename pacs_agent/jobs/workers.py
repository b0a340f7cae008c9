"""The worker registry: one Worker row per analysis process (start, heartbeat, stop), read by status and health."""

from __future__ import annotations

import os
import socket

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.db.events import record_event
from pacs_agent.db.models import Worker, utcnow
from pacs_agent.db.session import transaction


def register_worker(session_factory: sessionmaker[Session], worker_id: str, *, pid: int | None = None) -> None:
    """Create or refresh the Worker row of a starting worker process."""
    now = utcnow()
    with transaction(session_factory) as session:
        worker = session.get(Worker, worker_id)
        if worker is None:
            worker = Worker(id=worker_id)
            session.add(worker)
        worker.hostname = socket.gethostname()
        worker.pid = os.getpid() if pid is None else pid
        worker.started_at = now
        worker.heartbeat_at = now
        worker.current_job_id = None
        worker.stopped_at = None
        record_event(session, entity="worker", entity_id=worker_id, kind="worker_started", pid=worker.pid)


def worker_heartbeat(session_factory: sessionmaker[Session], worker_id: str, *, current_job_id: int | None) -> None:
    with transaction(session_factory) as session:
        session.execute(
            update(Worker).where(Worker.id == worker_id).values(heartbeat_at=utcnow(), current_job_id=current_job_id)
            .execution_options(synchronize_session=False)
        )


def stop_worker(session_factory: sessionmaker[Session], worker_id: str) -> None:
    with transaction(session_factory) as session:
        worker = session.get(Worker, worker_id)
        if worker is not None:
            worker.stopped_at = utcnow()
            worker.current_job_id = None
            record_event(session, entity="worker", entity_id=worker_id, kind="worker_stopped")
