"""Randomised CTPA series as DICOM CT Image Storage files, with their truth (labels, per-slice PE, clot centres).

Files are single-frame CT Image Storage, Explicit VR Little Endian, 12 bits stored with
RescaleIntercept -1024, written atomically. UIDs derive from the spec (same spec and seed, same
UIDs and pixels). The exam labels follow the RSNA-STR rules: a positive exam has a side and an
RV/LV call, a negative exam has neither.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pe_model.labels import EXAM_LABELS
from phantoms.randomised.anatomy import PlacedClot
from phantoms.randomised.render import Geometry, Renderer, slice_truth
from phantoms.randomised.spec import RandomisedPhantomError, RandomisedSpec

Point3 = tuple[float, float, float]
_INTERCEPT = -1024.0
_KERNEL_NAMES = {"soft": "SOFT", "standard": "STANDARD", "sharp": "LUNG"}


@dataclass(frozen=True)
class RandomisedClot:
    """A clot as written: centre of mass (patient mm), RMS radius, HU, level, form and RSNA sides."""

    center_patient_mm: Point3
    radius_mm: float
    hu: float
    kind: str
    form: str
    chronic: bool
    calcified: bool
    sides: tuple[str, ...]

    @property
    def location(self) -> str:
        """The first RSNA location label (compatible with ``phantoms.Clot.location``)."""
        return self.sides[0]


@dataclass(frozen=True)
class RandomisedTruth:
    """The answer for a randomised series. Per-slice tuples are inferior -> superior (InstanceNumber order)."""

    spec: RandomisedSpec
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]
    slice_positions_mm: tuple[float, ...]
    slice_pe_present: tuple[bool, ...]
    clots: tuple[RandomisedClot, ...]
    exam_labels: dict[str, bool]
    files: tuple[Path, ...]
    rv_lv_ratio: float
    landmarks_patient_mm: dict[str, Point3] = field(default_factory=dict)
    hu: dict[str, float] = field(default_factory=dict)


def exam_labels(spec: RandomisedSpec) -> dict[str, bool]:
    """The nine RSNA exam labels of a spec, consistent with the RSNA-STR rules."""
    labels = dict.fromkeys(EXAM_LABELS, False)
    if spec.pe:
        locations = set(spec.locations)
        labels["chronic_pe"] = spec.chronic
        labels["acute_and_chronic_pe"] = spec.acute_and_chronic
        labels["central_pe"] = "central" in locations
        labels["leftsided_pe"] = "left" in locations
        labels["rightsided_pe"] = "right" in locations
        labels["rv_lv_ratio_gte_1"] = spec.rv_lv_ratio >= 1.0
        labels["rv_lv_ratio_lt_1"] = spec.rv_lv_ratio < 1.0
    else:
        labels["negative_exam_for_pe"] = True
    return labels


def _clot(placed: PlacedClot) -> RandomisedClot:
    return RandomisedClot(center_patient_mm=placed.centre_patient_mm, radius_mm=placed.radius_mm,
                          hu=round(placed.hu, 1), kind=placed.kind, form=placed.form, chronic=placed.chronic,
                          calcified=placed.spec.calcified, sides=placed.sides)


def _uid(spec: RandomisedSpec, *parts: object) -> str:
    values = [f"{f.name}={getattr(spec, f.name)!r}" for f in dataclasses.fields(spec) if f.name != "tags"]
    return str(generate_uid(entropy_srcs=["pe-phantom-randomised-v1", *values, *(str(p) for p in parts)]))


def _ds(value: float) -> str:
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text[:16]


def _common(spec: RandomisedSpec, study_uid: str, series_uid: str, frame_uid: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20250610"
    time = f"{8 + spec.seed % 10:02d}{(spec.seed // 7) % 60:02d}{spec.seed % 60:02d}"
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
    ds.AccessionNumber = f"RP{abs(spec.seed) % 10**8:08d}"
    ds.Modality = "CT"
    ds.Manufacturer = "PE-Triage Phantom"
    ds.ManufacturerModelName = "Randomised CTPA"
    ds.SoftwareVersions = "phantoms.randomised 1"
    ds.InstitutionName = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StationName = "PHANTOM2"
    ds.StudyDescription = "CT ANGIO CHEST PE"
    if spec.series_description:
        ds.SeriesDescription = spec.series_description
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = "19580101"
    ds.PatientSex = ("M", "F")[spec.seed % 2]
    ds.PatientAge = f"{40 + spec.seed % 45:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 5
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.ContrastBolusAgent = "IOPROMIDE 370"
    ds.ContrastBolusRoute = "IV"
    ds.ContrastBolusVolume = 60
    ds.ContrastBolusIngredient = "IODINE"
    return ds


def _image(common: Dataset, spec: RandomisedSpec, geometry: Geometry, k: int, sop_uid: str,
           pixels: np.ndarray) -> Dataset:
    ds = Dataset()
    ds.update(common)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = k + 1
    ds.AcquisitionNumber = 1
    ds.ScanOptions = "HELICAL MODE"
    x, y, z = geometry.image_positions_patient[k]
    ds.ImagePositionPatient = [_ds(x), _ds(y), _ds(z)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceLocation = _ds(z)
    ds.PixelSpacing = [_ds(spec.pixel_spacing_mm)] * 2
    ds.SliceThickness = _ds(spec.slice_thickness_mm)
    ds.KVP = 100 if spec.seed % 3 == 0 else 120
    ds.DataCollectionDiameter = _ds(500.0)
    ds.ReconstructionDiameter = _ds(spec.pixel_spacing_mm * spec.columns)
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "160"
    ds.RotationDirection = "CW"
    ds.ExposureTime = 500
    ds.XRayTubeCurrent = 200
    ds.Exposure = 100
    ds.ConvolutionKernel = _KERNEL_NAMES[spec.kernel]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "100"
    ds.WindowWidth = "700"
    ds.RescaleIntercept = _ds(_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    stored = (pixels.astype(np.int32) - int(_INTERCEPT)).clip(0, 4095).astype(np.uint16)
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def _save(ds: Dataset, path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
    ds.file_meta = meta
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".dcm")
    os.close(handle)
    try:
        ds.save_as(temporary, enforce_file_format=True)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def render_volume(spec: RandomisedSpec) -> tuple[np.ndarray, Geometry, RandomisedTruth]:
    """The whole series in memory: HU int16 ``(n_slices, rows, columns)``, its geometry and truth (no files, no UIDs)."""
    renderer = Renderer(spec)
    volume = np.empty((spec.n_slices, spec.rows, spec.columns), dtype=np.int16)
    clot_max: list[float] = []
    for k, (image, fraction) in enumerate(renderer.slices()):
        volume[k] = image
        clot_max.append(fraction)
    truth = _truth(renderer, clot_max, "", "", (), ())
    return volume, renderer.geometry, truth


def _truth(renderer: Renderer, clot_max: list[float], study_uid: str, series_uid: str,
           sop_uids: tuple[str, ...], files: tuple[Path, ...]) -> RandomisedTruth:
    spec, scene = renderer.spec, renderer.scene
    flags = slice_truth(spec, renderer.geometry, clot_max, [c.centre_patient_mm[2] for c in scene.clots])
    if spec.pe and not any(flags):
        raise RandomisedPhantomError("no clot is visible in the scanned range; lengthen the scan")
    return RandomisedTruth(
        spec=spec,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        sop_instance_uids=sop_uids,
        slice_positions_mm=tuple(round(float(z), 4) for z in renderer.geometry.z_mm),
        slice_pe_present=flags,
        clots=tuple(_clot(c) for c in scene.clots),
        exam_labels=exam_labels(spec),
        files=files,
        rv_lv_ratio=round(scene.rv_lv_measured, 4),
        landmarks_patient_mm=dict(scene.landmarks),
        hu={k: round(v, 1) for k, v in scene.hu.items()},
    )


def write_randomised_series(directory: str | Path, spec: RandomisedSpec, *, file_names: str = "sop",
                            study_instance_uid: str | None = None) -> RandomisedTruth:
    """Render ``spec`` and write it under ``directory``: one CT Image Storage file per slice.

    ``file_names``: ``"sop"`` -> ``<SOPInstanceUID>.dcm``, ``"index"`` -> ``IM000001.dcm``.
    """
    if file_names not in ("sop", "index"):
        raise RandomisedPhantomError(f'file_names must be "sop" or "index", not {file_names!r}')
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    renderer = Renderer(spec)
    study_uid = str(study_instance_uid) if study_instance_uid else _uid(spec, "study")
    series_uid = _uid(spec, "series", study_uid)
    common = _common(spec, study_uid, series_uid, _uid(spec, "frame-of-reference", study_uid))
    sops: list[str] = []
    paths: list[Path] = []
    clot_max: list[float] = []
    for k, (image, fraction) in enumerate(renderer.slices()):
        sop_uid = _uid(spec, "sop", series_uid, k)
        path = out / (f"{sop_uid}.dcm" if file_names == "sop" else f"IM{k + 1:06d}.dcm")
        _save(_image(common, spec, renderer.geometry, k, sop_uid, image), path)
        sops.append(sop_uid)
        paths.append(path)
        clot_max.append(fraction)
    return _truth(renderer, clot_max, study_uid, series_uid, tuple(sops), tuple(paths))
