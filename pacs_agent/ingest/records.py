"""What the receiver hands to the database writer: one frozen record per association or instance event.

Records are built on pynetdicom's threads (cheap values only) and turned into rows by `pacs_agent.ingest.writer`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom

#: Header elements read on the hot path (everything else is read later by the tracker and worker).
HEADER_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "SeriesDescription",
    "AccessionNumber",
    # Read only so that the log pipeline can mask them (pacs_agent.logs); never stored or logged.
    "PatientName",
    "PatientID",
    "PatientBirthDate",
)

def now() -> datetime:
    return datetime.now(timezone.utc)


def clip(value: Any, length: int) -> str:
    text = "" if value is None else str(value).strip()
    return text[:length]

@dataclass(frozen=True)
class AssociationOpened:
    association_id: str
    calling_ae_title: str
    peer_address: str
    at: datetime


@dataclass(frozen=True)
class AssociationClosed:
    association_id: str
    reason: str
    at: datetime
    stored: int
    duplicates: int
    ignored: int
    rejected: int


@dataclass(frozen=True)
class AssociationRejected:
    calling_ae_title: str
    peer_address: str
    at: datetime


@dataclass(frozen=True)
class ReceivedInstance:
    """An instance now in the spool (``path`` relative to the spool root)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size_bytes: int
    received_at: datetime
    association_id: str | None
    calling_ae_title: str
    modality: str
    series_description: str
    accession_number: str


@dataclass(frozen=True)
class InstanceNotStored:
    """An instance acknowledged without storing (duplicate, other SOP class) or refused (status != 0)."""

    kind: str  # "duplicate_instance", "instance_ignored", "instance_rejected"
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    association_id: str | None
    status: int
    reason: str
    at: datetime


@dataclass(frozen=True)
class Flush:
    done: threading.Event


Record = AssociationOpened | AssociationClosed | AssociationRejected | ReceivedInstance | InstanceNotStored | Flush



def read_header(source: Path | bytes, *, keywords: Sequence[str] = HEADER_KEYWORDS) -> pydicom.Dataset:
    """The named elements of a Part 10 file (or bytes), without reading the pixel data."""
    fp: Any = BytesIO(source) if isinstance(source, bytes) else source
    return pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=list(keywords))


__all__ = [
    "AssociationClosed",
    "AssociationOpened",
    "AssociationRejected",
    "Flush",
    "HEADER_KEYWORDS",
    "InstanceNotStored",
    "ReceivedInstance",
    "Record",
    "clip",
    "now",
    "read_header",
]
