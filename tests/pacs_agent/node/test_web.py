"""The dashboard's HTTP server (uvicorn on a real loopback socket) over a real, migrated SQLite database.

Pages, JSON API, /healthz, /metrics (node state and time-to-stage histograms), admin actions with
their authentication, CSRF and audit trail, patient identifiers hidden by default, Grad-CAM PNG
rendering and path containment, TLS. The browser walk is tests/e2e/test_dashboard_browser.py.
"""

from __future__ import annotations

import dataclasses
import os
import re
import ssl
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from sqlalchemy import select

from pacs_agent.db.models import Delivery, DeliveryStatus, Event, Flag, Job, JobStatus, Output, OutputKind, Result, utcnow
from pacs_agent.db.session import transaction
from pacs_agent.errors import ConfigError
from pacs_agent.metrics import Stage, record_stage
from pacs_agent.node.web import HealthProbes, WebServer
from pacs_agent.node.web.auth import AdminCredentials, hash_password
from pacs_agent.settings import Settings
from tests.support.analysed_studies import seed_study
from tests.support.ct_series import PATIENT_ID, PATIENT_NAME, CTSeriesSpec, make_ct_series

from tests.support.settings import MigratedDB

TOKEN = "t0ken-for-the-dashboard-tests-0123"
PASSWORD = "correct horse battery"
HTML = {"Accept": "text/html,application/xhtml+xml"}


class Probes:
    receiver = True
    alive = (1, 1)


def _write_credentials(root: Path) -> tuple[Path, Path]:
    passwords = root / "admins.passwd"
    passwords.write_text(f"# dashboard admins\nrad1:{hash_password(PASSWORD)}\n")
    tokens = root / "admins.tokens"
    tokens.write_text(f"pacs-admin:{TOKEN}\n")
    return passwords, tokens


@pytest.fixture
def start_server(migrated_db: MigratedDB, tmp_path: Path) -> Iterator[Callable[..., WebServer]]:
    servers: list[WebServer] = []

    def start(*, credentials: bool = True, signing_key_file: str = "", **http: Any) -> WebServer:
        settings = migrated_db.settings
        options: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "enabled": True, **http}
        if credentials:
            passwords, tokens = _write_credentials(tmp_path)
            options.setdefault("admin_password_file", str(passwords))
            options.setdefault("admin_token_file", str(tokens))
        settings = dataclasses.replace(settings, http=type(settings.http)(**options),
                                       alerts=dataclasses.replace(settings.alerts, signing_key_file=signing_key_file))
        probes = HealthProbes(receiver_listening=lambda: Probes.receiver, workers_alive=lambda: Probes.alive)
        server = WebServer(settings, migrated_db.session_factory, probes)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
    Probes.receiver, Probes.alive = True, (1, 1)


def client(server: WebServer, **kwargs: Any) -> httpx.Client:
    return httpx.Client(base_url=f"{server.scheme}://127.0.0.1:{server.port}", timeout=20, **kwargs)


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, "the page carries no CSRF token"
    return match.group(1)


def login(http: httpx.Client) -> None:
    page = http.get("/login", headers=HTML)
    assert page.status_code == 200
    answer = http.post("/login", data={"username": "rad1", "password": PASSWORD, "csrf_token": csrf_of(page.text), "next": "/queue"})
    assert answer.status_code == 303 and answer.headers["location"] == "/queue"


# ---------------------------------------------------------------- reading


def test_worklist_json_and_html_filter_by_flag(start_server: Callable[..., WebServer], migrated_db: MigratedDB) -> None:
    seed_study(migrated_db.session_factory, study="1.9.1", flag=Flag.CRITICAL, probability=0.97)
    seed_study(migrated_db.session_factory, study="1.9.2", flag=Flag.ROUTINE, probability=0.05)
    seed_study(migrated_db.session_factory, study="1.9.3", flag=Flag.HIGH, probability=0.8)
    server = start_server()
    with client(server) as http:
        everything = http.get("/worklist").json()  # a script (no text/html in Accept) gets JSON
        assert [e["flag"] for e in everything] == ["CRITICAL", "HIGH", "ROUTINE"]
        assert http.get("/api/worklist", params={"flag": "critical"}).json()[0]["study_instance_uid"] == "1.9.1"
        assert [e["flag"] for e in http.get("/api/worklist?flag=CRITICAL&flag=HIGH").json()] == ["CRITICAL", "HIGH"]
        page = http.get("/worklist", params={"flag": "CRITICAL"}, headers=HTML)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        rows = re.findall(r'<tr class="row-(\w+)" data-study="([^"]+)"', page.text)
        assert rows == [("CRITICAL", "1.9.1")]
        assert 'http-equiv="refresh" content="30"' in page.text
        assert http.get("/worklist", params={"flag": "BOGUS"}, headers=HTML).status_code == 400
        assert http.get("/api/worklist", params={"flag": "BOGUS"}).json()["error"].startswith("unknown flag")
        assert http.get("/").headers["location"] == "/worklist"


def test_study_page_and_api_show_result_deliveries_and_events(start_server: Callable[..., WebServer], migrated_db: MigratedDB) -> None:
    _, job_id = seed_study(migrated_db.session_factory, study="1.9.5", flag=Flag.HIGH, probability=0.81, delivered=False)
    server = start_server()
    with client(server) as http:
        page = http.get("/studies/1.9.5", headers=HTML)
        assert page.status_code == 200
        assert 'id="study-flag"' in page.text and ">HIGH<" in page.text
        assert "test-model" in page.text and "sr.dcm is no longer in the spool" in page.text
        assert 'action="/actions/retry"' in page.text  # the failed delivery can be sent again
        detail = http.get("/api/studies/1.9.5").json()
        assert detail["study"]["flag"] == "HIGH" and detail["study"]["acknowledged"] is None
        (series,) = detail["series"]
        assert [j["id"] for j in series["jobs"]] == [job_id]
        assert series["jobs"][0]["outputs"][0]["deliveries"][0]["status"] == "FAILED"
        assert "job_succeeded" in {e["kind"] for e in series["events"]}
        assert http.get("/api/series/1.9.5.1").json()["series_instance_uid"] == "1.9.5.1"
        assert http.get("/series/1.9.5.1").headers["location"].startswith("/studies/1.9.5#series-")
        assert http.get(f"/api/jobs/{job_id}").json()["result"]["flag"] == "HIGH"
        assert http.get("/api/deliveries", params={"status": "failed"}).json()[0]["study_instance_uid"] == "1.9.5"
        assert http.get("/api/studies/9.9.9").status_code == 404
        assert http.get("/studies/9.9.9", headers=HTML).status_code == 404
        queue = http.get("/queue", headers=HTML)
        assert queue.status_code == 200 and 'id="open-deliveries"' in queue.text and "FAILED" in queue.text
        assert http.get("/api/queue").json()["deliveries"]["FAILED"] == 1


def test_study_page_shows_the_input_quality_verdict_and_the_images_left_out(
    start_server: Callable[..., WebServer], migrated_db: MigratedDB
) -> None:
    _, job_id = seed_study(migrated_db.session_factory, study="1.9.6", flag=Flag.REVIEW, probability=0.1)
    with transaction(migrated_db.session_factory) as session:
        result = session.scalars(select(Result).where(Result.job_id == job_id)).one()
        result.quality = {"status": "non-diagnostic", "passed": False, "summary": "non-diagnostic: pulmonary trunk 62 HU < 250 HU",
                          "reasons": ["pulmonary trunk 62 HU < 250 HU"], "unmeasured": [], "pulmonary_trunk_hu": 62.0,
                          "noise_hu": 14.0, "thresholds": {"min_trunk_hu": 250.0}}
        result.skipped_images = [{"sop_instance_uid": "1.9.6.1.77", "reason": "localizer"}]
    server = start_server()
    with client(server) as http:
        page = http.get("/studies/1.9.6", headers=HTML).text
        assert "non-diagnostic: pulmonary trunk 62 HU &lt; 250 HU" in page
        assert f'id="skipped-{job_id}"' in page and "1.9.6.1.77" in page and "localizer" in page
        result_json = http.get(f"/api/jobs/{job_id}").json()["result"]
        assert result_json["quality"]["status"] == "non-diagnostic"
        assert result_json["input_quality"]["pulmonary_trunk_hu"] == 62.0 and "thresholds" not in result_json["input_quality"]
        assert result_json["skipped_images"] == [{"sop_instance_uid": "1.9.6.1.77", "reason": "localizer"}]


def test_healthz_and_health_page_report_each_part(start_server: Callable[..., WebServer]) -> None:
    server = start_server()
    with client(server) as http:
        assert http.get("/healthz").json()["status"] == "ok"
        Probes.receiver = False
        answer = http.get("/healthz")
        assert answer.status_code == 503 and answer.json()["receiver"] == {"ok": False}
        Probes.receiver, Probes.alive = True, (0, 2)
        answer = http.get("/healthz")
        assert answer.status_code == 503 and answer.json()["workers"] == {"ok": False, "alive": 0, "expected": 2}
        page = http.get("/health", headers=HTML)
        assert "UNHEALTHY" in page.text and "0 of 2 alive" in page.text and 'id="time-to-notification"' in page.text


def _samples(body: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def test_metrics_node_state_and_time_to_stage(start_server: Callable[..., WebServer], migrated_db: MigratedDB) -> None:
    seed_study(migrated_db.session_factory, study="1.9.7", flag=Flag.CRITICAL, probability=0.95, latency_s=42)
    seed_study(migrated_db.session_factory, study="1.9.8", flag=Flag.HIGH, probability=0.75, latency_s=700, delivered=False)
    with transaction(migrated_db.session_factory) as session:
        record_stage(session, "1.9.7", Stage.NOTIFIED, at=utcnow(), target="webhook")
        record_stage(session, "1.9.7", Stage.ACKNOWLEDGED, at=utcnow() + timedelta(seconds=300), user="rad1")
        record_stage(session, "1.9.7", Stage.ACKNOWLEDGED, at=utcnow() + timedelta(seconds=900), user="rad2")  # only the first counts
    server = start_server()
    with client(server) as http:
        samples = _samples(http.get("/metrics").text)
    assert samples[("pe_agent_jobs", (("status", "SUCCEEDED"),))] == 2
    assert samples[("pe_agent_jobs_succeeded_total", ())] == 2
    assert samples[("pe_agent_deliveries", (("status", "FAILED"),))] == 1
    assert samples[("pe_agent_delivery_failed_attempts_total", ())] == 4
    assert samples[("pe_agent_worklist_studies", (("flag", "CRITICAL"),))] == 1
    assert samples[("pe_agent_analysis_latency_seconds_count", ())] == 2

    def stage(name: str, flag: str, suffix: str, le: str | None = None) -> float:
        labels = {"stage": name, "flag": flag, **({"le": le} if le else {})}
        return samples[(f"pe_agent_time_to_stage_seconds_{suffix}", tuple(sorted(labels.items())))]

    assert stage("analysed", "CRITICAL", "count") == 1 and 42 <= stage("analysed", "CRITICAL", "sum") < 70
    assert stage("analysed", "CRITICAL", "bucket", "30.0") == 0 and stage("analysed", "CRITICAL", "bucket", "60.0") == 1
    assert stage("delivered", "CRITICAL", "count") == 1
    assert stage("notified", "CRITICAL", "count") == 1
    assert stage("acknowledged", "CRITICAL", "count") == 1 and 340 <= stage("acknowledged", "CRITICAL", "sum") < 380
    assert stage("analysed", "HIGH", "bucket", "600.0") == 0 and stage("analysed", "HIGH", "count") == 1
    assert stage("delivered", "HIGH", "count") == 0  # its report has not reached PACS
    assert stage("acknowledged", "ROUTINE", "count") == 0  # every (stage, flag) pair is exported


def test_unknown_path_is_404_and_pages_forbid_framing(start_server: Callable[..., WebServer]) -> None:
    server = start_server()
    with client(server) as http:
        answer = http.get("/admin")
        assert answer.status_code == 404 and "error" in answer.json()
        page = http.get("/worklist", headers=HTML)
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["cache-control"] == "no-store" and "<script" not in page.text


# ---------------------------------------------------------------- patient identifiers


def _instance_file(settings: Settings, study: str) -> str:
    ds = make_ct_series(CTSeriesSpec(n_slices=1, rows=16, columns=16, study_instance_uid=study))[0]
    relative = f"incoming/{study}/{study}.1/{ds.SOPInstanceUID}.dcm"
    path = Path(settings.storage.root) / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return relative


def test_patient_identifiers_hidden_unless_configured(start_server: Callable[..., WebServer], migrated_db: MigratedDB) -> None:
    seed_study(migrated_db.session_factory, study="1.9.11", flag=Flag.CRITICAL, probability=0.9,
               instance_path=_instance_file(migrated_db.settings, "1.9.11"))
    hidden = start_server()
    with client(hidden) as http:
        entry = http.get("/api/worklist").json()[0]
        assert entry["patient"] is None and entry["accession_number"] is None
        for path in ("/worklist", "/studies/1.9.11"):
            text = http.get(path, headers=HTML).text
            assert PATIENT_ID not in text and "Phantom" not in text and "ACC0042" not in text
        assert PATIENT_ID not in http.get("/api/studies/1.9.11").text
    shown = start_server(show_patient_identifiers=True)
    with client(shown) as http:
        entry = http.get("/api/worklist").json()[0]
        assert entry["patient"] == {"name": PATIENT_NAME.replace("^", ", ", 1).replace("^", " "), "id": PATIENT_ID}
        assert entry["accession_number"] == "ACC0042"
        assert PATIENT_ID in http.get("/worklist", headers=HTML).text


# ---------------------------------------------------------------- actions


def _jobs(db: MigratedDB, series_id: int) -> list[Job]:
    with db.session_factory() as session:
        return list(session.scalars(select(Job).where(Job.series_id == series_id).order_by(Job.id)))


def _admin_events(db: MigratedDB) -> list[Event]:
    with db.session_factory() as session:
        return list(session.scalars(select(Event).where(Event.kind == "admin_action").order_by(Event.id)))


def test_api_actions_need_a_token_and_are_audited(start_server: Callable[..., WebServer], migrated_db: MigratedDB) -> None:
    series_id, job_id = seed_study(migrated_db.session_factory, study="1.9.20", flag=Flag.HIGH, probability=0.8, delivered=False)
    server = start_server()
    with client(server) as http:
        assert http.post("/api/series/1.9.20.1/reprocess").status_code == 401
        assert http.post("/api/series/1.9.20.1/reprocess", headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
        assert len(_jobs(migrated_db, series_id)) == 1 and not _admin_events(migrated_db)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        answer = http.post("/api/series/1.9.20.1/reprocess", headers=auth)
        assert answer.status_code == 200 and answer.json()["supersedes_job_id"] == job_id
        new_job = answer.json()["job_id"]
        again = http.post("/api/series/1.9.20.1/reprocess", headers=auth)
        assert again.status_code == 409 and "already has job" in again.json()["error"]
        assert http.post(f"/api/jobs/{new_job}/cancel", headers=auth).json()["status"] == "CANCELLED"
        assert http.post(f"/api/jobs/{new_job}/cancel", headers=auth).status_code == 409
        (delivery,) = http.get("/api/deliveries").json()
        assert http.post(f"/api/deliveries/{delivery['id']}/retry", headers=auth).json()["requeued"] == 1
        answer = http.post("/api/studies/1.9.20/acknowledge", headers=auth, json={"note": "called the ward"})
        assert answer.status_code == 200
        assert http.get("/api/studies/1.9.20").json()["study"]["acknowledged"]["by"] == "pacs-admin"
        assert http.post("/api/studies/1.9.99/acknowledge", headers=auth).status_code == 404
        assert http.post("/api/jobs/999/cancel", headers=auth).status_code == 404
    events = _admin_events(migrated_db)
    assert [e.detail["action"] for e in events] == ["reprocess", "cancel", "retry", "acknowledge"]
    assert {e.detail["user"] for e in events} == {"pacs-admin"} and {e.detail["via"] for e in events} == {"api"}
    with migrated_db.session_factory() as session:
        cancelled = session.scalars(select(Event).where(Event.kind == "job_cancelled")).one()
        assert cancelled.detail["by"] == "pacs-admin"
        assert session.get(Delivery, delivery["id"]).status == DeliveryStatus.PENDING


def test_form_actions_need_sign_in_and_csrf(start_server: Callable[..., WebServer], migrated_db: MigratedDB) -> None:
    series_id, _ = seed_study(migrated_db.session_factory, study="1.9.30", flag=Flag.CRITICAL, probability=0.9)
    server = start_server()
    with client(server) as http:
        page = http.get("/studies/1.9.30", headers=HTML).text
        token = csrf_of(page)
        form = {"series_instance_uid": "1.9.30.1", "csrf_token": token, "next": "/studies/1.9.30"}
        refused = http.post("/actions/reprocess", data=form, headers=HTML)
        assert refused.status_code == 401 and "sign in as an administrator" in refused.text
        assert len(_jobs(migrated_db, series_id)) == 1

        wrong = http.post("/login", data={"username": "rad1", "password": "not it", "csrf_token": token, "next": "/"})
        assert wrong.status_code == 401 and "Wrong user name or password" in wrong.text
        login(http)
        token = csrf_of(http.get("/studies/1.9.30", headers=HTML).text)  # signing in gives a new token
        forged = http.post("/actions/reprocess", data={**form, "csrf_token": "forged"}, headers=HTML)
        assert forged.status_code == 403 and "CSRF" in forged.text
        stale = http.post("/actions/reprocess", data=form, headers=HTML)  # the token from before signing in
        assert stale.status_code == 403
        done = http.post("/actions/reprocess", data={**form, "csrf_token": token, "next": "//evil.example/x"})
        assert done.status_code == 303 and done.headers["location"] == "/worklist"  # no open redirect
        assert [j.status for j in _jobs(migrated_db, series_id)] == [JobStatus.SUCCEEDED, JobStatus.QUEUED]
        assert "queued job" in http.get("/worklist", headers=HTML).text  # the flash message

        # A session user calling the API must send the CSRF token in a header.
        assert http.post("/api/studies/1.9.30/acknowledge").status_code == 403
        assert http.post("/api/studies/1.9.30/acknowledge", headers={"X-CSRF-Token": token}).status_code == 200
    (reprocess, acknowledge) = _admin_events(migrated_db)
    assert (reprocess.detail["action"], reprocess.detail["user"], reprocess.detail["via"]) == ("reprocess", "rad1", "web")
    assert acknowledge.detail["user"] == "rad1"


def test_actions_refused_when_no_admin_is_configured(start_server: Callable[..., WebServer], migrated_db: MigratedDB) -> None:
    seed_study(migrated_db.session_factory, study="1.9.40", flag=Flag.HIGH, probability=0.8)
    server = start_server(credentials=False)
    with client(server) as http:
        answer = http.post("/api/series/1.9.40.1/reprocess", headers={"Authorization": f"Bearer {TOKEN}"})
        assert answer.status_code == 403 and "admin_password_file" in answer.json()["error"]
        page = http.get("/studies/1.9.40", headers=HTML).text
        assert "reprocess-button" not in page and http.get("/login", headers=HTML).status_code == 404
        form = http.post("/actions/reprocess", data={"series_instance_uid": "1.9.40.1", "csrf_token": "any"}, headers=HTML)
        assert form.status_code == 403
    assert not _admin_events(migrated_db)


def test_credential_files_are_checked_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "passwd"
    bad.write_text("rad1:plaintext\n")
    with pytest.raises(ConfigError, match="line 1: expected user:"):
        AdminCredentials.from_files(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        AdminCredentials.from_files("", str(tmp_path / "missing"))
    short = tmp_path / "tokens"
    short.write_text("admin:short\n")
    with pytest.raises(ConfigError, match="at least 16"):
        AdminCredentials.from_files("", str(short))
    bare = tmp_path / "bare"
    bare.write_text(TOKEN + "\n")
    assert AdminCredentials.from_files("", str(bare)).user_for_token(TOKEN) == "token"


# ---------------------------------------------------------------- images, TLS


def _secondary_capture(path: Path) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 40, 60, 3, "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.PlanarConfiguration = 8, 8, 7, 0, 0
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[..., 0] = 200
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_gradcam_png_from_the_outbox_and_paths_stay_in_the_spool(start_server: Callable[..., WebServer], migrated_db: MigratedDB) -> None:
    _, job_id = seed_study(migrated_db.session_factory, study="1.9.50", flag=Flag.HIGH, probability=0.8)
    _secondary_capture(Path(migrated_db.settings.storage.root) / f"outbox/{job_id}/sc.dcm")
    with transaction(migrated_db.session_factory) as session:
        good = Output(job_id=job_id, kind=OutputKind.SC, sop_class_uid=SecondaryCaptureImageStorage, sop_instance_uid="1.9.50.10",
                      series_instance_uid="1.9.50.11", path=f"outbox/{job_id}/sc.dcm")
        escape = Output(job_id=job_id, kind=OutputKind.SC, sop_class_uid=SecondaryCaptureImageStorage, sop_instance_uid="1.9.50.12",
                        series_instance_uid="1.9.50.11", path="../../../../etc/passwd")
        session.add_all([good, escape])
        session.flush()
        good_id, escape_id = good.id, escape.id
    server = start_server()
    with client(server) as http:
        image = http.get(f"/outputs/{good_id}/image.png")
        assert image.status_code == 200 and image.headers["content-type"] == "image/png" and image.content[:8] == b"\x89PNG\r\n\x1a\n"
        from PIL import Image
        import io

        decoded = Image.open(io.BytesIO(image.content))
        assert decoded.size == (60, 40) and decoded.convert("RGB").getpixel((5, 5)) == (200, 0, 0)
        assert http.get(f"/outputs/{escape_id}/image.png").status_code == 404
        assert f"/outputs/{good_id}/image.png" in http.get("/studies/1.9.50", headers=HTML).text


def test_tls(start_server: Callable[..., WebServer], tmp_path: Path) -> None:
    from tests.support.tls import make_test_pki, openssl_available

    if not openssl_available():
        pytest.skip("openssl is not installed")

    pki = make_test_pki(tmp_path / "pki")
    server = start_server(tls_certificate=str(pki.server_certificate), tls_private_key=str(pki.server_key))
    assert server.scheme == "https"
    context = ssl.create_default_context(cafile=str(pki.ca_certificate))
    context.check_hostname = False
    with client(server, verify=context) as http:
        answer = http.get("/healthz")
        assert answer.status_code == 200 and answer.json()["status"] == "ok"
        page = http.get("/login", headers=HTML)
        cookie = page.headers["set-cookie"].lower()
        assert "secure" in cookie and "samesite=strict" in cookie and "httponly" in cookie
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5)


def test_default_settings_bind_loopback_and_refuse_a_taken_port(start_server: Callable[..., WebServer]) -> None:
    assert Settings().http.host == "127.0.0.1" and Settings().http.enabled is False
    first = start_server()
    with pytest.raises(ConfigError, match="cannot listen"):
        start_server(port=first.port)


def test_hash_password_command_writes_a_line_the_node_accepts(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pacs_agent.node.web.auth", "hash-password", "dr.who"], input=PASSWORD + "\n",
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line.startswith("dr.who:$argon2id$") and PASSWORD not in line
    passwords = tmp_path / "passwd"
    passwords.write_text(line + "\n")
    credentials = AdminCredentials.from_files(str(passwords))
    assert credentials.check_password("dr.who", PASSWORD) and not credentials.check_password("dr.who", PASSWORD + "x")
    assert not credentials.check_password("nobody", PASSWORD)
    short = subprocess.run([sys.executable, "-m", "pacs_agent.node.web.auth", "hash-password"], input="short\n",
                           capture_output=True, text=True, timeout=60, check=False)
    assert short.returncode == 1 and "at least 8" in short.stderr


def test_serve_stops_at_start_on_a_bad_credentials_file(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.support.settings import find_free_port

    broken = tmp_path / "admins.passwd"
    broken.write_text("rad1:not-a-hash\n")
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[node]\nport = {find_free_port()}\n[storage]\nroot = "{tmp_path / "spool"}"\n'
        f'[database]\nurl = "sqlite:///{tmp_path / "agent.sqlite"}"\n[log]\nformat = "json"\n'
        f'[http]\nenabled = true\nport = {find_free_port()}\nadmin_password_file = "{broken}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PE_AGENT")}
    done = subprocess.run([sys.executable, "-m", "pacs_agent.node.cli", "serve", "--config", str(config)], capture_output=True, text=True,
                          timeout=120, env=env, check=False)
    assert done.returncode == 1
    assert "admin_password_file" in done.stdout + done.stderr and "line 1" in done.stdout + done.stderr
    assert "worker_process_started" not in done.stdout + done.stderr


def _alert(db: MigratedDB, study: str, target: str = "pe-team") -> int:
    from pacs_agent.db.models import Notification, NotificationStatus

    with transaction(db.session_factory) as session:
        n = Notification(dedup_key=f"alert|{target}|{study}|CRITICAL", study_instance_uid=study, series_instance_uid=f"{study}.1",
                         flag=Flag.CRITICAL, target=target, kind="webhook", status=NotificationStatus.SENT, attempts=1, sent_at=utcnow())
        session.add(n)
        session.flush()
        return n.id


def test_dashboard_acknowledgement_acknowledges_the_alerts(start_server: Callable[..., WebServer], migrated_db: MigratedDB) -> None:
    from pacs_agent.db.models import Notification

    seed_study(migrated_db.session_factory, study="1.9.60", flag=Flag.CRITICAL, probability=0.9)
    alert_id = _alert(migrated_db, "1.9.60")
    server = start_server()
    with client(server) as http:
        page = http.get("/studies/1.9.60", headers=HTML).text
        assert 'id="notifications"' in page and "pe-team" in page
        auth = {"Authorization": f"Bearer {TOKEN}"}
        first = http.post("/api/studies/1.9.60/acknowledge", headers=auth, json={"note": "on the phone with the ward"})
        assert first.status_code == 200 and first.json()["notification_ids"] == [alert_id]
        again = http.post("/api/studies/1.9.60/acknowledge", headers=auth)
        assert again.json()["already_acknowledged"] is True and again.json()["acknowledged_by"] == "pacs-admin"
        (shown,) = http.get("/api/studies/1.9.60").json()["notifications"]
        assert shown["acknowledged"]["by"] == "pacs-admin" and shown["acknowledged"]["via"] == "api"
    with migrated_db.session_factory() as session:
        n = session.get(Notification, alert_id)
        assert n is not None and n.acknowledged_by == "pacs-admin"
        acks = list(session.scalars(select(Event).where(Event.kind == "study_acknowledged")))
        assert [(e.entity_id, e.detail["user"], e.detail["note"]) for e in acks] == [("1.9.60", "pacs-admin", "on the phone with the ward")]


def test_signed_link_shows_a_page_and_only_its_post_acknowledges(start_server: Callable[..., WebServer], migrated_db: MigratedDB,
                                                                   tmp_path: Path) -> None:
    from pacs_agent.db.models import Notification
    from pacs_agent.notify.links import sign_ack_token

    seed_study(migrated_db.session_factory, study="1.9.70", flag=Flag.CRITICAL, probability=0.9)
    alert_id = _alert(migrated_db, "1.9.70")
    key_file = tmp_path / "ack.key"
    key_file.write_text("k" * 44 + "\n")
    server = start_server(credentials=False, signing_key_file=str(key_file))
    token = sign_ack_token(key_file.read_bytes().strip(), alert_id, utcnow() + timedelta(hours=1))
    with client(server) as http:
        page = http.get(f"/ack/{token}", headers=HTML)
        assert page.status_code == 200 and 'id="ack-submit"' in page.text and "1.9.70" in page.text
        with migrated_db.session_factory() as session:
            opened = session.get(Notification, alert_id)
            assert opened is not None and opened.acknowledged_at is None  # opening the link changes nothing
        forged = http.get(f"/ack/{token[:-3]}xyz", headers=HTML)
        assert forged.status_code == 403 and "not valid" in forged.text
        no_csrf = http.post(f"/ack/{token}", data={"user": "Dr Who"}, headers=HTML)
        assert no_csrf.status_code == 403
        done = http.post(f"/ack/{token}", data={"user": "Dr Who", "csrf_token": csrf_of(page.text)})
        assert done.status_code == 303 and done.headers["location"] == "/studies/1.9.70"
        assert "already" in http.get(f"/ack/{token}", headers=HTML).text.lower()
    with migrated_db.session_factory() as session:
        n = session.get(Notification, alert_id)
        assert n is not None and (n.acknowledged_by, n.acknowledged_via) == ("Dr Who", "link")
