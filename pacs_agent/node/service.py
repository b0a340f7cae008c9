"""`pe-agent serve` and `pe-agent worker`: the node's processes.

serve: migrate the database, start the DICOM receiver (this process, or node.receiver_processes
processes fed by this one: pacs_agent.dicom.scp_pool), the scheduler (tracker sweep,
dispatch, lease recovery, retention), ``workers.count`` worker processes ("spawn": inference cannot
stall or crash the listener) and the optional HTTP server. Child processes that die are restarted by
pacs_agent.node.supervisor (up to MAX_RESTARTS per slot); a worker that cannot load the model stops the
node with exit code 1, since nothing could be analysed. SIGINT/SIGTERM: stop receiving, stop the scheduler, SIGTERM the workers and
wait for them, exit 0.
"""

from __future__ import annotations

import dataclasses
import threading

from alembic.util import CommandError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.db.migrate import upgrade_database
from pacs_agent.db.session import make_engine, make_session_factory
from pacs_agent.errors import AgentError
from pacs_agent.logs import configure_logging, get_logger
from pacs_agent.jobs.leases import default_owner
from pacs_agent.settings import Settings
from pacs_agent.analysis.worker import EXIT_OK
from pacs_agent.node.supervisor import WorkerPool, watch
from pacs_agent.signals import stop_on_signals

log = get_logger(__name__)

EXIT_FAILURE = 1


def _migrate(settings: Settings) -> bool:
    """Bring the schema to this build's revision (serve and worker always do); False when impossible."""
    try:
        revision = upgrade_database(settings.database.url)
    except (SQLAlchemyError, CommandError, OSError) as exc:
        log.error("database_upgrade_failed", error=f"{type(exc).__name__}: {exc}")
        return False
    log.info("database_upgraded", revision=revision, note="serve and worker always bring the schema to this build's revision")
    return True


def _release_leases_of_dead_local_processes(factory: sessionmaker[Session]) -> None:
    """After a crash, hand back at once what this host's dead processes held (not after the lease)."""
    from pacs_agent.delivery.dispatcher import release_deliveries_of_dead_local_dispatchers
    from pacs_agent.jobs.queue import release_jobs_of_dead_local_workers

    jobs = release_jobs_of_dead_local_workers(factory)
    if jobs:
        log.warning("jobs_of_dead_workers_released", count=len(jobs), job_ids=jobs)
    deliveries = release_deliveries_of_dead_local_dispatchers(factory)
    if deliveries:
        log.warning("deliveries_of_dead_dispatcher_released", count=len(deliveries))


def serve(settings: Settings, *, stop_event: threading.Event | None = None) -> int:
    """Run the node until SIGINT/SIGTERM (or ``stop_event``). Returns the exit code."""
    from pacs_agent.dicom.scp_pool import build_receiver
    from pacs_agent.node.scheduler import build_scheduler
    from pacs_agent.series.tracker import recover_open_associations

    configure_logging(settings.log)
    stop = stop_event or threading.Event()
    restore_signals = stop_on_signals(stop, event="stopping")
    log.info("serve_starting", settings=settings.redacted())
    if not _migrate(settings):
        restore_signals()
        return EXIT_FAILURE
    engine = make_engine(settings.database.url)
    factory = make_session_factory(engine)
    receiver = build_receiver(settings, factory)
    pool = WorkerPool(settings, settings.workers.count)
    scheduler = build_scheduler(settings, factory, owner=f"{default_owner()}/dispatch")
    http_server = None
    code = EXIT_OK
    try:
        if settings.http.enabled:
            # Built first: a bad credentials file, TLS key or taken port stops serve before anything starts.
            from pacs_agent.node.web import HealthProbes, WebServer

            http_server = WebServer(
                settings, factory,
                HealthProbes(receiver_listening=lambda: receiver.is_running, workers_alive=lambda: (pool.alive(), pool.expected)),
            )
        reopened = recover_open_associations(factory)
        if reopened:
            log.warning("associations_recovered", count=reopened)
        _release_leases_of_dead_local_processes(factory)
        receiver.start()
        pool.start()
        scheduler.start()
        if http_server is not None:
            http_server.start()
        log.info("serve_ready", dicom_port=receiver.port, workers=settings.workers.count,
                 http_port=http_server.port if http_server else None)
        if watch(stop, {"worker": pool, "receiver": receiver}, event="serve_stopping"):
            code = EXIT_FAILURE
    except (AgentError, OSError, SQLAlchemyError) as exc:
        log.error("serve_failed", error=f"{type(exc).__name__}: {exc}")
        code = EXIT_FAILURE
    finally:
        receiver.stop()
        if scheduler.running:
            scheduler.shutdown(wait=True)
        pool.stop()
        if http_server is not None:
            http_server.stop()
        engine.dispose()
        restore_signals()
        log.info("serve_stopped", exit_code=code)
    return code


def run_workers(settings: Settings, *, count: int | None = None, stop_event: threading.Event | None = None) -> int:
    """`pe-agent worker`: only worker processes (scale-out), same restart and stop rules as serve."""
    configure_logging(settings.log)
    stop = stop_event or threading.Event()
    restore_signals = stop_on_signals(stop, event="stopping")
    n = count if count is not None else max(settings.workers.count, 1)
    log.info("workers_starting", count=n, settings=settings.redacted())
    if not _migrate(settings):
        restore_signals()
        return EXIT_FAILURE
    # Workers size their torch threads by workers.count: make it the number actually started.
    settings = dataclasses.replace(settings, workers=dataclasses.replace(settings.workers, count=n))
    pool = WorkerPool(settings, n)
    code = EXIT_OK
    pool.start()
    try:
        if watch(stop, {"worker": pool}, event="workers_stopping", until=pool.all_given_up):
            code = EXIT_FAILURE
    finally:
        pool.stop()
        restore_signals()
    return code
