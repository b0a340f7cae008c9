"""E-mail alerts against aiosmtpd requiring STARTTLS and AUTH, and HL7 ORU^R01 results against a
python-hl7 MLLP listener answering AA, AE, AR or someone else's ACK; all on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import hl7
import pytest
from sqlalchemy import select

from pacs_agent.db.models import Flag, Notification, NotificationAttempt, NotificationStatus, utcnow
from tests.support.notify_servers import http_receiver, mllp_listener, smtp_receiver
from tests.support.tls import LoopbackPKI, make_test_pki, openssl_available

from tests.support.flagged_studies import ACCESSION, PATIENT_ID, STUDY, flag_study
from tests.support.notify_node import Node

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LoopbackPKI:
    if not openssl_available():
        pytest.skip("openssl is needed to make the SMTP server's certificate")
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def smtp(pki: LoopbackPKI, free_port: Callable[[], int]) -> Iterator[Any]:
    context = pki.server_context(require_client_certificate=False)
    with smtp_receiver(context, user="pe-agent", password="correct horse", port=free_port()) as receiver:
        yield receiver


def email_target(smtp: Any, pki: LoopbackPKI, password_file: Path, **more: Any) -> dict[str, Any]:
    return {
        "name": "mail", "kind": "Email", "smtp_host": smtp.host, "smtp_port": smtp.port, "smtp_security": "STARTTLS",
        "smtp_username": "pe-agent", "smtp_password_file": str(password_file), "ca_file": str(pki.ca_certificate),
        "from_address": "pe-agent@hospital.example", "to": ["pe-team@hospital.example", "oncall@hospital.example"], **more,
    }


def test_email_over_starttls_with_auth(node_factory: Callable[..., Node], smtp: Any, pki: LoopbackPKI, tmp_path: Path) -> None:
    password = tmp_path / "smtp.password"
    password.write_text("correct horse\n")
    node = node_factory([email_target(smtp, pki, password)])
    flag_study(node.session_factory, node.settings, STUDY, Flag.CRITICAL)
    report = node.notifier.run_once()
    assert report.sent == report.raised and len(report.sent) == 1
    assert smtp.authenticated_users == ["pe-agent"]
    (mail,) = smtp.messages
    assert smtp.envelopes == [("pe-agent@hospital.example", ["pe-team@hospital.example", "oncall@hospital.example"])]
    assert "PE triage CRITICAL" in mail["Subject"] and mail["X-PE-Agent-Notification"] == str(report.sent[0])
    body = mail.get_payload(decode=True).decode()
    assert f"https://pe.example.org/studies/{STUDY}" in body and "https://pe.example.org/ack/v1." in body
    assert "Unverified AI output" in body
    for identifier in (PATIENT_ID, ACCESSION, "Lastname"):
        assert identifier not in body


def test_email_with_a_wrong_password_fails_for_good(node_factory: Callable[..., Node], smtp: Any, pki: LoopbackPKI, tmp_path: Path) -> None:
    password = tmp_path / "smtp.password"
    password.write_text("wrong")
    node = node_factory([email_target(smtp, pki, password)])
    flag_study(node.session_factory, node.settings, STUDY, Flag.HIGH, p=0.8)
    report = node.notifier.run_once()
    assert len(report.failed) == 1 and smtp.messages == []
    with node.session_factory() as session:
        (attempt,) = session.scalars(select(NotificationAttempt))
    assert attempt.status_code == 535 and not attempt.retryable


def test_email_to_an_untrusted_certificate_is_refused(node_factory: Callable[..., Node], smtp: Any, pki: LoopbackPKI, tmp_path: Path) -> None:
    password = tmp_path / "smtp.password"
    password.write_text("correct horse")
    node = node_factory([email_target(smtp, pki, password, ca_file="")])  # system CAs do not know our test CA
    flag_study(node.session_factory, node.settings, STUDY, Flag.CRITICAL)
    report = node.notifier.run_once()
    assert len(report.failed) == 1 and smtp.messages == [] and smtp.authenticated_users == []
    (n,) = node.notifications()
    assert "certificate not trusted" in n.last_error


def test_email_password_from_the_environment(node_factory: Callable[..., Node], smtp: Any, pki: LoopbackPKI,
                                             monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PE_TEST_SMTP_PASSWORD", "correct horse")
    target = email_target(smtp, pki, tmp_path / "unused", smtp_password_env="PE_TEST_SMTP_PASSWORD")
    target["smtp_password_file"] = ""
    node = node_factory([target])
    flag_study(node.session_factory, node.settings, STUDY, Flag.CRITICAL)
    assert len(node.notifier.run_once().sent) == 1 and len(smtp.messages) == 1


def test_https_webhook_verified_against_ca_file(node_factory: Callable[..., Node], pki: LoopbackPKI) -> None:
    with http_receiver(tls_context=pki.server_context(require_client_certificate=False)) as hook:
        node = node_factory([
            {"name": "trusted", "kind": "webhook", "url": hook.url, "ca_file": str(pki.ca_certificate)},
            {"name": "untrusted", "kind": "webhook", "url": hook.url},
        ])
        flag_study(node.session_factory, node.settings, STUDY, Flag.CRITICAL)
        report = node.notifier.run_once()
    assert len(report.sent) == 1 and len(report.failed) == 1 and len(hook.requests) == 1
    trusted, untrusted = node.notifications()
    assert trusted.status == NotificationStatus.SENT and hook.url.startswith("https://")
    assert untrusted.status == NotificationStatus.FAILED and "CERTIFICATE_VERIFY_FAILED" in untrusted.last_error


def hl7_target(listener: Any, **more: Any) -> dict[str, Any]:
    return {"name": "ris", "kind": "hl7", "host": listener.host, "port": listener.port, "receiving_application": "RIS",
            "receiving_facility": "HOSP", "sending_facility": "RAD", "timeout_seconds": 5, **more}


def test_hl7_oru_is_acknowledged_and_carries_the_result(node_factory: Callable[..., Node]) -> None:
    with mllp_listener() as ris:
        node = node_factory([hl7_target(ris)])
        flag_study(node.session_factory, node.settings, STUDY, Flag.CRITICAL)
        flag_study(node.session_factory, node.settings, "1.2.3.4", Flag.ROUTINE, p=0.05)  # hl7 gets every flag
        report = node.notifier.run_once()
        assert len(report.sent) == 2
        flag_study(node.session_factory, node.settings, "1.2.3.4", Flag.ROUTINE, p=0.04)  # a new result: sent again
        assert len(node.notifier.run_once().sent) == 1
    first = next(m for m in ris.messages if str(m.segment("OBX")[5]) == "CRITICAL")
    msh = first.segment("MSH")
    assert str(msh[9]) == "ORU^R01^ORU_R01" and str(msh[12]) == "2.5.1" and str(msh[5]) == "RIS" and str(msh[11]) == "P"
    pid = first.segment("PID")
    assert str(pid[3]).startswith(PATIENT_ID) and str(pid[5]) == "Lastname^Firstname" and str(pid[7]) == "19600101"
    obr = first.segment("OBR")
    assert str(obr[3]) == ACCESSION and str(obr[25]) == "P"
    obx = {str(seg[3]).split("^")[0]: seg for seg in first.segments("OBX")}
    assert str(obx["PEAI-FLAG"][8]) == "AA" and str(obx["PEAI-PROB"][5]) == "0.9300"
    assert str(obx["110180"][5]) == STUDY
    assert "RV/LV >= 1" in str(obx["PEAI-FINDING"][5])
    assert "Unverified AI output" in hl7.util.unescape(first, str(obx["PEAI-DISCLAIMER"][5]))
    assert all(str(seg[11]) == "P" for seg in first.segments("OBX"))
    later = [m for m in ris.messages if str(m.segment("OBX")[5]) == "ROUTINE"]
    assert [str(m.segment("OBR")[25]) for m in later] == ["P", "C"]  # the second result corrects the first
    with node.session_factory() as session:
        details = [a.detail for a in session.scalars(select(NotificationAttempt))]
    assert details == ["HL7 ACK AA: accepted"] * 3
    assert node.events("study_notified") == []  # a RIS result is not an alert to a person


@pytest.mark.parametrize(("answers", "status", "attempts"), [
    (["AE"], NotificationStatus.FAILED, 1),  # an error in our message: resending it unchanged cannot help
    (["AR", "AA"], NotificationStatus.SENT, 2),  # refused (system down): retried
    (["WRONG-ID", "AA"], NotificationStatus.SENT, 2),  # an ACK of another message is no ACK of ours
])
def test_hl7_ack_codes(node_factory: Callable[..., Node], answers: list[str], status: NotificationStatus, attempts: int) -> None:
    with mllp_listener(codes=answers) as ris:
        node = node_factory([hl7_target(ris)])
        flag_study(node.session_factory, node.settings, STUDY, Flag.HIGH, p=0.8)
        node.notifier.run_once()
        node.notifier.run_once(now=utcnow() + timedelta(seconds=11))
    (n,) = node.notifications()
    assert n.status == status and n.attempts == attempts and len(ris.messages) == attempts


def test_hl7_listener_down_is_retried(node_factory: Callable[..., Node], free_port: Callable[[], int]) -> None:
    node = node_factory([{"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": free_port(), "timeout_seconds": 2}])
    flag_study(node.session_factory, node.settings, STUDY, Flag.HIGH, p=0.8)
    report = node.notifier.run_once()
    assert len(report.retrying) == 1
    (n,) = node.notifications()
    assert n.status == NotificationStatus.PENDING and "MLLP to 127.0.0.1" in n.last_error


def test_hl7_without_received_images_fails_with_the_reason(node_factory: Callable[..., Node]) -> None:
    with mllp_listener() as ris:
        node = node_factory([hl7_target(ris)])
        flag_study(node.session_factory, node.settings, STUDY, Flag.HIGH, p=0.8)
        for path in Path(node.settings.storage.root).rglob("*.dcm"):
            path.unlink()  # retention removed them
        report = node.notifier.run_once()
    assert len(report.failed) == 1 and ris.messages == []
    with node.session_factory() as session:
        (n,) = session.scalars(select(Notification))
    assert "PID-3" in n.last_error
