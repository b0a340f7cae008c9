"""One receiver, three `pe-agent worker` hosts, one shared spool and one database (PostgreSQL, and SQLite).

Twelve phantom series arrive by C-STORE while a worker host is killed (SIGKILL of its supervisor and
worker) in the middle of a job and another hangs mid-job (SIGSTOP) and wakes up later: each series is
analysed exactly once (one SUCCEEDED job, one result, one report set at PACS, no object sent twice),
the jobs of the killed and the hung host come back when their leases expire and are finished by
another host, and nothing the killed or the late attempt wrote reaches PACS. Deliveries are claimed
the same way: dispatchers racing on PostgreSQL send each object once.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from pacs_agent.db.migrate import upgrade_database
from pacs_agent.db.models import Delivery, DeliveryStatus, Event, Job, JobStatus, Output, OutputKind, Result, Series, SeriesState, Worker
from pacs_agent.db.session import make_engine, make_session_factory, transaction
from pacs_agent.delivery.dispatcher import dispatch_due
from pacs_agent.delivery.outbox import queue_deliveries
from pacs_agent.reports import write_reports
from pacs_agent.settings import OutputSettings, load_settings
from phantoms import PhantomTruth
from tests.faults.node import wait_until
from tests.scaleout.cluster import Cluster, pause_a_running_job, pe_agent, send_series
from tests.scaleout.cluster import SERIES_COUNT
from tests.support.ct_series import CTSeriesSpec, make_ct_series
from tests.support.pacs_scp import PacsSCP
from tests.support.predictions import make_prediction

pytestmark = pytest.mark.slow

SR_STORAGE_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def _events(cluster: Cluster, kind: str) -> list[Event]:
    with cluster.sessions()() as session:
        rows = list(session.scalars(select(Event).where(Event.kind == kind).order_by(Event.id)))
        session.expunge_all()
        return rows


def _rows(cluster: Cluster, model: type[Result] | type[Output] | type[Worker]) -> list[object]:
    with cluster.sessions()() as session:
        rows: list[object] = list(session.scalars(select(model)))
        session.expunge_all()
        return rows


def test_twelve_series_three_workers_one_killed_one_hung_mid_job(
    database_url: str, make_cluster: Callable[..., Cluster], pacs: PacsSCP, phantom_series: list[PhantomTruth]
) -> None:
    cluster = make_cluster(database_url, workers=3)
    assert "database schema is at revision" in cluster.upgrade()
    current = pe_agent("db", "current", "--json", "--config", str(cluster.root / "receiver" / "upgrade.toml"))
    assert current.returncode == 0, current.stderr
    receiver = cluster.start_receiver()
    hosts = cluster.start_workers()
    owners = {h.owner for h in hosts}

    failures: list[BaseException] = []

    def scanner() -> None:
        try:
            send_series(receiver.port, [truth.files for truth in phantom_series])
        except BaseException as exc:  # reported by the test thread below
            failures.append(exc)

    sender = threading.Thread(target=scanner, name="scanner")
    sender.start()
    victim_job_id, victim = pause_a_running_job(cluster, timeout=90)
    victim_owner = victim.owner
    victim.kill9()
    # A second host hangs mid-job (SIGSTOP: its database connection stays open). Its lease expires, the
    # last host redoes the job; when the hung host wakes up its result must be dropped, not delivered.
    hung_job_id, hung = pause_a_running_job(cluster, timeout=90, exclude=[victim], exclude_jobs=[victim_job_id])
    hung_owner = hung.owner
    wait_until(lambda: (job := cluster.job(hung_job_id)) is not None and job.status == JobStatus.SUCCEEDED,
               timeout=90, what=f"the hung host's job to be finished elsewhere:\n{cluster.logs()}")
    hung.resume()
    wait_until(lambda: '"event": "job_result_dropped"' in hung.log_text(),
               timeout=30, what=f"the hung host to drop its late result:\n{hung.log_tail()}")
    sender.join(timeout=120)
    assert not sender.is_alive() and not failures, failures

    wait_until(lambda: cluster.all_done(SERIES_COUNT), timeout=120, what=f"all series analysed and delivered:\n{cluster.logs()}")

    # Each series analysed exactly once: one job each, SUCCEEDED, one result.
    jobs = cluster.jobs()
    assert len(jobs) == SERIES_COUNT
    assert all(j.status == JobStatus.SUCCEEDED for j in jobs), [(j.id, j.status, j.error) for j in jobs]
    assert len({j.series_id for j in jobs}) == SERIES_COUNT
    results = [r for r in _rows(cluster, Result) if isinstance(r, Result)]
    assert sorted(r.job_id for r in results) == sorted(j.id for j in jobs)

    # The killed host's job: its lease expired, it was claimed again by a surviving host and finished there.
    by_id = {j.id: j for j in jobs}
    # The hung host's job likewise, and the hung host's late result was dropped.
    assert victim_job_id != hung_job_id
    assert by_id[victim_job_id].attempts == by_id[hung_job_id].attempts == 2
    assert all(j.attempts == 1 for j in jobs if j.id not in (victim_job_id, hung_job_id))
    claimed = _events(cluster, "job_claimed")
    expired = _events(cluster, "job_lease_expired")
    finished_by = {e.job_id: e.detail["owner"] for e in _events(cluster, "job_succeeded")}
    for job_id, owner in ((victim_job_id, victim_owner), (hung_job_id, hung_owner)):
        claims = [e.detail["owner"] for e in claimed if e.job_id == job_id]
        assert claims[0] == owner and len(claims) == 2 and claims[1] in owners - {owner}
        assert [e.detail["owner"] for e in expired if e.job_id == job_id] == [owner]
        assert finished_by[job_id] == claims[1]
    assert set(finished_by.values()) <= owners
    # The work was shared: three hosts claimed jobs. (Which hosts *finish* jobs is a race: with one host
    # killed and one frozen, the third may rightly finish all twelve.)
    assert {e.detail["owner"] for e in claimed} == owners

    # One report set per series at PACS, every object once, only the objects of the finishing attempt.
    outputs = [o for o in _rows(cluster, Output) if isinstance(o, Output)]
    assert sorted(Counter(o.job_id for o in outputs).values()) == [2] * SERIES_COUNT  # SR + one SC (key_slices 1)
    received = pacs.received_uids
    assert len(received) == len(set(received)), "an object reached PACS twice"
    assert set(received) == {o.sop_instance_uid for o in outputs}
    reports_per_study = Counter(
        str(ds.StudyInstanceUID) for ds in pacs.received if str(ds.SOPClassUID).startswith(SR_STORAGE_PREFIX)
    )
    assert reports_per_study == Counter(truth.study_instance_uid for truth in phantom_series)
    assert {o.kind for o in outputs} == {OutputKind.SR, OutputKind.SC}

    # Everything lives on the shared spool: received instances and every host's outbox.
    for output in outputs:
        assert (cluster.spool / output.path).is_file()
    assert (cluster.spool / "incoming").is_dir()
    assert not [p for h in cluster.hosts for p in Path(h.workdir).rglob("*.dcm")]  # nothing outside the share

    # Three worker processes registered; the killed one never said it stopped.
    workers = {w.id: w for w in _rows(cluster, Worker) if isinstance(w, Worker)}
    assert owners <= set(workers)
    assert workers[victim_owner].stopped_at is None


@pytest.mark.postgres
def test_concurrent_dispatchers_on_postgresql_send_each_object_once(postgres_url: str, tmp_path: Path) -> None:
    """Deliveries are claimed like jobs (leases, SKIP LOCKED): three dispatchers racing over the same
    due deliveries on PostgreSQL send every object exactly once, over the shared spool."""
    engine = make_engine(postgres_url)
    upgrade_database(postgres_url, engine)
    factory = make_session_factory(engine)
    with PacsSCP(ae_title="PACS") as pacs:
        settings = load_settings(None, environ={}, overrides={
            "storage": {"root": str(tmp_path / "shared-spool")}, "database": {"url": postgres_url},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
        })
        for _ in range(4):
            datasets = make_ct_series(CTSeriesSpec(n_slices=6, rows=32, columns=32))
            with transaction(factory) as session:
                series = Series(study_instance_uid=str(datasets[0].StudyInstanceUID), series_instance_uid=str(datasets[0].SeriesInstanceUID),
                                state=SeriesState.ANALYSED, instance_count=len(datasets))
                session.add(series)
                session.flush()
                job = Job(series_id=series.id, status=JobStatus.SUCCEEDED, reason="received")
                session.add(job)
                session.flush()
                produced = write_reports(make_prediction(datasets, n_key_images=2), datasets, OutputSettings(key_slices=2),
                                         settings.spool_root / "outbox" / str(job.id))
                queue_deliveries(session, job, produced, settings.destinations, settings.spool_root)
        barrier = threading.Barrier(3)
        sent: dict[str, int] = {}

        def dispatcher(owner: str) -> None:
            barrier.wait()
            sent[owner] = dispatch_due(factory, settings, owner=owner)

        threads = [threading.Thread(target=dispatcher, args=(f"receiver-{i}/dispatch",)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        pacs.wait_for(12, timeout=20)
    with factory() as session:
        deliveries = list(session.scalars(select(Delivery)))
    engine.dispose()
    assert sum(sent.values()) == 12 and len(deliveries) == 12
    assert len(pacs.requests) == 12 and len(set(pacs.received_uids)) == 12
    assert all(d.status == DeliveryStatus.DELIVERED and d.attempts == 1 for d in deliveries)
