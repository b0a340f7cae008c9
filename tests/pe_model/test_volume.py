"""Volume builder: every slice at its physical position, whatever the order, gaps or encoding."""

from __future__ import annotations

import dataclasses

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    UID,
    generate_uid,
)

from pe_model.errors import (
    InconsistentOrientationError,
    MissingGeometryError,
    MixedSeriesError,
    NoImagesError,
    NotCTError,
    TooFewSlicesError,
    UnreadablePixelsError,
)
from phantoms import SUPPORTED_TRANSFER_SYNTAXES, PhantomSpec, generate_volume, write_phantom_series
from pe_model.volume import Volume, load_series, read_datasets

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
STUDY = generate_uid()
SERIES = generate_uid()


def hu_of_position(position_mm: float) -> float:
    """The HU every pixel of a test slice holds: encodes where the slice lies."""
    return 100.0 + 4.0 * position_mm


def ct_slice(
    position: Sequence[float],
    *,
    orientation: Sequence[float] = AXIAL,
    rows: int = 40,
    columns: int = 36,
    hu: float | None = None,
    instance_number: int = 1,
    series_uid: str = SERIES,
    study_uid: str = STUDY,
    modality: str = "CT",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    pixel_spacing: Sequence[float] = (0.7, 0.8),
    bits: int = 16,
    signed: bool = True,
    slope: float = 1.0,
    intercept: float = -1024.0,
    stored: np.ndarray | None = None,
) -> Dataset:
    """A small single-frame CT image whose pixels carry ``hu`` (a slope/intercept rescale away)."""
    normal = np.cross(orientation[:3], orientation[3:])
    if hu is None:
        hu = hu_of_position(float(np.dot(position, normal)))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.ImageType = list(image_type)
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.SliceThickness = 1.0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = bits
    ds.BitsStored = bits if bits == 8 else 12 if not signed else 16
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if stored is None:
        value = round((hu - intercept) / slope)
        dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}[(bits, signed)]
        stored = np.full((rows, columns), value, dtype=dtype)
        # A gradient so that a flipped or transposed image would be noticed.
        stored[0, 0] = value + 1
    ds.PixelData = stored.tobytes()
    return ds


def axial_series(positions_z: Sequence[float], **kwargs: object) -> list[Dataset]:
    return [ct_slice((-50.0, -60.0, z), instance_number=i + 1, **kwargs) for i, z in enumerate(positions_z)]  # type: ignore[arg-type]


def write(datasets: Sequence[Dataset], folder: Path, transfer_syntax: str | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        if transfer_syntax is not None and transfer_syntax != ExplicitVRLittleEndian:
            if transfer_syntax in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
                ds.file_meta.TransferSyntaxUID = transfer_syntax
            elif transfer_syntax == JPEG2000:
                ds.compress(transfer_syntax, j2k_cr=[5])
            else:
                ds.compress(transfer_syntax)
        path = folder / f"img{i:04d}"  # no extension: names must not matter
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def assert_at_positions(volume: Volume, expected_z: Sequence[float], atol: float = 0.01) -> None:
    """Slice k of the volume lies at the k-th ascending position and holds that position's pixels."""
    expected = np.sort(np.asarray(expected_z, dtype=np.float64))
    assert volume.shape[0] == len(expected)
    np.testing.assert_allclose(volume.positions_mm, expected, atol=1e-6)
    assert np.all(np.diff(volume.positions_mm) > 0)
    for k, z in enumerate(expected):
        np.testing.assert_allclose(volume.voxels[k, 1:, 1:], hu_of_position(z), atol=atol)
        np.testing.assert_allclose(volume.voxels[k, 0, 0], hu_of_position(z) + 1, atol=max(atol, 0.01))
        np.testing.assert_allclose(volume.image_positions[k], (-50.0, -60.0, z))


Z = [float(-100 + 2.5 * k) for k in range(12)]


def test_ascending_series_from_folder(tmp_path: Path) -> None:
    write(axial_series(Z), tmp_path / "a")
    volume = load_series(tmp_path / "a")
    assert_at_positions(volume, Z)
    assert volume.voxels.dtype == np.int16  # integral slope and intercept: HU are integers
    assert volume.pixel_spacing_mm == (0.7, 0.8)
    assert volume.study_instance_uid == STUDY and volume.series_instance_uid == SERIES
    assert volume.slice_thickness_mm == 1.0
    assert volume.skipped == ()
    assert volume.frame_numbers == (None,) * len(Z)
    np.testing.assert_allclose(volume.normal, (0, 0, 1))


def test_descending_series_is_sorted_ascending_along_normal() -> None:
    datasets = axial_series(list(reversed(Z)))
    volume = load_series(datasets)
    assert_at_positions(volume, Z)
    # Instance numbers ran the other way: sorting must ignore them.
    by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
    assert [by_uid[u].ImagePositionPatient[2] for u in volume.sop_instance_uids] == sorted(Z)


def test_shuffled_arrival_and_shuffled_instance_numbers() -> None:
    rng = np.random.default_rng(3)
    datasets = axial_series(Z)
    for ds, n in zip(datasets, rng.permutation(len(datasets)), strict=True):
        ds.InstanceNumber = int(n) + 1
    order = rng.permutation(len(datasets))
    volume = load_series([datasets[i] for i in order])
    assert_at_positions(volume, Z)


def test_gaps_keep_real_positions() -> None:
    gapped = [z for i, z in enumerate(Z) if i not in (4, 5, 9)] + [Z[-1] + 7.0]
    volume = load_series(axial_series(gapped), min_slices=5)
    assert_at_positions(volume, gapped)
    assert volume.mean_slice_spacing_mm == pytest.approx((max(gapped) - min(gapped)) / (len(gapped) - 1))


def test_sorting_uses_the_normal_not_z_alone() -> None:
    # Coronal slices: ImagePositionPatient z is constant, slices step along y (posterior).
    ys = [float(-20 + 3 * k) for k in range(11)]
    rng = np.random.default_rng(0)
    datasets = [
        ct_slice((-50.0, y, 30.0), orientation=CORONAL, instance_number=int(n))
        for y, n in zip(ys, rng.permutation(11), strict=True)
    ]
    volume = load_series(datasets)
    normal = np.cross(CORONAL[:3], CORONAL[3:])  # (0, 1, 0)
    np.testing.assert_allclose(volume.normal, normal)
    np.testing.assert_allclose(volume.positions_mm, sorted(ys))
    for k, y in enumerate(sorted(ys)):
        assert volume.image_positions[k][1] == y
        np.testing.assert_allclose(volume.voxels[k, 1:, 1:], hu_of_position(y))


def test_oblique_orientation_sorted_along_its_normal() -> None:
    a = np.deg2rad(20.0)
    orientation = (1.0, 0.0, 0.0, 0.0, float(np.cos(a)), float(-np.sin(a)))
    normal = np.cross(orientation[:3], orientation[3:])
    # Slices step along the normal, but z runs the opposite way of the position along the normal
    # for some, so sorting by z would be wrong.
    steps = [3.0 * k for k in range(10)]
    rng = np.random.default_rng(1)
    datasets = [ct_slice(tuple(np.array([0.0, 10.0, 5.0]) + s * normal), orientation=orientation) for s in rng.permutation(steps)]
    volume = load_series(datasets)
    base = float(np.dot((0.0, 10.0, 5.0), normal))
    np.testing.assert_allclose(volume.positions_mm, base + np.asarray(steps), atol=1e-9)
    for k in range(10):
        np.testing.assert_allclose(volume.voxels[k, 1:, 1:], hu_of_position(volume.positions_mm[k]), atol=0.51)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} (dcmtk) is not installed")
    return path


@pytest.mark.parametrize(
    ("transfer_syntax", "atol"),
    [
        (ImplicitVRLittleEndian, 0.01),
        (ExplicitVRLittleEndian, 0.01),
        (DeflatedExplicitVRLittleEndian, 0.01),
        (RLELossless, 0.01),
        (JPEGLSLossless, 0.01),
        (JPEG2000Lossless, 0.01),
        (JPEG2000, 12.0),
    ],
    ids=["implicit", "explicit", "deflate", "rle", "jpeg-ls", "j2k-lossless", "j2k-lossy"],
)
def test_transfer_syntaxes_encoded_with_pydicom(tmp_path: Path, transfer_syntax: str, atol: float) -> None:
    datasets = axial_series(list(reversed(Z)))
    paths = write(datasets, tmp_path, transfer_syntax)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == transfer_syntax
    volume = load_series(tmp_path)
    assert_at_positions(volume, Z, atol=atol)


@pytest.mark.dcmtk
@pytest.mark.parametrize(
    ("option", "transfer_syntax", "bits", "atol"),
    [("+eb", JPEGBaseline8Bit, 8, 3.0), ("+e1", JPEGLosslessSV1, 16, 0.01)],
    ids=["jpeg-baseline-8bit", "jpeg-lossless-sv1"],
)
def test_transfer_syntaxes_encoded_with_dcmtk(
    tmp_path: Path, option: str, transfer_syntax: str, bits: int, atol: float
) -> None:
    dcmcjpeg = _tool("dcmcjpeg")
    # JPEG baseline holds 8-bit samples: positions chosen so HU stays within one byte of stored range.
    zs = [float(2 * k) for k in range(12)]
    datasets = [
        ct_slice((0.0, 0.0, z), bits=bits, signed=False, intercept=-0.0 if bits == 8 else -1024.0, instance_number=12 - i)
        for i, z in enumerate(zs)
    ]
    for ds in datasets:
        ds.ImagePositionPatient = [-50.0, -60.0, ds.ImagePositionPatient[2]]
    raw = write(datasets, tmp_path / "raw")
    out = tmp_path / "enc"
    out.mkdir()
    for path in raw:
        subprocess.run([dcmcjpeg, option, str(path), str(out / path.name)], check=True, capture_output=True)
    assert pydicom.dcmread(out / raw[0].name).file_meta.TransferSyntaxUID == transfer_syntax
    volume = load_series(out)
    assert_at_positions(volume, zs, atol=atol)


def enhanced_ct(positions_z: Sequence[float], *, slopes: Sequence[float] | None = None, localizer_frame: int | None = None) -> Dataset:
    """An Enhanced CT multi-frame image: geometry and rescale in functional groups."""
    n = len(positions_z)
    slopes = list(slopes) if slopes is not None else [1.0] * n
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = SERIES
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = 16, 12
    ds.NumberOfFrames = n
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = list(AXIAL)
    measures = Dataset()
    measures.PixelSpacing = [0.7, 0.8]
    measures.SliceThickness = 1.25
    shared.PlaneOrientationSequence = DicomSequence([orient])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    pixels = np.empty((n, 16, 12), dtype=np.int16)
    for i, (z, slope) in enumerate(zip(positions_z, slopes, strict=True)):
        group = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [-50.0, -60.0, float(z)]
        group.PlanePositionSequence = DicomSequence([pos])
        transform = Dataset()
        transform.RescaleSlope = slope
        transform.RescaleIntercept = -1024.0
        transform.RescaleType = "HU"
        group.PixelValueTransformationSequence = DicomSequence([transform])
        frame_type = Dataset()
        frame_type.FrameType = ["ORIGINAL", "PRIMARY", "LOCALIZER" if i == localizer_frame else "AXIAL", "NONE"]
        group.CTImageFrameTypeSequence = DicomSequence([frame_type])
        frames.append(group)
        value = round((hu_of_position(z) + 1024.0) / slope)
        pixels[i] = value
        pixels[i, 0, 0] = value + round(1 / slope)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.PixelData = pixels.tobytes()
    return ds


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, RLELossless], ids=["native", "rle"])
def test_enhanced_ct_multiframe_sorted_with_per_frame_rescale(tmp_path: Path, transfer_syntax: str) -> None:
    rng = np.random.default_rng(5)
    order = rng.permutation(len(Z))
    zs = [Z[i] for i in order]
    slopes = [1.0 if i % 2 else 0.5 for i in range(len(zs))]
    ds = enhanced_ct(zs, slopes=slopes)
    write([ds], tmp_path, transfer_syntax)
    volume = load_series(tmp_path)
    np.testing.assert_allclose(volume.positions_mm, Z)
    for k, z in enumerate(Z):
        np.testing.assert_allclose(volume.voxels[k, 1:, 1:], hu_of_position(z), atol=0.5)
    # frame numbers point back into the source frames
    assert [zs[f - 1] for f in volume.frame_numbers if f is not None] == Z
    assert set(volume.sop_instance_uids) == {ds.SOPInstanceUID}
    assert volume.slice_thickness_mm == 1.25
    assert volume.pixel_spacing_mm == (0.7, 0.8)


def test_enhanced_ct_localizer_frame_dropped() -> None:
    ds = enhanced_ct(Z + [500.0], localizer_frame=len(Z))
    volume = load_series([ds])
    np.testing.assert_allclose(volume.positions_mm, Z)
    assert volume.skipped == ((ds.SOPInstanceUID, "localizer (scout) image"),)


def test_localizer_other_orientation_and_other_size_are_dropped_with_reasons() -> None:
    series = axial_series(Z)
    localizer = ct_slice((0.0, 0.0, 0.0), orientation=CORONAL, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    sagittal = ct_slice((0.0, 0.0, 0.0), orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
    big = ct_slice((-50.0, -60.0, 999.0), rows=20)
    volume = load_series(series + [localizer, sagittal, big])
    assert_at_positions(volume, Z)
    reasons = dict(volume.skipped)
    assert reasons[localizer.SOPInstanceUID] == "localizer (scout) image"
    assert "orientation" in reasons[sagittal.SOPInstanceUID]
    assert "20x36" in reasons[big.SOPInstanceUID]
    assert len(volume.skipped) == 3


def test_duplicate_positions_keep_the_later_instance() -> None:
    series = axial_series(Z)
    again = ct_slice((-50.0, -60.0, Z[3]), instance_number=100, hu=hu_of_position(Z[3]))
    volume = load_series(series + [again])
    assert_at_positions(volume, Z)
    assert volume.sop_instance_uids[3] == again.SOPInstanceUID
    assert dict(volume.skipped)[series[3].SOPInstanceUID].startswith("duplicate position")


def test_same_file_received_twice_is_kept_once(tmp_path: Path) -> None:
    paths = write(axial_series(Z), tmp_path / "s")
    (tmp_path / "s" / "copy").mkdir()
    shutil.copy(paths[2], tmp_path / "s" / "copy" / "again.dcm")
    volume = load_series(tmp_path / "s")
    assert_at_positions(volume, Z)
    assert volume.skipped[0][1] == "same image received twice"


def test_read_datasets_recurses_and_skips_non_dicom_and_dicomdir(tmp_path: Path) -> None:
    write(axial_series(Z[:3]), tmp_path / "a" / "b")
    (tmp_path / "notes.txt").write_text("not dicom")
    (tmp_path / "a" / "empty.dcm").write_bytes(b"")
    (tmp_path / "DICOMDIR").write_bytes(b"\0" * 132)
    datasets = read_datasets(tmp_path)
    assert len(datasets) == 3
    assert all("PixelData" in ds for ds in datasets)
    assert len(read_datasets(datasets)) == 3
    assert len(read_datasets([str(p) for p in sorted((tmp_path / "a" / "b").iterdir())])) == 3


def test_in_memory_datasets_without_file_meta_decode_as_native() -> None:
    datasets = axial_series(Z)
    for ds in datasets:
        del ds.file_meta
    volume = load_series(datasets)
    assert_at_positions(volume, Z)
    assert not hasattr(datasets[0], "file_meta") or "TransferSyntaxUID" not in datasets[0].file_meta


def test_patient_position_of_a_voxel() -> None:
    gapped = [0.0, 1.0, 2.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
    volume = load_series(axial_series(gapped))
    # pixel (row 3, column 2) of slice 4: column steps along the row direction (x), by column spacing
    np.testing.assert_allclose(volume.patient_position(4, 3, 2), (-50.0 + 2 * 0.8, -60.0 + 3 * 0.7, 6.0))
    # halfway between slices 2 (z 2) and 3 (z 5)
    np.testing.assert_allclose(volume.patient_position(2.5, 0, 0), (-50.0, -60.0, 3.5))


# ---- errors -----------------------------------------------------------------------------------


def test_no_images(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(NoImagesError, match="no DICOM images"):
        load_series(tmp_path)


def test_mixed_series() -> None:
    datasets = axial_series(Z) + axial_series([500.0], series_uid=generate_uid())
    with pytest.raises(MixedSeriesError, match="2 series"):
        load_series(datasets)


def test_not_ct() -> None:
    with pytest.raises(NotCTError, match="modality is MR, not CT"):
        load_series(axial_series(Z, modality="MR"))


def test_too_few_slices_message() -> None:
    with pytest.raises(TooFewSlicesError) as info:
        load_series(axial_series(Z[:3]))
    assert str(info.value) == "series has 3 usable slices; at least 10 are needed"


def test_only_localizers_is_too_few_slices() -> None:
    with pytest.raises(TooFewSlicesError, match="0 usable slices"):
        load_series(axial_series(Z, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")))


def test_inconsistent_orientation() -> None:
    axial = axial_series(Z[:6])
    coronal = [ct_slice((0.0, float(y), 0.0), orientation=CORONAL) for y in range(6)]
    with pytest.raises(InconsistentOrientationError, match="two largest hold 6 images each"):
        load_series(axial + coronal)
    with pytest.raises(InconsistentOrientationError, match="holds 7 of 12 images"):
        load_series(axial_series(Z[:7]) + coronal[:5])


def test_missing_geometry() -> None:
    datasets = axial_series(Z)
    for ds in datasets:
        del ds.ImagePositionPatient
    with pytest.raises(MissingGeometryError, match="ImagePositionPatient"):
        load_series(datasets)
    datasets = axial_series(Z)
    for ds in datasets:
        del ds.PixelSpacing
    with pytest.raises(MissingGeometryError, match="PixelSpacing"):
        load_series(datasets)


def test_image_without_position_is_skipped_not_fatal() -> None:
    datasets = axial_series(Z)
    extra = ct_slice((0.0, 0.0, 0.0))
    del extra.ImagePositionPatient
    volume = load_series(datasets + [extra])
    assert dict(volume.skipped)[extra.SOPInstanceUID] == "ImagePositionPatient missing or invalid"


def test_unreadable_pixels(tmp_path: Path) -> None:
    datasets = axial_series(Z)
    datasets[5].PixelData = datasets[5].PixelData[:10]
    with pytest.raises(UnreadablePixelsError, match=datasets[5].SOPInstanceUID) as info:
        load_series(datasets)
    assert "\n" not in str(info.value)
    assert "pixel data holds 10 bytes" in str(info.value)


# ---- phantom series (phantoms) -------------------------------------------------------

PHANTOM = PhantomSpec(n_slices=40, rows=64, columns=64, pixel_spacing_mm=5.5, slice_spacing_mm=6.0, noise_hu=8.0)


@pytest.fixture(scope="module")
def phantom_hu() -> np.ndarray:
    voxels, _, _ = generate_volume(PHANTOM)
    return voxels.astype(np.float32)


@pytest.mark.parametrize("transfer_syntax", SUPPORTED_TRANSFER_SYNTAXES, ids=lambda uid: UID(uid).keyword)
def test_phantom_series_in_every_phantom_transfer_syntax(
    tmp_path: Path, phantom_hu: np.ndarray, transfer_syntax: str
) -> None:
    truth = write_phantom_series(tmp_path, PHANTOM, transfer_syntax_uid=transfer_syntax, file_names="index")
    assert pydicom.dcmread(truth.files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == transfer_syntax
    volume = load_series(tmp_path)
    np.testing.assert_allclose(volume.positions_mm, truth.slice_positions_mm, atol=1e-6)
    assert volume.sop_instance_uids == truth.sop_instance_uids
    assert volume.study_instance_uid == truth.study_instance_uid
    assert volume.series_instance_uid == truth.series_instance_uid
    np.testing.assert_array_equal(volume.voxels, phantom_hu)  # all phantom syntaxes are lossless
    assert volume.skipped == ()


def test_enhanced_phantom_matches_single_frame(tmp_path: Path, phantom_hu: np.ndarray) -> None:
    truth = write_phantom_series(tmp_path, PHANTOM, enhanced=True, signed_pixels=True)
    volume = load_series(tmp_path)
    assert volume.frame_numbers == tuple(range(1, PHANTOM.n_slices + 1))
    np.testing.assert_allclose(volume.positions_mm, truth.slice_positions_mm, atol=1e-6)
    np.testing.assert_array_equal(volume.voxels, phantom_hu)


def test_phantom_landmark_lies_in_its_anatomy(tmp_path: Path) -> None:
    truth = write_phantom_series(tmp_path, PHANTOM)
    volume = load_series(tmp_path)
    # patient -> voxel via the volume's own geometry: the lung landmark must read lung HU
    for name, low, high in [("right_lung", -1000, -700), ("left_lung", -1000, -700), ("vertebral_body", 150, 900)]:
        point = np.asarray(truth.landmarks_patient_mm[name])
        k = int(np.argmin(np.abs(volume.positions_mm - float(np.dot(point, volume.normal)))))
        offset = point - volume.image_positions[k]
        column = round(float(np.dot(offset, volume.orientation[:3])) / volume.pixel_spacing_mm[1])
        row = round(float(np.dot(offset, volume.orientation[3:])) / volume.pixel_spacing_mm[0])
        assert low <= volume.voxels[k, row, column] <= high, name
        np.testing.assert_allclose(volume.patient_position(k, row, column), point, atol=4.0)


@pytest.mark.parametrize("defect", ["bits_allocated_8", "rows_columns_half"])
def test_native_pixel_data_of_the_wrong_length_is_refused(tmp_path: Path, defect: str) -> None:
    """pydicom would decode the first bytes of such pixel data into a plausible but wrong image."""
    from phantoms import PhantomSpec, write_phantom_series

    truth = write_phantom_series(tmp_path, PhantomSpec(n_slices=12, rows=32, columns=32))
    for victim in truth.files:  # every slice alike, so none is dropped as "another size"
        ds = pydicom.dcmread(victim)
        if defect == "bits_allocated_8":
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        else:
            ds.Rows, ds.Columns = 16, 16
        ds.save_as(victim)
    with pytest.raises(UnreadablePixelsError, match="pixel data holds .* bytes, but"):
        load_series(tmp_path)


def test_a_decoder_failure_is_wrapped_with_its_cause(tmp_path: Path) -> None:
    from pydicom.encaps import encapsulate, generate_fragments

    from phantoms import PhantomSpec, write_phantom_series

    truth = write_phantom_series(tmp_path, PhantomSpec(n_slices=12, rows=32, columns=32), transfer_syntax_uid=RLELossless)
    victim = truth.files[3]
    ds = pydicom.dcmread(victim)
    fragment = next(generate_fragments(ds.PixelData))
    ds.PixelData = encapsulate([fragment[:40]])  # an RLE segment cut short
    ds.save_as(victim)
    with pytest.raises(UnreadablePixelsError, match="cannot decode the pixel data of image") as info:
        load_series(tmp_path)
    assert info.value.__cause__ is not None


def test_hu_are_int16_only_when_exact_and_in_range(tmp_path: Path) -> None:
    """int16 HU for integral rescales (half the memory), float32 for a fractional slope; the values are
    the same either way. A slice whose HU leave the Hounsfield range is not CT: it is dropped with the
    reason (pe_model.validation), never stored as a plausible-looking slice."""
    fractional = load_series(write(axial_series(Z, slope=0.5, intercept=-1024.0), tmp_path / "half"))
    assert fractional.voxels.dtype == np.float32
    for k, z in enumerate(Z):
        np.testing.assert_allclose(fractional.voxels[k, 1:, 1:], hu_of_position(z), atol=0.5)
    # A uint16 image with intercept +2000: 65535 + 2000 HU is no tissue.
    datasets = axial_series(Z, bits=16, signed=False)
    datasets[7] = ct_slice((-50.0, -60.0, Z[7]), signed=False, intercept=2000.0,
                           stored=np.full((40, 36), 65535, dtype=np.uint16))
    datasets[7].BitsStored, datasets[7].HighBit = 16, 15
    wide = load_series(write(datasets, tmp_path / "wide"))
    assert wide.voxels.dtype == np.int16
    assert str(datasets[7].SOPInstanceUID) not in wide.sop_instance_uids
    reasons = dict(wide.skipped)
    assert "Hounsfield range" in reasons[str(datasets[7].SOPInstanceUID)]
    kept = [z for k, z in enumerate(Z) if k != 7]
    assert_at_positions(wide, kept)


def test_int16_and_float32_volumes_resample_identically(tmp_path: Path) -> None:
    from pe_model.preprocessing import resample_isotropic

    volume = load_series(write(axial_series(Z), tmp_path / "a"))
    assert volume.voxels.dtype == np.int16
    as_float = dataclasses.replace(volume, voxels=volume.voxels.astype(np.float32))
    for a, b in zip(resample_isotropic(volume, 1.0), resample_isotropic(as_float, 1.0), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
