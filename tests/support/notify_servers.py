"""Local receivers for notification tests, all on loopback: an HTTP webhook receiver, an SMTP server
(aiosmtpd) that requires STARTTLS and AUTH, and an HL7 MLLP listener (python-hl7) that answers ACKs."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import hl7
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from hl7.mllp import start_hl7_server


@dataclass
class HTTPReceiver:
    """Records each POST (headers, parsed JSON body); answers with ``codes`` in turn, then 200."""

    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)


@contextmanager
def http_receiver(codes: list[int] | None = None, tls_context: ssl.SSLContext | None = None) -> Iterator[HTTPReceiver]:
    """ThreadingHTTPServer on 127.0.0.1 (HTTPS with ``tls_context``)."""
    receiver = HTTPReceiver(url="", codes=list(codes or []))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            receiver.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "raw": body, "json": json.loads(body)})
            code = receiver.codes.pop(0) if receiver.codes else 200
            self.send_response(code)
            if 300 <= code < 400:
                self.send_header("Location", "http://127.0.0.1:9/elsewhere")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls_context is not None:
        server.socket = tls_context.wrap_socket(server.socket, server_side=True)
    scheme = "https" if tls_context is not None else "http"
    receiver.url = f"{scheme}://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@dataclass
class SMTPReceiver:
    host: str
    port: int
    messages: list[Message] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)
    #: Set when a client authenticated, to check it happened over TLS.
    authenticated_users: list[str] = field(default_factory=list)


class _Handler:
    def __init__(self, receiver: SMTPReceiver) -> None:
        self.receiver = receiver

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802 (aiosmtpd's name)
        content = envelope.original_content or b""
        self.receiver.messages.append(message_from_bytes(content))
        self.receiver.envelopes.append((str(envelope.mail_from), list(envelope.rcpt_tos)))
        return "250 Message accepted for delivery"


@contextmanager
def smtp_receiver(server_context: ssl.SSLContext, *, user: str, password: str, port: int) -> Iterator[SMTPReceiver]:
    """aiosmtpd on 127.0.0.1:``port`` that requires STARTTLS before anything and AUTH LOGIN/PLAIN."""
    receiver = SMTPReceiver(host="127.0.0.1", port=port)

    def authenticator(server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and auth_data.login == user.encode() and auth_data.password == password.encode()
        if ok:
            receiver.authenticated_users.append(user)
        return AuthResult(success=ok, handled=False)

    controller = Controller(
        _Handler(receiver), hostname="127.0.0.1", port=port, tls_context=server_context, require_starttls=True,
        auth_required=True, auth_require_tls=True, authenticator=authenticator, ready_timeout=10,
    )
    controller.start()
    try:
        yield receiver
    finally:
        controller.stop()


@dataclass
class MLLPListener:
    host: str
    port: int
    #: ACK codes to answer in turn (then "AA"); "WRONG-ID" answers AA for another control id.
    codes: list[str] = field(default_factory=list)
    messages: list[hl7.Message] = field(default_factory=list)


def _ack(message: hl7.Message, code: str) -> str:
    control_id = str(message.segment("MSH")[10])
    if code == "WRONG-ID":
        code, control_id = "AA", "SOMEONE-ELSE"
    return "\r".join([
        "MSH|^~\\&|RIS|HOSP|PE_AGENT||20261205000000||ACK^R01^ACK|ACK" + control_id[:15] + "|P|2.5.1",
        f"MSA|{code}|{control_id}|{'accepted' if code == 'AA' else 'refused for the test'}",
    ])


@contextmanager
def mllp_listener(codes: list[str] | None = None) -> Iterator[MLLPListener]:
    """python-hl7's MLLP server on 127.0.0.1 in its own thread and event loop."""
    listener = MLLPListener(host="127.0.0.1", port=0, codes=list(codes or []))
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def handle(reader: Any, writer: Any) -> None:
        try:
            while not reader.at_eof():
                message = await reader.readmessage()
                listener.messages.append(message)
                code = listener.codes.pop(0) if listener.codes else "AA"
                writer.writemessage(hl7.parse(_ack(message, code)))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass  # the sender closed the connection after its ACK
        finally:
            writer.close()

    async def start() -> None:
        server = await start_hl7_server(handle, "127.0.0.1", 0, encoding="utf-8")
        holder["server"] = server
        listener.port = server.sockets[0].getsockname()[1]
        ready.set()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("MLLP listener did not start")
    try:
        yield listener
    finally:
        async def stop() -> None:
            holder["server"].close()
            await holder["server"].wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
