"""At start-up, leases held by dead processes of this host go back at once; other hosts' stay."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import timedelta

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from pacs_agent.db.models import Delivery, DeliveryStatus, Event, Job, JobStatus, Output, OutputKind, Series, Worker, utcnow
from pacs_agent.db.session import transaction
from pacs_agent.delivery.dispatcher import release_deliveries_of_dead_local_dispatchers
from pacs_agent.delivery.dimse import no_delay
from pacs_agent.jobs.queue import release_jobs_of_dead_local_workers
from pacs_agent.jobs.leases import owner_process, process_alive
from pacs_agent.jobs.workers import register_worker

from tests.support.settings import MigratedDB

HOST = socket.gethostname()


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    assert not process_alive(process.pid)
    return process.pid


def _running_job(db: MigratedDB, n: int, owner: str, *, attempts: int = 1, max_attempts: int = 3) -> int:
    with transaction(db.session_factory) as session:
        series = Series(study_instance_uid="1.2.3", series_instance_uid=f"1.2.3.{n}", instance_count=50)
        session.add(series)
        session.flush()
        job = Job(series_id=series.id, status=JobStatus.RUNNING, reason="received", attempts=attempts, max_attempts=max_attempts,
                  lease_owner=owner, lease_expires_at=utcnow() + timedelta(hours=1))
        session.add(job)
        session.flush()
        return job.id


def _sending_delivery(db: MigratedDB, job_id: int, n: int, owner: str) -> int:
    with transaction(db.session_factory) as session:
        output = Output(job_id=job_id, kind=OutputKind.SR, sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33",
                        sop_instance_uid=f"1.2.9.{n}", series_instance_uid="1.2.9", path=f"outbox/{job_id}/{n}.dcm")
        session.add(output)
        session.flush()
        delivery = Delivery(output_id=output.id, destination="pacs", status=DeliveryStatus.SENDING, attempts=2,
                            next_attempt_at=utcnow() - timedelta(minutes=1),
                            lease_owner=owner, lease_expires_at=utcnow() + timedelta(minutes=5))
        session.add(delivery)
        session.flush()
        return delivery.id


def _job(db: MigratedDB, job_id: int) -> Job:
    with db.session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _delivery(db: MigratedDB, delivery_id: int) -> Delivery:
    with db.session_factory() as session:
        delivery = session.get(Delivery, delivery_id)
        assert delivery is not None
        return delivery


def _kinds(db: MigratedDB, entity: str, entity_id: int) -> list[str]:
    with db.session_factory() as session:
        return list(session.scalars(select(Event.kind).where(Event.entity == entity, Event.entity_id == str(entity_id)).order_by(Event.id)))


def test_owner_process_parses_the_owner_formats() -> None:
    assert owner_process("node-1:4242") == ("node-1", 4242)
    assert owner_process("node-1:4242/w3") == ("node-1", 4242)
    assert owner_process("node-1:4242/dispatch") == ("node-1", 4242)
    for odd in ("w", "dead", "node-1:", ":12", "node-1:0/w0", "node-1:x/w0", ""):
        assert owner_process(odd) is None, odd
    assert process_alive(os.getpid())
    assert not process_alive(0)


def test_jobs_of_dead_local_workers_are_requeued_and_others_are_left(migrated_db: MigratedDB) -> None:
    db = migrated_db
    dead, parent_dead = _dead_pid(), _dead_pid()
    # A pool's worker is named after serve's pid; its own pid is in the Worker row.
    register_worker(db.session_factory, f"{HOST}:{parent_dead}/w0", pid=dead)
    register_worker(db.session_factory, f"{HOST}:{parent_dead}/w1", pid=os.getpid())  # still running (orphaned)
    register_worker(db.session_factory, f"elsewhere:{dead}/w0", pid=dead)
    with transaction(db.session_factory) as session:
        other = session.get(Worker, f"elsewhere:{dead}/w0")
        assert other is not None
        other.hostname = "elsewhere"
    dead_worker = _running_job(db, 1, f"{HOST}:{parent_dead}/w0")
    live_worker = _running_job(db, 2, f"{HOST}:{parent_dead}/w1")
    other_host = _running_job(db, 3, f"elsewhere:{dead}/w0")
    rowless_dead = _running_job(db, 4, f"{HOST}:{dead}")
    rowless_live = _running_job(db, 5, f"{HOST}:{os.getpid()}")
    rowless_other_host = _running_job(db, 6, f"elsewhere:{dead}")
    out_of_attempts = _running_job(db, 7, f"{HOST}:{dead}/w9", attempts=3, max_attempts=3)
    unparsable = _running_job(db, 8, "worker-a")

    released = release_jobs_of_dead_local_workers(db.session_factory)

    assert sorted(released) == sorted([dead_worker, rowless_dead, out_of_attempts])
    for job_id in (dead_worker, rowless_dead):
        job = _job(db, job_id)
        assert (job.status, job.lease_owner, job.lease_expires_at, job.attempts) == (JobStatus.QUEUED, None, None, 1)
        assert _kinds(db, "job", job_id)[-1] == "job_lease_released"
    failed = _job(db, out_of_attempts)
    assert failed.status == JobStatus.FAILED and "attempt 3 of 3" in failed.error
    for job_id in (live_worker, other_host, rowless_live, rowless_other_host, unparsable):
        job = _job(db, job_id)
        assert job.status == JobStatus.RUNNING and job.lease_owner is not None, job_id
    assert release_jobs_of_dead_local_workers(db.session_factory) == []


def test_deliveries_of_a_dead_local_dispatcher_go_back_to_pending(migrated_db: MigratedDB) -> None:
    db = migrated_db
    dead = _dead_pid()
    job_id = _running_job(db, 1, "w")
    stale = _sending_delivery(db, job_id, 1, f"{HOST}:{dead}/dispatch")
    live = _sending_delivery(db, job_id, 2, f"{HOST}:{os.getpid()}/dispatch")
    other_host = _sending_delivery(db, job_id, 3, f"elsewhere:{dead}/dispatch")
    before = utcnow()

    assert release_deliveries_of_dead_local_dispatchers(db.session_factory) == [stale]

    released = _delivery(db, stale)
    assert (released.status, released.lease_owner, released.lease_expires_at, released.attempts) == (DeliveryStatus.PENDING, None, None, 2)
    assert before - timedelta(seconds=1) <= released.next_attempt_at <= utcnow()
    assert _kinds(db, "delivery", stale) == ["delivery_lease_released"]
    for delivery_id in (live, other_host):
        delivery = _delivery(db, delivery_id)
        assert delivery.status == DeliveryStatus.SENDING and delivery.lease_owner is not None
        assert _kinds(db, "delivery", delivery_id) == []
    assert release_deliveries_of_dead_local_dispatchers(db.session_factory) == []


def test_dispatcher_association_turns_nagle_off(free_port: object) -> None:
    port = free_port()  # type: ignore[operator]
    scp = AE(ae_title="PACS")
    scp.add_supported_context(Verification)
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_ECHO, lambda event: 0x0000)])
    try:
        scu = AE(ae_title="NODE")
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", port, ae_title="PACS")
        assert assoc.is_established
        raw = assoc.dul.socket.socket  # type: ignore[union-attr]
        assert raw is not None and raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        no_delay(assoc)
        assert raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assoc.release()
    finally:
        server.shutdown()
