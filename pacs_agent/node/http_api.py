"""Optional HTTP endpoints of the serve process (stdlib server in a thread, loopback by default).

- GET /worklist: the worklist as JSON (most urgent first);
- GET /healthz: JSON {database, receiver, workers}; 200 when all are fine, else 503;
- GET /metrics: Prometheus text, computed from the database at scrape time (so every worker
  process's work counts, with no shared in-memory state).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.db.models import Delivery, DeliveryStatus, Job, JobStatus, Result, Series
from pacs_agent.logs import get_logger
from pacs_agent.jobs.queue import queue_depth
from pacs_agent.node.admin import delivery_counts
from pacs_agent.worklist import flag_counts, list_worklist

log = get_logger(__name__)

#: Analysis latency buckets (seconds from the series' last instance to its result).
LATENCY_BUCKETS: tuple[float, ...] = (5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
#: Latency is computed over this many most recent results.
LATENCY_WINDOW = 10_000


@dataclass(frozen=True)
class HealthProbes:
    """How the server learns about the parts it does not own (the serve process supplies them)."""

    receiver_listening: Callable[[], bool]
    workers_alive: Callable[[], tuple[int, int]]  # (alive, expected)


class DatabaseCollector(Collector):
    """Prometheus metrics read from the database on each scrape."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._factory = session_factory

    def collect(self) -> Iterator[Metric]:
        with self._factory() as session:
            depth = queue_depth(session)
            jobs = GaugeMetricFamily("pe_agent_jobs", "Jobs by status.", labels=["status"])
            for status, count in depth.items():
                jobs.add_metric([status], count)
            yield jobs
            yield CounterMetricFamily("pe_agent_jobs_succeeded", "Jobs that succeeded.", value=depth[JobStatus.SUCCEEDED.value])
            yield CounterMetricFamily("pe_agent_jobs_failed", "Jobs that failed for good.", value=depth[JobStatus.FAILED.value])

            deliveries = GaugeMetricFamily("pe_agent_deliveries", "Deliveries by status.", labels=["status"])
            for status, count in delivery_counts(session).items():
                deliveries.add_metric([status], count)
            yield deliveries
            failed_attempts = 0
            for status, attempts in session.execute(select(Delivery.status, Delivery.attempts)):
                failed_attempts += max(int(attempts) - (1 if DeliveryStatus(status) == DeliveryStatus.DELIVERED else 0), 0)
            yield CounterMetricFamily(
                "pe_agent_delivery_failed_attempts", "C-STORE attempts to a destination that did not deliver.", value=failed_attempts
            )

            flags = GaugeMetricFamily("pe_agent_worklist_studies", "Studies on the worklist by flag.", labels=["flag"])
            for flag, count in flag_counts(session).items():
                flags.add_metric([flag], count)
            yield flags

            rows = session.execute(
                select(Result.created_at, Series.last_received_at)
                .join(Job, Result.job_id == Job.id).join(Series, Job.series_id == Series.id)
                .order_by(Result.id.desc()).limit(LATENCY_WINDOW)
            ).all()
            latencies = [max((created - last).total_seconds(), 0.0) for created, last in rows]
            buckets = [(str(float(b)), sum(1 for v in latencies if v <= b)) for b in LATENCY_BUCKETS]
            buckets.append(("+Inf", len(latencies)))
            yield HistogramMetricFamily(
                "pe_agent_analysis_latency_seconds",
                f"Seconds from a series' last received instance to its result (latest {LATENCY_WINDOW} results).",
                buckets=buckets, sum_value=sum(latencies),
            )


def health(session_factory: sessionmaker[Session], probes: HealthProbes) -> tuple[bool, dict[str, Any]]:
    """(healthy, details) for /healthz."""
    try:
        with session_factory() as session:
            session.execute(text("SELECT 1"))
        database: dict[str, Any] = {"ok": True}
    except Exception as exc:  # any database failure is "unhealthy", reported, never raised
        database = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    receiver_ok = bool(probes.receiver_listening())
    alive, expected = probes.workers_alive()
    workers_ok = alive >= expected
    details = {
        "database": database,
        "receiver": {"ok": receiver_ok},
        "workers": {"ok": workers_ok, "alive": alive, "expected": expected},
    }
    healthy = bool(database["ok"]) and receiver_ok and workers_ok
    return healthy, {"status": "ok" if healthy else "unhealthy", **details}


class HTTPServer:
    """The /worklist, /healthz and /metrics server, running in a daemon thread."""

    def __init__(self, host: str, port: int, session_factory: sessionmaker[Session], probes: HealthProbes) -> None:
        self._factory = session_factory
        self._probes = probes
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(DatabaseCollector(session_factory))
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)
        self._thread.start()
        log.info("http_started", host=self._server.server_address[0], port=self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        log.info("http_stopped")

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0].rstrip("/") or "/"
                try:
                    if path == "/worklist":
                        with server._factory() as session:
                            body = [e.to_json_dict() for e in list_worklist(session)]
                        self._send(200, "application/json", json.dumps(body).encode())
                    elif path == "/healthz":
                        ok, details = health(server._factory, server._probes)
                        self._send(200 if ok else 503, "application/json", json.dumps(details).encode())
                    elif path == "/metrics":
                        self._send(200, "text/plain; version=0.0.4; charset=utf-8", generate_latest(server._registry))
                    else:
                        self._send(404, "application/json", json.dumps({"error": f"no such endpoint {path}"}).encode())
                except Exception as exc:  # one failing request must not take the server down
                    log.error("http_request_failed", path=path, error=f"{type(exc).__name__}: {exc}")
                    self._send(500, "application/json", json.dumps({"error": "internal error"}).encode())

            def _send(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
                return  # access logs stay out of the structured log

        return Handler
