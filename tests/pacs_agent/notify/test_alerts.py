"""Alerts end to end against a real HTTP receiver on loopback: raising, templates, retries with
backoff, escalation, acknowledgement (CLI-style, dashboard-style, signed link) and what a message
may say about the patient."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from pacs_agent.db.models import Flag, NotificationAttempt, NotificationStatus, utcnow
from pacs_agent.db.session import transaction
from pacs_agent.errors import ConfigError, NotificationError
from pacs_agent.notify import Notifier, acknowledge, acknowledge_by_link, notification_for_link, retry_notifications
from pacs_agent.notify.links import sign_ack_token, verify_ack_token
from tests.support.flagged_studies import ACCESSION, PATIENT_ID, STUDY, flag_study
from tests.support.notify_node import KEY, Node
from tests.support.notify_servers import http_receiver


def webhook(name: str, url: str, **more: Any) -> dict[str, Any]:
    return {"name": name, "kind": "webhook", "url": url, **more}


def test_critical_study_alerts_once_without_identifiers_and_link_acknowledges(node_factory: Callable[..., Node]) -> None:
    with http_receiver() as hook:
        node = node_factory([webhook("pe-team", hook.url)])
        flag_study(node.session_factory, node.settings, STUDY, Flag.CRITICAL)
        report = node.notifier.run_once()
        assert len(report.raised) == 1 and report.sent == report.raised
        assert node.notifier.run_once().raised == ()  # once per study and flag
        assert len(hook.requests) == 1
    body = hook.requests[0]["json"]
    assert body["schema"] == "pe-agent.alert/1" and body["flag"] == "CRITICAL" and body["study_instance_uid"] == STUDY
    assert body["summary"].startswith("PE (p=0.93): central, right; RV/LV >= 1")
    assert body["patient"] is None
    raw = hook.requests[0]["raw"].decode()
    for identifier in (PATIENT_ID, ACCESSION, "Lastname"):
        assert identifier not in raw
    assert "Unverified AI output" in body["disclaimer"] and "ab" * 32 in body["disclaimer"]
    assert body["dashboard_url"] == f"https://pe.example.org/studies/{STUDY}"
    assert body["acknowledge_url"].startswith("https://pe.example.org/ack/v1.")
    assert hook.requests[0]["headers"]["x-pe-agent-notification"] == str(body["notification_id"])

    token = body["acknowledge_url"].rsplit("/", 1)[1]
    with transaction(node.session_factory) as session:
        shown = notification_for_link(session, KEY, token)
        assert shown.flag == Flag.CRITICAL and shown.study_instance_uid == STUDY
        result = acknowledge_by_link(session, KEY, token, user="Dr Who")
    assert result.acknowledged_ids == (body["notification_id"],) and result.via == "link" and not result.already_acknowledged
    (n,) = node.notifications()
    assert n.status == NotificationStatus.SENT and n.acknowledged_by == "Dr Who" and n.acknowledged_via == "link"
    (notified,) = node.events("study_notified")
    (acknowledged,) = node.events("study_acknowledged")
    assert notified.entity == "study" and notified.entity_id == STUDY and notified.detail["target"] == "pe-team"
    assert acknowledged.entity_id == STUDY and acknowledged.detail["user"] == "Dr Who" and acknowledged.detail["via"] == "link"
    # the same link again: not an error, it reports the first acknowledgement
    with transaction(node.session_factory) as session:
        again = acknowledge_by_link(session, KEY, token)
    assert again.already_acknowledged and again.user == "Dr Who"
    assert len(node.events("study_acknowledged")) == 1


def test_identifiers_only_for_a_target_configured_to_carry_them(node_factory: Callable[..., Node]) -> None:
    with http_receiver() as hook:
        node = node_factory([webhook("ward", hook.url, include_patient_identifiers=True, flags=["high", "Critical"])])
        flag_study(node.session_factory, node.settings, STUDY, Flag.HIGH, p=0.8)
        node.notifier.run_once()
    (request,) = hook.requests
    assert request["json"]["patient"] == {"name": "Lastname, Firstname", "id": PATIENT_ID, "accession_number": ACCESSION}
    assert "Lastname, Firstname" in request["json"]["text"]


def test_teams_and_slack_templates_and_signature(node_factory: Callable[..., Node], tmp_path: Path) -> None:
    secret = tmp_path / "hook.secret"
    secret.write_text("s3cret\n")
    with http_receiver() as teams, http_receiver() as slack:
        node = node_factory([webhook("teams", teams.url, template="Teams", secret_file=str(secret)), webhook("slack", slack.url, template="slack")])
        flag_study(node.session_factory, node.settings, STUDY, Flag.CRITICAL)
        node.notifier.run_once()
    card_message = teams.requests[0]["json"]
    assert card_message["type"] == "message"
    card = card_message["attachments"][0]
    assert card["contentType"] == "application/vnd.microsoft.card.adaptive"
    assert card["content"]["type"] == "AdaptiveCard" and "CRITICAL" in card["content"]["body"][0]["text"]
    assert [a["title"] for a in card["content"]["actions"]] == ["Open study", "Acknowledge"]
    expected = hmac.new(b"s3cret", teams.requests[0]["raw"], hashlib.sha256).hexdigest()
    assert teams.requests[0]["headers"]["x-pe-agent-signature"] == f"sha256={expected}"
    slack_body = slack.requests[0]["json"]
    assert "CRITICAL" in slack_body["text"] and slack_body["blocks"][0]["type"] == "header"
    assert slack_body["blocks"][-1]["type"] == "actions"
    assert "x-pe-agent-signature" not in slack.requests[0]["headers"]


def test_transient_failures_retry_with_backoff_then_deliver(node_factory: Callable[..., Node]) -> None:
    with http_receiver(codes=[503, 429]) as hook:
        node = node_factory([webhook("pe-team", hook.url)])
        flag_study(node.session_factory, node.settings, STUDY, Flag.CRITICAL)
        first = node.notifier.run_once()
        assert first.retrying == first.raised and not first.sent
        (n,) = node.notifications()
        assert n.status == NotificationStatus.PENDING and "HTTP 503" in n.last_error
        wait_1 = (n.next_attempt_at - utcnow()).total_seconds()
        assert 8 < wait_1 <= 10
        assert node.notifier.run_once().sent == ()  # not due yet
        second = node.notifier.run_once(now=utcnow() + timedelta(seconds=11))
        assert second.retrying == first.raised
        (n,) = node.notifications()
        assert 18 < (n.next_attempt_at - utcnow()).total_seconds() <= 20  # doubled
        third = node.notifier.run_once(now=utcnow() + timedelta(seconds=21))
        assert third.sent == first.raised
    with node.session_factory() as session:
        attempts = list(session.scalars(select(NotificationAttempt).order_by(NotificationAttempt.id)))
    assert [(a.attempt, a.ok, a.status_code) for a in attempts] == [(1, False, 503), (2, False, 429), (3, True, 200)]
    assert [e.detail["attempt"] for e in node.events("notification_retry")] == [1, 2]


def test_unreachable_target_fails_after_max_attempts(node_factory: Callable[..., Node], free_port: Callable[[], int]) -> None:
    node = node_factory([webhook("gone", f"http://127.0.0.1:{free_port()}/hook", timeout_seconds=2)], alerts={"max_attempts": 2})
    flag_study(node.session_factory, node.settings, STUDY, Flag.HIGH, p=0.8)
    node.notifier.run_once()
    report = node.notifier.run_once(now=utcnow() + timedelta(minutes=5))
    assert len(report.failed) == 1
    (n,) = node.notifications()
    assert n.status == NotificationStatus.FAILED and n.attempts == 2 and "cannot reach the webhook" in n.last_error
    # an administrator re-queues it once the receiver is back
    with transaction(node.session_factory) as session:
        assert retry_notifications(session, [n.id]) == [n.id]
    with http_receiver() as hook:
        # the administrator fixes the URL and restarts the node
        fixed = dataclasses.replace(node.settings, notifications=(dataclasses.replace(node.settings.notifications[0], url=hook.url),))
        notifier = Notifier(fixed, node.session_factory, owner="test:2/notify")
        assert notifier.run_once().sent == (n.id,)
    assert len(hook.requests) == 1


def test_permanent_refusal_escalates_at_once(node_factory: Callable[..., Node]) -> None:
    with http_receiver(codes=[400]) as primary, http_receiver() as backup:
        node = node_factory([
            webhook("primary", primary.url, escalate_to="backup", escalate_after_minutes=30),
            webhook("backup", backup.url, flags=[]),
        ])
        flag_study(node.session_factory, node.settings, STUDY, Flag.CRITICAL)
        report = node.notifier.run_once()
        assert len(report.failed) == 1 and len(report.escalated) == 1 and report.sent == report.escalated
    assert len(primary.requests) == 1 and len(backup.requests) == 1
    body = backup.requests[0]["json"]
    assert body["escalation_level"] == 1 and "could not be delivered" in body["escalation_reason"] and "HTTP 400" in body["escalation_reason"]
    failed, escalation = node.notifications()
    assert failed.status == NotificationStatus.FAILED and failed.attempts == 1 and failed.escalated_at is not None
    assert escalation.escalated_from_id == failed.id and escalation.target == "backup"


def test_unacknowledged_alert_escalates_after_its_minutes_and_acknowledged_one_does_not(node_factory: Callable[..., Node]) -> None:
    with http_receiver() as primary, http_receiver() as backup:
        node = node_factory([
            webhook("primary", primary.url, escalate_to="backup", escalate_after_minutes=10),
            webhook("backup", backup.url, flags=[]),
        ])
        flag_study(node.session_factory, node.settings, STUDY, Flag.CRITICAL)
        flag_study(node.session_factory, node.settings, "1.2.3.4", Flag.HIGH, p=0.7)
        node.notifier.run_once()
        assert len(primary.requests) == 2 and backup.requests == []
        assert node.notifier.run_once(now=utcnow() + timedelta(minutes=9)).escalated == ()
        with transaction(node.session_factory) as session:
            result = acknowledge(session, "1.2.3.4", "radiologist on call", "cli")
        assert len(result.acknowledged_ids) == 1
        report = node.notifier.run_once(now=utcnow() + timedelta(minutes=11))
        assert len(report.escalated) == 1 and report.sent == report.escalated
        assert node.notifier.run_once(now=utcnow() + timedelta(minutes=30)).escalated == ()  # once only
    (request,) = backup.requests
    assert request["json"]["study_instance_uid"] == STUDY
    assert "not acknowledged within 11 minutes" in request["json"]["escalation_reason"]
    (escalated,) = node.events("notification_escalated")
    assert escalated.detail["escalated_to"] == "backup" and "10 minutes" in escalated.detail["reason"]


def test_acknowledging_cancels_a_pending_escalation(node_factory: Callable[..., Node], free_port: Callable[[], int]) -> None:
    with http_receiver() as primary:
        node = node_factory([
            webhook("primary", primary.url, escalate_to="backup", escalate_after_minutes=1),
            webhook("backup", f"http://127.0.0.1:{free_port()}/down", flags=[], timeout_seconds=2),
        ])
        flag_study(node.session_factory, node.settings, STUDY, Flag.CRITICAL)
        node.notifier.run_once()
        report = node.notifier.run_once(now=utcnow() + timedelta(minutes=2))
        assert len(report.escalated) == 1 and report.retrying == report.escalated
    first_id = node.notifications()[0].id
    with transaction(node.session_factory) as session:
        result = acknowledge(session, first_id, "Dr Who", "dashboard", note="seen, calling the ward")
    assert result.cancelled_ids == report.escalated and len(result.acknowledged_ids) == 2
    _, escalation = node.notifications()
    assert escalation.status == NotificationStatus.CANCELLED
    assert node.notifier.run_once(now=utcnow() + timedelta(hours=1)).sent == ()
    (event,) = node.events("study_acknowledged")
    assert event.detail["note"] == "seen, calling the ward" and event.detail["via"] == "dashboard"


def test_more_urgent_flag_alerts_again_a_quieter_one_does_not(node_factory: Callable[..., Node]) -> None:
    with http_receiver() as hook:
        node = node_factory([webhook("pe-team", hook.url)])
        flag_study(node.session_factory, node.settings, STUDY, Flag.HIGH, p=0.8)
        node.notifier.run_once()
        flag_study(node.session_factory, node.settings, STUDY, Flag.CRITICAL, series_number=2)
        node.notifier.run_once()
        # re-analysis of the critical series comes back HIGH: the study stays CRITICAL, nothing new
        flag_study(node.session_factory, node.settings, STUDY, Flag.HIGH, p=0.8, series_number=2)
        node.notifier.run_once()
    assert [r["json"]["flag"] for r in hook.requests] == ["HIGH", "CRITICAL"]


def test_routine_old_and_unlisted_flags_do_not_alert(node_factory: Callable[..., Node]) -> None:
    with http_receiver() as hook:
        node = node_factory([webhook("pe-team", hook.url), webhook("critical-only", hook.url, flags=["CRITICAL"])])
        flag_study(node.session_factory, node.settings, "1.1", Flag.ROUTINE, p=0.1)
        flag_study(node.session_factory, node.settings, "1.2", Flag.REVIEW, p=0.45)
        flag_study(node.session_factory, node.settings, "1.3", Flag.CRITICAL, age=timedelta(hours=25))
        flag_study(node.session_factory, node.settings, "1.4", Flag.HIGH, p=0.8)
        node.notifier.run_once()
    assert [(r["json"]["target"], r["json"]["study_instance_uid"]) for r in hook.requests] == [("pe-team", "1.4")]


def test_demo_model_messages_say_not_for_clinical_use(node_factory: Callable[..., Node]) -> None:
    with http_receiver() as hook:
        node = node_factory([webhook("pe-team", hook.url)], model={"checkpoint": "/models/real.pt"})
        flag_study(node.session_factory, node.settings, "1.1", Flag.CRITICAL, model_name="pe-triage-demo")
        flag_study(node.session_factory, node.settings, "1.2", Flag.CRITICAL)
        node.notifier.run_once()
    by_study = {r["json"]["study_instance_uid"]: r["json"] for r in hook.requests}
    assert by_study["1.1"]["not_for_clinical_use"] and by_study["1.1"]["title"].startswith("NOT FOR CLINICAL USE")
    assert not by_study["1.2"]["not_for_clinical_use"] and "NOT FOR CLINICAL USE" not in json.dumps(by_study["1.2"])


def test_acknowledge_refuses_what_it_cannot_name(node_factory: Callable[..., Node]) -> None:
    node = node_factory([])
    flag_study(node.session_factory, node.settings, STUDY, Flag.CRITICAL)
    with transaction(node.session_factory) as session:
        with pytest.raises(NotificationError, match="no notification 99"):
            acknowledge(session, 99, "x", "cli")
        with pytest.raises(NotificationError, match="neither a notification id nor a Study Instance UID"):
            acknowledge(session, "DROP TABLE", "x", "cli")
        with pytest.raises(NotificationError, match="no result or alert"):
            acknowledge(session, "1.2.3.999", "x", "cli")
        with pytest.raises(NotificationError, match="say who"):
            acknowledge(session, STUDY, "  ", "cli")
        # a worklist study without any alert can be acknowledged (the dashboard's button)
        result = acknowledge(session, STUDY, "Dr Who", "dashboard")
    assert result.acknowledged_ids == () and not result.already_acknowledged
    assert len(node.events("study_acknowledged")) == 1


def test_signed_links_cannot_be_forged_or_extended() -> None:
    now = utcnow()
    token = sign_ack_token(KEY, 7, now + timedelta(hours=1))
    assert verify_ack_token(KEY, token, now=now) == 7
    version, nid, expires, signature = token.split(".")
    with pytest.raises(NotificationError, match="wrong signature"):
        verify_ack_token(KEY, f"{version}.8.{expires}.{signature}", now=now)
    with pytest.raises(NotificationError, match="wrong signature"):
        verify_ack_token(KEY, f"{version}.{nid}.{int(expires) + 3600}.{signature}", now=now)
    with pytest.raises(NotificationError, match="wrong signature"):
        verify_ack_token(b"x" * 40, token, now=now)
    with pytest.raises(NotificationError, match="expired"):
        verify_ack_token(KEY, token, now=now + timedelta(hours=2))
    for bad in ("", "v1.7", "v2.7.1.x", "v1.-7.1.x", "v1.7.1.x.y"):
        with pytest.raises(NotificationError, match="malformed"):
            verify_ack_token(KEY, bad, now=now)


def test_short_or_missing_signing_key_is_a_config_error(node_factory: Callable[..., Node], tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_text("tooshort")
    with pytest.raises(ConfigError, match="at least 32"):
        node_factory([], alerts={"signing_key_file": str(short)})
    with pytest.raises(ConfigError, match="does not exist"):
        node_factory([], alerts={"signing_key_file": str(tmp_path / "missing.key")})


def test_redirect_is_not_followed(node_factory: Callable[..., Node]) -> None:
    with http_receiver(codes=[302]) as hook:
        node = node_factory([webhook("pe-team", hook.url)])
        flag_study(node.session_factory, node.settings, STUDY, Flag.CRITICAL)
        report = node.notifier.run_once()
    assert len(report.failed) == 1
    (n,) = node.notifications()
    assert "redirected to http://127.0.0.1:9/elsewhere" in n.last_error


def test_serve_scheduler_runs_the_notifier(node_factory: Callable[..., Node], tmp_path: Path) -> None:
    from pacs_agent.node.scheduler import build_scheduler

    with http_receiver() as hook:
        node = node_factory([webhook("pe-team", hook.url)], alerts={"poll_seconds": 0.2})
        flag_study(node.session_factory, node.settings, STUDY, Flag.CRITICAL)
        scheduler = build_scheduler(node.settings, node.session_factory, owner="test:1/dispatch", tracker=False, dispatcher=False)
        assert scheduler.get_job("notify") is not None
        scheduler.start()
        try:
            deadline = utcnow() + timedelta(seconds=20)
            while not hook.requests and utcnow() < deadline:
                time.sleep(0.1)
        finally:
            scheduler.shutdown()
    assert [r["json"]["flag"] for r in hook.requests] == ["CRITICAL"]
    (n,) = node.notifications()
    assert n.status == NotificationStatus.SENT


def test_serve_refuses_to_start_with_a_missing_signing_key(settings_factory: Callable[..., Any], tmp_path: Path) -> None:
    from pacs_agent.node.scheduler import build_scheduler

    settings = settings_factory(notifications=[webhook("pe-team", "http://127.0.0.1:9/")],
                                alerts={"signing_key_file": str(tmp_path / "nope.key")})
    with pytest.raises(ConfigError, match="signing_key_file .* does not exist"):
        build_scheduler(settings, None, owner="test:1/dispatch")  # type: ignore[arg-type]
    scheduler_without_targets = build_scheduler(settings_factory(), None, owner="t/dispatch", tracker=False, dispatcher=False)  # type: ignore[arg-type]
    assert scheduler_without_targets.get_job("notify") is None


@pytest.mark.postgres
def test_two_notifiers_on_postgresql_send_each_alert_once(node_factory: Callable[..., Node], postgres_url: str) -> None:
    """Two serve processes sharing PostgreSQL: raising is idempotent (dedup_key) and claiming skips locked rows."""
    with http_receiver() as hook:
        node = node_factory([webhook("pe-team", hook.url)], database={"url": postgres_url})
        for n in range(4):
            flag_study(node.session_factory, node.settings, f"1.2.{n}", Flag.CRITICAL)
        other = Notifier(node.settings, node.session_factory, owner="other:2/notify")
        with ThreadPoolExecutor(2) as pool:
            reports = list(pool.map(lambda notifier: notifier.run_once(), [node.notifier, other]))
        leftover = node.notifier.run_once()
    raised = sorted(i for r in [*reports, leftover] for i in r.raised)
    sent = sorted(i for r in [*reports, leftover] for i in r.sent)
    assert len(raised) == 4 and sent == raised
    assert sorted(r["json"]["study_instance_uid"] for r in hook.requests) == [f"1.2.{n}" for n in range(4)]
    with transaction(node.session_factory) as session:
        assert acknowledge(session, "1.2.0", "Dr Who", "cli").acknowledged_ids


def test_retention_deletes_finished_notifications_with_the_events(node_factory: Callable[..., Node], free_port: Callable[[], int]) -> None:
    from pacs_agent.node.scheduler import run_retention

    with http_receiver() as hook:
        node = node_factory([webhook("pe-team", hook.url), webhook("down", f"http://127.0.0.1:{free_port()}/", timeout_seconds=2)])
        flag_study(node.session_factory, node.settings, STUDY, Flag.CRITICAL)
        node.notifier.run_once()
    sent, pending = node.notifications()
    assert sent.status == NotificationStatus.SENT and pending.status == NotificationStatus.PENDING
    report = run_retention(node.session_factory, node.settings, now=utcnow() + timedelta(days=node.settings.retention.events_days + 1))
    assert report.notifications_deleted == 1
    assert [n.id for n in node.notifications()] == [pending.id], "a notification still being sent is kept"
    with node.session_factory() as session:
        assert [a.notification_id for a in session.scalars(select(NotificationAttempt))] == [pending.id]
