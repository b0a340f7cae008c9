"""Predictor on a phantom: output shapes, chunk -> source UID mapping, key images, heatmaps."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from pe_model.checkpoint import load_checkpoint
from pe_model.consistency import violations
from pe_model.errors import CheckpointError, SeriesError
from pe_model.labels import EXAM_LABELS, SERIES_PE_KEY
from phantoms import PhantomSpec, PhantomTruth, write_phantom_series
from pe_model.predictor import DeviceError, Predictor
from pe_model.preprocessing import preprocess
from pe_model.volume import load_series

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STAGES = ("load", "quality", "preprocess", "stage1", "stage2", "gradcam", "total")


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(tiny_checkpoint, device="cpu", gradcam_top_k=3)


def _nearest_uids(truth: PhantomTruth, positions_mm: np.ndarray) -> tuple[str, ...]:
    source = np.asarray(truth.slice_positions_mm)
    nearest = [truth.sop_instance_uids[int(np.argmin(np.abs(source - p)))] for p in positions_mm]
    return tuple(dict.fromkeys(nearest))


def test_prediction_shapes_and_consistency(
    predictor: Predictor, phantom_series: tuple[Path, PhantomTruth], tiny_checkpoint: Path
) -> None:
    directory, truth = phantom_series
    prediction = predictor.predict(directory)
    prepared = preprocess(load_series(directory), predictor.preprocess_config)
    chunks = math.ceil(prepared.num_slices / 10)

    assert prediction.study_instance_uid == truth.study_instance_uid
    assert prediction.series_instance_uid == truth.series_instance_uid
    assert set(prediction.probabilities) == {*EXAM_LABELS, SERIES_PE_KEY}
    assert set(prediction.labels) == set(EXAM_LABELS)
    assert len(prediction.chunk_probabilities) == chunks == len(prediction.chunk_sop_instance_uids)
    assert prediction.probabilities[SERIES_PE_KEY] == max(prediction.chunk_probabilities)
    assert violations(list(prediction.chunk_probabilities), prediction.probabilities) == []
    assert prediction.labels == {k: prediction.probabilities[k] > 0.5 for k in EXAM_LABELS}
    assert prediction.pe_present == (max(prediction.chunk_probabilities) > 0.5)
    assert set(prediction.attention) == set(EXAM_LABELS)
    for weights in prediction.attention.values():
        assert len(weights) == chunks and sum(weights) == pytest.approx(1.0, abs=1e-5)
        assert min(weights) >= 0.0
    assert set(prediction.timings_s) == set(STAGES)
    assert all(value >= 0.0 for value in prediction.timings_s.values())
    assert prediction.timings_s["total"] >= prediction.timings_s["stage1"]
    assert prediction.source_sop_instance_uids == truth.sop_instance_uids
    assert prediction.model.sha256 == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert prediction.model.not_for_clinical_use


def test_chunks_map_to_the_source_slices_they_cover(
    predictor: Predictor, phantom_series: tuple[Path, PhantomTruth]
) -> None:
    directory, truth = phantom_series
    prediction = predictor.predict(directory)
    prepared = preprocess(load_series(directory), predictor.preprocess_config)
    covered: list[str] = []
    for index, uids in enumerate(prediction.chunk_sop_instance_uids):
        start, stop = prepared.chunk_slice_range(index)
        # Independent check: the source slice nearest to each 1-mm slice of the chunk.
        assert uids == _nearest_uids(truth, prepared.slice_positions_mm[start:stop])
        covered.extend(uids)
    order = {uid: i for i, uid in enumerate(truth.sop_instance_uids)}
    ranks = [order[uid] for uid in dict.fromkeys(covered)]
    assert ranks == sorted(ranks) and ranks == list(range(ranks[0], ranks[-1] + 1))


def test_key_images_and_heatmaps_line_up_with_source_images(
    predictor: Predictor, phantom_series: tuple[Path, PhantomTruth]
) -> None:
    directory, truth = phantom_series
    prediction = predictor.predict(directory)
    assert len(prediction.key_images) == min(3, len(prediction.chunk_probabilities))
    probabilities = [k.pe_probability for k in prediction.key_images]
    assert probabilities == sorted(probabilities, reverse=True)
    top = sorted(prediction.chunk_probabilities, reverse=True)[: len(probabilities)]
    assert probabilities == top
    assert len(prediction.heatmaps) == len(prediction.key_images)
    positions = dict(zip(truth.sop_instance_uids, truth.slice_positions_mm, strict=True))
    for key, heatmap in zip(prediction.key_images, prediction.heatmaps, strict=True):
        assert key.sop_instance_uid in truth.sop_instance_uids
        assert key.sop_instance_uid in prediction.chunk_sop_instance_uids[key.chunk_index]
        assert key.pe_probability == prediction.chunk_probabilities[key.chunk_index]
        assert key.frame_number is None
        assert heatmap.sop_instance_uid == key.sop_instance_uid
        assert heatmap.chunk_index == key.chunk_index
        assert heatmap.values.shape == (truth.spec.rows, truth.spec.columns)
        assert heatmap.values.dtype == np.float32
        assert float(heatmap.values.min()) >= 0.0 and float(heatmap.values.max()) <= 1.0
        # The peak is a point of the key image's own plane.
        assert heatmap.peak_position_patient[2] == pytest.approx(positions[key.sop_instance_uid])


def test_every_input_form_gives_the_same_prediction(
    predictor: Predictor, phantom_series: tuple[Path, PhantomTruth]
) -> None:
    directory, truth = phantom_series
    reference = predictor.predict(directory)
    paths = list(reversed(truth.files))
    datasets = [pydicom.dcmread(path) for path in truth.files]
    for series in (paths, datasets, load_series(directory), str(directory)):
        again = predictor.predict(series)
        assert again.probabilities == pytest.approx(reference.probabilities)
        assert again.chunk_probabilities == pytest.approx(reference.chunk_probabilities)
        assert again.key_images == reference.key_images
        assert again.labels == reference.labels


def test_without_gradcam_key_image_is_the_middle_slice(
    tiny_checkpoint: Path, phantom_series: tuple[Path, PhantomTruth]
) -> None:
    directory, _ = phantom_series
    predictor = Predictor.from_checkpoint(tiny_checkpoint, gradcam_top_k=0)
    volume = load_series(directory)
    prediction = predictor.predict(volume)
    prepared = preprocess(volume, predictor.preprocess_config)
    assert prediction.heatmaps == ()
    (key,) = prediction.key_images
    sources = prepared.chunk_source_indices(key.chunk_index)
    assert key.sop_instance_uid == volume.sop_instance_uids[int(sources[len(sources) // 2])]


def test_enhanced_ct_key_images_carry_frame_numbers(
    predictor: Predictor, tmp_path: Path
) -> None:
    truth = write_phantom_series(
        tmp_path / "enhanced", PhantomSpec(n_slices=30, rows=64, columns=64), enhanced=True
    )
    prediction = predictor.predict(tmp_path / "enhanced")
    (uid,) = set(truth.sop_instance_uids)
    assert prediction.source_sop_instance_uids == (uid,)
    assert all(uids == (uid,) for uids in prediction.chunk_sop_instance_uids)
    for key, heatmap in zip(prediction.key_images, prediction.heatmaps, strict=True):
        assert key.sop_instance_uid == uid
        assert key.frame_number is not None and 1 <= key.frame_number <= 30
        assert heatmap.frame_number == key.frame_number


def test_unanalysable_series_raises_series_error(predictor: Predictor, tmp_path: Path) -> None:
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(SeriesError):
        predictor.predict(tmp_path)


def test_checkpoint_identity_and_device_are_checked(tiny_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match="expected"):
        Predictor.from_checkpoint(tiny_checkpoint, expected_sha256="f" * 64)
    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="auto")
    assert predictor.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            Predictor.from_checkpoint(tiny_checkpoint, device="cuda")
    assert load_checkpoint(tiny_checkpoint).card.not_for_clinical_use


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_cpu(
    predictor: Predictor, tiny_checkpoint: Path, phantom_series: tuple[Path, PhantomTruth]
) -> None:
    directory, _ = phantom_series
    on_cpu = predictor.predict(directory)
    on_gpu = Predictor.from_checkpoint(tiny_checkpoint, device="cuda").predict(directory)
    assert np.allclose(on_gpu.chunk_probabilities, on_cpu.chunk_probabilities, atol=0.05)
    assert len(on_gpu.heatmaps) == len(on_cpu.heatmaps)


def test_batch_size_and_precision(
    tiny_checkpoint: Path, phantom_series: tuple[Path, PhantomTruth], predictor: Predictor
) -> None:
    directory, _ = phantom_series
    volume = load_series(directory)
    fp32 = Predictor.from_checkpoint(tiny_checkpoint, precision="fp32")
    reference = fp32.predict(volume)
    assert fp32.precision == reference.precision == "fp32" and fp32.batch_size == 2
    one_at_a_time = Predictor.from_checkpoint(tiny_checkpoint, batch_size=1, precision="fp32").predict(volume)
    assert one_at_a_time.chunk_probabilities == pytest.approx(reference.chunk_probabilities, abs=1e-5)
    bf16 = Predictor.from_checkpoint(tiny_checkpoint, precision="bf16")
    assert bf16.precision == "bf16"
    mixed = bf16.predict(volume)
    assert mixed.precision == "bf16"
    assert mixed.chunk_probabilities == pytest.approx(reference.chunk_probabilities, abs=0.02)
    with pytest.raises(ValueError, match="precision"):
        Predictor.from_checkpoint(tiny_checkpoint, precision="fp8")


def test_long_series_is_resized_for_stage_two_and_mapped_back(
    predictor: Predictor, tmp_path: Path
) -> None:
    """More chunks than the sequence model's seq_len (40): linear resize and back."""
    directory = tmp_path / "long"
    write_phantom_series(
        directory,
        PhantomSpec(n_slices=100, rows=48, columns=48, pixel_spacing_mm=7.0, slice_spacing_mm=5.0),
    )
    prediction = predictor.predict(directory)
    chunks = len(prediction.chunk_probabilities)
    assert chunks > predictor.sequence_model.config.seq_len
    assert len(prediction.chunk_sop_instance_uids) == chunks
    for weights in prediction.attention.values():
        assert len(weights) == chunks and sum(weights) == pytest.approx(1.0, abs=1e-5)
    assert violations(list(prediction.chunk_probabilities), prediction.probabilities) == []
    assert all(0.0 <= p <= 1.0 for p in prediction.chunk_probabilities)
