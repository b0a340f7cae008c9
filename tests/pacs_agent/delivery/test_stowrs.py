"""The STOW-RS target against a real HTTP(S) server on loopback that answers as a DICOMweb service would.

What a real archive does on success is tested against Orthanc (test_results_to_orthanc.py); here the
server answers what archives answer in trouble: failure reasons, warnings, 5xx, 4xx, TLS, auth.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest

from pacs_agent.delivery.stowrs import StowRsTarget, credentials, read_secret, ssl_context
from pacs_agent.errors import DeliveryError
from pacs_agent.reports import ProducedObject, write_reports
from pacs_agent.settings import OutputSettings
from tests.support.ct_series import CTSeriesSpec, make_ct_series
from tests.support.pacs_scp import free_port
from tests.support.predictions import make_prediction
from tests.support.tls import make_test_pki, openssl_available


@dataclass
class Reply:
    status: int = 200
    #: SOP Instance UID -> Failure Reason (in Failed SOP Sequence).
    failures: dict[str, int] = field(default_factory=dict)
    #: SOP Instance UID -> Warning Reason (in Referenced SOP Sequence).
    warnings: dict[str, int] = field(default_factory=dict)
    body: bytes | None = None


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    datasets: list[pydicom.Dataset]


class FakeDicomWeb:
    """ThreadingHTTPServer that parses STOW-RS bodies and answers with ``reply``."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.reply = Reply()
        self.requests: list[Received] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
                return

            def do_GET(self) -> None:  # noqa: N802
                outer.requests.append(Received("GET", self.path, dict(self.headers), []))
                self._answer(outer.reply.status, b"[]")

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                datasets = _parts(self.headers["Content-Type"], body)
                outer.requests.append(Received("POST", self.path, dict(self.headers), datasets))
                reply = outer.reply
                if reply.body is not None:
                    self._answer(reply.status, reply.body)
                    return
                stored = [
                    {"00081155": {"vr": "UI", "Value": [str(ds.SOPInstanceUID)]},
                     **({"00081196": {"vr": "US", "Value": [reply.warnings[str(ds.SOPInstanceUID)]]}}
                        if str(ds.SOPInstanceUID) in reply.warnings else {})}
                    for ds in datasets if str(ds.SOPInstanceUID) not in reply.failures
                ]
                failed = [
                    {"00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [code]}}
                    for uid, code in reply.failures.items()
                ]
                document: dict[str, Any] = {}
                if stored:
                    document["00081199"] = {"vr": "SQ", "Value": stored}
                if failed:
                    document["00081198"] = {"vr": "SQ", "Value": failed}
                self._answer(reply.status, json.dumps(document).encode())

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if context is not None:
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"{'https' if context else 'http'}://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _parts(content_type: str, body: bytes) -> list[pydicom.Dataset]:
    """Split a multipart/related body by its boundary and read each part as a DICOM file."""
    assert content_type.startswith("multipart/related")
    assert 'type="application/dicom"' in content_type
    boundary = content_type.split("boundary=")[1].strip('"').encode()
    assert body.endswith(b"--" + boundary + b"--\r\n")
    datasets = []
    for chunk in body.split(b"--" + boundary)[1:-1]:
        head, _, payload = chunk.partition(b"\r\n\r\n")
        assert b"Content-Type: application/dicom" in head
        datasets.append(pydicom.dcmread(BytesIO(payload.removesuffix(b"\r\n"))))
    return datasets


@pytest.fixture
def server() -> Iterator[FakeDicomWeb]:
    fake = FakeDicomWeb()
    yield fake
    fake.close()


@pytest.fixture
def produced(tmp_path: Path) -> list[ProducedObject]:
    series = make_ct_series(CTSeriesSpec(n_slices=6, rows=32, columns=32))
    return write_reports(make_prediction(series, n_key_images=2), series, OutputSettings(key_slices=2), tmp_path / "out")


def test_objects_go_as_one_multipart_request_and_every_one_is_stored(server: FakeDicomWeb, produced: list[ProducedObject]) -> None:
    target = StowRsTarget("web", server.url, credentials=credentials("bearer", token_env="T", environ={"T": "s3cret"}))
    outcomes = target.send([p.path for p in produced])
    assert [(o.ok, o.status, o.retryable) for o in outcomes] == [(True, 200, False)] * len(produced)
    assert [o.sop_instance_uid for o in outcomes] == [p.sop_instance_uid for p in produced]
    [request] = server.requests
    assert (request.method, request.path) == ("POST", "/dicom-web/studies")
    assert request.headers["Accept"] == "application/dicom+json"
    assert request.headers["Authorization"] == "Bearer s3cret"
    assert [str(ds.SOPInstanceUID) for ds in request.datasets] == [p.sop_instance_uid for p in produced]


def test_failure_and_warning_reasons_become_per_object_outcomes(server: FakeDicomWeb, produced: list[ProducedObject]) -> None:
    sc, sr, kos = produced[0], produced[2], produced[3]
    server.reply = Reply(status=202, failures={sc.sop_instance_uid: 0xA700, sr.sop_instance_uid: 0xC000},
                         warnings={kos.sop_instance_uid: 0xB000})
    outcomes = {o.sop_instance_uid: o for o in StowRsTarget("web", server.url).send([p.path for p in produced])}
    assert (outcomes[sc.sop_instance_uid].ok, outcomes[sc.sop_instance_uid].status, outcomes[sc.sop_instance_uid].retryable) == (False, 0xA700, True)
    assert "0xA700" in outcomes[sc.sop_instance_uid].reason
    assert (outcomes[sr.sop_instance_uid].ok, outcomes[sr.sop_instance_uid].status, outcomes[sr.sop_instance_uid].retryable) == (False, 0xC000, False)
    assert (outcomes[kos.sop_instance_uid].ok, outcomes[kos.sop_instance_uid].status) == (True, 0xB000)
    assert outcomes[produced[1].sop_instance_uid].ok


@pytest.mark.parametrize(("status", "retryable"), [(503, True), (429, True), (500, True), (400, False), (401, False), (413, False)])
def test_http_errors_fail_every_object_retryable_only_when_transient(
    server: FakeDicomWeb, produced: list[ProducedObject], status: int, retryable: bool
) -> None:
    server.reply = Reply(status=status, body=b"")
    outcomes = StowRsTarget("web", server.url).send([p.path for p in produced])
    assert {(o.ok, o.status, o.retryable) for o in outcomes} == {(False, status, retryable)}
    assert all(f"HTTP {status}" in o.reason for o in outcomes)


def test_no_server_is_retryable_without_a_status(produced: list[ProducedObject]) -> None:
    outcomes = StowRsTarget("web", f"http://127.0.0.1:{free_port()}/dicom-web", timeout=5).send([produced[0].path])
    [outcome] = outcomes
    assert (outcome.ok, outcome.status, outcome.retryable) == (False, None, True)
    assert "failed" in outcome.reason


def test_a_missing_file_fails_alone_and_permanently(server: FakeDicomWeb, produced: list[ProducedObject], tmp_path: Path) -> None:
    gone = tmp_path / "gone.dcm"
    outcomes = StowRsTarget("web", server.url).send([gone, produced[0].path])
    assert (outcomes[0].ok, outcomes[0].retryable, outcomes[0].status) == (False, False, None)
    assert "missing" in outcomes[0].reason
    assert outcomes[1].ok
    assert [len(r.datasets) for r in server.requests] == [1]


def test_large_sends_are_split_into_several_requests(server: FakeDicomWeb, produced: list[ProducedObject]) -> None:
    largest = max(p.path.stat().st_size for p in produced)
    outcomes = StowRsTarget("web", server.url, max_request_bytes=largest).send([p.path for p in produced])
    assert all(o.ok for o in outcomes)
    assert 1 < len(server.requests) <= len(produced)
    sent = [str(ds.SOPInstanceUID) for r in server.requests for ds in r.datasets]
    assert sent == [p.sop_instance_uid for p in produced]  # each once, in order
    sizes = {p.sop_instance_uid: p.path.stat().st_size for p in produced}
    assert all(sum(sizes[str(ds.SOPInstanceUID)] for ds in r.datasets) <= largest for r in server.requests)


def test_echo_is_a_qido_search_with_the_credentials(server: FakeDicomWeb) -> None:
    target = StowRsTarget("web", server.url, credentials=credentials("basic", username="agent", password_env="P", environ={"P": "pw"}))
    echo = target.echo()
    assert (echo.ok, echo.detail) == (True, "QIDO-RS 200")
    [request] = server.requests
    assert request.path == "/dicom-web/studies?limit=1"
    assert request.headers["Authorization"].startswith("Basic ")
    server.reply = Reply(status=401)
    assert StowRsTarget("web", server.url).echo() == type(echo)(False, "QIDO-RS 401 Unauthorized")
    refused = StowRsTarget("web", f"http://127.0.0.1:{free_port()}/x", timeout=5).echo()
    assert not refused.ok and "QIDO-RS" in refused.detail


def test_secrets_come_from_a_file_or_the_environment_and_are_never_printed(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abc123\n")
    bearer = credentials("bearer", token_file=str(token))
    assert bearer.headers() == {"Authorization": "Bearer abc123"}
    assert "abc123" not in repr(bearer)
    assert read_secret(env="X", what="t", environ={"X": " v "}) == "v"
    with pytest.raises(DeliveryError, match="X is not set"):
        read_secret(env="X", what="bearer token", environ={})
    with pytest.raises(DeliveryError, match="cannot read"):
        read_secret(file=str(tmp_path / "nope"), what="bearer token")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(DeliveryError, match="empty"):
        read_secret(file=str(tmp_path / "empty"), what="bearer token")
    with pytest.raises(DeliveryError, match="username"):
        credentials("basic", password_env="P", environ={"P": "x"})
    with pytest.raises(DeliveryError, match="not one of"):
        credentials("kerberos")
    with pytest.raises(DeliveryError, match="http"):
        StowRsTarget("web", "ftp://example/dicom-web")


@pytest.mark.skipif(not openssl_available(), reason="openssl is not installed")
def test_tls_is_verified_by_default_and_a_ca_makes_it_work(tmp_path: Path, produced: list[ProducedObject]) -> None:
    pki = make_test_pki(tmp_path / "pki")
    server = FakeDicomWeb(context=pki.server_context(require_client_certificate=False))
    try:
        untrusted = StowRsTarget("web", server.url, timeout=5).send([produced[0].path])
        assert not untrusted[0].ok and "certificate" in untrusted[0].reason.lower()
        assert not StowRsTarget("web", server.url, timeout=5).echo().ok
        trusted = StowRsTarget("web", server.url, verify=ssl_context(verify=True, ca_certificate=str(pki.ca_certificate)))
        assert [o.ok for o in trusted.send([p.path for p in produced])] == [True] * len(produced)
        assert trusted.echo().ok
    finally:
        server.close()
    with pytest.raises(DeliveryError, match="TLS"):
        ssl_context(verify=True, ca_certificate=str(tmp_path / "missing.pem"))
