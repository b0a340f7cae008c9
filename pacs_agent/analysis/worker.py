"""Analysis workers: one process each, the model loaded once, jobs claimed with a lease.

Each job runs in a thread of the worker process while the main thread renews the lease every
``workers.heartbeat_seconds``. A cancelled job (heartbeat refused) runs to its end and its result is
dropped. On SIGTERM/SIGINT the worker stops claiming, lets the current job finish within
``grace_seconds`` or releases it (back to QUEUED, attempt not counted), and exits 0. A model that
cannot be loaded is one log line and exit code EXIT_MODEL_ERROR, which `pe-agent serve` reports.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.analysis.pipeline import AnalysisOutcome, SourceReadError, analyze_sources, load_predictor, read_sources
from pacs_agent.db.migrate import check_schema_at_head
from pacs_agent.db.models import Instance, Job, Output, OutputKind, Result
from pacs_agent.db.session import make_engine, make_session_factory, transaction
from pacs_agent.db.events import record_event
from pacs_agent.errors import AgentError, InvalidUIDError
from pacs_agent.ingest.spool import Spool
from pacs_agent.logs import configure_logging, get_logger, log_context
from pacs_agent.jobs.queue import (
    ClaimedJob,
    LeaseLostError,
    claim_next_job,
    complete_job,
    fail_job,
    heartbeat,
    release_job,
)
from pacs_agent.jobs.leases import Backoff, default_owner
from pacs_agent.jobs.workers import register_worker, stop_worker, worker_heartbeat
from pacs_agent.settings import Settings
from pacs_agent.worklist import flag_for
from pacs_agent.signals import stop_on_signals

if TYPE_CHECKING:
    from pacs_agent.reports import RejectedInstance
    from pe_model.predictor import Predictor

log = get_logger(__name__)

EXIT_OK = 0
#: The worker could not start: model/checkpoint or database schema. Restarting will not help.
EXIT_MODEL_ERROR = 3
EXIT_STARTUP_ERROR = 4
DEFAULT_GRACE_SECONDS = 20.0


@dataclass
class _JobRun:
    """A job running in its thread; ``error`` set when it raised."""

    claimed: ClaimedJob
    thread: threading.Thread | None = None
    done: threading.Event = field(default_factory=threading.Event)
    outcome: str = ""
    error: BaseException | None = None


class WorkerContext:
    """What one worker process holds for its life: settings, database, model, identity."""

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session], predictor: Predictor, worker_id: str) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.predictor = predictor
        self.worker_id = worker_id
        self.spool = Spool(settings.spool_root, settings.node.min_free_disk_mb, fsync=settings.storage.fsync)
        self.spool_root = self.spool.root
        self.backoff = Backoff(settings.workers.backoff_initial_seconds, settings.workers.backoff_max_seconds)

    # ------------------------------------------------------------ one job

    def _source_paths(self, claimed: ClaimedJob) -> list[Path]:
        with self.session_factory() as session:
            rel = list(session.scalars(select(Instance.path).where(Instance.series_id == claimed.series_id).order_by(Instance.id)))
        if not rel:
            raise SourceReadError(f"series {claimed.series_instance_uid} has no stored instances")
        return [self._absolute(p) for p in rel]

    def _absolute(self, relative: str) -> Path:
        try:
            return self.spool.absolute(relative).resolve()
        except InvalidUIDError:
            raise SourceReadError(f"stored path {relative!r} leaves the spool") from None

    def _previous_report(self, claimed: ClaimedJob) -> pydicom.Dataset | None:
        """The SR of the job this one supersedes (re-analysis), or None."""
        if claimed.supersedes_job_id is None:
            return None
        with self.session_factory() as session:
            rel = session.scalars(
                select(Output.path).where(Output.job_id == claimed.supersedes_job_id, Output.kind == OutputKind.SR).order_by(Output.id)
            ).first()
        if rel is None:
            return None
        try:
            return pydicom.dcmread(self._absolute(rel), stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            log.warning("previous_report_unreadable", superseded_job_id=claimed.supersedes_job_id, error=str(exc))
            return None

    def _superseded_objects(self, claimed: ClaimedJob) -> list[RejectedInstance]:
        """Every object of the result this job supersedes, except rejection notes (they stay)."""
        from pacs_agent.reports import RejectedInstance

        if claimed.supersedes_job_id is None:
            return []
        with self.session_factory() as session:
            rows = session.execute(
                select(Output.sop_class_uid, Output.sop_instance_uid, Output.series_instance_uid)
                .where(Output.job_id == claimed.supersedes_job_id, Output.kind != OutputKind.REJECTION)
                .order_by(Output.id)
            ).all()
        return [RejectedInstance(row.sop_class_uid, row.sop_instance_uid, row.series_instance_uid) for row in rows]

    def analyse(self, claimed: ClaimedJob) -> AnalysisOutcome:
        """Predict from the series' files in the spool, write reports into the job's outbox folder.

        Headers only are kept for the reports (plus the heatmap slices): pe_model reads the pixels.
        A re-analysis names the superseded report as predecessor and (outputs.retract_superseded)
        rejects every object of the superseded result.
        """
        sources = read_sources(self._source_paths(claimed))
        out_dir = self.spool.job_outbox_dir(claimed.job_id)
        return analyze_sources(
            self.predictor, sources, self.settings.outputs, out_dir,
            previous_report=self._previous_report(claimed),
            superseded=self._superseded_objects(claimed),
            review_margin=self.settings.model.review_margin,
        )

    def store(self, claimed: ClaimedJob, outcome: AnalysisOutcome, seconds: float) -> None:
        """Result, outputs, deliveries, study flag and SUCCEEDED in one transaction (all or nothing)."""
        from pacs_agent.delivery.outbox import queue_deliveries

        prediction = outcome.prediction
        flag = flag_for(prediction, self.settings.model.review_margin)
        with transaction(self.session_factory) as session:
            session.add(
                Result(
                    job_id=claimed.job_id,
                    pe_present=bool(prediction.pe_present),
                    pe_probability=float(prediction.series_pe_probability),
                    probabilities={k: float(v) for k, v in prediction.probabilities.items()},
                    labels={k: bool(v) for k, v in prediction.labels.items()},
                    chunk_probabilities=[float(p) for p in prediction.chunk_probabilities],
                    key_images=prediction.to_json_dict()["key_images"],
                    skipped_images=[{"sop_instance_uid": uid, "reason": reason} for uid, reason in prediction.skipped_images],
                    flag=flag,
                    timings_s={**{k: float(v) for k, v in prediction.timings_s.items()}, "job": round(seconds, 4)},
                    model_name=prediction.model.name,
                    model_version=prediction.model.version,
                    model_sha256=prediction.model.sha256,
                    model_precision=prediction.precision,
                    quality={} if prediction.quality is None else prediction.quality.to_json_dict(),
                )
            )
            session.flush()
            complete_job(session, claimed.job_id, owner=self.worker_id, model_version=prediction.model.version)
            job = session.get(Job, claimed.job_id)
            if job is None:
                raise LeaseLostError(f"job {claimed.job_id} vanished")
            queue_deliveries(session, job, outcome.produced, self.settings.destinations, self.spool_root)
            if claimed.supersedes_job_id is not None:
                notes = [p for p in outcome.produced if p.kind == OutputKind.REJECTION]
                record_event(
                    session, entity="job", entity_id=claimed.job_id, kind="result_superseded",
                    series_instance_uid=claimed.series_instance_uid, job_id=claimed.job_id,
                    superseded_job_id=claimed.supersedes_job_id,
                    retracted=bool(notes),
                    rejection_note_sop_instance_uid=notes[0].sop_instance_uid if notes else None,
                    rejected_objects=len(self._superseded_objects(claimed)) if notes else 0,
                    rejection_reason=self.settings.outputs.rejection_reason if notes else None,
                )
        log.info("job_succeeded", flag=flag.value, pe_probability=round(float(prediction.series_pe_probability), 4),
                 quality=None if prediction.quality is None else prediction.quality.status,
                 outputs=len(outcome.produced), seconds=round(seconds, 2))

    def run_job(self, run: _JobRun) -> None:
        """Thread body: analyse, store; failures recorded on the job (retry or FAILED)."""
        from pe_model.errors import SeriesError

        claimed = run.claimed
        started = time.monotonic()
        with log_context(job_id=claimed.job_id, series_instance_uid=claimed.series_instance_uid, worker_id=self.worker_id):
            log.info("job_started", attempt=claimed.attempts, max_attempts=claimed.max_attempts, reason=claimed.reason)
            try:
                outcome = self.analyse(claimed)
                self.store(claimed, outcome, time.monotonic() - started)
                run.outcome = "succeeded"
            except LeaseLostError as exc:
                run.outcome = "dropped"
                log.warning("job_result_dropped", reason=str(exc))
            except SeriesError as exc:
                run.outcome = self._fail(claimed, str(exc), retryable=False)
            except (AgentError, OSError, RuntimeError, ValueError, MemoryError) as exc:
                run.outcome = self._fail(claimed, f"{type(exc).__name__}: {exc}", retryable=True)
            except Exception as exc:  # an unexpected bug must not kill the worker silently: record it, retry
                log.exception("job_crashed")
                run.outcome = self._fail(claimed, f"unexpected {type(exc).__name__}: {exc}", retryable=True)
                run.error = exc
            finally:
                run.done.set()

    def _fail(self, claimed: ClaimedJob, error: str, *, retryable: bool) -> str:
        try:
            status = fail_job(self.session_factory, claimed.job_id, owner=self.worker_id, error=error, retryable=retryable, backoff=self.backoff)
        except LeaseLostError as exc:
            log.warning("job_result_dropped", reason=str(exc))
            return "dropped"
        log.warning("job_failed" if status == "FAILED" else "job_will_retry", error=error, retryable=retryable, status=str(status))
        return f"failed:{status}"


def _supervise(ctx: WorkerContext, run: _JobRun, stop: threading.Event, grace_seconds: float) -> None:
    """Renew the lease while the job thread works; on stop, wait ``grace_seconds`` then release."""
    settings = ctx.settings.workers
    stop_seen_at: float | None = None
    last_beat = time.monotonic()
    held = True
    while not run.done.wait(timeout=min(settings.heartbeat_seconds, 0.25)):
        if held and time.monotonic() - last_beat >= settings.heartbeat_seconds:
            last_beat = time.monotonic()
            try:
                held = heartbeat(ctx.session_factory, run.claimed.job_id, owner=ctx.worker_id, lease_seconds=settings.lease_seconds)
            except Exception as exc:  # database hiccup: the lease is long enough for the next try
                log.warning("heartbeat_failed", job_id=run.claimed.job_id, error=str(exc))
            if not held:
                log.warning("job_lease_lost", job_id=run.claimed.job_id, note="cancelled or taken over; the result will be dropped")
        if stop.is_set():
            stop_seen_at = stop_seen_at or time.monotonic()
            if time.monotonic() - stop_seen_at >= grace_seconds:
                released = release_job(ctx.session_factory, run.claimed.job_id, owner=ctx.worker_id)
                log.warning("job_released_on_shutdown", job_id=run.claimed.job_id, released=released, grace_seconds=grace_seconds)
                return


def run_worker(
    settings: Settings,
    *,
    worker_id: str | None = None,
    stop_event: threading.Event | None = None,
    max_jobs: int | None = None,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    predictor: Predictor | None = None,
) -> int:
    """The worker loop. Returns the process exit code (0 after a clean stop).

    ``stop_event``: set it to stop (tests, threads); in the main thread SIGTERM/SIGINT set it too.
    ``max_jobs``: stop after that many jobs (tests). ``predictor``: an already loaded model (tests).
    """
    configure_logging(settings.log)
    worker_id = worker_id or default_owner()
    stop = stop_event or threading.Event()
    restore_signals = stop_on_signals(stop, event="worker_stopping")
    engine = make_engine(settings.database.url)
    try:
        with log_context(worker_id=worker_id):
            try:
                check_schema_at_head(engine)
            except AgentError as exc:
                log.error("worker_cannot_start", error=str(exc))
                return EXIT_STARTUP_ERROR
            factory = make_session_factory(engine)
            if predictor is None:
                from pe_model.errors import PEModelError

                try:
                    predictor = load_predictor(settings, processes=max(settings.workers.count, 1))
                except (PEModelError, OSError, RuntimeError, ValueError) as exc:
                    log.error("model_load_failed", checkpoint=settings.model.checkpoint, error=f"{type(exc).__name__}: {exc}")
                    return EXIT_MODEL_ERROR
            ctx = WorkerContext(settings, factory, predictor, worker_id)
            register_worker(factory, worker_id)
            log.info("worker_started", pid=os.getpid(), checkpoint=settings.model.checkpoint)
            try:
                _loop(ctx, stop, max_jobs, grace_seconds)
            finally:
                stop_worker(factory, worker_id)
                log.info("worker_stopped")
            return EXIT_OK
    finally:
        engine.dispose()
        restore_signals()


def _loop(ctx: WorkerContext, stop: threading.Event, max_jobs: int | None, grace_seconds: float) -> None:
    workers = ctx.settings.workers
    done = 0
    last_beat = 0.0
    while not stop.is_set() and (max_jobs is None or done < max_jobs):
        try:
            claimed = claim_next_job(ctx.session_factory, owner=ctx.worker_id, lease_seconds=workers.lease_seconds)
        except Exception as exc:  # database busy or gone for a moment: log, wait, try again
            log.warning("claim_failed", error=str(exc))
            stop.wait(workers.poll_seconds * 4)
            continue
        if claimed is None:
            if time.monotonic() - last_beat >= workers.heartbeat_seconds:
                worker_heartbeat(ctx.session_factory, ctx.worker_id, current_job_id=None)
                last_beat = time.monotonic()
            stop.wait(workers.poll_seconds)
            continue
        run = _JobRun(claimed=claimed)
        run.thread = threading.Thread(target=ctx.run_job, args=(run,), name=f"job-{claimed.job_id}", daemon=True)
        run.thread.start()
        _supervise(ctx, run, stop, grace_seconds)
        if not run.done.is_set():
            return  # released on shutdown; the daemon thread dies with the process
        worker_heartbeat(ctx.session_factory, ctx.worker_id, current_job_id=None)
        last_beat = time.monotonic()
        done += 1


def worker_process_main(settings: Settings, worker_id: str, grace_seconds: float = DEFAULT_GRACE_SECONDS) -> None:
    """Entry point of a worker process started by `serve` (multiprocessing "spawn")."""
    code = run_worker(settings, worker_id=worker_id, grace_seconds=grace_seconds)
    # Leave without waiting for a job thread abandoned on shutdown (its lease is already released).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
