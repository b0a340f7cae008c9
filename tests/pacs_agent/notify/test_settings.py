"""[[notifications]] and [alerts]: what each kind needs, escalation names, case-insensitive enums,
the environment override, and webhook URLs (credentials in themselves) kept out of the start-up log."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pacs_agent.errors import ConfigError
from pacs_agent.settings import load_settings


def load(notifications: list[dict[str, Any]], **more: Any) -> Any:
    return load_settings(None, environ={}, overrides={"notifications": notifications, **more})


WEBHOOK = {"name": "teams", "kind": "webhook", "url": "https://example.webhook.office.com/webhookb2/SECRET"}


@pytest.mark.parametrize(("entry", "message"), [
    ({"name": "x", "kind": "pager"}, "kind: 'pager' is not one of webhook, email, hl7"),
    ({"name": "x", "kind": "webhook"}, "a webhook needs an http"),
    ({"name": "x", "kind": "webhook", "url": "ftp://a"}, "a webhook needs an http"),
    ({**WEBHOOK, "template": "discord"}, "template: 'discord'"),
    ({"name": "x", "kind": "email", "smtp_host": "mail"}, "needs smtp_host, from_address and to"),
    ({"name": "x", "kind": "email", "smtp_host": "m", "from_address": "a@b", "to": ["c@d"], "smtp_security": "ssl"}, "smtp_security"),
    ({"name": "x", "kind": "hl7"}, "needs host and port"),
    ({"name": "x", "kind": "hl7", "host": "ris", "escalate_to": "teams"}, "do not escalate"),
    ({**WEBHOOK, "flags": ["URGENT"]}, "'URGENT' is not a worklist flag"),
    ({**WEBHOOK, "name": "a b"}, "must be 1-64 letters"),
    ({**WEBHOOK, "escalate_to": "nobody"}, "no [[notifications]] entry named 'nobody'"),
    ({**WEBHOOK, "escalate_to": "teams"}, "must name another webhook or email entry"),
    ({**WEBHOOK, "colour": "red"}, "unknown key(s) colour"),
])
def test_invalid_entries_are_refused_with_the_reason(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load([entry])
    assert message in str(info.value)


def test_duplicate_names_and_bad_public_url() -> None:
    with pytest.raises(ConfigError, match="duplicate name 'teams'"):
        load([WEBHOOK, WEBHOOK])
    with pytest.raises(ConfigError, match="http.public_url"):
        load([], http={"public_url": "pe-agent.local"})


def test_enums_are_case_insensitive_and_flags_default_by_kind() -> None:
    settings = load([
        {**WEBHOOK, "kind": "WebHook", "template": "TEAMS", "flags": ["critical"], "escalate_to": "mail"},
        {"name": "mail", "kind": "EMAIL", "smtp_host": "m", "from_address": "a@b", "to": ["c@d"], "smtp_security": "StartTLS"},
        {"name": "ris", "kind": "HL7", "host": "ris", "processing_id": "t"},
    ])
    teams, mail, ris = settings.notifications
    assert (teams.kind, teams.template, teams.effective_flags) == ("webhook", "teams", ("CRITICAL",))
    assert (mail.kind, mail.smtp_security, mail.effective_flags) == ("email", "starttls", ("CRITICAL", "HIGH"))
    assert ris.effective_flags == ("CRITICAL", "HIGH", "REVIEW", "ROUTINE", "ERROR") and ris.processing_id == "T"


def test_environment_list_and_redacted_url() -> None:
    settings = load_settings(None, environ={"PE_AGENT__NOTIFICATIONS": json.dumps([WEBHOOK])})
    assert settings.notifications[0].url.endswith("SECRET")
    redacted = settings.redacted()["notifications"][0]["url"]
    assert redacted == "https://example.webhook.office.com/***" and "SECRET" not in json.dumps(settings.redacted())
    with pytest.raises(ConfigError, match="JSON list of notifications"):
        load_settings(None, environ={"PE_AGENT__NOTIFICATIONS": "[{"})
