"""Analysed studies written straight into a migrated database, for dashboard and metrics tests.

Each goes through the real queue (enqueue, claim, complete), so its events, series state and
worklist row are those the node itself would write.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.db.models import Delivery, DeliveryStatus, Flag, Instance, Output, OutputKind, Result, Series, utcnow
from pacs_agent.db.session import transaction
from pacs_agent.jobs.queue import claim_next_job, complete_job, enqueue_job


def seed_study(session_factory: sessionmaker[Session], *, study: str, flag: Flag, probability: float, latency_s: float = 42.0,
               delivered: bool = True, instance_path: str = "") -> tuple[int, int]:
    """One analysed series of ``study`` with ``flag``; returns (series id, job id)."""
    with transaction(session_factory) as session:
        series = Series(study_instance_uid=study, series_instance_uid=f"{study}.1", modality="CT", series_description="CTPA",
                        last_received_at=utcnow() - timedelta(seconds=latency_s), accession_number="ACC0042")
        session.add(series)
        session.flush()
        if instance_path:
            session.add(Instance(series_id=series.id, sop_instance_uid=f"{study}.1.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                                 path=instance_path))
        job_id = enqueue_job(session, series, priority=0, reason="received", max_attempts=3).id
        series_id = series.id
    claimed = claim_next_job(session_factory, owner="w", lease_seconds=30)
    assert claimed is not None and claimed.job_id == job_id
    with transaction(session_factory) as session:
        session.add(Result(job_id=job_id, pe_present=flag in (Flag.CRITICAL, Flag.HIGH), pe_probability=probability,
                           probabilities={"pe_present_on_image": probability}, labels={"rv_lv_ratio_gte_1": flag == Flag.CRITICAL,
                                                                                       "central_pe": False, "indeterminate": False},
                           flag=flag, model_name="test-model", model_version="1", model_sha256="ab" * 32))
        output = Output(job_id=job_id, kind=OutputKind.SR, sop_class_uid="1.2", sop_instance_uid=f"{study}.9",
                        series_instance_uid=f"{study}.8", path=f"outbox/{job_id}/sr.dcm")
        session.add(output)
        session.flush()
        session.add(Delivery(output_id=output.id, destination="pacs",
                             status=DeliveryStatus.DELIVERED if delivered else DeliveryStatus.FAILED, attempts=1 if delivered else 4,
                             delivered_at=utcnow() if delivered else None))
        session.flush()
        complete_job(session, job_id, owner="w")
    return series_id, job_id
