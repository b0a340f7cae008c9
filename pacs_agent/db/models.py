"""SQLAlchemy 2.0 models of the node's state: the database is the bus between the stages
(receive, select, analyse, deliver).

No patient name, ID or birth date is stored anywhere in this schema.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class SeriesState(enum.StrEnum):
    RECEIVING = "RECEIVING"  # instances arriving or associations still open
    COMPLETE = "COMPLETE"  # quiet period over; selection not yet applied
    IGNORED = "IGNORED"  # not a CTPA (ignore_reason says why) or not analysable
    QUEUED = "QUEUED"  # a job is waiting or running
    ANALYSED = "ANALYSED"  # latest job succeeded
    FAILED = "FAILED"  # latest job failed for good


class JobStatus(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class DeliveryStatus(enum.StrEnum):
    PENDING = "PENDING"  # waiting for its next attempt
    SENDING = "SENDING"  # claimed by a dispatcher
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"  # gave up after max attempts; `pe-agent retry` re-queues it
    CANCELLED = "CANCELLED"


class OutputKind(enum.StrEnum):
    SR = "SR"
    SC = "SC"
    SEG = "SEG"
    #: Key Object Selection "key images" of a result.
    KOS = "KOS"
    #: IHE IOCM rejection note retracting a superseded result (never itself rejected).
    REJECTION = "REJECTION"


class Flag(enum.StrEnum):
    """Worklist priority flag of a study, most urgent first."""

    CRITICAL = "CRITICAL"  # PE with RV/LV >= 1, or central PE
    HIGH = "HIGH"  # PE
    REVIEW = "REVIEW"  # indeterminate or low confidence
    ERROR = "ERROR"  # analysis failed: a human must read it
    ROUTINE = "ROUTINE"  # negative

    @property
    def rank(self) -> int:
        return _FLAG_RANK[self]


_FLAG_RANK = {Flag.CRITICAL: 0, Flag.HIGH: 1, Flag.ERROR: 2, Flag.REVIEW: 3, Flag.ROUTINE: 4}


def _enum(cls: type[enum.Enum]) -> Enum:
    return Enum(cls, native_enum=False, length=16, validate_strings=True)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class Association(Base):
    """A DICOM association that delivered instances; a series is not complete while one is open."""

    __tablename__ = "associations"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str] = mapped_column(String(64), default="")
    opened_at: Mapped[datetime] = mapped_column(default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(default=None)
    #: "released", "aborted" or "recovered" (closed by a restart).
    close_reason: Mapped[str] = mapped_column(String(16), default="")


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_description: Mapped[str] = mapped_column(String(128), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    state: Mapped[SeriesState] = mapped_column(_enum(SeriesState), default=SeriesState.RECEIVING, index=True)
    ignore_reason: Mapped[str] = mapped_column(Text, default="")
    input_priority: Mapped[int] = mapped_column(Integer, default=0)
    #: instance_count when the latest job was queued; more instances later -> re-analysis.
    analysed_instance_count: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    instances: Mapped[list[Instance]] = relationship(back_populates="series", cascade="all, delete-orphan")
    jobs: Mapped[list[Job]] = relationship(back_populates="series", cascade="all, delete-orphan", order_by="Job.id")


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64), default="")
    #: Path relative to the spool root.
    path: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    association_id: Mapped[str | None] = mapped_column(ForeignKey("associations.id"), default=None, index=True)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_claim", "status", "priority", "not_before", "id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus), default=JobStatus.QUEUED)
    #: Higher runs first; ties by arrival (id).
    priority: Mapped[int] = mapped_column(Integer, default=0)
    #: "received", "late-instances", "reprocess".
    reason: Mapped[str] = mapped_column(String(32), default="received")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    not_before: Mapped[datetime] = mapped_column(default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    error: Mapped[str] = mapped_column(Text, default="")
    model_version: Mapped[str] = mapped_column(String(64), default="")
    #: The job whose report this job's report supersedes (re-analysis).
    supersedes_job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    series: Mapped[Series] = relationship(back_populates="jobs")
    result: Mapped[Result | None] = relationship(back_populates="job", uselist=False, cascade="all, delete-orphan")
    outputs: Mapped[list[Output]] = relationship(back_populates="job", cascade="all, delete-orphan", order_by="Output.id")


class Result(Base):
    __tablename__ = "results"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    pe_present: Mapped[bool] = mapped_column(default=False)
    pe_probability: Mapped[float] = mapped_column(Float, default=0.0)
    #: The nine exam labels and the series-level PE probability.
    probabilities: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: The nine final, consistent labels.
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    chunk_probabilities: Mapped[list[Any]] = mapped_column(default=list)
    key_images: Mapped[list[Any]] = mapped_column(default=list)
    #: Images of the series the analysis left out: [{"sop_instance_uid", "reason"}] (pe_model.volume).
    skipped_images: Mapped[list[Any]] = mapped_column(default=list, server_default=text("'[]'"))
    flag: Mapped[Flag] = mapped_column(_enum(Flag))
    timings_s: Mapped[dict[str, Any]] = mapped_column(default=dict)
    model_name: Mapped[str] = mapped_column(String(128), default="")
    model_version: Mapped[str] = mapped_column(String(64), default="")
    model_sha256: Mapped[str] = mapped_column(String(64), default="")
    #: The arithmetic the model ran in: "fp32" or "bf16" (pe_model.precision); "" for results stored
    #: before it was recorded.
    model_precision: Mapped[str] = mapped_column(String(8), default="", server_default=text("''"))
    #: The input-quality gate's report (``pe_model.quality.QualityReport.to_json_dict()``): status
    #: ("adequate", "non-diagnostic", "unverified"), summary, reasons, and the measurements
    #: (pulmonary_trunk_hu, lung_apex_covered, lung_base_covered, slice_thickness_mm, noise_hu, ...).
    #: Empty for results stored before the gate existed.
    quality: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default=text("'{}'"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="result")


class Output(Base):
    """A DICOM object this node produced (in the spool's outbox)."""

    __tablename__ = "outputs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[OutputKind] = mapped_column(_enum(OutputKind))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    #: Path relative to the spool root.
    path: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="outputs")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="output", cascade="all, delete-orphan")


class Delivery(Base):
    """One output x one destination."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("output_id", "destination"),
        Index("ix_deliveries_claim", "status", "next_attempt_at", "id"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("outputs.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    status: Mapped[DeliveryStatus] = mapped_column(_enum(DeliveryStatus), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: Last DICOM status returned by the destination (None: no response, e.g. connection refused).
    last_dicom_status: Mapped[int | None] = mapped_column(Integer, default=None)
    last_error: Mapped[str] = mapped_column(Text, default="")
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    output: Mapped[Output] = relationship(back_populates="deliveries")


class Study(Base):
    """Worklist row: one per study, flag from its latest result."""

    __tablename__ = "studies"
    study_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    flag: Mapped[Flag] = mapped_column(_enum(Flag))
    flag_rank: Mapped[int] = mapped_column(Integer, index=True)
    pe_probability: Mapped[float | None] = mapped_column(Float, default=None)
    series_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), default=None)
    summary: Mapped[str] = mapped_column(Text, default="")
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Worker(Base):
    """A worker process, for heartbeats and recovery of stalled jobs."""

    __tablename__ = "workers"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(128), default="")
    pid: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    current_job_id: Mapped[int | None] = mapped_column(Integer, default=None)
    stopped_at: Mapped[datetime | None] = mapped_column(default=None)


class Event(Base):
    """Audit trail of every state change. Never holds patient identifiers."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    #: "series", "job", "delivery", "association", "instance", "worker".
    entity: Mapped[str] = mapped_column(String(16))
    entity_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(48))
    from_state: Mapped[str] = mapped_column(String(16), default="")
    to_state: Mapped[str] = mapped_column(String(16), default="")
    series_instance_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    job_id: Mapped[int | None] = mapped_column(Integer, default=None, index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class NotificationStatus(enum.StrEnum):
    PENDING = "PENDING"  # waiting for its next attempt
    SENDING = "SENDING"  # leased to one sender
    SENT = "SENT"  # the receiver took it (HTTP 2xx, SMTP 250, HL7 AA)
    FAILED = "FAILED"  # gave up after alerts.max_attempts, or refused for good
    CANCELLED = "CANCELLED"


class Notification(Base):
    """One message about one study's flag to one [[notifications]] target (pacs_agent/notify/).

    Holds no patient identifiers: those are read from the received images when a message is built
    for a target configured to carry them.
    """

    __tablename__ = "notifications"
    __table_args__ = (Index("ix_notifications_claim", "status", "next_attempt_at", "id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    #: Makes raising idempotent across processes: "alert|target|study|flag", "hl7|target|study|job",
    #: "escalation|target|parent id".
    dedup_key: Mapped[str] = mapped_column(String(255), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    job_id: Mapped[int | None] = mapped_column(Integer, default=None)
    flag: Mapped[Flag] = mapped_column(_enum(Flag))
    target: Mapped[str] = mapped_column(String(64))
    #: "webhook", "email" or "hl7".
    kind: Mapped[str] = mapped_column(String(16))
    #: 0: first alert; 1 and up: escalations.
    escalation_level: Mapped[int] = mapped_column(Integer, default=0)
    escalated_from_id: Mapped[int | None] = mapped_column(ForeignKey("notifications.id", ondelete="SET NULL"), default=None)
    status: Mapped[NotificationStatus] = mapped_column(_enum(NotificationStatus), default=NotificationStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str] = mapped_column(Text, default="")
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(default=None)
    #: When this alert was escalated (each alert escalates once).
    escalated_at: Mapped[datetime | None] = mapped_column(default=None)
    acknowledged_at: Mapped[datetime | None] = mapped_column(default=None)
    acknowledged_by: Mapped[str] = mapped_column(String(128), default="")
    #: "cli", "dashboard" or "link".
    acknowledged_via: Mapped[str] = mapped_column(String(16), default="")

    attempt_rows: Mapped[list[NotificationAttempt]] = relationship(
        back_populates="notification", cascade="all, delete-orphan", order_by="NotificationAttempt.id"
    )


class NotificationAttempt(Base):
    """One try to send a notification, with what the receiver answered."""

    __tablename__ = "notification_attempts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    notification_id: Mapped[int] = mapped_column(ForeignKey("notifications.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime] = mapped_column(default=utcnow)
    ok: Mapped[bool] = mapped_column(default=False)
    #: HTTP status, SMTP reply code; None when nothing answered.
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    #: The receiver's answer in short ("HTTP 200", "SMTP 250", "HL7 ACK AA") or the error.
    detail: Mapped[str] = mapped_column(Text, default="")
    retryable: Mapped[bool] = mapped_column(default=True)

    notification: Mapped[Notification] = relationship(back_populates="attempt_rows")
