"""The channel protocol: one way to reach one [[notifications]] target, never raising on a send."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pacs_agent.notify.message import AlertMessage
from pacs_agent.settings import NotificationTarget


@dataclass(frozen=True)
class SendOutcome:
    """What the receiver answered: ``ok``, its code (HTTP/SMTP status; None: no answer), in words."""

    ok: bool
    status_code: int | None
    detail: str
    #: Transient (connection refused, timeout, 5xx, SMTP 4xx, HL7 AR) vs permanent (4xx, SMTP 5xx, HL7 AE).
    retryable: bool


class Channel(Protocol):
    target: NotificationTarget

    def send(self, message: AlertMessage) -> SendOutcome: ...


def build_channel(target: NotificationTarget) -> Channel:
    """The channel of ``target`` by its kind ("webhook", "email", "hl7")."""
    if target.kind == "webhook":
        from pacs_agent.notify.webhook import WebhookChannel

        return WebhookChannel(target)
    if target.kind == "email":
        from pacs_agent.notify.email import EmailChannel

        return EmailChannel(target)
    from pacs_agent.notify.hl7 import HL7Channel

    return HL7Channel(target)
