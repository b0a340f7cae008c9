"""Small hand-made CT series (pydicom datasets with pixel data) for report and delivery tests.

Independent of the model's phantom generator so that report writers can be tested on their own.
Pixel values: air -1000 HU outside a body ellipse, soft tissue 40 HU, a contrast-filled vessel 300 HU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

PATIENT_NAME = "Phantom^Report^Test"
PATIENT_ID = "PHANTOM-0042"
PATIENT_BIRTH_DATE = "19500101"


@dataclass(frozen=True)
class CTSeriesSpec:
    n_slices: int = 8
    rows: int = 64
    columns: int = 64
    slice_thickness_mm: float = 1.0
    pixel_spacing_mm: float = 0.7
    study_instance_uid: str = ""
    series_description: str = "CTPA chest"


def _pixels(rows: int, columns: int, index: int) -> np.ndarray:
    """(Rows, Columns) int16 stored values (HU + 1024)."""
    yy, xx = np.mgrid[0:rows, 0:columns]
    cy, cx = rows / 2, columns / 2
    hu = np.full((rows, columns), -1000, dtype=np.int16)
    body = ((yy - cy) / (0.42 * rows)) ** 2 + ((xx - cx) / (0.46 * columns)) ** 2 <= 1
    hu[body] = 40
    vessel = (yy - cy) ** 2 + (xx - cx - 3 - index % 3) ** 2 <= (rows / 10) ** 2
    hu[vessel] = 300
    return (hu + 1024).astype(np.int16)


def make_ct_series(spec: CTSeriesSpec = CTSeriesSpec()) -> list[Dataset]:
    """Single-frame CT Image Storage datasets of one axial series, in slice order."""
    study_uid = spec.study_instance_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = generate_uid()
    datasets: list[Dataset] = []
    for i in range(spec.n_slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = "20240105"
        ds.StudyTime = "101500"
        ds.SeriesDate = "20240105"
        ds.ContentDate = "20240105"
        ds.ContentTime = "101600"
        ds.AccessionNumber = "ACC0042"
        ds.Modality = "CT"
        ds.Manufacturer = "Phantom Scanner Co"
        ds.ReferringPhysicianName = "Referrer^Doctor"
        ds.StudyDescription = "CT angiography chest"
        ds.SeriesDescription = spec.series_description
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.PatientBirthDate = PATIENT_BIRTH_DATE
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST"
        ds.ContrastBolusAgent = "Iodine"
        ds.SliceThickness = spec.slice_thickness_mm
        ds.KVP = 120
        ds.PatientPosition = "FFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "42"
        ds.SeriesNumber = 3
        ds.InstanceNumber = i + 1
        ds.AcquisitionNumber = 1
        ds.ImagePositionPatient = [-22.4, -22.4, -float(i) * spec.slice_thickness_mm]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = -float(i) * spec.slice_thickness_mm
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = spec.rows
        ds.Columns = spec.columns
        ds.PixelSpacing = [spec.pixel_spacing_mm, spec.pixel_spacing_mm]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.PixelData = _pixels(spec.rows, spec.columns, i).tobytes()
        datasets.append(ds)
    return datasets


def write_ct_series(folder: Path, spec: CTSeriesSpec = CTSeriesSpec()) -> list[Path]:
    """Write ``make_ct_series(spec)`` as <SOPInstanceUID>.dcm files; returns the paths in slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in make_ct_series(spec):
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
