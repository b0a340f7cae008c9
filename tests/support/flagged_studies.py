"""Studies on the worklist with a flag, as the worker leaves them, with a received image (and its
patient identifiers) in the spool: for the notification and admin tests."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.db.models import Flag, Instance, Job, JobStatus, Result, Series, utcnow
from pacs_agent.db.session import transaction
from pacs_agent.settings import Settings
from pacs_agent.worklist import refresh_study

STUDY = "1.2.826.0.1.3680043.10.1.1"
PATIENT_NAME = "Lastname^Firstname"
PATIENT_ID = "MRN-4711"
ACCESSION = "ACC0815"

LABELS = {
    Flag.CRITICAL: {"central_pe": True, "rightsided_pe": True, "rv_lv_ratio_gte_1": True},
    Flag.HIGH: {"leftsided_pe": True, "rv_lv_ratio_lt_1": True},
    Flag.ROUTINE: {"negative_exam_for_pe": True},
    Flag.REVIEW: {"indeterminate": True},
}


def write_instance(spool: Path, study_uid: str, series_uid: str) -> tuple[str, str]:
    """A small CT header with patient identifiers, written where the receiver would put it."""
    sop_uid = str(generate_uid())
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "F"
    ds.AccessionNumber = ACCESSION
    ds.Modality = "CT"
    relative = f"incoming/{study_uid}/{series_uid}/{sop_uid}.dcm"
    path = spool / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return sop_uid, relative


def flag_study(
    session_factory: sessionmaker[Session], settings: Settings, study_uid: str, flag: Flag, *, p: float = 0.93,
    series_number: int = 1, model_name: str = "pe-triage-test", age: timedelta = timedelta(0),
) -> int:
    """A series of ``study_uid`` with a finished job whose result has ``flag``; returns the job id."""
    series_uid = f"{study_uid}.{series_number}"
    with transaction(session_factory) as session:
        series = session.query(Series).filter_by(series_instance_uid=series_uid).one_or_none()
        if series is None:
            series = Series(study_instance_uid=study_uid, series_instance_uid=series_uid, accession_number=ACCESSION, modality="CT",
                            first_received_at=utcnow() - age)
            session.add(series)
            session.flush()
            sop_uid, relative = write_instance(Path(settings.storage.root), study_uid, series_uid)
            session.add(Instance(series_id=series.id, sop_instance_uid=sop_uid, sop_class_uid=str(CTImageStorage), path=relative))
        job = Job(series_id=series.id, status=JobStatus.SUCCEEDED, finished_at=utcnow() - age, model_version="1")
        session.add(job)
        session.flush()
        session.add(Result(job_id=job.id, pe_present=flag in (Flag.CRITICAL, Flag.HIGH), pe_probability=p,
                           labels=LABELS.get(flag, {}), flag=flag, model_name=model_name, model_version="1.0", model_sha256="ab" * 32))
        session.flush()
        study = refresh_study(session, study_uid)
        assert study is not None
        study.updated_at = utcnow() - age
        return job.id
