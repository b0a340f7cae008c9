"""Configuration: defaults < TOML file < environment (PE_AGENT__SECTION__KEY) < CLI overrides.

Validated once at start and passed explicitly; nothing here is a module global.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pacs_agent.errors import ConfigError

ENV_PREFIX = "PE_AGENT__"
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash, max 16


@dataclass(frozen=True)
class TLSSettings:
    enabled: bool = False
    certificate: str = ""
    private_key: str = ""
    #: CA bundle used to verify peers' certificates (client certificates on the SCP side).
    ca_certificate: str = ""
    require_client_certificate: bool = True


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str = "PE_AGENT"
    host: str = "127.0.0.1"
    port: int = 11112
    #: Empty list: any calling AE is accepted. Otherwise unknown callers are rejected.
    allowed_calling_ae_titles: tuple[str, ...] = ()
    max_associations: int = 10
    #: Processes that receive. serve accepts each connection and hands it to the least busy receiver
    #: process, so concurrent senders use several cores (docs/BENCHMARKS.md); max_associations counts
    #: across all of them. 1: the receiver runs inside the serve process (least memory).
    receiver_processes: int = 2
    #: Below this much free space in the spool, C-STORE answers 0xA700.
    min_free_disk_mb: int = 512
    #: Network timeouts (seconds).
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    #: Longest PDU the node accepts and announces (0: none announced; the node still reads at most 64 MiB
    #: per P-DATA-TF). A peer that declares a longer PDU is aborted before its body is read.
    maximum_pdu_size: int = 0
    #: An incoming association that sends nothing for this long is aborted, and a connection that has not
    #: sent its A-ASSOCIATE-RQ by then is closed: silent peers must not hold association slots.
    idle_association_seconds: float = 15.0
    #: At most this many associations at once from one calling AE title (0: only max_associations applies).
    max_associations_per_calling_ae: int = 8
    #: Called AE titles the node answers to besides ae_title; any other is rejected (called AE title not
    #: recognized).
    ae_title_aliases: tuple[str, ...] = ()
    #: Largest dataset one C-STORE may carry, as received and once inflated (Deflated transfer syntax);
    #: a larger one is answered 0xA700 and nothing of it is kept.
    max_instance_bytes: int = 2 * 1024**3
    tls: TLSSettings = field(default_factory=TLSSettings)
    #: pynetdicom adapter (pacs_agent.dicom.pynetdicom_patches): event-driven reactors and capped polls for
    #: faster ingest. false: stock pynetdicom. They also turn themselves off, with one warning, when the
    #: installed pynetdicom lacks a private name they use.
    pynetdicom_patches: bool = True


@dataclass(frozen=True)
class StorageSettings:
    #: Spool root: incoming/, outbox/, tmp/ live below it. Can be a shared mount for scale-out.
    root: str = "./var/spool"
    #: fsync each received instance before it is acknowledged (survives power loss, costs ingest speed;
    #: without it an acknowledged instance survives a crash of the node but not of the machine).
    fsync: bool = False


@dataclass(frozen=True)
class DatabaseSettings:
    #: SQLAlchemy URL. SQLite (WAL) by default; postgresql+psycopg://... for several workers.
    url: str = "sqlite:///./var/pe_agent.sqlite"


@dataclass(frozen=True)
class SelectionSettings:
    """The default CTPA rule. A series must pass every enabled check to be analysed."""

    modalities: tuple[str, ...] = ("CT",)
    min_slices: int = 40
    max_slice_thickness_mm: float = 3.0
    #: Regular expression (case-insensitive) on SeriesDescription, StudyDescription and ProtocolName.
    description_pattern: str = r"CTPA|\bPE\b|angio|pulm|embol"
    #: Contrast agent present (ContrastBolusAgent/ContrastBolusRoute) or description matches.
    require_contrast_or_description: bool = True
    #: Allowed BodyPartExamined values (upper case); "" stands for unspecified.
    body_parts: tuple[str, ...] = ("", "CHEST", "THORAX", "LUNG", "CHEST_ABDOMEN", "CHESTABDOMEN", "CHEST_ABDOMEN_PELVIS", "TORSO", "HEART")


@dataclass(frozen=True)
class PriorityRule:
    """Input priority for matching series (higher runs first)."""

    priority: int
    calling_ae_title: str = ""
    description_pattern: str = ""


@dataclass(frozen=True)
class SeriesSettings:
    quiet_seconds: float = 5.0
    selection: SelectionSettings = field(default_factory=SelectionSettings)
    priority_rules: tuple[PriorityRule, ...] = ()
    default_priority: int = 0


#: Values of model.precision (pe_model.predictor.PRECISIONS; not imported so settings load without torch).
MODEL_PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class ModelSettings:
    #: Path to a checkpoint file, or ``builtin:demo``.
    checkpoint: str = "builtin:demo"
    #: If set, a checkpoint whose sha256 differs is refused.
    checkpoint_sha256: str = ""
    #: "cpu", "cuda", "cuda:N" or "auto" (CUDA when available).
    device: str = "cpu"
    #: Below this distance from 0.5 a decision is flagged REVIEW (low confidence).
    review_margin: float = 0.1
    torch_threads: int = 0
    #: Inference precision: "auto" (pe_model.precision: bf16 on CUDA and native-bf16 CPUs after a
    #: self-check, else fp32), "fp32" or
    #: "bf16" (also on CPUs with native bf16, about 2x faster there).
    precision: str = "auto"


@dataclass(frozen=True)
class WorkerSettings:
    #: Worker processes started by `pe-agent serve`.
    count: int = 1
    lease_seconds: float = 120.0
    heartbeat_seconds: float = 10.0
    max_attempts: int = 3
    backoff_initial_seconds: float = 10.0
    backoff_max_seconds: float = 600.0
    poll_seconds: float = 0.5


#: Values of destinations[].kind: how objects reach a destination (pacs_agent.delivery.target.build_target).
DESTINATION_KINDS: tuple[str, ...] = ("dimse", "stow-rs")
#: Values of destinations[].auth (STOW-RS): no credentials, a bearer token, or HTTP basic auth.
DESTINATION_AUTH_KINDS: tuple[str, ...] = ("none", "bearer", "basic")


@dataclass(frozen=True)
class DestinationSettings:
    name: str
    #: DIMSE: the PACS's AE title, host and port (unused for STOW-RS).
    ae_title: str = ""
    host: str = ""
    port: int = 0
    #: DIMSE: DICOM TLS with node.tls's certificate and CA.
    tls: bool = False
    #: Transport: "dimse" (C-STORE SCU; C-ECHO to test) or "stow-rs" (DICOMweb; QIDO-RS to test).
    kind: str = "dimse"
    #: STOW-RS: the DICOMweb service root; objects are POSTed to {url}/studies.
    url: str = ""
    #: STOW-RS credentials: "none", "bearer" (token_file or token_env) or "basic" (username and
    #: password_file or password_env). Secrets never sit in this file.
    auth: str = "none"
    token_file: str = ""
    token_env: str = ""
    username: str = ""
    password_file: str = ""
    password_env: str = ""
    #: STOW-RS over https: verify the server certificate (against ca_certificate, else the system store).
    tls_verify: bool = True
    ca_certificate: str = ""
    timeout_seconds: float = 60.0


#: The name this class had before the delivery package; kept so configurations in code keep working.
Destination = DestinationSettings


#: ``outputs.secondary_capture``: Grad-CAM SCs for positive and REVIEW results only, for all, or none.
SECONDARY_CAPTURE_POLICIES = ("positive", "always", "never")
#: ``outputs.rejection_reason``: IOCM title of the rejection note of a superseded result.
REJECTION_REASONS = ("quality", "patient-safety")


@dataclass(frozen=True)
class OutputSettings:
    structured_report: bool = True
    #: "positive" (CRITICAL, HIGH or REVIEW results), "always" or "never"; true/false mean always/never.
    secondary_capture: str = "positive"
    #: Key Object Selection ("key images") listing the key CT slices and the SCs.
    key_images: bool = True
    #: A re-analysis sends an IHE IOCM rejection note for every object of the result it supersedes.
    retract_superseded: bool = True
    rejection_reason: str = "quality"
    #: FRACTIONAL segmentation of the Grad-CAM heatmap.
    segmentation: bool = False
    #: Number of top chunks whose key slice gets a Grad-CAM secondary capture.
    key_slices: int = 3
    manufacturer: str = "PE Triage Project"
    institution_name: str = ""


@dataclass(frozen=True)
class DispatchSettings:
    max_attempts: int = 10
    backoff_initial_seconds: float = 5.0
    backoff_max_seconds: float = 300.0
    calling_ae_title: str = ""
    poll_seconds: float = 1.0


@dataclass(frozen=True)
class RetentionSettings:
    #: Delete received instances of finished series after this many days (0 keeps them).
    incoming_days: float = 7.0
    outbox_days: float = 7.0
    events_days: float = 90.0


@dataclass(frozen=True)
class LogSettings:
    #: "json" or "console" ("auto": console on a terminal, JSON otherwise).
    format: str = "auto"
    level: str = "INFO"


@dataclass(frozen=True)
class HTTPSettings:
    """The web dashboard, JSON API, /healthz and /metrics (pacs_agent.node.web)."""

    enabled: bool = False
    #: Loopback by default: only this machine reaches the dashboard until an administrator opens it.
    host: str = "127.0.0.1"
    port: int = 8080
    #: Admin actions (reprocess, retry, cancel, acknowledge) need one of these; without either they are refused.
    #: Lines ``user:$argon2id$...`` (hash with ``python -m pacs_agent.node.web.auth hash-password``).
    admin_password_file: str = ""
    #: Lines ``user:TOKEN`` (or one bare token, user "token"), sent as ``Authorization: Bearer TOKEN``.
    admin_token_file: str = ""
    #: Show patient name, ID and accession number (read from the received images); hidden by default.
    show_patient_identifiers: bool = False
    #: Serve HTTPS with this certificate chain and key (PEM); both or neither.
    tls_certificate: str = ""
    tls_private_key: str = ""
    #: Seconds between automatic reloads of the worklist and queue pages (0: never).
    refresh_seconds: int = 30
    #: The dashboard's address as people reach it (e.g. "https://pe-agent.hospital.org"); alert
    #: messages link to it. Empty: messages carry no links.
    public_url: str = ""


#: Kinds of [[notifications]] entries (pacs_agent/notify/channels.py).
NOTIFICATION_KINDS: tuple[str, ...] = ("webhook", "email", "hl7")
#: Kinds that alert a person: acknowledged and escalated. hl7 sends results to a RIS/EHR.
ALERT_KINDS: tuple[str, ...] = ("webhook", "email")
WEBHOOK_TEMPLATES: tuple[str, ...] = ("json", "teams", "slack")
SMTP_SECURITY: tuple[str, ...] = ("starttls", "tls", "none")


@dataclass(frozen=True)
class NotificationTarget:
    """One [[notifications]] entry: who hears of a flagged study, and how."""

    name: str
    #: "webhook" (HTTP POST), "email" (SMTP) or "hl7" (ORU^R01 over MLLP to a RIS/EHR).
    kind: str
    #: Study flags that notify this target. Empty: reached only by escalation from another entry.
    #: Unset: CRITICAL and HIGH for webhook/email; every flag for hl7.
    flags: tuple[str, ...] | None = None
    #: Another entry notified when an alert stays unacknowledged for escalate_after_minutes
    #: (or fails for good); empty: no escalation.
    escalate_to: str = ""
    escalate_after_minutes: float = 15.0
    #: Put accession number, patient name and patient ID in the message (read from the received
    #: images). Off by default: the message carries the flag, the finding, the Study Instance UID and
    #: links. hl7 always carries them (a result must be filed against the patient).
    include_patient_identifiers: bool = False
    timeout_seconds: float = 10.0
    # -- webhook
    url: str = ""
    #: "json" (documented in docs/NOTIFICATIONS.md), "teams" (Adaptive Card) or "slack" (Block Kit).
    template: str = "json"
    #: A file with a secret: each request carries X-PE-Agent-Signature: sha256=HMAC(secret, body).
    secret_file: str = ""
    # -- email
    smtp_host: str = ""
    smtp_port: int = 587
    #: "starttls" (port 587), "tls" (implicit TLS, port 465) or "none" (a local relay only).
    smtp_security: str = "starttls"
    smtp_username: str = ""
    #: The password: from a file, or from the environment variable named here.
    smtp_password_file: str = ""
    smtp_password_env: str = ""
    #: CA bundle that verifies the SMTP server's certificate (system CAs when empty).
    ca_file: str = ""
    from_address: str = ""
    to: tuple[str, ...] = ()
    # -- hl7
    host: str = ""
    port: int = 2575
    sending_application: str = "PE_AGENT"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    #: MSH-11: "P" production, "T" training, "D" debugging.
    processing_id: str = "P"

    @property
    def alerts_a_person(self) -> bool:
        return self.kind in ALERT_KINDS

    @property
    def effective_flags(self) -> tuple[str, ...]:
        if self.flags is not None:
            return self.flags
        return ("CRITICAL", "HIGH") if self.alerts_a_person else ("CRITICAL", "HIGH", "REVIEW", "ROUTINE", "ERROR")


@dataclass(frozen=True)
class AlertSettings:
    """How notifications are sent, retried and acknowledged."""

    #: A file holding the key (at least 32 bytes) that signs acknowledgement links. Empty: messages
    #: carry no acknowledgement link (acknowledge with `pe-agent ack` or the dashboard).
    signing_key_file: str = ""
    #: How long an acknowledgement link stays valid.
    link_valid_hours: float = 72.0
    max_attempts: int = 8
    backoff_initial_seconds: float = 10.0
    backoff_max_seconds: float = 600.0
    poll_seconds: float = 2.0
    #: Studies flagged longer ago than this are not alerted (no flood of old studies when a target
    #: is added or the node comes back after a long outage).
    lookback_hours: float = 24.0


@dataclass(frozen=True)
class Settings:
    node: NodeSettings = field(default_factory=NodeSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    series: SeriesSettings = field(default_factory=SeriesSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    workers: WorkerSettings = field(default_factory=WorkerSettings)
    destinations: tuple[DestinationSettings, ...] = ()
    outputs: OutputSettings = field(default_factory=OutputSettings)
    dispatch: DispatchSettings = field(default_factory=DispatchSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    log: LogSettings = field(default_factory=LogSettings)
    http: HTTPSettings = field(default_factory=HTTPSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    notifications: tuple[NotificationTarget, ...] = ()

    @property
    def spool_root(self) -> Path:
        return Path(self.storage.root)

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with secrets removed, for the start-up log line."""
        data = dataclasses.asdict(self)
        url = data["database"]["url"]
        data["database"]["url"] = re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)
        data["node"]["tls"]["private_key"] = "***" if data["node"]["tls"]["private_key"] else ""
        for target in data["notifications"]:
            # a Teams/Slack webhook URL is itself the credential: keep only scheme and host
            target["url"] = re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://[^/?#]*).*$", r"\1/***", target["url"]) if target["url"] else ""
        return data


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Build a value of annotation ``tp`` from TOML/env data, with one-line errors."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return _build(tp, value, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            # "A,B" or a JSON list, from an environment variable
            value = json.loads(value) if value.startswith("[") else [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(members[0], value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported setting type {tp!r}")


def _build(cls: Any, data: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {', '.join(unknown)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from None


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """PE_AGENT__NODE__PORT=11113 -> {"node": {"port": "11113"}}; keys are case-insensitive."""
    out: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
        if not path:
            continue
        if path in (["destinations"], ["notifications"]):
            try:
                out[path[0]] = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{name}: expected a JSON list of {path[0]} ({exc.msg})") from None
            continue
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _validate_stow_rs(d: DestinationSettings) -> None:
    """A STOW-RS destination: an http(s) URL and complete credentials (where the secret is, not the secret)."""
    where = f"destinations.{d.name}"
    if not re.match(r"^https?://[^/\s]+", d.url):
        raise ConfigError(f"{where}.url: {d.url!r} is not an http:// or https:// URL of a DICOMweb service")
    if d.auth not in DESTINATION_AUTH_KINDS:
        raise ConfigError(f"{where}.auth: {d.auth!r} is not one of {', '.join(DESTINATION_AUTH_KINDS)}")
    if d.auth == "bearer" and not (d.token_file or d.token_env):
        raise ConfigError(f"{where}: auth = \"bearer\" needs token_file or token_env")
    if d.auth == "basic" and not (d.username and (d.password_file or d.password_env)):
        raise ConfigError(f"{where}: auth = \"basic\" needs username and password_file or password_env")
    if d.timeout_seconds <= 0:
        raise ConfigError(f"{where}.timeout_seconds: must be greater than 0")


def _validate(settings: Settings) -> None:
    n = settings.node
    if not _AE_RE.match(n.ae_title) or n.ae_title.strip() != n.ae_title:
        raise ConfigError(f"node.ae_title: {n.ae_title!r} is not a valid AE title (1-16 characters, no backslash, no leading/trailing spaces)")
    for ae in n.allowed_calling_ae_titles:
        if not _AE_RE.match(ae):
            raise ConfigError(f"node.allowed_calling_ae_titles: {ae!r} is not a valid AE title")
    for ae in n.ae_title_aliases:
        if not _AE_RE.match(ae) or ae.strip() != ae:
            raise ConfigError(f"node.ae_title_aliases: {ae!r} is not a valid AE title")
    if not n.idle_association_seconds > 0:
        raise ConfigError("node.idle_association_seconds: must be greater than 0")
    if n.max_associations_per_calling_ae < 0:
        raise ConfigError("node.max_associations_per_calling_ae: must be 0 (no limit of its own) or more")
    if n.max_instance_bytes < 1024 * 1024:
        raise ConfigError("node.max_instance_bytes: must be at least 1048576 (1 MiB)")
    if n.maximum_pdu_size < 0:
        raise ConfigError("node.maximum_pdu_size: must be 0 (unlimited) or more")
    for label, port in [("node.port", n.port), ("http.port", settings.http.port)]:
        if not 0 <= port <= 65535:
            raise ConfigError(f"{label}: {port} is not a TCP port")
    if n.max_associations < 1:
        raise ConfigError("node.max_associations: must be at least 1")
    if not 1 <= n.receiver_processes <= 64:
        raise ConfigError("node.receiver_processes: must be between 1 and 64")
    if n.tls.enabled and not (n.tls.certificate and n.tls.private_key):
        raise ConfigError("node.tls: enabled needs certificate and private_key")
    if settings.series.quiet_seconds <= 0:
        raise ConfigError("series.quiet_seconds: must be greater than 0")
    try:
        re.compile(settings.series.selection.description_pattern)
        for rule in settings.series.priority_rules:
            re.compile(rule.description_pattern)
    except re.error as exc:
        raise ConfigError(f"series: invalid regular expression ({exc})") from None
    names = set()
    for d in settings.destinations:
        if d.name in names:
            raise ConfigError(f"destinations: duplicate name {d.name!r}")
        names.add(d.name)
        if d.kind not in DESTINATION_KINDS:
            raise ConfigError(f"destinations.{d.name}.kind: {d.kind!r} is not one of {', '.join(DESTINATION_KINDS)}")
        if d.kind == "stow-rs":
            _validate_stow_rs(d)
            continue
        if not _AE_RE.match(d.ae_title):
            raise ConfigError(f"destinations.{d.name}.ae_title: {d.ae_title!r} is not a valid AE title")
        if not d.host:
            raise ConfigError(f"destinations.{d.name}.host: a DIMSE destination needs a host")
        if not 1 <= d.port <= 65535:
            raise ConfigError(f"destinations.{d.name}.port: {d.port} is not a TCP port")
    h = settings.http
    if bool(h.tls_certificate) != bool(h.tls_private_key):
        raise ConfigError("http: tls_certificate and tls_private_key go together (both or neither)")
    if h.refresh_seconds < 0:
        raise ConfigError("http.refresh_seconds: must be 0 or more")
    if settings.model.precision not in MODEL_PRECISIONS:
        raise ConfigError(f"model.precision: {settings.model.precision!r} is not one of {', '.join(MODEL_PRECISIONS)}")
    if settings.outputs.secondary_capture not in SECONDARY_CAPTURE_POLICIES:
        raise ConfigError(
            f"outputs.secondary_capture: {settings.outputs.secondary_capture!r} is not one of {', '.join(SECONDARY_CAPTURE_POLICIES)}"
        )
    if settings.outputs.rejection_reason not in REJECTION_REASONS:
        raise ConfigError(f"outputs.rejection_reason: {settings.outputs.rejection_reason!r} is not one of {', '.join(REJECTION_REASONS)}")
    if settings.outputs.key_slices < 0:
        raise ConfigError("outputs.key_slices: must be 0 or more")
    if settings.log.format not in ("auto", "json", "console"):
        raise ConfigError("log.format: must be auto, json or console")
    if settings.workers.count < 0:
        raise ConfigError("workers.count: must be 0 or more")
    if settings.workers.heartbeat_seconds >= settings.workers.lease_seconds:
        raise ConfigError("workers.heartbeat_seconds: must be shorter than lease_seconds")
    _validate_notifications(settings)


def _validate_notifications(settings: Settings) -> None:
    """Each [[notifications]] entry has what its kind needs; escalation names an alerting entry."""
    public_url = settings.http.public_url
    if public_url and not re.match(r"^https?://[^/?#\s]+(/[^?#\s]*)?$", public_url):
        raise ConfigError(f"http.public_url: {public_url!r} is not an http(s) URL")
    alerts = settings.alerts
    if alerts.max_attempts < 1:
        raise ConfigError("alerts.max_attempts: must be at least 1")
    if alerts.poll_seconds <= 0 or alerts.link_valid_hours <= 0 or alerts.lookback_hours <= 0:
        raise ConfigError("alerts: poll_seconds, link_valid_hours and lookback_hours must be greater than 0")
    by_name: dict[str, NotificationTarget] = {}
    for target in settings.notifications:
        where = f"notifications.{target.name or '?'}"
        if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", target.name):
            raise ConfigError(f"notifications: name {target.name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        if target.name in by_name:
            raise ConfigError(f"notifications: duplicate name {target.name!r}")
        by_name[target.name] = target
        kind = target.kind.lower()
        if kind not in NOTIFICATION_KINDS:
            raise ConfigError(f"{where}.kind: {target.kind!r} is not one of {', '.join(NOTIFICATION_KINDS)}")
        for flag in target.effective_flags:
            if flag.upper() not in ("CRITICAL", "HIGH", "REVIEW", "ROUTINE", "ERROR"):
                raise ConfigError(f"{where}.flags: {flag!r} is not a worklist flag (CRITICAL, HIGH, REVIEW, ROUTINE, ERROR)")
        if target.timeout_seconds <= 0:
            raise ConfigError(f"{where}.timeout_seconds: must be greater than 0")
        if kind == "webhook":
            if not re.match(r"^https?://[^/?#\s]+", target.url):
                raise ConfigError(f"{where}.url: a webhook needs an http(s) URL, got {target.url!r}")
            if target.template.lower() not in WEBHOOK_TEMPLATES:
                raise ConfigError(f"{where}.template: {target.template!r} is not one of {', '.join(WEBHOOK_TEMPLATES)}")
        elif kind == "email":
            if not target.smtp_host or not target.from_address or not target.to:
                raise ConfigError(f"{where}: an email entry needs smtp_host, from_address and to")
            if target.smtp_security.lower() not in SMTP_SECURITY:
                raise ConfigError(f"{where}.smtp_security: {target.smtp_security!r} is not one of {', '.join(SMTP_SECURITY)}")
            if not 1 <= target.smtp_port <= 65535:
                raise ConfigError(f"{where}.smtp_port: {target.smtp_port} is not a TCP port")
            if target.smtp_password_file and target.smtp_password_env:
                raise ConfigError(f"{where}: set smtp_password_file or smtp_password_env, not both")
        else:
            if not target.host or not 1 <= target.port <= 65535:
                raise ConfigError(f"{where}: an hl7 entry needs host and port (the RIS/EHR's MLLP listener)")
            if target.processing_id.upper() not in ("P", "T", "D"):
                raise ConfigError(f"{where}.processing_id: must be P, T or D")
            if target.escalate_to:
                raise ConfigError(f"{where}.escalate_to: hl7 results are not acknowledged by a person, so they do not escalate")
        if target.escalate_after_minutes <= 0:
            raise ConfigError(f"{where}.escalate_after_minutes: must be greater than 0")
    for target in settings.notifications:
        if not target.escalate_to:
            continue
        other = by_name.get(target.escalate_to)
        if other is None:
            raise ConfigError(f"notifications.{target.name}.escalate_to: no [[notifications]] entry named {target.escalate_to!r}")
        if other.name == target.name or not other.alerts_a_person:
            raise ConfigError(f"notifications.{target.name}.escalate_to: must name another webhook or email entry")


def _secondary_capture_booleans(data: dict[str, Any]) -> dict[str, Any]:
    """``outputs.secondary_capture = true/false`` (the older boolean form) -> "always"/"never"."""
    outputs = data.get("outputs")
    if not isinstance(outputs, Mapping) or "secondary_capture" not in outputs:
        return data
    value = outputs["secondary_capture"]
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        value = value.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(value, bool):
        return {**data, "outputs": {**outputs, "secondary_capture": "always" if value else "never"}}
    return data


def load_settings(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Load and validate settings. Raises ConfigError with a one-line message."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            with p.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"config file {p} cannot be read: {exc.strerror}") from None
    data = _merge(data, _env_overrides(os.environ if environ is None else environ))
    if overrides:
        data = _merge(data, overrides)
    data = _secondary_capture_booleans(data)
    settings = _normalise(_build(Settings, data, ""))
    _validate(settings)
    return settings


def _normalise(settings: Settings) -> Settings:
    """Enumerated values of [[notifications]] compared without case ("Webhook", "critical")."""
    targets = tuple(
        dataclasses.replace(
            t,
            kind=t.kind.lower(),
            template=t.template.lower(),
            smtp_security=t.smtp_security.lower(),
            processing_id=t.processing_id.upper(),
            flags=None if t.flags is None else tuple(f.upper() for f in t.flags),
        )
        for t in settings.notifications
    )
    return dataclasses.replace(settings, notifications=targets)
