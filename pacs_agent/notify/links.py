"""Links in alert messages: the dashboard's study page, and a signed acknowledgement link.

An acknowledgement link is ``{http.public_url}/ack/{token}``; the token names one notification and
an expiry time and is signed with HMAC-SHA256 under the key in ``alerts.signing_key_file``, so it
cannot be forged or extended. Opening it shows a confirmation page (mail scanners open links; only
the POST from that page acknowledges), served by the dashboard with `acknowledge_by_link`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import quote

from pacs_agent.errors import ConfigError, NotificationError

#: Shortest signing key accepted (bytes): as long as the HMAC-SHA256 output.
MIN_KEY_BYTES = 32
_VERSION = "v1"


def load_signing_key(path: str) -> bytes:
    """The key in ``path`` (surrounding whitespace removed); ConfigError when missing or too short."""
    try:
        key = Path(path).read_bytes().strip()
    except FileNotFoundError:
        raise ConfigError(f"alerts.signing_key_file {path} does not exist (create it: head -c 32 /dev/urandom | base64 > {path})") from None
    except OSError as exc:
        raise ConfigError(f"alerts.signing_key_file {path} cannot be read: {exc.strerror}") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"alerts.signing_key_file {path} holds {len(key)} bytes; at least {MIN_KEY_BYTES} are needed")
    return key


def _signature(key: bytes, notification_id: int, expires: int) -> str:
    mac = hmac.new(key, f"ack|{notification_id}|{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def sign_ack_token(key: bytes, notification_id: int, expires_at: datetime) -> str:
    """A URL-safe token that acknowledges ``notification_id`` until ``expires_at``."""
    expires = int(expires_at.timestamp())
    return f"{_VERSION}.{notification_id}.{expires}.{_signature(key, notification_id, expires)}"


def verify_ack_token(key: bytes, token: str, *, now: datetime) -> int:
    """The notification id a valid token names; NotificationError when forged, malformed or expired."""
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != _VERSION or not parts[1].isdigit() or not parts[2].isdigit():
        raise NotificationError("this acknowledgement link is malformed")
    notification_id, expires = int(parts[1]), int(parts[2])
    if not hmac.compare_digest(parts[3], _signature(key, notification_id, expires)):
        raise NotificationError("this acknowledgement link is not valid (wrong signature)")
    if now.timestamp() > expires:
        raise NotificationError("this acknowledgement link has expired; acknowledge on the dashboard or with `pe-agent ack`")
    return notification_id


def study_url(public_url: str, study_instance_uid: str) -> str:
    """The dashboard's page of a study ("" when http.public_url is not set)."""
    if not public_url:
        return ""
    return f"{public_url.rstrip('/')}/studies/{quote(study_instance_uid, safe='')}"


def ack_url(public_url: str, key: bytes | None, notification_id: int, *, now: datetime, valid_hours: float) -> str:
    """The signed acknowledgement link ("" without http.public_url or a signing key)."""
    if not public_url or key is None:
        return ""
    token = sign_ack_token(key, notification_id, now + timedelta(hours=valid_hours))
    return f"{public_url.rstrip('/')}/ack/{token}"
