"""Series tracker: quiet period, open associations, selection -> job or IGNORED, late instances, recovery."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.db.migrate import upgrade_database
from pacs_agent.db.models import Association, Event, Job, JobStatus, Series, SeriesState, utcnow
from pacs_agent.db.session import make_engine, make_session_factory, transaction
from pacs_agent.dicom.scp import Receiver
from pacs_agent.ingest.records import AssociationClosed, AssociationOpened, ReceivedInstance
from pacs_agent.ingest.writer import apply_records
from pacs_agent.settings import Settings
from pacs_agent.ingest.spool import Spool
from pacs_agent.series import tracker
from pacs_agent.series.tracker import even_sample, recover_open_associations, sweep_series
from phantoms import PhantomSpec, PhantomTruth, write_phantom_series

QUIET = 1.0


@dataclass(frozen=True)
class World:
    settings: Settings
    factory: sessionmaker[Session]
    spool: Spool
    phantoms: Path


@pytest.fixture
def world(settings_factory: Callable[..., Settings], tmp_path: Path) -> Iterator[World]:
    settings = settings_factory(
        series={
            "quiet_seconds": QUIET,
            "selection": {"min_slices": 12},
            "priority_rules": [{"priority": 10, "calling_ae_title": "ER_CT"}],
        }
    )
    engine = make_engine(settings.database.url)
    upgrade_database(settings.database.url, engine)
    spool = Spool(settings.spool_root, settings.node.min_free_disk_mb)
    yield World(settings, make_session_factory(engine), spool, tmp_path / "phantoms")
    engine.dispose()


def phantom(world: World, name: str, **spec: Any) -> PhantomTruth:
    base: dict[str, Any] = {"n_slices": 16, "rows": 32, "columns": 32}
    return write_phantom_series(world.phantoms / name, PhantomSpec(**{**base, **spec}))


def ingest(
    world: World,
    truth: PhantomTruth,
    *,
    at: datetime,
    files: slice = slice(None),
    association_id: str | None = None,
    calling_ae_title: str = "SCANNER",
) -> None:
    """Put phantom files in the spool and record them, as the receiver does."""
    records = []
    for file in dict.fromkeys(truth.files[files]):  # an Enhanced CT file is listed once per frame
        ds = pydicom.dcmread(file, stop_before_pixels=True)
        target = world.spool.instance_path(truth.study_instance_uid, truth.series_instance_uid, ds.SOPInstanceUID)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)
        records.append(
            ReceivedInstance(
                study_instance_uid=truth.study_instance_uid, series_instance_uid=truth.series_instance_uid,
                sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, path=world.spool.relative(target),
                size_bytes=target.stat().st_size, received_at=at, association_id=association_id,
                calling_ae_title=calling_ae_title, modality="CT", series_description="", accession_number="",
            )
        )
    apply_records(world.factory, world.spool, records)


def series_row(world: World, uid: str) -> Series:
    with world.factory() as session:
        return session.scalars(select(Series).where(Series.series_instance_uid == uid)).one()


def jobs(world: World) -> list[Job]:
    with world.factory() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def finish_job(world: World, job_id: int, status: JobStatus = JobStatus.SUCCEEDED) -> None:
    """Stand-in for the worker: the job ran and the series was analysed."""
    with transaction(world.factory) as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.status = status
        job.series.state = SeriesState.ANALYSED if status == JobStatus.SUCCEEDED else SeriesState.FAILED


def test_quiet_period_is_honoured(world: World) -> None:
    truth = phantom(world, "ctpa")
    t0 = utcnow()
    ingest(world, truth, at=t0)
    assert sweep_series(world.factory, world.settings, now=t0 + timedelta(seconds=QUIET * 0.9)) == []
    assert series_row(world, truth.series_instance_uid).state == SeriesState.RECEIVING
    queued = sweep_series(world.factory, world.settings, now=t0 + timedelta(seconds=QUIET))
    assert len(queued) == 1
    row = series_row(world, truth.series_instance_uid)
    assert row.state == SeriesState.QUEUED and row.analysed_instance_count == 16
    job = jobs(world)[0]
    assert (job.id, job.reason, job.status, job.priority) == (queued[0], "received", JobStatus.QUEUED, 0)
    assert job.max_attempts == world.settings.workers.max_attempts
    # nothing new: a second sweep does nothing
    assert sweep_series(world.factory, world.settings, now=t0 + timedelta(seconds=60)) == []
    with world.factory() as session:
        states = [(e.from_state, e.to_state) for e in session.scalars(
            select(Event).where(Event.entity == "series", Event.kind == "series_state").order_by(Event.id))]
    assert states == [("", "RECEIVING"), ("RECEIVING", "COMPLETE"), ("COMPLETE", "QUEUED")]


def test_an_open_association_blocks_completion(world: World) -> None:
    truth = phantom(world, "ctpa")
    t0 = utcnow()
    apply_records(world.factory, world.spool, [AssociationOpened("assoc-1", "SCANNER", "127.0.0.1:1", t0)])
    ingest(world, truth, at=t0, association_id="assoc-1")
    later = t0 + timedelta(seconds=QUIET * 10)
    assert sweep_series(world.factory, world.settings, now=later) == []
    apply_records(world.factory, world.spool, [AssociationClosed("assoc-1", "released", later, 16, 0, 0, 0)])
    assert len(sweep_series(world.factory, world.settings, now=later)) == 1


def test_one_open_association_of_several_blocks_completion(world: World) -> None:
    truth = phantom(world, "ctpa")
    t0 = utcnow()
    apply_records(world.factory, world.spool, [
        AssociationOpened("a", "SCANNER", "", t0), AssociationOpened("b", "SCANNER", "", t0),
    ])
    ingest(world, truth, at=t0, files=slice(0, 8), association_id="a")
    ingest(world, truth, at=t0, files=slice(8, None), association_id="b")
    apply_records(world.factory, world.spool, [AssociationClosed("a", "released", t0, 8, 0, 0, 0)])
    assert sweep_series(world.factory, world.settings, now=t0 + timedelta(seconds=30)) == []
    apply_records(world.factory, world.spool, [AssociationClosed("b", "aborted", t0, 8, 0, 0, 0)])
    assert len(sweep_series(world.factory, world.settings, now=t0 + timedelta(seconds=30))) == 1


def test_head_ct_without_contrast_is_ignored_with_its_reason(world: World) -> None:
    truth = phantom(world, "head", kind="head", contrast=False, series_description="HEAD W/O", body_part_examined="HEAD")
    t0 = utcnow()
    ingest(world, truth, at=t0)
    assert sweep_series(world.factory, world.settings, now=t0 + timedelta(seconds=QUIET + 0.1)) == []
    row = series_row(world, truth.series_instance_uid)
    assert row.state == SeriesState.IGNORED
    assert "head CT: body part HEAD is not chest" in row.ignore_reason
    assert "no contrast agent and description 'HEAD W/O" in row.ignore_reason
    assert jobs(world) == []
    with world.factory() as session:
        event = session.scalars(select(Event).where(Event.to_state == "IGNORED")).one()
    assert event.detail["reason"] == row.ignore_reason


def test_too_few_slices_is_ignored_then_accepted_when_the_rest_arrives(world: World) -> None:
    truth = phantom(world, "ctpa")
    t0 = utcnow()
    ingest(world, truth, at=t0, files=slice(0, 5))
    sweep_series(world.factory, world.settings, now=t0 + timedelta(seconds=QUIET))
    row = series_row(world, truth.series_instance_uid)
    assert row.state == SeriesState.IGNORED and "5 slices; at least 12 needed" in row.ignore_reason
    t1 = t0 + timedelta(seconds=10)
    ingest(world, truth, at=t1, files=slice(5, None))
    assert sweep_series(world.factory, world.settings, now=t1) == []
    queued = sweep_series(world.factory, world.settings, now=t1 + timedelta(seconds=QUIET))
    assert len(queued) == 1
    assert jobs(world)[0].reason == "received"
    assert series_row(world, truth.series_instance_uid).ignore_reason == ""


def test_late_instances_after_analysis_queue_a_superseding_job(world: World) -> None:
    truth = phantom(world, "ctpa")
    t0 = utcnow()
    ingest(world, truth, at=t0, files=slice(0, 14))
    [first] = sweep_series(world.factory, world.settings, now=t0 + timedelta(seconds=QUIET))
    finish_job(world, first)
    t1 = t0 + timedelta(seconds=30)
    ingest(world, truth, at=t1, files=slice(14, None))
    assert sweep_series(world.factory, world.settings, now=t1 + timedelta(seconds=QUIET / 2)) == []  # not quiet yet
    [second] = sweep_series(world.factory, world.settings, now=t1 + timedelta(seconds=QUIET))
    job = jobs(world)[1]
    assert (job.id, job.reason, job.supersedes_job_id, job.status) == (second, "late-instances", first, JobStatus.QUEUED)
    row = series_row(world, truth.series_instance_uid)
    assert row.state == SeriesState.QUEUED and row.analysed_instance_count == row.instance_count == 16


def test_late_instances_while_the_job_still_waits_join_it(world: World) -> None:
    truth = phantom(world, "ctpa")
    t0 = utcnow()
    ingest(world, truth, at=t0, files=slice(0, 14))
    [first] = sweep_series(world.factory, world.settings, now=t0 + timedelta(seconds=QUIET))
    t1 = t0 + timedelta(seconds=5)
    ingest(world, truth, at=t1, files=slice(14, None))
    assert sweep_series(world.factory, world.settings, now=t1 + timedelta(seconds=QUIET)) == []
    assert [j.id for j in jobs(world)] == [first]
    assert series_row(world, truth.series_instance_uid).analysed_instance_count == 16
    with world.factory() as session:
        joined = session.scalars(select(Event).where(Event.kind == "late_instances_joined_job")).one()
    assert joined.job_id == first and joined.detail["added"] == 2


def test_late_instances_after_a_failed_job_supersede_nothing(world: World) -> None:
    truth = phantom(world, "ctpa")
    t0 = utcnow()
    ingest(world, truth, at=t0, files=slice(0, 14))
    [first] = sweep_series(world.factory, world.settings, now=t0 + timedelta(seconds=QUIET))
    finish_job(world, first, JobStatus.FAILED)
    ingest(world, truth, at=t0 + timedelta(seconds=5), files=slice(14, None))
    [second] = sweep_series(world.factory, world.settings, now=t0 + timedelta(seconds=5 + QUIET))
    job = jobs(world)[1]
    assert job.reason == "late-instances" and job.supersedes_job_id is None


def test_priority_rule_by_calling_ae(world: World) -> None:
    truth = phantom(world, "ctpa")
    t0 = utcnow()
    ingest(world, truth, at=t0, calling_ae_title="ER_CT")
    sweep_series(world.factory, world.settings, now=t0 + timedelta(seconds=QUIET))
    assert jobs(world)[0].priority == 10
    assert series_row(world, truth.series_instance_uid).input_priority == 10


def test_recover_open_associations(world: World) -> None:
    t0 = utcnow()
    apply_records(world.factory, world.spool, [
        AssociationOpened("left-open", "SCANNER", "", t0),
        AssociationOpened("closed", "SCANNER", "", t0),
        AssociationClosed("closed", "released", t0, 0, 0, 0, 0),
    ])
    assert recover_open_associations(world.factory) == 1
    assert recover_open_associations(world.factory) == 0
    with world.factory() as session:
        reasons = dict(session.execute(select(Association.id, Association.close_reason)).tuples().all())
    assert reasons == {"left-open": "recovered", "closed": "released"}


# -- over the network, with the scheduler's cadence ------------------------------------------------


class Sweeper(threading.Thread):
    """Calls sweep_series every 0.5 s like the scheduler does; notes when each job was queued."""

    def __init__(self, factory: sessionmaker[Session], settings: Settings) -> None:
        super().__init__(daemon=True)
        self.factory, self.settings = factory, settings
        self.queued_at: dict[int, float] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for job_id in sweep_series(self.factory, self.settings):
                self.queued_at[job_id] = time.monotonic()
            self.halt.wait(0.5)


@pytest.fixture
def live(settings_factory: Callable[..., Settings]) -> Iterator[tuple[Receiver, Sweeper, Settings]]:
    settings = settings_factory(series={"quiet_seconds": QUIET, "selection": {"min_slices": 12}})
    engine = make_engine(settings.database.url)
    upgrade_database(settings.database.url, engine)
    factory = make_session_factory(engine)
    receiver = Receiver(settings, factory)
    receiver.start()
    sweeper = Sweeper(factory, settings)
    sweeper.start()
    yield receiver, sweeper, settings
    sweeper.halt.set()
    sweeper.join(5)
    receiver.stop()
    engine.dispose()


def _associate(port: int) -> Any:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="PE_AGENT")
    assert assoc.is_established
    return assoc


def test_job_is_queued_within_quiet_seconds_plus_one_of_the_last_instance(
    live: tuple[Receiver, Sweeper, Settings], tmp_path: Path
) -> None:
    receiver, sweeper, _ = live
    truth = write_phantom_series(tmp_path / "p", PhantomSpec(n_slices=16, rows=32, columns=32))
    assoc = _associate(receiver.port)
    for file in truth.files:
        assert assoc.send_c_store(file).Status == 0
    last_ack = time.monotonic()
    assoc.release()
    deadline = last_ack + QUIET + 3
    while not sweeper.queued_at and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sweeper.queued_at, "no job was queued"
    latency = next(iter(sweeper.queued_at.values())) - last_ack
    assert QUIET <= latency <= QUIET + 1.0, f"queued {latency:.2f} s after the last instance"


def test_open_association_holds_the_series_over_the_network(
    live: tuple[Receiver, Sweeper, Settings], tmp_path: Path
) -> None:
    receiver, sweeper, _ = live
    truth = write_phantom_series(tmp_path / "p", PhantomSpec(n_slices=16, rows=32, columns=32))
    assoc = _associate(receiver.port)
    for file in truth.files:
        assert assoc.send_c_store(file).Status == 0
    time.sleep(QUIET + 1.5)  # quiet, but the association is still open
    assert sweeper.queued_at == {}
    released = time.monotonic()
    assoc.release()
    deadline = released + 3
    while not sweeper.queued_at and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sweeper.queued_at, "no job after the association was released"
    assert next(iter(sweeper.queued_at.values())) - released <= 1.0


def test_enhanced_ct_series_counts_frames_and_is_queued(world: World) -> None:
    truth = write_phantom_series(world.phantoms / "enhanced", PhantomSpec(n_slices=16, rows=32, columns=32), enhanced=True)
    assert len(set(truth.files)) == 1
    t0 = utcnow()
    ingest(world, truth, at=t0)
    [job_id] = sweep_series(world.factory, world.settings, now=t0 + timedelta(seconds=QUIET))
    with world.factory() as session:
        queued = session.scalars(select(Event).where(Event.kind == "job_queued")).one()
    assert queued.job_id == job_id
    assert series_row(world, truth.series_instance_uid).instance_count == 1


def test_even_sample() -> None:
    items = [str(i) for i in range(100)]
    sample = even_sample(items, 5)
    assert sample == ["0", "25", "50", "74", "99"]
    assert even_sample(items[:3], 5) == ["0", "1", "2"]
    assert even_sample(items, 1) == ["0"]


def test_large_series_are_decided_on_a_sample_scaled_to_the_instance_count(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracker, "SELECTION_SAMPLE", 4)
    read: list[int] = []
    original = tracker.read_selection_headers

    def counting(spool: Spool, paths: Any) -> list[pydicom.Dataset]:
        paths = list(paths)
        read.append(len(paths))
        return original(spool, paths)

    monkeypatch.setattr(tracker, "read_selection_headers", counting)
    full = phantom(world, "full")
    short = phantom(world, "short", n_slices=8, seed=1)
    t0 = utcnow()
    ingest(world, full, at=t0)
    ingest(world, short, at=t0)
    queued = sweep_series(world.factory, world.settings, now=t0 + timedelta(seconds=QUIET))
    assert read == [4, 4]
    assert len(queued) == 1
    assert series_row(world, full.series_instance_uid).state == SeriesState.QUEUED
    ignored = series_row(world, short.series_instance_uid)
    assert ignored.state == SeriesState.IGNORED and "8 slices; at least 12 needed" in ignored.ignore_reason
