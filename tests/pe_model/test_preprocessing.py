"""Preprocessing: isotropic resampling at real positions, lung crop, windows, chunks, maps back."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from phantoms import PhantomSpec, generate_volume
from pe_model.preprocessing import (
    CropBox,
    PreprocessConfig,
    apply_windows,
    lung_crop_box,
    preprocess,
    resample_isotropic,
)
from pe_model.volume import Volume

AXIAL = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


def make_volume(
    voxels: np.ndarray,
    positions: Sequence[float],
    pixel_spacing: tuple[float, float] = (1.0, 1.0),
    origin: tuple[float, float] = (-100.0, -80.0),
    orientation: np.ndarray = AXIAL,
) -> Volume:
    """A Volume built directly (no DICOM): slice k at ``positions[k]`` along the normal."""
    positions_arr = np.asarray(positions, dtype=np.float64)
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    in_plane = origin[0] * row + origin[1] * col
    d = len(positions_arr)
    return Volume(
        voxels=voxels.astype(np.float32),
        positions_mm=positions_arr,
        image_positions=np.stack([in_plane + p * normal for p in positions_arr]),
        orientation=orientation,
        pixel_spacing_mm=pixel_spacing,
        sop_instance_uids=tuple(f"1.2.3.{k}" for k in range(d)),
        frame_numbers=(None,) * d,
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        slice_thickness_mm=1.0,
        skipped=(),
    )


def chest_volume(
    slices: int = 48, size: int = 64, pixel_mm: float = 6.0, slice_mm: float = 5.0, lungs: bool = True
) -> tuple[Volume, list[tuple[np.ndarray, np.ndarray]]]:
    """Air around an elliptic body (40 HU), optionally two lung ellipsoids (-850 HU).

    Returns the volume and each lung's (min, max) patient-coordinate extent along x, y, z.
    """
    z = np.arange(slices) * slice_mm  # positions along +z
    y = -size * pixel_mm / 2 + np.arange(size) * pixel_mm
    x = -size * pixel_mm / 2 + np.arange(size) * pixel_mm
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    voxels = np.full(zz.shape, -1000.0, dtype=np.float32)
    voxels[(xx / 170.0) ** 2 + (yy / 120.0) ** 2 <= 1.0] = 40.0
    extents = []
    if lungs:
        zc = z.mean()
        for cx in (-75.0, 70.0):
            a, b, c = 50.0, 70.0, 90.0
            inside = ((xx - cx) / a) ** 2 + ((yy + 5.0) / b) ** 2 + ((zz - zc) / c) ** 2 <= 1.0
            voxels[inside] = -850.0
            extents.append((np.array([cx - a, -5.0 - b, zc - c]), np.array([cx + a, -5.0 + b, zc + c])))
    volume = make_volume(voxels, z, pixel_spacing=(pixel_mm, pixel_mm), origin=(x[0], y[0]))
    return volume, extents


# ---- config ---------------------------------------------------------------------------------


def test_config_round_trips_through_json() -> None:
    config = PreprocessConfig(spacing_mm=1.5, input_size=64, chunk_depth=8, windows=((-600.0, 1500.0), (100.0, 700.0)))
    again = PreprocessConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert again.windows == ((-600.0, 1500.0), (100.0, 700.0))
    assert PreprocessConfig.from_dict({}) == PreprocessConfig()


@pytest.mark.parametrize(
    "bad",
    [{"spacing_mm": 0}, {"input_size": 4}, {"chunk_depth": 0}, {"crop_margin_mm": -1}, {"windows": [[0, 0]]}, {"size": 3}],
)
def test_config_rejects_invalid_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PreprocessConfig.from_dict(bad)


# ---- resampling -----------------------------------------------------------------------------


def test_resampling_is_exact_for_uneven_spacing_and_gaps() -> None:
    # HU linear in the position: linear interpolation at the real positions reproduces it exactly,
    # while interpolating by slice index (ignoring the gap) would not.
    positions = [10.0, 11.0, 12.5, 13.0, 20.0, 21.0, 22.0]
    voxels = np.stack([np.full((8, 6), 3.0 * p + 7.0) for p in positions])
    grid, targets, nearest = resample_isotropic(make_volume(voxels, positions), 1.0)
    np.testing.assert_allclose(targets, np.arange(10.0, 22.0 + 1e-9, 1.0))
    assert grid.shape == (13, 8, 6)
    np.testing.assert_allclose(grid.numpy()[:, 3, 3], 3.0 * targets + 7.0, rtol=1e-6)
    # nearest source slice: 16 mm is nearer to 13 (index 3) than to 20; 17 mm nearer to 20
    assert nearest[targets == 16.0][0] == 3 and nearest[targets == 17.0][0] == 4
    np.testing.assert_array_equal(nearest[:4], [0, 1, 2, 3])


def test_resampling_places_a_bright_marker_slice_at_its_position() -> None:
    positions = np.arange(30) * 2.5  # 0 .. 72.5 mm
    voxels = np.zeros((30, 16, 16), dtype=np.float32)
    voxels[17] = 1000.0  # at 42.5 mm
    grid, targets, nearest = resample_isotropic(make_volume(voxels, positions, pixel_spacing=(0.5, 0.75)), 1.0)
    profile = grid.numpy()[:, 4, 4]
    peak = int(np.argmax(profile))
    assert targets[peak] == pytest.approx(42.5, abs=0.5)
    assert profile[peak] == pytest.approx(1000.0 * (1 - abs(targets[peak] - 42.5) / 2.5))
    assert profile[np.abs(targets - 42.5) >= 2.5].max() == 0.0
    assert nearest[peak] == 17
    # in-plane: 16 px at 0.5 mm -> 8 voxels, 16 px at 0.75 mm -> 12 voxels
    assert grid.shape[1:] == (8, 12)


def test_resampling_descending_input_ordering_is_handled_by_volume() -> None:
    # Volumes are always ascending; a single-slice volume still resamples.
    grid, targets, nearest = resample_isotropic(make_volume(np.ones((1, 4, 4)), [5.0]), 1.0)
    assert grid.shape == (1, 4, 4) and targets.tolist() == [5.0] and nearest.tolist() == [0]


# ---- lung crop ------------------------------------------------------------------------------


def _grid_box_of(extent: tuple[np.ndarray, np.ndarray], volume: Volume, spacing: float) -> np.ndarray:
    """Lung extent in resampled grid voxel indices (z, y, x) (min, max)."""
    lo, hi = extent
    origin = volume.image_positions[0]
    return np.array(
        [
            [(lo[2] - volume.positions_mm[0]) / spacing, (hi[2] - volume.positions_mm[0]) / spacing],
            [(lo[1] - origin[1]) / spacing, (hi[1] - origin[1]) / spacing],
            [(lo[0] - origin[0]) / spacing, (hi[0] - origin[0]) / spacing],
        ]
    )


def test_crop_box_contains_both_lungs_and_little_else() -> None:
    volume, extents = chest_volume()
    spacing, margin = 2.0, 10.0
    grid, _, _ = resample_isotropic(volume, spacing)
    box = lung_crop_box(grid, spacing, margin)
    assert box.basis == "lungs"
    lungs = np.array([_grid_box_of(e, volume, spacing) for e in extents])
    want_lo, want_hi = lungs[:, :, 0].min(axis=0), lungs[:, :, 1].max(axis=0)
    got_lo = np.array([box.z0, box.y0, box.x0])
    got_hi = np.array([box.z1, box.y1, box.x1])
    margin_vox = margin / spacing
    assert np.all(got_lo <= want_lo - margin_vox + 3) and np.all(got_hi >= want_hi + margin_vox - 3)
    assert np.all(got_lo >= want_lo - margin_vox - 4) and np.all(got_hi <= want_hi + margin_vox + 4)
    # the body is wider than the lungs: the crop must be narrower than the body (170 mm half-width)
    assert (box.x1 - box.x0) * spacing < 2 * 170.0


def test_crop_box_falls_back_to_body_without_lungs() -> None:
    volume, _ = chest_volume(lungs=False)
    grid, _, _ = resample_isotropic(volume, 2.0)
    box = lung_crop_box(grid, 2.0, 0.0)
    assert box.basis == "body"
    # body: x within +-170 mm, y within +-120 mm of the centre; grid origin at -192 mm
    assert (box.x1 - box.x0) * 2.0 == pytest.approx(340.0, abs=8.0)
    assert (box.y1 - box.y0) * 2.0 == pytest.approx(240.0, abs=8.0)
    assert (box.z0, box.z1) == (0, grid.shape[0])


def test_crop_box_of_pure_air_is_the_whole_grid() -> None:
    grid = torch.full((12, 20, 20), -1000.0)
    assert lung_crop_box(grid, 1.0, 5.0) == CropBox(0, 12, 0, 20, 0, 20)
    assert lung_crop_box(grid, 1.0, 5.0).basis == "grid"


def test_outside_air_is_not_lung() -> None:
    # A body with no lungs lying in air: the air around must not be picked as lungs.
    volume, _ = chest_volume(lungs=False)
    grid, _, _ = resample_isotropic(volume, 3.0)
    assert lung_crop_box(grid, 3.0, 0.0).basis == "body"


# ---- windows --------------------------------------------------------------------------------


def test_windows_scale_each_channel() -> None:
    hu = torch.tensor([-2000.0, -1350.0, -600.0, 150.0, 40.0, 240.0, 3000.0]).view(1, 1, -1)
    out = apply_windows(hu, ((-600.0, 1500.0), (100.0, 700.0), (40.0, 400.0)))
    assert out.dtype == torch.uint8 and out.shape == (3, 1, 1, 7)
    lung, pe, mediastinal = (out[c, 0, 0].tolist() for c in range(3))
    assert lung[:4] == [0, 0, 128, 255]
    assert pe[3] == round((150 - (100 - 350)) / 700 * 255) and pe[0] == 0 and pe[-1] == 255
    assert mediastinal[4] == 128 and mediastinal[5] == 255


# ---- whole preprocessing and the maps back --------------------------------------------------

SMALL = PreprocessConfig(spacing_mm=2.0, input_size=32, chunk_depth=10, crop_margin_mm=10.0)


def test_preprocess_shapes_padding_and_maps() -> None:
    volume, _ = chest_volume()
    series = preprocess(volume, SMALL)
    z = series.num_slices
    assert z == series.crop.z1 - series.crop.z0
    n = int(np.ceil(z / 10))
    assert series.chunks.shape == (n, 3, 10, 32, 32) and series.chunks.dtype == torch.uint8
    assert series.num_chunks == n
    pad = n * 10 - z
    if pad:
        assert series.chunks[-1, :, 10 - pad :].max() == 0
    assert series.chunks[-1, :, : 10 - pad].max() > 0
    assert series.slice_positions_mm.shape == (z,) and series.source_slice_index.shape == (z,)
    np.testing.assert_allclose(np.diff(series.slice_positions_mm), 2.0)
    # nearest source slice of each resampled slice
    expected = np.abs(volume.positions_mm[None, :] - series.slice_positions_mm[:, None]).argmin(axis=1)
    np.testing.assert_array_equal(series.source_slice_index, expected)
    assert series.chunk_slice_range(n - 1) == ((n - 1) * 10, z)
    first = series.chunk_source_indices(0)
    assert np.all(np.diff(first) > 0) and first[0] == series.source_slice_index[0]
    assert series.resampled_shape[1:] == (192, 192)
    with pytest.raises(IndexError):
        series.chunk_slice_range(n)


def _bright_cube_volume() -> tuple[Volume, np.ndarray]:
    """Uneven slice positions, anisotropic pixels, one bright cube; returns its patient centre."""
    positions = np.concatenate([np.arange(0, 60, 3.0), np.arange(64, 110, 2.0)])
    d, rows, columns = len(positions), 48, 40
    voxels = np.full((d, rows, columns), -50.0, dtype=np.float32)
    k, r, c = 25, 30, 11  # slice 25 is at 70 mm, in the finer part
    voxels[k - 2 : k + 3, r - 3 : r + 4, c - 3 : c + 4] = 500.0
    volume = make_volume(voxels, positions, pixel_spacing=(1.5, 2.0))
    return volume, volume.patient_position(k, r, c)


def test_bright_source_voxel_lands_at_the_same_patient_position_in_the_input() -> None:
    volume, centre = _bright_cube_volume()
    config = PreprocessConfig(spacing_mm=1.0, input_size=48, chunk_depth=8, crop_margin_mm=0.0)
    series = preprocess(volume, config)
    # soft tissue everywhere: the body box is the whole grid
    assert series.crop.basis == "body"
    assert series.crop == CropBox(0, series.resampled_shape[0], 0, series.resampled_shape[1], 0, series.resampled_shape[2])
    n, _, depth, size, _ = series.chunks.shape
    pe_channel = series.chunks[:, 1].reshape(n * depth, size, size).float().numpy()  # (slices, S, S)
    hot = np.argwhere(pe_channel >= pe_channel.max() - 1)  # saturated voxels of the cube
    d, y, x = hot.mean(axis=0)
    chunk = int(d // depth)
    position = series.input_to_patient(volume, chunk, float(d - chunk * depth), float(y), float(x))
    np.testing.assert_allclose(position, centre, atol=1.5)


def test_heatmap_to_source_round_trip_alignment() -> None:
    volume, _ = _bright_cube_volume()
    config = PreprocessConfig(spacing_mm=1.0, input_size=40, chunk_depth=8, crop_margin_mm=0.0)
    series = preprocess(volume, config)
    # Make a crop that is not the whole grid so the crop offset is exercised.
    series = type(series)(
        chunks=series.chunks,
        num_slices=series.num_slices - 5,
        slice_positions_mm=series.slice_positions_mm[3:-2],
        source_slice_index=series.source_slice_index[3:-2],
        crop=CropBox(3, series.crop.z1 - 2, 5, series.resampled_shape[1] - 9, 4, series.resampled_shape[2] - 6),
        resampled_shape=series.resampled_shape,
        config=config,
    )
    for chunk, (d, y, x) in [(2, (3, 10, 25)), (5, (6, 30, 7)), (9, (1, 20, 20))]:
        dd, yy, xx = np.meshgrid(np.arange(8), np.arange(40), np.arange(40), indexing="ij")
        cam = np.exp(-((dd - d) ** 2 + (yy - y) ** 2 + (xx - x) ** 2) / (2 * 1.5**2)).astype(np.float32)
        maps = series.heatmap_to_source(volume, chunk, cam)
        assert set(maps) == set(series.chunk_source_indices(chunk).tolist())
        for m in maps.values():
            assert m.shape == (48, 40) and m.dtype == np.float32
            assert m.min() >= 0.0 and m.max() <= 1.0 + 1e-6
        k, r, c = max(((k, *np.unravel_index(int(m.argmax()), m.shape)) for k, m in maps.items()), key=lambda t: maps[t[0]][t[1], t[2]])
        assert maps[k][r, c] > 0.2
        want = series.input_to_patient(volume, chunk, d, y, x)
        got = volume.patient_position(k, r, c)
        # within one source pixel (2 mm) in-plane and half the local slice spacing along z
        np.testing.assert_allclose(got[:2], want[:2], atol=2.0)
        assert abs(got[2] - want[2]) <= 1.5


def test_heatmap_is_zero_outside_the_crop() -> None:
    volume, _ = chest_volume()
    series = preprocess(volume, SMALL)
    cam = np.ones((10, 32, 32), dtype=np.float32)
    maps = series.heatmap_to_source(volume, 0, cam)
    some = next(iter(maps.values()))
    rows_inside = np.nonzero(some.max(axis=1) > 0)[0]
    cols_inside = np.nonzero(some.max(axis=0) > 0)[0]
    # source pixels are 6 mm, grid voxels 2 mm: the crop's source extent is its grid extent / 3
    assert (rows_inside[-1] - rows_inside[0] + 1) == pytest.approx((series.crop.y1 - series.crop.y0) / 3, abs=1.5)
    assert (cols_inside[-1] - cols_inside[0] + 1) == pytest.approx((series.crop.x1 - series.crop.x0) / 3, abs=1.5)
    np.testing.assert_allclose(some[rows_inside[0] + 1 : rows_inside[-1], cols_inside[0] + 1 : cols_inside[-1]], 1.0, atol=1e-6)
    assert some[0, 0] == 0.0
    with pytest.raises(ValueError, match="shape"):
        series.heatmap_to_source(volume, 0, np.ones((10, 16, 16)))


# ---- on phantoms (phantoms) ------------------------------------------------------------


def _phantom_volume(spec: PhantomSpec) -> Volume:
    hu, geometry, _ = generate_volume(spec)
    orientation = np.asarray(geometry.image_orientation_patient, dtype=np.float64)
    image_positions = np.asarray(geometry.image_positions_patient, dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    d = hu.shape[0]
    return Volume(
        voxels=hu.astype(np.float32),
        positions_mm=image_positions @ normal,
        image_positions=image_positions,
        orientation=orientation,
        pixel_spacing_mm=geometry.pixel_spacing_mm,
        sop_instance_uids=tuple(f"1.2.3.{k}" for k in range(d)),
        frame_numbers=(None,) * d,
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        slice_thickness_mm=geometry.slice_thickness_mm,
        skipped=(),
    )


def test_crop_box_contains_both_lungs_of_a_phantom() -> None:
    spec = PhantomSpec(n_slices=50, rows=64, columns=64, pixel_spacing_mm=5.5, slice_spacing_mm=6.0, noise_hu=10.0)
    volume = _phantom_volume(spec)
    config = PreprocessConfig(spacing_mm=2.0, input_size=32, crop_margin_mm=0.0)
    series = preprocess(volume, config)
    assert series.crop.basis == "lungs"
    # Truth: air inside the body = components below -500 HU that do not touch the image border.
    labels, n = ndimage.label(volume.voxels < -500)
    border = set(np.unique(np.concatenate([labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]], axis=None)))
    sizes = np.bincount(labels.ravel())
    inner = sorted((i for i in range(1, n + 1) if i not in border), key=lambda i: -sizes[i])[:2]
    lungs = np.argwhere(np.isin(labels, inner))
    assert len(lungs) > 0
    # every lung voxel's centre, mapped into the resampled grid, lies in the crop (one voxel slack)
    _, gy, gx = series.resampled_shape
    ry, rx = gy / volume.shape[1], gx / volume.shape[2]
    z = (volume.positions_mm[lungs[:, 0]] - volume.positions_mm[0]) / config.spacing_mm
    y = (lungs[:, 1] + 0.5) * ry - 0.5
    x = (lungs[:, 2] + 0.5) * rx - 0.5
    crop = series.crop
    assert z.min() >= crop.z0 - 1 and z.max() <= crop.z1 and y.min() >= crop.y0 - 1 and y.max() <= crop.y1
    assert x.min() >= crop.x0 - 1 and x.max() <= crop.x1
    # and the crop is not the whole body: lungs end above the lowest slices of the phantom
    assert crop.shape[0] < series.resampled_shape[0] or crop.shape[2] < gx
    for name in ("right_lung", "left_lung", "pulmonary_trunk"):
        point = np.asarray(spec_landmark(spec, name))
        grid_z = (float(point @ volume.normal) - volume.positions_mm[0]) / config.spacing_mm
        assert crop.z0 <= grid_z < crop.z1, name


def spec_landmark(spec: PhantomSpec, name: str) -> tuple[float, float, float]:
    _, _, truth = generate_volume(spec)
    return truth.landmarks_patient_mm[name]


def test_head_phantom_falls_back_to_the_body_box() -> None:
    spec = PhantomSpec(kind="head", pe=False, n_slices=30, rows=48, columns=48, pixel_spacing_mm=5.0, slice_spacing_mm=5.0)
    series = preprocess(_phantom_volume(spec), PreprocessConfig(spacing_mm=3.0, input_size=32))
    assert series.crop.basis == "body"
    _, y, x = series.resampled_shape
    assert series.crop.shape[1] < y and series.crop.shape[2] < x  # the air around the head is cut
    assert series.chunks.shape[1:] == (3, 10, 32, 32)


# ---- memory on a full-size series -------------------------------------------------------------

_MEASURE = """
import resource, sys
from pe_model.preprocessing import preprocess
from pe_model.volume import load_series
volume = load_series(sys.argv[1])
series = preprocess(volume)
print(volume.shape, tuple(series.chunks.shape), series.crop.basis, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


@pytest.mark.slow
def test_full_size_series_loads_and_preprocesses_under_2_gb(tmp_path: Path) -> None:
    """400 x 512 x 512 at 0.7 mm from DICOM files: peak RSS of load + preprocess stays under 2 GB."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    n, size, spacing = 400, 512, 0.7
    axis = (np.arange(size) - size / 2) * spacing
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    body = (xx / 170) ** 2 + (yy / 120) ** 2 <= 1
    study, series_uid = generate_uid(), generate_uid()
    for k in range(n):
        z = k * spacing
        hu = np.where(body, 40, -1000).astype(np.int16)
        for cx in (-75.0, 70.0):
            hu[((xx - cx) / 50) ** 2 + ((yy + 5) / 70) ** 2 + ((z - n * spacing / 2) / 110) ** 2 <= 1] = -850
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.SOPInstanceUID = generate_uid()
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series_uid, "CT"
        ds.ImagePositionPatient = [float(axis[0]), float(axis[0]), z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing, spacing]
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 1
        ds.PixelData = (hu + 1024).tobytes()
        ds.save_as(tmp_path / f"{n - k:04d}.dcm", enforce_file_format=True)
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tmp_path)], check=True, capture_output=True, text=True, timeout=300
    )
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("(400, 512, 512)") and "lungs" in line
    peak_mb = int(line.rsplit(" ", 1)[1])
    assert peak_mb < 2048, line
