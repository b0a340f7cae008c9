"""Crash reconciliation: spool files that have no Instance row (crash between rename and commit) are recorded."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.db.models import Instance, Series
from pacs_agent.errors import InvalidUIDError
from pacs_agent.ingest.records import ReceivedInstance, Record, read_header
from pacs_agent.ingest.spool import INSTANCE_SUFFIX, Spool, validate_uid
from pacs_agent.ingest.writer import apply_records
from pacs_agent.logs import get_logger

log = get_logger(__name__)


def reconcile_spool(session_factory: sessionmaker[Session], spool: Spool, *, settled_s: float = 0.0) -> int:
    """Record spool files that have no Instance row (crash between rename and commit); return how many.

    One query for every series' instance count; only folders whose file count differs are compared
    file by file, so a start-up over a large spool stays quick. ``settled_s``: leave out files written
    less than that many seconds ago (while other receivers run, their newest files are still on their
    way to the database).
    """
    with session_factory() as session:
        counts = dict(session.execute(select(Series.series_instance_uid, Series.instance_count)).tuples().all())
    recorded = 0
    newest = time.time() - settled_s if settled_s > 0 else float("inf")
    for study_uid, series_uid, folder in spool.iter_incoming():
        files = sorted(folder.glob(f"*{INSTANCE_SUFFIX}"))
        if len(files) == counts.get(series_uid, 0):
            continue
        with session_factory() as session:
            known = set(session.scalars(select(Instance.path).join(Series).where(Series.series_instance_uid == series_uid)))
        records: list[Record] = []
        for file in files:
            if spool.relative(file) in known:
                continue
            record = _record_from_file(spool, file, study_uid, series_uid, newest)
            if record is not None:
                records.append(record)
        if records:
            apply_records(session_factory, spool, records)
            recorded += len(records)
    if recorded:
        log.warning("receiver_reconciled_spool", instances=recorded)
    return recorded


def _record_from_file(spool: Spool, file: Path, study_uid: str, series_uid: str, newest: float) -> Record | None:
    try:
        stat = file.stat()
        if stat.st_mtime > newest:
            return None
        header = read_header(file)
        meta = header.file_meta
        sop_uid = validate_uid(str(header.SOPInstanceUID))
        if file.name != f"{sop_uid}{INSTANCE_SUFFIX}":
            raise InvalidUIDError("file name and SOPInstanceUID differ")
    except FileNotFoundError:
        return None  # deleted meanwhile (a duplicate dropped by a writer, retention)
    except (InvalidDicomError, InvalidUIDError, AttributeError, OSError, ValueError) as exc:
        log.error("receiver_spool_file_unreadable", path=spool.relative(file), error=str(exc))
        return None
    return ReceivedInstance(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        sop_class_uid=str(header.get("SOPClassUID", meta.get("MediaStorageSOPClassUID", ""))),
        transfer_syntax_uid=str(meta.get("TransferSyntaxUID", "")),
        path=spool.relative(file),
        size_bytes=stat.st_size,
        received_at=datetime.fromtimestamp(stat.st_mtime, timezone.utc),
        association_id=None,
        calling_ae_title="",
        modality=str(header.get("Modality", "")),
        series_description=str(header.get("SeriesDescription", "")),
        accession_number=str(header.get("AccessionNumber", "")),
    )
