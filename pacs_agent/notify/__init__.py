"""Critical-result notifications: alerts (webhook, e-mail) with acknowledgement and escalation, and
HL7 v2 ORU^R01 results over MLLP. Configured as [[notifications]] entries and [alerts]."""

from __future__ import annotations

from pacs_agent.notify.ack import AckResult, acknowledge, acknowledge_by_link, notification_for_link
from pacs_agent.notify.outbox import Notifier, RoundReport, retry_notifications

__all__ = [
    "AckResult",
    "Notifier",
    "RoundReport",
    "acknowledge",
    "acknowledge_by_link",
    "notification_for_link",
    "retry_notifications",
]
