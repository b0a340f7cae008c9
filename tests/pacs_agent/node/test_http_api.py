"""HTTP endpoints on a real loopback socket, reading a real SQLite database."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pacs_agent.db.models import Delivery, DeliveryStatus, Flag, Output, OutputKind, Result, Series, utcnow
from pacs_agent.db.session import transaction
from pacs_agent.node.http_api import HealthProbes, HTTPServer
from pacs_agent.jobs.queue import claim_next_job, complete_job, enqueue_job

from tests.support.settings import MigratedDB


class Probes:
    receiver = True
    alive = (1, 1)


@pytest.fixture
def server(migrated_db: MigratedDB) -> Iterator[HTTPServer]:
    probes = HealthProbes(receiver_listening=lambda: Probes.receiver, workers_alive=lambda: Probes.alive)
    srv = HTTPServer("127.0.0.1", 0, migrated_db.session_factory, probes)
    srv.start()
    yield srv
    srv.stop()
    Probes.receiver, Probes.alive = True, (1, 1)


def get(server: HTTPServer, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def seed_result(db: MigratedDB) -> None:
    """One analysed series (latency 42 s after its last instance) with a HIGH result and two deliveries."""
    with transaction(db.session_factory) as session:
        series = Series(study_instance_uid="1.9", series_instance_uid="1.9.1", last_received_at=utcnow() - timedelta(seconds=42))
        session.add(series)
        session.flush()
        job_id = enqueue_job(session, series, priority=0, reason="received", max_attempts=3).id
    claim_next_job(db.session_factory, owner="w", lease_seconds=30)
    with transaction(db.session_factory) as session:
        session.add(Result(job_id=job_id, pe_present=True, pe_probability=0.8, labels={}, flag=Flag.HIGH))
        output = Output(job_id=job_id, kind=OutputKind.SR, sop_class_uid="1.2", sop_instance_uid="1.9.9", series_instance_uid="1.9.8", path="outbox/1/x.dcm")
        session.add(output)
        session.flush()
        session.add(Delivery(output_id=output.id, destination="pacs", status=DeliveryStatus.DELIVERED, attempts=3))
        session.add(Delivery(output_id=output.id, destination="archive", status=DeliveryStatus.FAILED, attempts=4))
        session.flush()
        complete_job(session, job_id, owner="w")


def test_worklist_json(server: HTTPServer, migrated_db: MigratedDB) -> None:
    seed_result(migrated_db)
    code, body = get(server, "/worklist")
    assert code == 200
    (entry,) = json.loads(body)
    assert entry["study_instance_uid"] == "1.9" and entry["flag"] == "HIGH" and entry["pe_probability"] == 0.8


def test_healthz_reports_each_part(server: HTTPServer) -> None:
    code, body = get(server, "/healthz")
    assert code == 200 and json.loads(body)["status"] == "ok"
    Probes.receiver = False
    code, body = get(server, "/healthz")
    assert code == 503 and json.loads(body)["receiver"] == {"ok": False}
    Probes.receiver, Probes.alive = True, (0, 2)
    code, body = get(server, "/healthz")
    assert code == 503 and json.loads(body)["workers"] == {"ok": False, "alive": 0, "expected": 2}


def test_metrics_from_the_database(server: HTTPServer, migrated_db: MigratedDB) -> None:
    seed_result(migrated_db)
    code, body = get(server, "/metrics")
    assert code == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    assert samples[("pe_agent_jobs", (("status", "SUCCEEDED"),))] == 1
    assert samples[("pe_agent_jobs", (("status", "QUEUED"),))] == 0
    assert samples[("pe_agent_jobs_succeeded_total", ())] == 1
    assert samples[("pe_agent_deliveries", (("status", "FAILED"),))] == 1
    assert samples[("pe_agent_delivery_failed_attempts_total", ())] == 2 + 4
    assert samples[("pe_agent_worklist_studies", (("flag", "HIGH"),))] == 1
    assert samples[("pe_agent_analysis_latency_seconds_count", ())] == 1
    assert 42 <= samples[("pe_agent_analysis_latency_seconds_sum", ())] < 60
    assert samples[("pe_agent_analysis_latency_seconds_bucket", (("le", "30.0"),))] == 0
    assert samples[("pe_agent_analysis_latency_seconds_bucket", (("le", "60.0"),))] == 1


def test_unknown_path_is_404(server: HTTPServer) -> None:
    code, body = get(server, "/admin")
    assert code == 404 and "no such endpoint" in body
