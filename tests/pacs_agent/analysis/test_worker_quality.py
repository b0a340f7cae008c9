"""The input-quality gate in the node: a series with unopacified pulmonary arteries is stored as
"non-diagnostic: <reason>" with flag REVIEW and its measurements; `pe-agent show` prints them."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from pacs_agent.analysis.worker import EXIT_OK, run_worker
from pacs_agent.db.models import Flag, Instance, Job, Result, Series, SeriesState, Study
from pacs_agent.db.session import transaction
from pacs_agent.jobs.queue import enqueue_job
from pacs_agent.logs import PATIENT_VALUES, configure_logging
from pacs_agent.node.cli import main
from pacs_agent.settings import LogSettings
from pacs_agent.worklist import flag_for
from phantoms.heldout import HeldoutSpec, HeldoutTruth, write_heldout_series
from tests.support.settings import MigratedDB


def _ingest(db: MigratedDB, source: Path, pulmonary_artery_hu: float) -> tuple[Series, HeldoutTruth]:
    spec = HeldoutSpec(seed=12, rows=96, columns=96, fov_mm=340.0, slice_thickness_mm=3.0, slice_spacing_mm=3.0,
                       pulmonary_artery_hu=pulmonary_artery_hu, patient_id=f"HQ-{pulmonary_artery_hu:.0f}")
    truth = write_heldout_series(source, spec)
    root = Path(db.settings.storage.root)
    folder = root / "incoming" / truth.study_instance_uid / truth.series_instance_uid
    folder.mkdir(parents=True, exist_ok=True)
    with transaction(db.session_factory) as session:
        series = Series(study_instance_uid=truth.study_instance_uid, series_instance_uid=truth.series_instance_uid,
                        modality="CT", instance_count=len(truth.files), state=SeriesState.COMPLETE)
        session.add(series)
        session.flush()
        for sop, file in zip(truth.sop_instance_uids, truth.files, strict=True):
            target = folder / f"{sop}.dcm"
            shutil.copyfile(file, target)
            session.add(Instance(series_id=series.id, sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                                 path=target.relative_to(root).as_posix(), size_bytes=target.stat().st_size))
        enqueue_job(session, series, priority=0, reason="received", max_attempts=db.settings.workers.max_attempts)
    return series, truth


@pytest.fixture(autouse=True)
def _quiet_logs_after() -> Any:
    yield
    PATIENT_VALUES.clear()
    configure_logging(LogSettings(format="json", level="WARNING"), stream=io.StringIO())


def test_unopacified_series_is_review_with_reason_and_measurements(
    migrated_db: MigratedDB, tmp_path: Path, tiny_predictor: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    poor, _ = _ingest(migrated_db, tmp_path / "poor", 60.0)
    good, _ = _ingest(migrated_db, tmp_path / "good", 350.0)
    assert run_worker(migrated_db.settings, worker_id="w-q", max_jobs=2, predictor=tiny_predictor) == EXIT_OK
    with migrated_db.session_factory() as session:
        results = {
            s.id: session.scalars(select(Result).join(Job).where(Job.series_id == s.id)).one() for s in (poor, good)
        }
        bad = results[poor.id]
        assert bad.flag == Flag.REVIEW
        assert bad.quality["status"] == "non-diagnostic" and bad.quality["passed"] is False
        assert bad.quality["summary"].startswith("non-diagnostic: ") and "< 250 HU" in bad.quality["summary"]
        assert bad.quality["lung_apex_covered"] is True and bad.quality["slice_thickness_mm"] == 3.0
        study = session.get(Study, poor.study_instance_uid)
        assert study is not None and study.flag == Flag.REVIEW
        assert study.summary.startswith("non-diagnostic: ")
        fine = results[good.id]
        assert fine.quality["status"] == "adequate"
        assert fine.quality["pulmonary_trunk_hu"] == pytest.approx(350.0, abs=25.0)
        assert not session.get(Study, good.study_instance_uid).summary.startswith("non-diagnostic")  # type: ignore[union-attr]
        assert fine.flag == flag_for(fine, migrated_db.settings.model.review_margin)  # the model's own flag
        job_id = session.scalars(select(Job.id).where(Job.series_id == poor.id)).one()

    config = tmp_path / "agent.toml"
    config.write_text(f'[storage]\nroot = "{migrated_db.settings.storage.root}"\n'
                      f'[database]\nurl = "{migrated_db.settings.database.url}"\n[log]\nformat = "json"\n')
    capsys.readouterr()
    assert main(["show", str(job_id), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "non-diagnostic: " in out and "Input quality" in out and "pulmonary trunk" in out
    assert main(["show", str(job_id), "--config", str(config), "--json"]) == 0
    shown = capsys.readouterr().out
    assert '"status": "non-diagnostic"' in shown and '"summary": "non-diagnostic: ' in shown
