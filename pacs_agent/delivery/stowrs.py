"""DICOMweb STOW-RS delivery target (PS3.18 10.5): POST the produced objects to ``{url}/studies``.

One ``send`` is one or more HTTP requests (batches of at most ``max_request_bytes``), each a
``multipart/related; type="application/dicom"`` body of Part 10 files. Per-object outcomes come
from the Store Instances Response (``application/dicom+json``): instances in Referenced SOP
Sequence are stored (with a Warning Reason, still stored); those in Failed SOP Sequence carry
their Failure Reason as the DICOM status. Transient trouble (no connection, timeout, HTTP 408,
429 or 5xx, Failure Reason 0xA7xx "out of resources" or 0x0110 "processing failure") is
retryable; everything else (HTTP 4xx, 0xA9xx, 0xC000, refused SOP class) is permanent, so the
dispatcher's dead letter holds it until a person acts (``pe-agent retry``).

``echo`` is a QIDO-RS ``GET {url}/studies?limit=1``: it proves the service answers, that TLS and
the credentials are accepted, without storing anything.
Credentials (bearer token or basic auth) are read from a file or an environment variable when
the target is built, never from the configuration file itself, and never logged.
"""

from __future__ import annotations

import json
import os
import ssl
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from pacs_agent.delivery.target import EchoOutcome, ObjectOutcome
from pacs_agent.errors import DeliveryError
from pacs_agent.settings import DESTINATION_AUTH_KINDS, DestinationSettings, Settings

#: Default upper bound of one request body; larger sends are split into several requests.
MAX_REQUEST_BYTES = 64 * 1024 * 1024
#: DICOM JSON tags of the Store Instances Response (PS3.18 Table 10.5.3-1).
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"
#: HTTP statuses worth retrying unchanged.
_RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
#: Failure Reasons worth retrying: processing failure, out of resources (0xA7xx).
_RETRYABLE_FAILURE_REASONS = frozenset({0x0110})
AUTH_KINDS = DESTINATION_AUTH_KINDS


@dataclass(frozen=True)
class Credentials:
    """HTTP credentials of a STOW-RS destination, already read from their file or variable."""

    kind: str = "none"
    token: str = ""
    username: str = ""
    password: str = ""

    def __repr__(self) -> str:  # never print a secret
        return f"Credentials(kind={self.kind!r}, username={self.username!r})"

    def headers(self) -> dict[str, str]:
        if self.kind == "bearer":
            return {"Authorization": f"Bearer {self.token}"}
        return {}

    def auth(self) -> httpx.Auth | None:
        if self.kind == "basic":
            return httpx.BasicAuth(self.username, self.password)
        return None


def read_secret(*, file: str = "", env: str = "", what: str, environ: Mapping[str, str] | None = None) -> str:
    """A secret from ``file`` (first line, stripped) or the environment variable ``env``."""
    environ = os.environ if environ is None else environ
    if file:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except OSError as exc:
            raise DeliveryError(f"{what}: cannot read {file}: {exc.strerror or exc}") from None
        secret = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not secret:
            raise DeliveryError(f"{what}: {file} is empty")
        return secret
    if env:
        secret = environ.get(env, "").strip()
        if not secret:
            raise DeliveryError(f"{what}: environment variable {env} is not set")
        return secret
    raise DeliveryError(f"{what}: give a file or an environment variable")


def credentials(
    kind: str,
    *,
    token_file: str = "",
    token_env: str = "",
    username: str = "",
    password_file: str = "",
    password_env: str = "",
    environ: Mapping[str, str] | None = None,
) -> Credentials:
    """Read the credentials of one destination (``kind``: none, bearer or basic)."""
    if kind not in AUTH_KINDS:
        raise DeliveryError(f"auth {kind!r} is not one of {', '.join(AUTH_KINDS)}")
    if kind == "bearer":
        return Credentials(kind=kind, token=read_secret(file=token_file, env=token_env, what="bearer token", environ=environ))
    if kind == "basic":
        if not username:
            raise DeliveryError("basic auth needs a username")
        password = read_secret(file=password_file, env=password_env, what="basic auth password", environ=environ)
        return Credentials(kind=kind, username=username, password=password)
    return Credentials()


def ssl_context(*, verify: bool, ca_certificate: str = "", client_certificate: str = "", client_private_key: str = "") -> ssl.SSLContext | bool:
    """What httpx verifies the server with: a context (CA bundle, client certificate) or False."""
    if not verify:
        return False
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_certificate or None)
        if client_certificate:
            context.load_cert_chain(client_certificate, client_private_key or None)
    except (OSError, ssl.SSLError) as exc:
        raise DeliveryError(f"TLS set-up failed: {exc}") from exc
    return context


@dataclass(frozen=True)
class _Part:
    path: Path
    sop_instance_uid: str
    data: bytes


def _retryable_failure(reason: int) -> bool:
    return reason in _RETRYABLE_FAILURE_REASONS or (reason & 0xFF00) == 0xA700


def _uid_of(item: Mapping[str, Any]) -> str:
    value = item.get(_REFERENCED_SOP_INSTANCE_UID, {}).get("Value") or [""]
    return str(value[0])


def _int_of(item: Mapping[str, Any], tag: str) -> int | None:
    value = item.get(tag, {}).get("Value")
    if not value:
        return None
    try:
        return int(value[0])
    except (TypeError, ValueError):
        return None


class StowRsTarget:
    """A DICOMweb service that stores by STOW-RS (Orthanc, dcm4chee, Google/Azure DICOM, ...)."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        credentials: Credentials | None = None,
        verify: ssl.SSLContext | bool = True,
        timeout: float = 60.0,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise DeliveryError(f"destination {name}: url {url!r} must start with http:// or https://")
        self.name = name
        self.url = url.rstrip("/")
        self.credentials = credentials or Credentials()
        self.verify = verify
        self.timeout = timeout
        self.max_request_bytes = max_request_bytes
        self._transport = transport

    @classmethod
    def from_settings(cls, destination: DestinationSettings, settings: Settings, *,
                      environ: Mapping[str, str] | None = None) -> StowRsTarget:
        """The target of a ``kind = "stow-rs"`` destination; reads its secret now (DeliveryError if it cannot).

        A client certificate for mutual TLS is the node's own (node.tls.certificate / private_key) when set.
        """
        tls = settings.node.tls
        return cls(
            destination.name,
            destination.url,
            credentials=credentials(
                destination.auth,
                token_file=destination.token_file,
                token_env=destination.token_env,
                username=destination.username,
                password_file=destination.password_file,
                password_env=destination.password_env,
                environ=environ,
            ),
            verify=ssl_context(
                verify=destination.tls_verify,
                ca_certificate=destination.ca_certificate,
                client_certificate=tls.certificate if destination.url.startswith("https://") else "",
                client_private_key=tls.private_key,
            ),
            timeout=destination.timeout_seconds,
        )

    def _client(self) -> httpx.Client:
        return httpx.Client(
            verify=self.verify,
            timeout=self.timeout,
            auth=self.credentials.auth(),
            headers={"User-Agent": "pe-agent STOW-RS", **self.credentials.headers()},
            transport=self._transport,
            follow_redirects=False,
        )

    # -- send ------------------------------------------------------------------------------------
    def send(self, paths: Sequence[Path]) -> list[ObjectOutcome]:
        """Store ``paths``; one outcome per path, in order. Never raises for network or server trouble."""
        outcomes: dict[Path, ObjectOutcome] = {}
        parts: list[_Part] = []
        for path in paths:
            try:
                uid = str(read_file_meta_info(path).MediaStorageSOPInstanceUID)
                data = path.read_bytes()
            except FileNotFoundError:
                outcomes[path] = ObjectOutcome(path, "", False, None, f"output file {path} is missing", retryable=False)
                continue
            except (InvalidDicomError, OSError, AttributeError) as exc:
                outcomes[path] = ObjectOutcome(path, "", False, None, f"output file {path} cannot be read: {exc}", retryable=False)
                continue
            parts.append(_Part(path, uid, data))
        if parts:
            with self._client() as client:
                for batch in self._batches(parts):
                    for outcome in self._post(client, batch):
                        outcomes[outcome.path] = outcome
        return [outcomes[path] for path in paths]

    def _batches(self, parts: Sequence[_Part]) -> Iterator[list[_Part]]:
        batch: list[_Part] = []
        size = 0
        for part in parts:
            if batch and size + len(part.data) > self.max_request_bytes:
                yield batch
                batch, size = [], 0
            batch.append(part)
            size += len(part.data)
        if batch:
            yield batch

    def _post(self, client: httpx.Client, batch: Sequence[_Part]) -> list[ObjectOutcome]:
        boundary = f"pe-agent-{uuid.uuid4().hex}"
        body = bytearray()
        for part in batch:
            body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
            body += part.data
            body += b"\r\n"
        body += f"--{boundary}--\r\n".encode("ascii")
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }

        def every(ok: bool, status: int | None, reason: str, retryable: bool) -> list[ObjectOutcome]:
            return [ObjectOutcome(p.path, p.sop_instance_uid, ok, status, reason, retryable) for p in batch]

        try:
            response = client.post(f"{self.url}/studies", content=bytes(body), headers=headers)
        except httpx.TimeoutException as exc:
            return every(False, None, f"STOW-RS to {self.name} timed out: {exc}", True)
        except httpx.HTTPError as exc:
            return every(False, None, f"STOW-RS to {self.name} failed: {_plain(exc)}", True)
        return self._outcomes(batch, response)

    def _outcomes(self, batch: Sequence[_Part], response: httpx.Response) -> list[ObjectOutcome]:
        code = response.status_code
        document: dict[str, Any] = {}
        if response.content:
            try:
                parsed = response.json()
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
                parsed = None
            if isinstance(parsed, list) and parsed and isinstance(parsed[0], dict):
                parsed = parsed[0]
            if isinstance(parsed, dict):
                document = parsed
        stored = {_uid_of(item): item for item in (document.get(_REFERENCED_SOP_SEQUENCE, {}).get("Value") or [])}
        failed = {_uid_of(item): item for item in (document.get(_FAILED_SOP_SEQUENCE, {}).get("Value") or [])}
        outcomes: list[ObjectOutcome] = []
        for part in batch:
            uid = part.sop_instance_uid
            if uid in failed:
                reason_code = _int_of(failed[uid], _FAILURE_REASON)
                text = f"STOW-RS failure reason 0x{reason_code:04X}" if reason_code is not None else f"STOW-RS HTTP {code}: failed"
                outcomes.append(ObjectOutcome(part.path, uid, False, reason_code if reason_code is not None else code, text,
                                              retryable=reason_code is not None and _retryable_failure(reason_code)))
            elif uid in stored or (code == 200 and not failed and not stored):
                warning = _int_of(stored.get(uid, {}), _WARNING_REASON)
                outcomes.append(ObjectOutcome(part.path, uid, True, warning if warning is not None else code, "", retryable=False))
            elif 200 <= code < 300:
                outcomes.append(ObjectOutcome(part.path, uid, False, code, f"STOW-RS HTTP {code}: instance not in the response", True))
            else:
                detail = response.reason_phrase or ""
                outcomes.append(ObjectOutcome(part.path, uid, False, code, f"STOW-RS HTTP {code} {detail}".rstrip(),
                                              retryable=code in _RETRYABLE_HTTP))
        return outcomes

    # -- echo ------------------------------------------------------------------------------------
    def echo(self) -> EchoOutcome:
        """QIDO-RS search for one study; any 2xx means the service, TLS and credentials work."""
        try:
            with self._client() as client:
                response = client.get(f"{self.url}/studies", params={"limit": "1"}, headers={"Accept": "application/dicom+json"})
        except httpx.HTTPError as exc:
            return EchoOutcome(False, f"QIDO-RS {self.url}: {_plain(exc)}")
        if 200 <= response.status_code < 300:
            return EchoOutcome(True, f"QIDO-RS {response.status_code}")
        return EchoOutcome(False, f"QIDO-RS {response.status_code} {response.reason_phrase}".rstrip())


def _plain(exc: BaseException) -> str:
    """A one-line cause (httpx wraps the socket or TLS error)."""
    cause = exc.__cause__ or exc.__context__
    text = str(exc) or type(exc).__name__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({cause})"
    return text
