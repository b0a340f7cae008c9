"""Writes a held-out CTPA as a DICOM CT Image Storage series and returns its ground truth.

Each slice is one Part 10 file (Explicit VR Little Endian) with the modules a PACS sends and a
C-STORE receiver checks: Patient, General Study, General Series, Frame of Reference, General
Equipment, General Image, Image Plane, Image Pixel, Contrast/Bolus, CT Image, VOI LUT and SOP
Common. Stored pixels are unsigned with RescaleIntercept -1024 (12 bits) or signed with intercept 0
(16 bits), as the spec says. UIDs derive from the spec, so the same spec gives the same files.

Truth: the nine RSNA exam labels (``pe_model.labels.EXAM_LABELS``), PE on each slice, every clot
with its centre and end points in patient mm, the RV/LV ratio drawn, the pulmonary arterial HU and
the lung extent. Labelling rules: a saddle clot is central, left and right; a clot in the pulmonary
trunk is central; one in a main, lobar or segmental artery counts for its side; a series whose
clots are all chronic is ``chronic_pe``, a mix of chronic and acute ``acute_and_chronic_pe``; the RV/LV
labels are set for PE exams only, as in the RSNA-STR data.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pe_model.labels import EXAM_LABELS
from phantoms.heldout.anatomy import Chest, PlacedClot, build_chest, scan_range
from phantoms.heldout.errors import HeldoutSpecError
from phantoms.heldout.render import CLOT_PIXEL_FRACTION, SliceGrid, SliceRenderer
from phantoms.heldout.spec import HeldoutSpec

Point3 = tuple[float, float, float]

#: Upper bound on slices in one series (a 0.2 mm spacing over a long scan would be absurd).
MAX_SLICES = 2000


@dataclass(frozen=True)
class ClotTruth:
    """One clot as drawn: where it is (patient mm, LPS) and what it is."""

    level: str
    form: str
    side: str
    artery: str
    chronic: bool
    hu: float
    centre_patient_mm: Point3
    #: The two ends of the clot along its artery (a saddle: its reach into each main artery).
    ends_patient_mm: tuple[Point3, Point3]
    lumen_radius_mm: float

    def distance_mm(self, point: Point3 | np.ndarray) -> float:
        """Distance from ``point`` to the clot: to the nearer of its centre and its axis segment."""
        p = np.asarray(point, dtype=np.float64)
        a, b = (np.asarray(e, dtype=np.float64) for e in self.ends_patient_mm)
        c = np.asarray(self.centre_patient_mm, dtype=np.float64)
        ab = b - a
        t = float(np.clip(np.dot(p - a, ab) / max(float(np.dot(ab, ab)), 1e-12), 0.0, 1.0))
        on_axis = float(np.linalg.norm(p - (a + t * ab)))
        if self.level == "saddle":
            on_axis = min(on_axis, float(np.linalg.norm(p - c)), _segment(p, c, a), _segment(p, c, b))
        return min(on_axis, float(np.linalg.norm(p - c)))

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "form": self.form,
            "side": self.side,
            "artery": self.artery,
            "chronic": self.chronic,
            "hu": round(self.hu, 1),
            "centre_patient_mm": list(self.centre_patient_mm),
            "ends_patient_mm": [list(e) for e in self.ends_patient_mm],
            "lumen_radius_mm": round(self.lumen_radius_mm, 2),
        }


def _segment(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ab = b - a
    t = float(np.clip(np.dot(p - a, ab) / max(float(np.dot(ab, ab)), 1e-12), 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * ab)))


@dataclass(frozen=True)
class HeldoutTruth:
    """Ground truth of one held-out series; slices ascending in z (``sop_instance_uids`` likewise)."""

    spec: HeldoutSpec
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]
    slice_positions_mm: tuple[float, ...]
    slice_pe_present: tuple[bool, ...]
    clots: tuple[ClotTruth, ...]
    exam_labels: dict[str, bool]
    rv_lv_ratio: float
    pulmonary_artery_hu: float
    lung_apex_z_mm: float
    lung_base_z_mm: float
    #: Named points: pulmonary trunk (middle), bifurcation, aorta (ascending), carina.
    landmarks_patient_mm: dict[str, Point3]
    files: tuple[Path, ...] = field(default=())

    @property
    def pe(self) -> bool:
        return bool(self.clots)

    @property
    def sides(self) -> frozenset[str]:
        """The set of central/left/right the exam labels name (empty for a negative exam)."""
        names = {"central_pe": "central", "leftsided_pe": "left", "rightsided_pe": "right"}
        return frozenset(name for key, name in names.items() if self.exam_labels[key])

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "pe": self.pe,
            "exam_labels": dict(self.exam_labels),
            "rv_lv_ratio": round(self.rv_lv_ratio, 4),
            "pulmonary_artery_hu": round(self.pulmonary_artery_hu, 1),
            "lung_apex_z_mm": round(self.lung_apex_z_mm, 2),
            "lung_base_z_mm": round(self.lung_base_z_mm, 2),
            "slice_positions_mm": [round(z, 3) for z in self.slice_positions_mm],
            "slice_pe_present": list(self.slice_pe_present),
            "clots": [c.to_json_dict() for c in self.clots],
            "landmarks_patient_mm": {k: list(v) for k, v in self.landmarks_patient_mm.items()},
            "spec": {
                "seed": self.spec.seed,
                "rows": self.spec.rows,
                "columns": self.spec.columns,
                "fov_mm": round(self.spec.fov_mm, 2),
                "pixel_spacing_mm": round(self.spec.pixel_spacing_mm, 4),
                "slice_thickness_mm": self.spec.slice_thickness_mm,
                "slice_spacing_mm": self.spec.slice_spacing_mm,
                "kernel": self.spec.kernel,
                "noise_hu": round(self.spec.noise_hu, 2),
            },
        }


def exam_labels_for(clots: tuple[ClotTruth, ...], rv_lv_ratio: float) -> dict[str, bool]:
    """The nine RSNA exam labels of a series with these clots (rules in the module docstring)."""
    labels = dict.fromkeys(EXAM_LABELS, False)
    if not clots:
        labels["negative_exam_for_pe"] = True
        return labels
    chronic = [c.chronic for c in clots]
    labels["chronic_pe"] = all(chronic)
    labels["acute_and_chronic_pe"] = any(chronic) and not all(chronic)
    labels["central_pe"] = any(c.level in ("saddle", "trunk") for c in clots)
    labels["leftsided_pe"] = any(c.level == "saddle" or (c.level not in ("trunk",) and c.side == "left") for c in clots)
    labels["rightsided_pe"] = any(c.level == "saddle" or (c.level not in ("trunk",) and c.side == "right") for c in clots)
    labels["rv_lv_ratio_gte_1"] = rv_lv_ratio >= 1.0
    labels["rv_lv_ratio_lt_1"] = rv_lv_ratio < 1.0
    return labels


def _point(p: np.ndarray) -> Point3:
    return (round(float(p[0]), 3), round(float(p[1]), 3), round(float(p[2]), 3))


def _clot_truth(placed: PlacedClot) -> ClotTruth:
    spec = placed.spec
    return ClotTruth(
        level=spec.level,
        form=spec.form,
        side="both" if spec.level == "saddle" else ("" if spec.level == "trunk" else spec.side),
        artery=placed.location,
        chronic=spec.chronic,
        hu=spec.hu,
        centre_patient_mm=_point(placed.centre),
        ends_patient_mm=(_point(placed.ends[0]), _point(placed.ends[1])),
        lumen_radius_mm=placed.radius_mm,
    )


def slice_positions(chest: Chest) -> np.ndarray:
    """z (mm) of each slice centre, ascending."""
    spec = chest.spec
    z_lo, z_hi = scan_range(chest)
    if z_hi <= z_lo:
        raise HeldoutSpecError("the scan margins leave no scan range (above_apex_mm + below_base_mm too negative)")
    count = int(math.floor((z_hi - z_lo) / spec.slice_spacing_mm)) + 1
    if count > MAX_SLICES:
        raise HeldoutSpecError(f"{count} slices exceed the limit of {MAX_SLICES}; use a larger slice_spacing_mm")
    return z_lo + spec.slice_spacing_mm * np.arange(count)


def render_slices(spec: HeldoutSpec, chest: Chest | None = None) -> Iterator[tuple[float, np.ndarray, bool]]:
    """Yield ``(z_mm, HU (rows, columns) float32, PE on slice)`` for each slice, inferior first."""
    chest = chest or build_chest(spec)
    grid = SliceGrid.centred(spec.rows, spec.columns, spec.pixel_spacing_mm, spec.slice_thickness_mm)
    renderer = SliceRenderer(chest, grid, np.random.default_rng([spec.seed, 0x5EED]))
    for z in slice_positions(chest):
        hu, clot_fraction = renderer.render(float(z))
        yield float(z), hu, clot_fraction >= CLOT_PIXEL_FRACTION


def generate_heldout_volume(spec: HeldoutSpec) -> tuple[np.ndarray, HeldoutTruth]:
    """The series in memory: HU ``(D, H, W)`` float32 (slices ascending in z) and its truth (no files)."""
    chest = build_chest(spec)
    slices: list[np.ndarray] = []
    flags: list[bool] = []
    zs: list[float] = []
    for z, hu, pe in render_slices(spec, chest):
        zs.append(z)
        slices.append(hu)
        flags.append(pe)
    truth = _truth(spec, chest, zs, flags, (), "", "")
    return np.stack(slices), truth


def _truth(
    spec: HeldoutSpec,
    chest: Chest,
    zs: list[float],
    flags: list[bool],
    sops: tuple[str, ...],
    study: str,
    series: str,
    files: tuple[Path, ...] = (),
) -> HeldoutTruth:
    clots = tuple(_clot_truth(c) for c in chest.clots)
    trunk = chest.tube("pulmonary_trunk")
    aorta = chest.tube("aorta")
    return HeldoutTruth(
        spec=spec,
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uids=sops,
        slice_positions_mm=tuple(float(z) for z in zs),
        slice_pe_present=tuple(flags),
        clots=clots,
        exam_labels=exam_labels_for(clots, chest.rv_lv_ratio),
        rv_lv_ratio=float(chest.rv_lv_ratio),
        pulmonary_artery_hu=float(spec.pulmonary_artery_hu),
        lung_apex_z_mm=chest.lung_apex_z,
        lung_base_z_mm=chest.lung_base_z,
        landmarks_patient_mm={
            "pulmonary_trunk": _point(trunk.at(0.5 * trunk.length_mm)[0]),
            "pulmonary_bifurcation": _point(trunk.points[-1]),
            "ascending_aorta": _point(aorta.at(0.25 * aorta.length_mm)[0]),
            "carina": _point(chest.tube("trachea").points[-1]),
        },
        files=files,
    )


def _uid(spec: HeldoutSpec, *parts: object) -> str:
    return str(generate_uid(entropy_srcs=["phantoms.heldout", str(spec), *[str(p) for p in parts]]))


def _ds(value: float) -> str:
    """A DS value of at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if len(text) <= 16 else f"{value:.6g}"


def write_heldout_series(
    directory: str | Path,
    spec: HeldoutSpec,
    *,
    study_instance_uid: str | None = None,
    patient_name: str = "HELDOUT^PHANTOM",
) -> HeldoutTruth:
    """Render ``spec`` and write one CT Image Storage file per slice under ``directory``
    (``IM00001.dcm``, ... in InstanceNumber order); return the truth with the file paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    chest = build_chest(spec)
    zs_all = slice_positions(chest)
    study = study_instance_uid or _uid(spec, "study")
    series = _uid(spec, "series")
    frame_of_reference = _uid(spec, "for")
    rng = np.random.default_rng([spec.seed, 0xD1C0])
    kvp = str(int(rng.choice([80, 100, 120])))
    date = f"2026{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    time_of_day = f"{int(rng.integers(0, 24)):02d}{int(rng.integers(0, 60)):02d}00"
    accession = f"HO{spec.seed % 10**8:08d}"
    base = _base_dataset(spec, study, series, frame_of_reference, kvp, date, time_of_day, accession, patient_name)

    n = len(zs_all)
    sops: list[str] = []
    files: list[Path] = []
    flags: list[bool] = []
    zs: list[float] = []
    x0 = -(spec.columns - 1) / 2.0 * spec.pixel_spacing_mm
    y0 = -(spec.rows - 1) / 2.0 * spec.pixel_spacing_mm
    for k, (z, hu, pe) in enumerate(render_slices(spec, chest)):
        instance_number = n - k if spec.number_from_head else k + 1
        sop = _uid(spec, "sop", k)
        ds = Dataset()
        ds.update(base)
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = instance_number
        ds.ImagePositionPatient = [_ds(x0), _ds(y0), _ds(z)]
        ds.SliceLocation = _ds(z)
        if spec.signed_pixels:
            ds.PixelData = np.clip(np.rint(hu), -1024, 3071).astype("<i2").tobytes()
        else:
            ds.PixelData = (np.clip(np.rint(hu), -1024, 3071) + 1024).astype("<u2").tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = UID(sop)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        path = out / f"IM{instance_number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sops.append(sop)
        files.append(path)
        flags.append(pe)
        zs.append(z)
    return _truth(spec, chest, zs, flags, tuple(sops), study, series, tuple(files))


def _base_dataset(
    spec: HeldoutSpec,
    study: str,
    series: str,
    frame_of_reference: str,
    kvp: str,
    date: str,
    time_of_day: str,
    accession: str,
    patient_name: str,
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = date
    ds.SeriesDate = date
    ds.AcquisitionDate = date
    ds.ContentDate = date
    ds.StudyTime = time_of_day
    ds.SeriesTime = time_of_day
    ds.AcquisitionTime = time_of_day
    ds.ContentTime = time_of_day
    ds.AccessionNumber = accession
    ds.Modality = "CT"
    ds.Manufacturer = "Held-out phantom family"
    ds.InstitutionName = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StationName = "HELDOUT"
    ds.StudyDescription = "CT ANGIOGRAPHY CHEST"
    ds.SeriesDescription = spec.series_description
    ds.ManufacturerModelName = "phantoms.heldout"
    ds.PatientName = patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.ContrastBolusAgent = "IODINATED CONTRAST"
    ds.ContrastBolusRoute = "IV"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds(spec.slice_thickness_mm)
    ds.SpacingBetweenSlices = _ds(spec.slice_spacing_mm)
    ds.KVP = kvp
    ds.DataCollectionDiameter = _ds(500.0)
    ds.ReconstructionDiameter = _ds(spec.fov_mm)
    ds.ConvolutionKernel = {"soft": "B20f", "standard": "B30f", "sharp": "B46f"}[spec.kernel]
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.StudyID = "1"
    ds.SeriesNumber = 5
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = frame_of_reference
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.PixelSpacing = [_ds(spec.pixel_spacing_mm), _ds(spec.pixel_spacing_mm)]
    ds.BitsAllocated = 16
    if spec.signed_pixels:
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "0"
    else:
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "100"
    ds.WindowWidth = "700"
    return ds
