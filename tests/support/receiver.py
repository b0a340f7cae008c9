"""Helpers for receiver tests: a small CT instance, a pynetdicom SCU, a running receiver with its database."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.db.models import Association, Event
from pacs_agent.dicom.scp import Receiver
from pacs_agent.dicom.scp_pool import ReceiverPool
from pacs_agent.settings import Settings


PATIENT_NAME = "Doe^Jane^Receiver"


def ct_slice(study: str, series: str, index: int, *, sop: str | None = None, size: int = 16, **extra: Any) -> Dataset:
    """A small but complete CT Image Storage instance (explicit VR little endian)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop or generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientName = PATIENT_NAME
    ds.PatientID = "RCV-0001"
    ds.PatientBirthDate = "19700101"
    ds.Modality = "CT"
    ds.SeriesDescription = "CTA CHEST PE"
    ds.AccessionNumber = "ACC1"
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [0.0, 0.0, float(index)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = "1.0"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    pixels = (np.arange(size * size, dtype=np.int16).reshape(size, size) + index * 7) % 2000
    ds.PixelData = pixels.astype(np.int16).tobytes()
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


class Peer:
    """A running receiver with its database, for one test."""

    def __init__(self, receiver: Receiver | ReceiverPool, factory: sessionmaker[Session], settings: Settings) -> None:
        self.receiver = receiver
        self.factory = factory
        self.settings = settings

    @property
    def port(self) -> int:
        return self.receiver.port

    def session(self) -> Session:
        self.receiver.flush()
        return self.factory()

    def events(self, kind: str) -> list[Event]:
        with self.session() as session:
            return list(session.scalars(select(Event).where(Event.kind == kind).order_by(Event.id)))

    def wait_closed(self, count: int = 1, timeout: float = 10.0) -> list[Association]:
        deadline = time.monotonic() + timeout
        while True:
            with self.session() as session:
                closed = list(session.scalars(select(Association).where(Association.closed_at.is_not(None))))
            if len(closed) >= count or time.monotonic() > deadline:
                return closed
            time.sleep(0.05)


def scu(ae_title: str = "SCANNER", transfer_syntaxes: list[str] | None = None) -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    syntaxes = transfer_syntaxes or [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    ae.add_requested_context(CTImageStorage, syntaxes)
    ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    return ae


def send(peer: Peer, datasets: list[Dataset], *, ae: AE | None = None, **kwargs: Any) -> list[int]:
    """C-STORE each dataset on one association; return the statuses."""
    assoc = (ae or scu()).associate("127.0.0.1", peer.port, ae_title=peer.settings.node.ae_title, **kwargs)
    assert assoc.is_established, "association was not accepted"
    statuses = []
    for ds in datasets:
        status = assoc.send_c_store(ds)
        statuses.append(int(status.Status))
    assoc.release()
    return statuses


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}
