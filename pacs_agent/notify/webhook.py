"""Webhook alerts: an HTTP POST of JSON, in our own schema or as a Microsoft Teams or Slack message.

- "json": the AlertMessage as documented in docs/NOTIFICATIONS.md (schema pe-agent.alert/1);
- "teams": an Adaptive Card in the message envelope that Teams workflows ("When a Teams webhook
  request is received") and incoming webhooks accept;
- "slack": Block Kit with a plain ``text`` fallback, for Slack incoming webhooks.
With ``secret_file`` each request carries ``X-PE-Agent-Signature: sha256=<hex HMAC of the body>``.
Redirects are not followed: a POST silently turned into a GET would lose the alert.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pacs_agent.db.models import Flag
from pacs_agent.notify.channels import SendOutcome
from pacs_agent.notify.message import AlertMessage
from pacs_agent.settings import NotificationTarget

USER_AGENT = "pe-agent-notify/1"
_COLOURS = {Flag.CRITICAL: "attention", Flag.HIGH: "warning"}


def teams_payload(message: AlertMessage) -> dict[str, Any]:
    """An Adaptive Card 1.4 inside the "message" envelope."""
    body: list[dict[str, Any]] = [
        {"type": "TextBlock", "size": "Large", "weight": "Bolder", "wrap": True, "text": message.title,
         "color": _COLOURS.get(message.flag, "default")},
        {"type": "TextBlock", "wrap": True, "text": "\n\n".join(message.text_lines()[:-1])},
        {"type": "TextBlock", "wrap": True, "isSubtle": True, "size": "Small", "text": message.disclaimer},
    ]
    actions = [
        {"type": "Action.OpenUrl", "title": title, "url": url}
        for title, url in (("Open study", message.dashboard_url), ("Acknowledge", message.acknowledge_url)) if url
    ]
    card: dict[str, Any] = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": body,
    }
    if actions:
        card["actions"] = actions
    return {
        "type": "message",
        "summary": message.title,
        "attachments": [{"contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": None, "content": card}],
    }


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_payload(message: AlertMessage) -> dict[str, Any]:
    """Block Kit blocks, with ``text`` as the notification fallback."""
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": message.title[:150]}},
        {"type": "section", "text": {"type": "mrkdwn", "text": _slack_escape("\n".join(message.text_lines()[:-1]))[:3000]}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": _slack_escape(message.disclaimer)[:3000]}]},
    ]
    buttons = [
        {"type": "button", "text": {"type": "plain_text", "text": title}, "url": url}
        for title, url in (("Open study", message.dashboard_url), ("Acknowledge", message.acknowledge_url)) if url
    ]
    if buttons:
        blocks.append({"type": "actions", "elements": buttons})
    return {"text": _slack_escape(f"{message.title}: {message.summary}"), "blocks": blocks}


def payload(template: str, message: AlertMessage) -> dict[str, Any]:
    if template == "teams":
        return teams_payload(message)
    if template == "slack":
        return slack_payload(message)
    return message.to_json_dict()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None


class WebhookChannel:
    def __init__(self, target: NotificationTarget) -> None:
        self.target = target

    def send(self, message: AlertMessage) -> SendOutcome:
        try:
            context = ssl.create_default_context(cafile=self.target.ca_file or None)
        except (OSError, ssl.SSLError) as exc:
            return SendOutcome(False, None, f"ca_file {self.target.ca_file} cannot be used: {exc}", retryable=False)
        opener = urllib.request.build_opener(_NoRedirect(), urllib.request.HTTPSHandler(context=context))
        body = json.dumps(payload(self.target.template, message), separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json; charset=utf-8", "User-Agent": USER_AGENT,
                   "X-PE-Agent-Notification": str(message.notification_id)}
        if self.target.secret_file:
            try:
                secret = Path(self.target.secret_file).read_bytes().strip()
            except OSError as exc:
                return SendOutcome(False, None, f"secret_file {self.target.secret_file} cannot be read: {exc.strerror}", retryable=False)
            headers["X-PE-Agent-Signature"] = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        request = urllib.request.Request(self.target.url, data=body, headers=headers, method="POST")
        try:
            with opener.open(request, timeout=self.target.timeout_seconds) as response:
                code = int(response.status)
                return SendOutcome(True, code, f"HTTP {code}", retryable=False)
        except urllib.error.HTTPError as exc:
            code = int(exc.code)
            reason = f"HTTP {code} {exc.reason}"
            if 300 <= code < 400:
                location = exc.headers.get("Location", "") if exc.headers else ""
                return SendOutcome(False, code, f"{reason}: redirected to {location or '?'}; configure the final URL", retryable=False)
            return SendOutcome(False, code, reason, retryable=code in (408, 425, 429) or code >= 500)
        except urllib.error.URLError as exc:
            permanent = isinstance(exc.reason, ssl.SSLCertVerificationError)
            return SendOutcome(False, None, f"cannot reach the webhook: {exc.reason}", retryable=not permanent)
        except (TimeoutError, OSError) as exc:
            return SendOutcome(False, None, f"webhook request failed: {type(exc).__name__}: {exc}", retryable=True)
