"""TLS contexts for DICOM: the SCP's server context (deferred handshake) and the SCU's client context."""

from __future__ import annotations

import ssl
from typing import Any

from pacs_agent.errors import ReceiverError
from pacs_agent.settings import TLSSettings


class _DeferredHandshakeContext(ssl.SSLContext):
    """An SSL context whose server sockets do the TLS handshake on their first read.

    pynetdicom wraps each accepted socket in its listener thread; with the default immediate handshake a
    peer that connects and sends nothing would stall the listener for every other client. Deferred,
    the handshake runs in the association's own thread (OpenSSL performs it inside the first read).
    """

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:  # type: ignore[override]
        if kwargs.get("server_side"):
            kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def server_ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """TLS context for the SCP: our certificate and key; peers verified against the CA bundle."""
    context = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.certificate, tls.private_key)
        if tls.ca_certificate:
            context.load_verify_locations(cafile=tls.ca_certificate)
    except (OSError, ssl.SSLError) as exc:
        raise ReceiverError(f"TLS certificate, key or CA cannot be loaded: {exc}") from exc
    if tls.require_client_certificate:
        if not tls.ca_certificate:
            raise ReceiverError("node.tls.require_client_certificate needs node.tls.ca_certificate to verify clients")
        context.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_certificate:
        context.verify_mode = ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """Client-side TLS from the node's certificate settings (the CA verifies the PACS)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_certificate or None)
    if tls.certificate and tls.private_key:
        context.load_cert_chain(tls.certificate, tls.private_key)
    return context
