"""notify.admin: the notification listing shape and test messages that name no patient or study."""

from __future__ import annotations

from collections.abc import Callable

from pacs_agent.db.models import Flag, NotificationStatus
from pacs_agent.notify.admin import TEST_STUDY_INSTANCE_UID, list_notifications, send_test
from tests.support.flagged_studies import STUDY, flag_study
from tests.support.notify_node import Node
from tests.support.notify_servers import http_receiver, mllp_listener


def test_send_test_reaches_webhook_and_hl7_without_storing_anything(node_factory: Callable[..., Node]) -> None:
    with http_receiver() as hook, mllp_listener(codes=["AR"]) as ris:
        node = node_factory([{"name": "hook", "kind": "webhook", "url": hook.url},
                             {"name": "ris", "kind": "hl7", "host": ris.host, "port": ris.port}])
        webhook_outcome = send_test(node.settings.notifications[0], node.settings)
        hl7_outcome = send_test(node.settings.notifications[1], node.settings)
    assert webhook_outcome.ok and webhook_outcome.detail == "HTTP 200"
    body = hook.requests[0]["json"]
    assert body["study_instance_uid"] == TEST_STUDY_INSTANCE_UID and "TEST MESSAGE" in body["summary"] and body["not_for_clinical_use"]
    # a production RIS refuses a training message: the answer still proves the link
    assert not hl7_outcome.ok and hl7_outcome.detail.startswith("HL7 ACK AR")
    (message,) = ris.messages
    assert str(message.segment("MSH")[11]) == "T" and str(message.segment("PID")[3]).startswith("PEAGENT-TEST")
    assert node.notifications() == []


def test_listing_shape_and_filters(node_factory: Callable[..., Node]) -> None:
    with http_receiver(codes=[500]) as hook:
        node = node_factory([{"name": "hook", "kind": "webhook", "url": hook.url}])
        flag_study(node.session_factory, node.settings, STUDY, Flag.CRITICAL)
        flag_study(node.session_factory, node.settings, "1.2.3", Flag.HIGH, p=0.7)
        node.notifier.run_once()
    with node.session_factory() as session:
        everything = list_notifications(session, attempts=True)
        pending = list_notifications(session, statuses=(NotificationStatus.PENDING,))
        one_study = list_notifications(session, study_instance_uid=STUDY)
    assert [n["study_instance_uid"] for n in everything] == ["1.2.3", STUDY]  # newest first
    assert [n["study_instance_uid"] for n in pending] == [STUDY] and pending[0]["last_error"].startswith("HTTP 500") and pending[0]["next_attempt_at"]
    assert [n["flag"] for n in one_study] == ["CRITICAL"] and one_study[0]["acknowledged"] is None
    # the CRITICAL study is raised (and sent) first: it met the 500, the HIGH one the 200 after it
    assert everything[1]["attempt_log"][0]["status_code"] == 500 and everything[0]["status"] == "SENT"
    assert set(everything[0]) == {
        "id", "study_instance_uid", "series_instance_uid", "job_id", "flag", "target", "kind", "escalation_level",
        "escalated_from_id", "status", "attempts", "next_attempt_at", "last_error", "created_at", "sent_at", "escalated_at",
        "acknowledged", "attempt_log",
    }
