"""Prometheus metrics of the node, all defined here: node state and time to notification.

Everything is computed from the database at scrape time, so the work of every process (receivers,
workers, the dispatcher, alerting, `pe-agent ack` run from a shell) counts, with no shared in-memory
state and nothing lost at a restart.

Time to notification: for each study on the worklist, the seconds from the last received image of
the series that set its flag to each later stage, one histogram per (stage, flag):

- ``complete``: the series was complete (quiet period over) and selection ran;
- ``analysed``: the result was stored;
- ``delivered``: every report object reached every destination;
- ``notified``: the first alert about the study was sent;
- ``acknowledged``: a person acknowledged the result.

``notified`` and ``acknowledged`` are marked by whoever sends or takes them, inside its own
transaction: ``record_stage(session, study_instance_uid, Stage.NOTIFIED, target="teams")``. A stage
counts once per study, at its first mark. Re-analyses (reason "reprocess") are left out: their
"last image" is long past and says nothing about the pipeline's speed.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.db.models import Delivery, DeliveryStatus, Event, Flag, Job, JobStatus, Output, Result, Series, Study, utcnow
from pacs_agent.db.events import record_event
from pacs_agent.node.admin import delivery_counts, job_counts
from pacs_agent.worklist import flag_counts


class Stage(enum.StrEnum):
    """The stages after a study's last image, in the order they happen."""

    COMPLETE = "complete"
    ANALYSED = "analysed"
    DELIVERED = "delivered"
    NOTIFIED = "notified"
    ACKNOWLEDGED = "acknowledged"


#: Stages marked by an event (entity "study", entity_id the Study Instance UID) of this kind.
STAGE_EVENT_KINDS: Mapping[Stage, str] = {Stage.NOTIFIED: "study_notified", Stage.ACKNOWLEDGED: "study_acknowledged"}
#: Histogram buckets (seconds): from a fast automatic chain (seconds) to a slow human one (hours).
TIME_TO_STAGE_BUCKETS: tuple[float, ...] = (5, 10, 20, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400)
TIME_TO_STAGE_METRIC = "pe_agent_time_to_stage_seconds"
#: Analysis latency buckets (seconds from the series' last instance to its result).
LATENCY_BUCKETS: tuple[float, ...] = (5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
#: Histograms are computed over this many most recent studies / results.
WINDOW = 10_000


def record_stage(session: Session, study_instance_uid: str, stage: Stage, *, at: datetime | None = None, **detail: Any) -> Event:
    """Mark that ``stage`` (NOTIFIED or ACKNOWLEDGED) happened for a study, in the caller's transaction."""
    kind = STAGE_EVENT_KINDS.get(stage)
    if kind is None:
        raise ValueError(f"stage {stage} is derived from the node's own records and cannot be marked")
    event = record_event(session, entity="study", entity_id=study_instance_uid, kind=kind, **detail)
    if at is not None:
        event.at = at
    return event


@dataclass(frozen=True)
class StudyTimeline:
    """When each stage happened for one study (the series and job that set its worklist flag)."""

    study_instance_uid: str
    flag: Flag
    job_id: int
    last_image_at: datetime
    stages: Mapping[Stage, datetime]

    def seconds(self, stage: Stage) -> float | None:
        """Seconds from the last image to ``stage``; None when the stage has not happened."""
        at = self.stages.get(stage)
        if at is None:
            return None
        return max((at - self.last_image_at).total_seconds(), 0.0)


def _chunks(values: Sequence[Any], size: int = 500) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start:start + size]


def study_timelines(session: Session, *, limit: int = WINDOW) -> list[StudyTimeline]:
    """Timelines of the most recent ``limit`` studies: the flagged series and its latest automatic analysis.

    A study re-analysed by hand keeps the timeline of its automatic analysis (the one people were
    told about); a study with only re-analyses has none.
    """
    flagged = session.execute(
        select(Study.study_instance_uid, Study.flag, Series.id, Series.series_instance_uid, Series.last_received_at)
        .join(Series, Series.series_instance_uid == Study.series_instance_uid)
        .order_by(Study.first_received_at.desc())
        .limit(limit)
    ).all()
    automatic: dict[int, tuple[int, datetime, datetime | None]] = {}  # series id -> (job id, job created, result created)
    for chunk in _chunks([r[2] for r in flagged]):
        for series_id, job_id, created, analysed_at in session.execute(
            select(Job.series_id, Job.id, Job.created_at, Result.created_at)
            .outerjoin(Result, Result.job_id == Job.id)
            .where(Job.series_id.in_(chunk), Job.reason != "reprocess", Job.status.in_((JobStatus.SUCCEEDED, JobStatus.FAILED)))
            .order_by(Job.id)
        ):
            automatic[int(series_id)] = (int(job_id), created, analysed_at)
    rows = [
        (study_uid, flag, automatic[series_id][0], automatic[series_id][1], series_uid, last_image, automatic[series_id][2])
        for study_uid, flag, series_id, series_uid, last_image in flagged
        if series_id in automatic
    ]
    if not rows:
        return []
    series_uids = [r[4] for r in rows]
    job_ids = [r[2] for r in rows]
    study_uids = [r[0] for r in rows]
    completes: dict[str, list[datetime]] = {}
    for chunk in _chunks(series_uids):
        for uid, at in session.execute(
            select(Event.series_instance_uid, Event.at)
            .where(Event.kind == "series_state", Event.to_state == "COMPLETE", Event.series_instance_uid.in_(chunk))
        ):
            completes.setdefault(uid, []).append(at)
    delivered: dict[int, datetime] = {}
    for chunk in _chunks(job_ids):
        for job_id, total, done, last in session.execute(
            select(
                Output.job_id, func.count(Delivery.id),
                func.count(Delivery.id).filter(Delivery.status == DeliveryStatus.DELIVERED),
                func.max(Delivery.delivered_at),
            )
            .join(Delivery, Delivery.output_id == Output.id)
            .where(Output.job_id.in_(chunk))
            .group_by(Output.job_id)
        ):
            if total and total == done and last is not None:
                delivered[int(job_id)] = _aware(last)
    marked: dict[tuple[str, str], datetime] = {}
    for chunk in _chunks(study_uids):
        for uid, kind, first in session.execute(
            select(Event.entity_id, Event.kind, func.min(Event.at))
            .where(Event.entity == "study", Event.kind.in_(list(STAGE_EVENT_KINDS.values())), Event.entity_id.in_(chunk))
            .group_by(Event.entity_id, Event.kind)
        ):
            marked[(uid, kind)] = _aware(first)
    timelines = []
    for study_uid, flag, job_id, job_created, series_uid, last_image, result_at in rows:
        stages: dict[Stage, datetime] = {}
        before_job = [at for at in completes.get(series_uid, []) if at <= job_created]
        stages[Stage.COMPLETE] = max(before_job) if before_job else job_created
        if result_at is not None:
            stages[Stage.ANALYSED] = result_at
        if job_id in delivered:
            stages[Stage.DELIVERED] = delivered[job_id]
        for stage, kind in STAGE_EVENT_KINDS.items():
            if (study_uid, kind) in marked:
                stages[stage] = marked[(study_uid, kind)]
        timelines.append(StudyTimeline(study_uid, Flag(flag), int(job_id), last_image, stages))
    return timelines


def _aware(value: datetime) -> datetime:
    """min() over a UTC column comes back without the column's type on SQLite (a string or a naive value)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=utcnow().tzinfo)


@dataclass(frozen=True)
class StageHistogram:
    """One (stage, flag) histogram: cumulative bucket counts as Prometheus has them, and quantiles for people."""

    stage: Stage
    flag: Flag
    buckets: tuple[tuple[float, int], ...]  # (upper bound in seconds, cumulative count); last bound is +Inf
    count: int
    sum_seconds: float
    median_seconds: float | None
    p90_seconds: float | None
    max_seconds: float | None


def _quantile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(max(math.ceil(q * len(ordered)) - 1, 0), len(ordered) - 1)
    return ordered[index]


def stage_histograms(timelines: Iterable[StudyTimeline], *, buckets: Sequence[float] = TIME_TO_STAGE_BUCKETS) -> list[StageHistogram]:
    """Every (stage, flag) pair, empty ones included, so a dashboard and a scraper see a fixed set."""
    values: dict[tuple[Stage, Flag], list[float]] = {(s, f): [] for s in Stage for f in Flag}
    for timeline in timelines:
        for stage in Stage:
            elapsed = timeline.seconds(stage)
            if elapsed is not None:
                values[(stage, timeline.flag)].append(elapsed)
    out = []
    for (stage, flag), seconds in values.items():
        cumulative = tuple((float(b), sum(1 for v in seconds if v <= b)) for b in buckets) + ((math.inf, len(seconds)),)
        out.append(StageHistogram(
            stage=stage, flag=flag, buckets=cumulative, count=len(seconds), sum_seconds=sum(seconds),
            median_seconds=_quantile(seconds, 0.5), p90_seconds=_quantile(seconds, 0.9),
            max_seconds=max(seconds) if seconds else None,
        ))
    return out


class NodeStateCollector(Collector):
    """Jobs, deliveries, worklist and analysis latency, read from the database on each scrape."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._factory = session_factory

    def collect(self) -> Iterator[Metric]:
        with self._factory() as session:
            depth = job_counts(session)
            jobs = GaugeMetricFamily("pe_agent_jobs", "Jobs by status.", labels=["status"])
            for status, count in depth.items():
                jobs.add_metric([status], count)
            yield jobs
            yield CounterMetricFamily("pe_agent_jobs_succeeded", "Jobs that succeeded.", value=depth[JobStatus.SUCCEEDED.value])
            yield CounterMetricFamily("pe_agent_jobs_failed", "Jobs that failed for good.", value=depth[JobStatus.FAILED.value])

            deliveries = GaugeMetricFamily("pe_agent_deliveries", "Deliveries by status.", labels=["status"])
            for status, count in delivery_counts(session).items():
                deliveries.add_metric([status], count)
            yield deliveries
            failed_attempts = 0
            for status, attempts in session.execute(select(Delivery.status, Delivery.attempts)):
                failed_attempts += max(int(attempts) - (1 if DeliveryStatus(status) == DeliveryStatus.DELIVERED else 0), 0)
            yield CounterMetricFamily(
                "pe_agent_delivery_failed_attempts", "C-STORE attempts to a destination that did not deliver.", value=failed_attempts
            )

            flags = GaugeMetricFamily("pe_agent_worklist_studies", "Studies on the worklist by flag.", labels=["flag"])
            for flag, count in flag_counts(session).items():
                flags.add_metric([flag], count)
            yield flags

            rows = session.execute(
                select(Result.created_at, Series.last_received_at)
                .join(Job, Result.job_id == Job.id).join(Series, Job.series_id == Series.id)
                .order_by(Result.id.desc()).limit(WINDOW)
            ).all()
            latencies = [max((created - last).total_seconds(), 0.0) for created, last in rows]
            buckets = [(str(float(b)), sum(1 for v in latencies if v <= b)) for b in LATENCY_BUCKETS]
            buckets.append(("+Inf", len(latencies)))
            yield HistogramMetricFamily(
                "pe_agent_analysis_latency_seconds",
                f"Seconds from a series' last received instance to its result (latest {WINDOW} results).",
                buckets=buckets, sum_value=sum(latencies),
            )


class TimeToStageCollector(Collector):
    """``pe_agent_time_to_stage_seconds{stage, flag}``: seconds from the last image to each stage."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._factory = session_factory

    def collect(self) -> Iterator[Metric]:
        with self._factory() as session:
            histograms = stage_histograms(study_timelines(session))
        family = HistogramMetricFamily(
            TIME_TO_STAGE_METRIC,
            f"Seconds from a study's last received image to each stage (complete, analysed, delivered, notified, "
            f"acknowledged), by worklist flag (latest {WINDOW} studies; re-analyses left out).",
            labels=["stage", "flag"],
        )
        for h in histograms:
            family.add_metric(
                [h.stage.value, h.flag.value],
                buckets=[("+Inf" if math.isinf(bound) else str(bound), count) for bound, count in h.buckets],
                sum_value=h.sum_seconds,
            )
        yield family


def build_registry(session_factory: sessionmaker[Session]) -> CollectorRegistry:
    """A registry with every metric of the node (what /metrics serves)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeStateCollector(session_factory))
    registry.register(TimeToStageCollector(session_factory))
    return registry
