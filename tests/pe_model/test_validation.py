"""Content sanity before the model: series no CT scanner makes are refused with the reason, or analysed
without the disagreeing images and with those images listed — never turned into a confident answer."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from pe_model.errors import (
    ImplausibleGeometryError,
    ImplausiblePixelValuesError,
    IncompleteSeriesError,
    InconsistentSeriesError,
    SeriesError,
    VolumeTooLargeError,
)
from pe_model.validation import SeriesLimits, check_resampled_size, pixel_spacing_problem, rescale_problem
from pe_model.volume import load_series
from phantoms import PhantomSpec, write_phantom_series

N = 24


@pytest.fixture(scope="module")
def unsigned_series(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    """A valid phantom: uint16 with 12 bits stored and intercept -1024 (the phantom's default)."""
    truth = write_phantom_series(tmp_path_factory.mktemp("u"), PhantomSpec(rows=48, columns=48, n_slices=N, seed=11))
    return [pydicom.dcmread(f) for f in truth.files]


@pytest.fixture(scope="module")
def signed_series(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    """A valid phantom stored as int16 HU (PixelRepresentation 1, intercept 0)."""
    truth = write_phantom_series(
        tmp_path_factory.mktemp("s"), PhantomSpec(rows=48, columns=48, n_slices=N, seed=12), signed_pixels=True
    )
    return [pydicom.dcmread(f) for f in truth.files]


def _fresh(series: list[Dataset]) -> list[Dataset]:
    return sorted((copy.deepcopy(ds) for ds in series), key=lambda ds: float(ds.ImagePositionPatient[2]))


def test_the_valid_phantoms_load_without_skips(unsigned_series: list[Dataset], signed_series: list[Dataset]) -> None:
    for series in (unsigned_series, signed_series):
        volume = load_series(_fresh(series))
        assert volume.shape[0] == N and volume.skipped == ()
        assert -1100 <= float(volume.voxels.min()) and float(volume.voxels.max()) < 3072


@pytest.mark.parametrize("slope", ["0", "-1", "1000", "1e30", "NaN"])
def test_an_implausible_rescale_slope_in_every_image_refuses_the_series(unsigned_series: list[Dataset], slope: str) -> None:
    series = _fresh(unsigned_series)
    for ds in series:
        ds.RescaleSlope = slope
    with pytest.raises(ImplausiblePixelValuesError, match="RescaleSlope"):
        load_series(series)


def test_rescale_slope_zero_in_one_image_drops_that_image_and_lists_it(unsigned_series: list[Dataset]) -> None:
    series = _fresh(unsigned_series)
    series[10].RescaleSlope = 0
    volume = load_series(series)
    uid = str(series[10].SOPInstanceUID)
    assert uid not in volume.sop_instance_uids and volume.shape[0] == N - 1
    assert "RescaleSlope is 0" in dict(volume.skipped)[uid]


def test_a_huge_intercept_refuses_the_series(unsigned_series: list[Dataset]) -> None:
    series = _fresh(unsigned_series)
    for ds in series:
        ds.RescaleIntercept = 20000
    with pytest.raises(ImplausiblePixelValuesError, match="denser than bone|Hounsfield"):
        load_series(series)


def test_signed_pixels_declared_unsigned_are_not_hu(signed_series: list[Dataset]) -> None:
    """PixelRepresentation 0 on int16 data: air (-1000) reads as 64,536 HU."""
    series = _fresh(signed_series)
    for ds in series:
        ds.PixelRepresentation = 0
    with pytest.raises(ImplausiblePixelValuesError, match="PixelRepresentation"):
        load_series(series)


def test_a_slope_of_ten_makes_tissue_denser_than_bone(unsigned_series: list[Dataset]) -> None:
    series = _fresh(unsigned_series)
    for ds in series:
        ds.RescaleSlope = 10
    with pytest.raises(ImplausiblePixelValuesError, match="denser than bone"):
        load_series(series)


@pytest.mark.parametrize("spacing", [[0, 0], [-0.7, -0.7], [0.0001, 0.0001], [50, 50], [1e6, 1e6]])
def test_an_implausible_pixel_spacing_refuses_the_series_before_decoding(
    unsigned_series: list[Dataset], spacing: list[float]
) -> None:
    series = _fresh(unsigned_series)
    for ds in series:
        ds.PixelSpacing = spacing
    with pytest.raises(ImplausibleGeometryError, match="PixelSpacing|field of view"):
        load_series(series)


def test_a_gap_of_many_slice_spacings_refuses_the_series(unsigned_series: list[Dataset]) -> None:
    series = _fresh(unsigned_series)
    for ds in series[N // 2 :]:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 100.0]
    with pytest.raises(IncompleteSeriesError, match="gap of 102.5 mm"):
        load_series(series)


def test_a_few_missing_slices_are_not_a_gap(unsigned_series: list[Dataset]) -> None:
    series = _fresh(unsigned_series)
    del series[12:14]  # two missing: a step of 3 spacings
    assert load_series(series).shape[0] == N - 2


def test_slices_spread_over_metres_are_not_one_series(unsigned_series: list[Dataset]) -> None:
    series = _fresh(unsigned_series)
    for k, ds in enumerate(series):
        ds.ImagePositionPatient = [0.0, 0.0, 200.0 * k]
    with pytest.raises(ImplausibleGeometryError, match="span|slice spacing"):
        load_series(series)


def test_half_the_slices_in_another_matrix_size_refuse_the_series(unsigned_series: list[Dataset]) -> None:
    series = _fresh(unsigned_series)
    for ds in series[::2]:
        ds.Rows, ds.Columns = 24, 96  # same number of pixels: the pixel data length still matches
    with pytest.raises(InconsistentSeriesError, match="image size"):
        load_series(series)


def test_one_slice_of_another_matrix_size_is_dropped_and_listed(unsigned_series: list[Dataset]) -> None:
    series = _fresh(unsigned_series)
    series[5].Rows, series[5].Columns = 24, 96
    volume = load_series(series)
    assert volume.shape[0] == N - 1
    assert "image size 24x96" in dict(volume.skipped)[str(series[5].SOPInstanceUID)]


def test_mixed_pixel_representation_drops_the_minority(signed_series: list[Dataset]) -> None:
    series = _fresh(signed_series)
    series[3].PixelRepresentation = 0
    volume = load_series(series)
    assert "pixel encoding" in dict(volume.skipped)[str(series[3].SOPInstanceUID)]


def test_the_volume_cap_refuses_before_allocating(unsigned_series: list[Dataset]) -> None:
    limits = SeriesLimits(max_volume_bytes=N * 48 * 48 * 2 - 1)
    with pytest.raises(VolumeTooLargeError, match="GiB"):
        load_series(_fresh(unsigned_series), limits=limits)
    assert load_series(_fresh(unsigned_series), limits=SeriesLimits(max_volume_bytes=N * 48 * 48 * 2)).shape[0] == N


def test_huge_matrix_headers_are_refused_by_the_cap_not_by_the_allocator(tmp_path: Path, unsigned_series: list[Dataset]) -> None:
    """Rows x Columns of 65535 on every file, pixel data unchanged: refused before any allocation."""
    series = _fresh(unsigned_series)
    for ds in series:
        ds.Rows = ds.Columns = 65535
        ds.PixelSpacing = [0.01, 0.01]  # a plausible field of view, so only the size is wrong
    with pytest.raises(SeriesError) as info:
        load_series(series, limits=SeriesLimits(min_pixel_spacing_mm=0.001))
    assert isinstance(info.value, VolumeTooLargeError)


def test_the_resampled_grid_is_capped() -> None:
    check_resampled_size(300.0, 512, 512, (0.7, 0.7), 1.0)
    with pytest.raises(VolumeTooLargeError, match="resampled"):
        check_resampled_size(2400.0, 1024, 1024, (0.97, 0.97), 1.0)


def test_header_checks_name_the_value() -> None:
    assert rescale_problem(None, None) is None
    assert rescale_problem(1.0, -1024.0) is None
    assert "is 0" in (rescale_problem(0.0, -1024.0) or "")
    assert "not a number" in (rescale_problem(float("nan"), None) or "")
    assert pixel_spacing_problem((0.7, 0.7), 512, 512) is None
    assert "not positive" in (pixel_spacing_problem((0.0, 0.7), 512, 512) or "")
    assert "field of view" in (pixel_spacing_problem((5.0, 5.0), 512, 512) or "")
    with pytest.raises(ValueError):
        SeriesLimits(max_gap_factor=0.5)


def test_values_of_a_signed_phantom_stay_exact(signed_series: list[Dataset]) -> None:
    volume = load_series(_fresh(signed_series))
    first = _fresh(signed_series)[0]
    np.testing.assert_array_equal(volume.voxels[0], first.pixel_array.astype(np.int16))


def test_a_codestream_larger_than_rows_columns_is_refused_before_decoding(tmp_path: Path) -> None:
    """A JPEG 2000 frame declaring more pixels than the header allows never reaches the decoder."""
    from pydicom.uid import JPEG2000Lossless

    from pe_model.errors import UnreadablePixelsError

    truth = write_phantom_series(
        tmp_path / "j2k", PhantomSpec(rows=32, columns=32, n_slices=12, seed=13), transfer_syntax_uid=JPEG2000Lossless
    )
    series = [pydicom.dcmread(f) for f in truth.files]
    assert load_series(copy.deepcopy(series)).shape == (12, 32, 32)
    for ds in series:
        ds.Rows = ds.Columns = 16
    with pytest.raises(UnreadablePixelsError, match="declares 32x32 pixels"):
        load_series(series)
