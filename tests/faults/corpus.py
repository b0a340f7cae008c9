"""A generated corpus of bad DICOM input: each case is what a broken or hostile sender could send.

Every case starts from a small valid CTPA phantom (phantoms, 64 x 64 x 48, its own seed so its
UIDs are its own) and damages it. A case says what the node must answer: the DICOM statuses allowed for
its instances and, for each series it creates, the final states allowed (with IGNORED and FAILED a
human-readable reason is required by the test). "absent" means no series row may exist.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, JPEG2000Lossless, generate_uid

from phantoms import PhantomSpec, write_phantom_series

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210

#: Final series states a case may end in ("absent": the node keeps no series for it).
ANALYSED = "ANALYSED"
IGNORED = "IGNORED"
FAILED = "FAILED"
ABSENT = "absent"

#: A path a traversal UID aims at; the test checks that nothing appears there.
TRAVERSAL_TARGET = "pe_agent_traversal_probe"

N_SLICES = 48
SIZE = 64


@dataclass(frozen=True)
class Sent:
    """What a case sends: one list of items per association, and the series it is about."""

    associations: tuple[tuple[Dataset | Path, ...], ...]
    series_instance_uids: tuple[str, ...]
    abort_last: bool = False


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path, int], Sent]
    statuses: frozenset[int]
    outcomes: frozenset[str]
    why: str
    #: Extra seconds the node may need (large series).
    extra_timeout: float = 0.0
    notes: tuple[str, ...] = field(default_factory=tuple)


def phantom(workdir: Path, seed: int, **spec: object) -> list[Dataset]:
    """A valid CTPA phantom series as datasets (sorted by InstanceNumber)."""
    values: dict[str, object] = {"rows": SIZE, "columns": SIZE, "n_slices": N_SLICES, "seed": seed, "patient_id": f"CORPUS-{seed}"}
    values.update(spec)
    truth = write_phantom_series(workdir / f"phantom-{seed}", PhantomSpec(**values))  # type: ignore[arg-type]
    return [pydicom.dcmread(path) for path in truth.files]


def _one(datasets: Sequence[Dataset]) -> Sent:
    return Sent((tuple(datasets),), (str(datasets[0].SeriesInstanceUID),))


def _save_raw(ds: Dataset, path: Path) -> Path:
    """Write a Part 10 file with the file meta exactly as set (pydicom would otherwise fix it up)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.preamble = b"\x00" * 128
    pydicom.dcmwrite(path, ds, enforce_file_format=False)
    return path


# ---------------------------------------------------------------- builders


def truncated_pixel_data(workdir: Path, seed: int) -> Sent:
    series = phantom(workdir, seed)
    for ds in series:
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    return _one(series)


def wrong_bits_allocated(workdir: Path, seed: int) -> Sent:
    series = phantom(workdir, seed)
    for ds in series:
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
    return _one(series)


def invalid_bits_allocated(workdir: Path, seed: int) -> Sent:
    series = phantom(workdir, seed)
    for ds in series:
        ds.BitsAllocated = 12
    return _one(series)


def pixel_data_larger_than_rows_columns(workdir: Path, seed: int) -> Sent:
    series = phantom(workdir, seed)
    for ds in series:
        ds.Rows = 32
        ds.Columns = 32
    return _one(series)


def pixel_data_smaller_than_rows_columns(workdir: Path, seed: int) -> Sent:
    series = phantom(workdir, seed)
    for ds in series:
        ds.Rows = 128
        ds.Columns = 128
    return _one(series)


def _with_uid(keyword: str, value: str) -> Callable[[Path, int], Sent]:
    def build(workdir: Path, seed: int) -> Sent:
        series = phantom(workdir, seed)[:3]
        for index, ds in enumerate(series):
            uid = value if keyword != "SOPInstanceUID" else f"{value}{index}" if value.endswith(".") else value
            setattr(ds, keyword, uid)
            if keyword == "SOPInstanceUID":
                ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
        return Sent((tuple(series),), (str(series[0].SeriesInstanceUID),))

    build.__name__ = f"uid_{keyword}"
    return build


def traversal_in_study_uid(workdir: Path, seed: int) -> Sent:
    return _with_uid("StudyInstanceUID", f"../../../{TRAVERSAL_TARGET}")(workdir, seed)


def traversal_in_series_uid(workdir: Path, seed: int) -> Sent:
    series = phantom(workdir, seed)[:3]
    original = str(series[0].SeriesInstanceUID)
    for ds in series:
        ds.SeriesInstanceUID = f"1.2/../../../../{TRAVERSAL_TARGET}"
    return Sent((tuple(series),), (original, str(series[0].SeriesInstanceUID)))


def absolute_path_sop_uid(workdir: Path, seed: int) -> Sent:
    series = phantom(workdir, seed)[:1]
    ds = series[0]
    ds.SOPInstanceUID = f"/tmp/{TRAVERSAL_TARGET}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return Sent(((ds,),), (str(ds.SeriesInstanceUID),))


def letters_in_uid(workdir: Path, seed: int) -> Sent:
    return _with_uid("SeriesInstanceUID", "1.2.840.abc.7")(workdir, seed)


def uid_too_long(workdir: Path, seed: int) -> Sent:
    return _with_uid("StudyInstanceUID", "1." + "2" * 70)(workdir, seed)


def uid_leading_zero(workdir: Path, seed: int) -> Sent:
    return _with_uid("SeriesInstanceUID", "1.2.840.0123.4")(workdir, seed)


def missing_study_uid(workdir: Path, seed: int) -> Sent:
    series = phantom(workdir, seed)[:3]
    for ds in series:
        del ds.StudyInstanceUID
    return Sent((tuple(series),), (str(series[0].SeriesInstanceUID),))


def sop_uid_differs_from_request(workdir: Path, seed: int) -> Sent:
    """The file meta (and so the C-STORE request) names one SOP Instance UID, the dataset another."""
    series = phantom(workdir, seed)[:3]
    paths = []
    for index, ds in enumerate(series):
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        paths.append(_save_raw(ds, workdir / f"mismatch-{seed}" / f"{index}.dcm"))
    return Sent((tuple(paths),), (str(series[0].SeriesInstanceUID),))


def not_a_dataset(workdir: Path, seed: int) -> Sent:
    """Valid file meta, then bytes that are not a DICOM data set."""
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(3):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2")
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
        path = workdir / f"garbage-{seed}" / f"{index}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds = Dataset()
        ds.file_meta = meta
        ds.save_as(path, enforce_file_format=True)
        with path.open("ab") as fh:
            fh.write(b"\xff\xff\xff\xff" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        paths.append(path)
    return Sent((tuple(paths),), ())


def missing_image_position(workdir: Path, seed: int) -> Sent:
    series = phantom(workdir, seed)
    for ds in series:
        del ds.ImagePositionPatient
    return _one(series)


def missing_image_orientation(workdir: Path, seed: int) -> Sent:
    series = phantom(workdir, seed)
    for ds in series:
        del ds.ImageOrientationPatient
    return _one(series)


def image_position_missing_on_some(workdir: Path, seed: int) -> Sent:
    series = phantom(workdir, seed)
    for ds in series[::7]:
        del ds.ImagePositionPatient
    return _one(series)


def mixed_orientations(workdir: Path, seed: int) -> Sent:
    series = phantom(workdir, seed)
    for ds in series[1::2]:
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]  # coronal
    return _one(series)


def duplicate_positions(workdir: Path, seed: int) -> Sent:
    series = phantom(workdir, seed)
    for ds in series:
        ds.ImagePositionPatient = list(series[0].ImagePositionPatient)
    return _one(series)


def single_slice(workdir: Path, seed: int) -> Sent:
    return _one(phantom(workdir, seed, n_slices=1))


def two_thousand_slices(workdir: Path, seed: int) -> Sent:
    """2,000 slices of 16 x 16 at 0.5 mm: a 48-slice phantom's slices repeated along z (fast to build)."""
    base = phantom(workdir, seed, rows=16, columns=16, slice_spacing_mm=0.5, pixel_spacing_mm=20.0)
    origin = [float(v) for v in base[0].ImagePositionPatient]
    series = []
    for index in range(2000):
        ds = copy.deepcopy(base[index % len(base)])
        ds.SOPInstanceUID = f"{base[0].SOPInstanceUID[:40]}.{index + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] - 0.5 * index]
        ds.SliceLocation = origin[2] - 0.5 * index
        series.append(ds)
    return _one(series)


def structured_report(workdir: Path, seed: int) -> Sent:
    """A non-image SOP class (Basic Text SR) in a series of its own."""
    base = phantom(workdir, seed)[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = UID("1.2.840.10008.5.1.4.1.1.88.11")
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
    ds.StudyInstanceUID = base.StudyInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientName = base.PatientName
    ds.PatientID = base.PatientID
    ds.ValueType = "CONTAINER"
    return Sent(((ds,),), (str(ds.SeriesInstanceUID),))


def encapsulated_pdf(workdir: Path, seed: int) -> Sent:
    base = phantom(workdir, seed)[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = UID("1.2.840.10008.5.1.4.1.1.104.1")
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
    ds.StudyInstanceUID = base.StudyInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DOC"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    return Sent(((ds,),), (str(ds.SeriesInstanceUID),))


def mr_sop_class_in_ct_series(workdir: Path, seed: int) -> Sent:
    """MR Image Storage instances: recorded as ignored (not analysed), acknowledged with success."""
    series = phantom(workdir, seed)[:3]
    for ds in series:
        ds.SOPClassUID = UID("1.2.840.10008.5.1.4.1.1.4")
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.Modality = "MR"
    return Sent((tuple(series),), (str(series[0].SeriesInstanceUID),))


def utf8_character_set(workdir: Path, seed: int) -> Sent:
    series = phantom(workdir, seed)
    for ds in series:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "山田^太郎=ヤマダ^タロウ"
        ds.SeriesDescription = "CTPA Lungenembolie Ü 肺塞栓"
        ds.InstitutionName = "Hôpital Saint-Éloi"
    return _one(series)


def unknown_character_set(workdir: Path, seed: int) -> Sent:
    series = phantom(workdir, seed)
    for ds in series:
        ds.SpecificCharacterSet = "ISO_IR 999"
        ds.InstitutionName = "Klinik \xe4\xf6\xfc"
    return _one(series)


def latin1_bytes_without_character_set(workdir: Path, seed: int) -> Sent:
    series = phantom(workdir, seed)
    for ds in series:
        if "SpecificCharacterSet" in ds:
            del ds.SpecificCharacterSet
        ds.add_new(0x00081090, "LO", b"Scanner M\xfcller \xff\xfe")  # ManufacturerModelName, raw 8-bit bytes
    return _one(series)


def invalid_birth_date(workdir: Path, seed: int) -> Sent:
    series = phantom(workdir, seed)
    for ds in series:
        ds.PatientBirthDate = "19471399"  # month 13, day 99
    return _one(series)


def huge_private_tag(workdir: Path, seed: int) -> Sent:
    series = phantom(workdir, seed)
    block = series[0].private_block(0x0011, "PE FAULT TEST", create=True)
    block.add_new(0x01, "OB", bytes(24 * 1024 * 1024))
    for ds in series[1:5]:
        b = ds.private_block(0x0011, "PE FAULT TEST", create=True)
        b.add_new(0x01, "OB", bytes(2 * 1024 * 1024))
    return _one(series)


def zero_length_elements(workdir: Path, seed: int) -> Sent:
    series = phantom(workdir, seed)
    for ds in series:
        ds.PixelSpacing = None
        ds.SliceThickness = None
        ds.RescaleSlope = None
        ds.RescaleIntercept = None
        ds.SeriesDescription = None
        ds.PatientName = None
    return _one(series)


def empty_pixel_data(workdir: Path, seed: int) -> Sent:
    series = phantom(workdir, seed)
    for ds in series:
        ds.PixelData = b""
    return _one(series)


def study_uid_disagrees(workdir: Path, seed: int) -> Sent:
    series = phantom(workdir, seed)
    other_study = generate_uid()
    for ds in series[N_SLICES // 2 :]:
        ds.StudyInstanceUID = other_study
    return _one(series)


def corrupt_jpeg2000(workdir: Path, seed: int) -> Sent:
    series = phantom(workdir, seed)
    corrupted = []
    for ds in series:
        ds = copy.deepcopy(ds)
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        frame = b"\xff\x4f\xff\x51" + bytes(200)
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        corrupted.append(ds)
    return _one(corrupted)


def rgb_pixels(workdir: Path, seed: int) -> Sent:
    series = phantom(workdir, seed)
    for ds in series:
        gray = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(SIZE, SIZE)
        rgb = np.repeat((gray >> 4).astype(np.uint8)[..., None], 3, axis=2)
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = rgb.tobytes()
    return _one(series)


def nan_rescale_slope(workdir: Path, seed: int) -> Sent:
    series = phantom(workdir, seed)
    for ds in series:
        ds.RescaleSlope = "NaN"
    return _one(series)


def head_ct_without_contrast(workdir: Path, seed: int) -> Sent:
    return _one(phantom(workdir, seed, kind="head", pe=False, contrast=False, series_description="CT HEAD"))


def localizer(workdir: Path, seed: int) -> Sent:
    series = phantom(workdir, seed)
    for ds in series:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    return _one(series)


def aborted_association(workdir: Path, seed: int) -> Sent:
    """The sender aborts after half the slices: what was acknowledged is kept, the series still closes."""
    series = phantom(workdir, seed)
    return Sent((tuple(series[: N_SLICES // 2]),), (str(series[0].SeriesInstanceUID),), abort_last=True)


def duplicate_instances(workdir: Path, seed: int) -> Sent:
    series = phantom(workdir, seed)
    return Sent((tuple(series), tuple(series[:10])), (str(series[0].SeriesInstanceUID),))


ALL_STATES = frozenset({ANALYSED, IGNORED, FAILED})
NOT_ANALYSED = frozenset({IGNORED, FAILED})
OK = frozenset({SUCCESS})

CASES: tuple[Case, ...] = (
    Case("truncated_pixel_data", truncated_pixel_data, OK, NOT_ANALYSED, "pixel data shorter than Rows x Columns x 2"),
    Case("wrong_bits_allocated", wrong_bits_allocated, OK, NOT_ANALYSED, "BitsAllocated 8 on 16-bit data"),
    Case("invalid_bits_allocated", invalid_bits_allocated, OK, NOT_ANALYSED, "BitsAllocated 12 (not a multiple of 8)"),
    Case("pixel_data_larger_than_rows_columns", pixel_data_larger_than_rows_columns, OK, NOT_ANALYSED, "Rows/Columns 32 on 64 x 64 data"),
    Case("pixel_data_smaller_than_rows_columns", pixel_data_smaller_than_rows_columns, OK, NOT_ANALYSED, "Rows/Columns 128 on 64 x 64 data"),
    Case("empty_pixel_data", empty_pixel_data, OK, NOT_ANALYSED, "PixelData present but zero length"),
    Case("corrupt_jpeg2000", corrupt_jpeg2000, OK, NOT_ANALYSED, "JPEG 2000 transfer syntax, codestream cut short"),
    Case("rgb_pixels", rgb_pixels, OK, NOT_ANALYSED, "RGB pixels in a CT series"),
    Case("nan_rescale_slope", nan_rescale_slope, OK, ALL_STATES, "RescaleSlope NaN (pe_model.volume falls back to slope 1.0)"),
    Case("traversal_in_study_uid", traversal_in_study_uid, frozenset({DATASET_DOES_NOT_MATCH}), frozenset({ABSENT}), "StudyInstanceUID ../../../x"),
    Case("traversal_in_series_uid", traversal_in_series_uid, frozenset({DATASET_DOES_NOT_MATCH}), frozenset({ABSENT}), "SeriesInstanceUID 1.2/../../x"),
    Case("absolute_path_sop_uid", absolute_path_sop_uid, frozenset({DATASET_DOES_NOT_MATCH}), frozenset({ABSENT}), "SOPInstanceUID /tmp/x"),
    Case("letters_in_uid", letters_in_uid, frozenset({DATASET_DOES_NOT_MATCH}), frozenset({ABSENT}), "SeriesInstanceUID with letters"),
    Case("uid_too_long", uid_too_long, frozenset({DATASET_DOES_NOT_MATCH}), frozenset({ABSENT}), "StudyInstanceUID of 72 characters"),
    Case("uid_leading_zero", uid_leading_zero, frozenset({DATASET_DOES_NOT_MATCH}), frozenset({ABSENT}), "UID component with a leading zero"),
    Case("missing_study_uid", missing_study_uid, frozenset({DATASET_DOES_NOT_MATCH}), frozenset({ABSENT}), "no StudyInstanceUID"),
    Case("sop_uid_differs_from_request", sop_uid_differs_from_request, frozenset({DATASET_DOES_NOT_MATCH}), frozenset({ABSENT}), "request and dataset name different SOP Instance UIDs"),
    Case("not_a_dataset", not_a_dataset, frozenset({CANNOT_UNDERSTAND, DATASET_DOES_NOT_MATCH}), frozenset(), "random bytes after a valid file meta"),
    Case("missing_image_position", missing_image_position, OK, NOT_ANALYSED, "no ImagePositionPatient"),
    Case("missing_image_orientation", missing_image_orientation, OK, NOT_ANALYSED, "no ImageOrientationPatient"),
    Case("image_position_missing_on_some", image_position_missing_on_some, OK, ALL_STATES, "ImagePositionPatient missing on every 7th slice"),
    Case("mixed_orientations", mixed_orientations, OK, NOT_ANALYSED, "axial and coronal slices in one series"),
    Case("duplicate_positions", duplicate_positions, OK, NOT_ANALYSED, "every slice at the same position"),
    Case("single_slice", single_slice, OK, frozenset({IGNORED}), "one slice"),
    Case("two_thousand_slices", two_thousand_slices, OK, ALL_STATES, "2,000 slices of 16 x 16", extra_timeout=120.0),
    Case("structured_report", structured_report, OK, frozenset({ABSENT}), "Basic Text SR (non-image SOP class)"),
    Case("encapsulated_pdf", encapsulated_pdf, OK, frozenset({ABSENT}), "Encapsulated PDF (non-image SOP class)"),
    Case("mr_sop_class", mr_sop_class_in_ct_series, OK, frozenset({ABSENT}), "MR Image Storage"),
    Case("utf8_character_set", utf8_character_set, OK, frozenset({ANALYSED}), "ISO_IR 192 with Japanese and accented text"),
    Case("unknown_character_set", unknown_character_set, OK, frozenset({ANALYSED}), "SpecificCharacterSet ISO_IR 999"),
    Case("latin1_bytes_without_character_set", latin1_bytes_without_character_set, OK, frozenset({ANALYSED}), "8-bit bytes with no character set"),
    Case("invalid_birth_date", invalid_birth_date, OK, frozenset({ANALYSED}), "PatientBirthDate 19471399 (not a date)"),
    Case("huge_private_tags", huge_private_tag, OK, frozenset({ANALYSED}), "24 MB and 2 MB private OB elements"),
    Case("zero_length_elements", zero_length_elements, OK, ALL_STATES, "zero-length PixelSpacing, SliceThickness, rescale, names"),
    Case("study_uid_disagrees", study_uid_disagrees, OK, ALL_STATES, "half the slices name another study"),
    Case("head_ct_without_contrast", head_ct_without_contrast, OK, frozenset({IGNORED}), "a head CT the CTPA rule excludes"),
    Case("localizer", localizer, OK, frozenset({IGNORED}), "ImageType LOCALIZER"),
    Case("aborted_association", aborted_association, OK, frozenset({IGNORED}), "sender aborts after 24 of 48 slices"),
    Case("duplicate_instances", duplicate_instances, OK, frozenset({ANALYSED}), "10 instances sent twice"),
)
