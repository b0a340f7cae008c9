"""Worker loop against a real SQLite database, the spool and the tiny random model.

Series are put into the spool and database directly here (the receiver has its own tests; the
end-to-end test goes through it).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from pacs_agent.db.models import Delivery, DeliveryStatus, Event, Flag, Instance, Job, JobStatus, Output, OutputKind, Result, Series, SeriesState, Study, Worker
from pacs_agent.db.session import transaction
from pacs_agent.logs import PATIENT_VALUES, configure_logging
from pacs_agent.jobs.queue import cancel_job, enqueue_job, reprocess_series
from pacs_agent.reports import secondary_captures_wanted
from pacs_agent.settings import LogSettings, Settings
from pacs_agent.analysis.worker import EXIT_MODEL_ERROR, EXIT_OK, run_worker
from pacs_agent.worklist import flag_for
from phantoms import PhantomSpec, write_phantom_series

from tests.support.settings import MigratedDB


def ingest(db: MigratedDB, source: Path, *, n_slices: int = 48, seed: int = 0, name: str = "PHANTOM^WORKER") -> Series:
    """Write a phantom series, copy it into the spool layout and record Series/Instance rows."""
    truth = write_phantom_series(source, PhantomSpec(n_slices=n_slices, rows=64, columns=64, seed=seed, patient_name=name))
    root = Path(db.settings.storage.root)
    folder = root / "incoming" / truth.study_instance_uid / truth.series_instance_uid
    folder.mkdir(parents=True, exist_ok=True)
    with transaction(db.session_factory) as session:
        series = Series(
            study_instance_uid=truth.study_instance_uid, series_instance_uid=truth.series_instance_uid,
            modality="CT", instance_count=len(truth.files), state=SeriesState.COMPLETE,
        )
        session.add(series)
        session.flush()
        for sop, file in zip(truth.sop_instance_uids, truth.files, strict=True):
            target = folder / f"{sop}.dcm"
            shutil.copyfile(file, target)
            session.add(Instance(series_id=series.id, sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                                 path=target.relative_to(root).as_posix(), size_bytes=target.stat().st_size))
        enqueue_job(session, series, priority=0, reason="received", max_attempts=db.settings.workers.max_attempts)
    return series


def jobs_of(db: MigratedDB, series_id: int) -> list[Job]:
    with db.session_factory() as session:
        return list(session.scalars(select(Job).where(Job.series_id == series_id).order_by(Job.id)))


@pytest.fixture(autouse=True)
def _quiet_logs_after() -> Any:
    yield
    PATIENT_VALUES.clear()
    configure_logging(LogSettings(format="json", level="WARNING"), stream=io.StringIO())


def test_job_succeeds_with_result_outputs_deliveries_and_flag(
    migrated_db: MigratedDB, tmp_path: Path, tiny_predictor: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    series = ingest(migrated_db, tmp_path / "src")
    code = run_worker(migrated_db.settings, worker_id="w-test", max_jobs=1, predictor=tiny_predictor)
    assert code == EXIT_OK
    (job,) = jobs_of(migrated_db, series.id)
    assert job.status == JobStatus.SUCCEEDED and job.attempts == 1 and job.model_version
    with migrated_db.session_factory() as session:
        result = session.scalars(select(Result).where(Result.job_id == job.id)).one()
        assert result.flag == flag_for(result, migrated_db.settings.model.review_margin)  # consistent with its labels
        assert set(result.labels) >= {"negative_exam_for_pe", "rv_lv_ratio_gte_1"}
        assert result.model_sha256 and result.timings_s["job"] > 0
        assert result.model_precision in ("fp32", "bf16")
        outputs = session.scalars(select(Output).where(Output.job_id == job.id)).all()
        kinds = sorted(o.kind for o in outputs)
        # The tiny random model's flag decides whether Grad-CAM SCs are made (outputs.secondary_capture = "positive").
        heatmaps = [OutputKind.SC, OutputKind.SC] if secondary_captures_wanted(migrated_db.settings.outputs, result.flag) else []
        assert kinds == sorted([*heatmaps, OutputKind.SR, OutputKind.KOS])
        for output in outputs:
            path = Path(migrated_db.settings.storage.root) / output.path
            assert path.parent.name == str(job.id) and pydicom.dcmread(path).SOPInstanceUID == output.sop_instance_uid
        deliveries = session.scalars(select(Delivery)).all()
        assert len(deliveries) == len(outputs) and {d.status for d in deliveries} == {DeliveryStatus.PENDING}
        assert session.get(Series, series.id).state == SeriesState.ANALYSED  # type: ignore[union-attr]
        study = session.get(Study, series.study_instance_uid)
        assert study is not None and study.flag == result.flag and study.job_id == job.id
    captured = capsys.readouterr().err  # the worker logs JSON lines to stderr (settings.log.format = json)
    lines = [json.loads(line) for line in captured.splitlines() if line.startswith("{")]
    started = [line for line in lines if line["event"] == "job_started"]
    assert started and started[0]["job_id"] == job.id and started[0]["series_instance_uid"] == series.series_instance_uid
    assert "PHANTOM^WORKER" not in captured and "PHANTOM WORKER" not in captured


def test_series_the_model_cannot_analyse_fails_at_once(migrated_db: MigratedDB, tmp_path: Path, tiny_predictor: Any) -> None:
    series = ingest(migrated_db, tmp_path / "src", n_slices=4)
    assert run_worker(migrated_db.settings, worker_id="w", max_jobs=1, predictor=tiny_predictor) == EXIT_OK
    (job,) = jobs_of(migrated_db, series.id)
    assert job.status == JobStatus.FAILED and job.attempts == 1
    assert job.error and "\n" not in job.error
    with migrated_db.session_factory() as session:
        study = session.get(Study, series.study_instance_uid)
        assert study is not None and study.flag == Flag.ERROR


def test_missing_files_are_retried_with_backoff(migrated_db: MigratedDB, tmp_path: Path, tiny_predictor: Any) -> None:
    series = ingest(migrated_db, tmp_path / "src")
    shutil.rmtree(Path(migrated_db.settings.storage.root) / "incoming")
    assert run_worker(migrated_db.settings, worker_id="w", max_jobs=1, predictor=tiny_predictor) == EXIT_OK
    (job,) = jobs_of(migrated_db, series.id)
    assert job.status == JobStatus.QUEUED and job.attempts == 1 and "missing from the spool" in job.error
    assert job.not_before > job.started_at  # type: ignore[operator]


def test_reprocess_report_references_the_previous_one(migrated_db: MigratedDB, tmp_path: Path, tiny_predictor: Any) -> None:
    series = ingest(migrated_db, tmp_path / "src")
    run_worker(migrated_db.settings, worker_id="w", max_jobs=1, predictor=tiny_predictor)
    with transaction(migrated_db.session_factory) as session:
        row = session.get(Series, series.id)
        assert row is not None
        reprocess_series(session, row, max_attempts=3)
    run_worker(migrated_db.settings, worker_id="w", max_jobs=1, predictor=tiny_predictor)
    first, second = jobs_of(migrated_db, series.id)
    assert second.status == JobStatus.SUCCEEDED and second.supersedes_job_id == first.id
    with migrated_db.session_factory() as session:
        srs = {o.job_id: o for o in session.scalars(select(Output).where(Output.kind == OutputKind.SR))}
    root = Path(migrated_db.settings.storage.root)
    new_sr = pydicom.dcmread(root / srs[second.id].path)
    referenced = [
        item.ReferencedSOPInstanceUID
        for study in new_sr.PredecessorDocumentsSequence
        for s in study.ReferencedSeriesSequence
        for item in s.ReferencedSOPSequence
    ]
    assert referenced == [srs[first.id].sop_instance_uid]
    # The superseded result is retracted: an IOCM rejection note lists every one of its objects.
    with migrated_db.session_factory() as session:
        first_outputs = {o.sop_instance_uid for o in session.scalars(select(Output).where(Output.job_id == first.id))}
        [note_row] = session.scalars(select(Output).where(Output.job_id == second.id, Output.kind == OutputKind.REJECTION)).all()
        [event] = session.scalars(select(Event).where(Event.kind == "result_superseded", Event.job_id == second.id)).all()
        assert session.scalars(select(Delivery).where(Delivery.output_id == note_row.id)).one().status == DeliveryStatus.PENDING
    note = pydicom.dcmread(root / note_row.path)
    assert note.ConceptNameCodeSequence[0].CodeValue == "113001"
    rejected = {
        str(item.ReferencedSOPInstanceUID)
        for study in note.CurrentRequestedProcedureEvidenceSequence
        for s in study.ReferencedSeriesSequence
        for item in s.ReferencedSOPSequence
    }
    assert rejected == first_outputs
    assert event.detail["retracted"] is True and event.detail["superseded_job_id"] == first.id
    assert event.detail["rejected_objects"] == len(first_outputs)
    assert event.detail["rejection_note_sop_instance_uid"] == note_row.sop_instance_uid

    # A second reprocess rejects the second result, never the first rejection note.
    with transaction(migrated_db.session_factory) as session:
        row = session.get(Series, series.id)
        assert row is not None
        reprocess_series(session, row, max_attempts=3)
    run_worker(migrated_db.settings, worker_id="w", max_jobs=1, predictor=tiny_predictor)
    third = jobs_of(migrated_db, series.id)[2]
    assert third.supersedes_job_id == second.id
    with migrated_db.session_factory() as session:
        second_outputs = {o.sop_instance_uid for o in session.scalars(
            select(Output).where(Output.job_id == second.id, Output.kind != OutputKind.REJECTION))}
        [third_note] = session.scalars(select(Output).where(Output.job_id == third.id, Output.kind == OutputKind.REJECTION)).all()
    rejected_again = {
        str(item.ReferencedSOPInstanceUID)
        for study in pydicom.dcmread(root / third_note.path).CurrentRequestedProcedureEvidenceSequence
        for s in study.ReferencedSeriesSequence
        for item in s.ReferencedSOPSequence
    }
    assert rejected_again == second_outputs


def test_reprocess_without_retraction_records_it(migrated_db: MigratedDB, tmp_path: Path, tiny_predictor: Any) -> None:
    settings = replace(migrated_db.settings, outputs=replace(migrated_db.settings.outputs, retract_superseded=False))
    series = ingest(migrated_db, tmp_path / "src")
    run_worker(settings, worker_id="w", max_jobs=1, predictor=tiny_predictor)
    with transaction(migrated_db.session_factory) as session:
        row = session.get(Series, series.id)
        assert row is not None
        reprocess_series(session, row, max_attempts=3)
    run_worker(settings, worker_id="w", max_jobs=1, predictor=tiny_predictor)
    _, second = jobs_of(migrated_db, series.id)
    with migrated_db.session_factory() as session:
        assert not session.scalars(select(Output).where(Output.kind == OutputKind.REJECTION)).all()
        [event] = session.scalars(select(Event).where(Event.kind == "result_superseded", Event.job_id == second.id)).all()
    assert event.detail["retracted"] is False


class GatedPredictor:
    """The real predictor, held at a gate so a test can act while a job is running."""

    def __init__(self, predictor: Any) -> None:
        self._predictor = predictor
        self.entered = threading.Event()
        self.gate = threading.Event()

    def predict(self, series: Any) -> Any:
        self.entered.set()
        if not self.gate.wait(timeout=60):
            raise RuntimeError("gate never opened")
        return self._predictor.predict(series)


def _start(settings: Settings, predictor: Any, **kwargs: Any) -> tuple[threading.Thread, threading.Event, list[int]]:
    stop = threading.Event()
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(run_worker(settings, worker_id="w", stop_event=stop, predictor=predictor, **kwargs)))
    thread.start()
    return thread, stop, codes


def _wait(predicate: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_cancelled_running_job_drops_its_result(migrated_db: MigratedDB, tmp_path: Path, tiny_predictor: Any) -> None:
    series = ingest(migrated_db, tmp_path / "src")
    gated = GatedPredictor(tiny_predictor)
    thread, stop, codes = _start(migrated_db.settings, gated)
    assert gated.entered.wait(30)
    (job,) = jobs_of(migrated_db, series.id)
    with transaction(migrated_db.session_factory) as session:
        cancel_job(session, job.id)
    time.sleep(migrated_db.settings.workers.heartbeat_seconds * 1.5)  # the worker sees it at its heartbeat
    gated.gate.set()
    with migrated_db.session_factory() as session:
        _wait(lambda: session.scalars(select(Event).where(Event.job_id == job.id, Event.kind == "job_cancelled")).first() is not None)
    time.sleep(2)
    stop.set()
    thread.join(30)
    assert codes == [EXIT_OK]
    (job,) = jobs_of(migrated_db, series.id)
    assert job.status == JobStatus.CANCELLED
    with migrated_db.session_factory() as session:
        assert session.scalars(select(Result)).first() is None
        assert session.scalars(select(Delivery)).first() is None


def test_stop_releases_a_job_that_outlasts_the_grace_period(migrated_db: MigratedDB, tmp_path: Path, tiny_predictor: Any) -> None:
    series = ingest(migrated_db, tmp_path / "src")
    gated = GatedPredictor(tiny_predictor)
    thread, stop, codes = _start(migrated_db.settings, gated, grace_seconds=0.5)
    assert gated.entered.wait(30)
    stop.set()
    thread.join(30)
    assert codes == [EXIT_OK]
    (job,) = jobs_of(migrated_db, series.id)
    assert job.status == JobStatus.QUEUED and job.attempts == 0 and job.lease_owner is None
    gated.gate.set()  # let the abandoned thread end; its late result must not land
    time.sleep(3)
    assert jobs_of(migrated_db, series.id)[0].status == JobStatus.QUEUED


def test_stop_lets_a_quick_job_finish(migrated_db: MigratedDB, tmp_path: Path, tiny_predictor: Any) -> None:
    series = ingest(migrated_db, tmp_path / "src")
    gated = GatedPredictor(tiny_predictor)
    thread, stop, codes = _start(migrated_db.settings, gated, grace_seconds=60)
    assert gated.entered.wait(30)
    stop.set()
    gated.gate.set()
    thread.join(60)
    assert codes == [EXIT_OK]
    assert jobs_of(migrated_db, series.id)[0].status == JobStatus.SUCCEEDED


def test_unloadable_model_exits_with_model_error(settings_factory: Callable[..., Settings], migrated_db: MigratedDB, tmp_path: Path) -> None:
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    settings = settings_factory(model={"checkpoint": str(bad)})
    assert run_worker(settings, worker_id="w", max_jobs=1) == EXIT_MODEL_ERROR


def test_retention_deletes_what_is_no_longer_needed(migrated_db: MigratedDB, tmp_path: Path, tiny_predictor: Any) -> None:
    from datetime import timedelta

    from pacs_agent.db.models import utcnow
    from pacs_agent.node.scheduler import run_retention

    kept = ingest(migrated_db, tmp_path / "a", seed=1)
    run_worker(migrated_db.settings, worker_id="w", max_jobs=1, predictor=tiny_predictor)
    purged = ingest(migrated_db, tmp_path / "b", seed=2)
    run_worker(migrated_db.settings, worker_id="w", max_jobs=1, predictor=tiny_predictor)
    (kept_job,) = jobs_of(migrated_db, kept.id)
    (purged_job,) = jobs_of(migrated_db, purged.id)
    with transaction(migrated_db.session_factory) as session:
        for delivery in session.scalars(select(Delivery).join(Output)):
            job_id = session.get(Output, delivery.output_id).job_id  # type: ignore[union-attr]
            delivery.status = DeliveryStatus.DELIVERED if job_id == purged_job.id else DeliveryStatus.FAILED
    root = Path(migrated_db.settings.storage.root)
    assert (root / "outbox" / str(kept_job.id)).is_dir() and (root / "outbox" / str(purged_job.id)).is_dir()

    report = run_retention(migrated_db.session_factory, migrated_db.settings, now=utcnow() + timedelta(days=1))
    assert report.series_purged == 0 and report.outbox_jobs_purged == 0 and report.events_deleted == 0  # too young

    later = utcnow() + timedelta(days=365)
    report = run_retention(migrated_db.session_factory, migrated_db.settings, now=later)
    assert report.series_purged == 2 and report.instance_files_deleted == 2 * 48
    assert not (root / "incoming" / purged.study_instance_uid).exists()
    assert report.outbox_jobs_purged == 1  # the job with a FAILED delivery keeps its files for `pe-agent retry`
    assert (root / "outbox" / str(kept_job.id)).is_dir() and not (root / "outbox" / str(purged_job.id)).exists()
    assert report.events_deleted > 0
    with migrated_db.session_factory() as session:
        assert session.scalars(select(Event).where(Event.at < later - timedelta(days=90))).first() is None


@pytest.mark.slow
def test_pool_restarts_a_worker_that_dies(settings_factory: Callable[..., Settings], migrated_db: MigratedDB, tiny_checkpoint: Path) -> None:
    import signal as signals

    from pacs_agent.node.supervisor import WorkerPool

    settings = settings_factory(model={"checkpoint": str(tiny_checkpoint)})
    pool = WorkerPool(settings, 1, grace_seconds=2)
    pool.start()
    try:
        _wait(lambda: pool.alive() == 1)
        first_pid = pool._slots[0].process.pid  # type: ignore[union-attr]
        assert first_pid is not None
        os.kill(first_pid, signals.SIGKILL)
        _wait(lambda: pool._slots[0].process.exitcode is not None)  # type: ignore[union-attr]
        pool.check()
        _wait(lambda: pool.alive() == 1)
        assert pool._slots[0].process.pid != first_pid and pool._restarts.restarts(0) == 1  # type: ignore[union-attr]
        assert not pool.fatal
    finally:
        pool.stop()
    assert pool.alive() == 0


@pytest.mark.slow
def test_worker_command_processes_jobs_in_spawned_processes(
    settings_factory: Callable[..., Settings], migrated_db: MigratedDB, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    from pacs_agent.node.service import run_workers

    settings = settings_factory(model={"checkpoint": str(tiny_checkpoint), "torch_threads": 1})
    series = ingest(migrated_db, tmp_path / "src")
    stop = threading.Event()
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(run_workers(settings, count=1, stop_event=stop)))
    thread.start()
    try:
        _wait(lambda: jobs_of(migrated_db, series.id)[0].status == JobStatus.SUCCEEDED, timeout=120)
    finally:
        stop.set()
        thread.join(60)
    assert codes == [EXIT_OK]
    with migrated_db.session_factory() as session:
        workers = session.scalars(select(Worker)).all()
        assert len(workers) == 1 and workers[0].stopped_at is not None and workers[0].pid != os.getpid()
