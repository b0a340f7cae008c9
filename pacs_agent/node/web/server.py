"""The dashboard's HTTP(S) server: uvicorn running the ASGI app in a thread of the serve process.

The socket is bound in the constructor, so a taken port or an address that cannot be bound fails
`pe-agent serve` at start with a clear message, and port 0 (tests) is known at once. Loopback
unless ``http.host`` says otherwise; a non-loopback address without TLS is logged as a warning.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.errors import ConfigError
from pacs_agent.logs import get_logger
from pacs_agent.settings import Settings

log = get_logger(__name__)


@dataclass(frozen=True)
class HealthProbes:
    """How the server learns about the parts it does not own (the serve process supplies them)."""

    receiver_listening: Callable[[], bool]
    workers_alive: Callable[[], tuple[int, int]]  # (alive, expected)


def health(session_factory: sessionmaker[Session], probes: HealthProbes) -> tuple[bool, dict[str, Any]]:
    """(healthy, details) for /healthz and the health page."""
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


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"http: cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


class WebServer:
    """The dashboard, JSON API, /healthz and /metrics, served by uvicorn in a daemon thread."""

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session], probes: HealthProbes) -> None:
        from pacs_agent.node.web.app import create_app

        http = settings.http
        self._tls = bool(http.tls_certificate)
        app = create_app(settings, session_factory, probes)
        self._socket = _bind(http.host, http.port)
        config = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", server_header=False, proxy_headers=False,
            ssl_certfile=http.tls_certificate or None, ssl_keyfile=http.tls_private_key or None,
            timeout_graceful_shutdown=5,
        )
        try:
            config.load()  # reads the TLS files now: a bad certificate fails serve at start
        except (OSError, ValueError) as exc:
            self._socket.close()
            raise ConfigError(f"http: TLS certificate or key cannot be used ({exc})") from None
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        if not is_loopback(http.host) and not self._tls:
            log.warning("http_not_loopback_without_tls", host=http.host,
                        advice="set http.tls_certificate and http.tls_private_key, or keep http.host on loopback")

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    @property
    def scheme(self) -> str:
        return "https" if self._tls else "http"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, name="http", daemon=True)
        self._thread.start()
        log.info("http_started", host=self._socket.getsockname()[0], port=self.port, scheme=self.scheme)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._socket.close()
        log.info("http_stopped")
