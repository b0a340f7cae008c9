"""Stage 1 and stage 2 on a tiny cache: transforms, sampler sharding, checkpoints and resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pe_model.labels import EXAM_LABELS
from pe_model.preprocessing import PreprocessConfig
from training.cache import SeriesCache, build_cache
from training.dataset import read_rsna_dataset
from training.distributed import init_distributed
from training.errors import CheckpointStateError
from training.features import extract_features, load_exam_features
from training.stage1 import (
    ChunkDataset,
    EpochSampler,
    Stage1Config,
    augment_chunk,
    load_encoder,
    train_stage1,
)
from training.stage2 import Stage2Config, fit_exam, load_sequence_model, predict_exams, train_stage2
from training.synthetic import PhantomRecord

TINY = Stage1Config(encoder_width=4, input_size=32, epochs=1, batch_size=8, positive_fraction=0.5,
                    samples_per_epoch=16, amp=False, aux_exam_weight=0.5, matched_negative_fraction=0.5,
                    max_head_weight=1.0, validation_chunks=12)


@pytest.fixture(scope="module")
def tiny_cache(small_dataset: tuple[Path, list[PhantomRecord]], tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[SeriesCache, list[str]]:
    root, _ = small_dataset
    dataset = read_rsna_dataset(root)
    cache_dir = tmp_path_factory.mktemp("cache")
    build_cache(dataset.series, cache_dir, PreprocessConfig(input_size=32), train_size=40, progress=False)
    return SeriesCache(cache_dir), [s.key for s in dataset.series]


def test_transforms_keep_the_chunk_layout() -> None:
    torch.manual_seed(0)
    chunk = torch.randint(0, 256, (3, 10, 40, 40), dtype=torch.uint8)
    cropped = augment_chunk(chunk, 32, rotation_probability=0.0, rotation_degrees=15.0)
    assert cropped.shape == (3, 10, 32, 32) and cropped.dtype == torch.uint8
    # Without rotation the crop is a window of the original, the same for every slice.
    found = [(t, x) for t in range(9) for x in range(9)
             if torch.equal(chunk[:, :, t:t + 32, x:x + 32], cropped)]
    assert len(found) == 1
    rotated = augment_chunk(chunk, 32, rotation_probability=1.0, rotation_degrees=10.0)
    assert rotated.shape == (3, 10, 32, 32)
    # The seed pads a rotated chunk with its border values; the project with zeros.
    flat = torch.full((3, 10, 40, 40), 77, dtype=torch.uint8)
    border = augment_chunk(flat, 32, 1.0, 15.0, symmetric=False, padding="border")
    assert torch.all(border == 77)
    torch.manual_seed(1)
    zeros = augment_chunk(flat, 32, 1.0, 15.0, symmetric=False, padding="zeros")
    assert int(zeros[:, :, 0, 0].max()) < 77 or int(zeros[:, :, -1, -1].max()) < 77


def test_epoch_sampler_shards_and_balances() -> None:
    labels = np.array([1] * 5 + [0] * 95)
    plain = [list(EpochSampler(labels, rank=r, world_size=2, seed=3)) for r in range(2)]
    assert sorted(plain[0] + plain[1]) == list(range(100))
    balanced = EpochSampler(labels, seed=3, positive_fraction=0.5, samples_per_epoch=40)
    drawn = list(balanced)
    assert len(drawn) == len(balanced) == 40
    assert sum(labels[i] for i in drawn) == 20
    balanced.set_epoch(1)
    assert list(balanced) != drawn
    balanced.set_epoch(0)
    assert list(balanced) == drawn


def test_matched_negatives_come_from_negative_exams_at_the_height_of_a_clot() -> None:
    # 100 chunks: items 0-59 belong to positive exams (PE chunks 50-54 at heights 0.85-0.92),
    # items 60-99 to negative exams, at heights spread over 0.05-0.95.
    labels = np.array([0] * 50 + [1] * 5 + [0] * 45)
    heights = np.concatenate([np.linspace(0.0, 1.0, 60), np.linspace(0.05, 0.95, 40)])
    negative_exam = np.array([False] * 60 + [True] * 40)
    sampler = EpochSampler(labels, seed=1, positive_fraction=0.5, samples_per_epoch=200, positions=heights,
                           negative_exam=negative_exam, matched_negative_fraction=1.0)
    drawn = np.array(list(sampler))
    negatives = drawn[labels[drawn] == 0]
    assert len(negatives) == 100
    assert np.all(negative_exam[negatives])
    clot_heights = heights[50:55]
    distance = np.abs(heights[negatives][:, None] - clot_heights[None, :]).min(axis=1)
    assert np.all(distance <= 0.05)
    assert len(set(negatives.tolist())) > 3


def test_chunk_dataset_aux_targets(tiny_cache: tuple[SeriesCache, list[str]]) -> None:
    cache, keys = tiny_cache
    dataset = ChunkDataset(cache, keys, input_size=32, train=False)
    assert len(dataset) == sum(cache.entries[k].num_chunks for k in keys)
    chunk, label, aux = dataset[0]
    assert chunk.shape == (3, 10, 32, 32) and label.shape == () and aux.shape == (len(EXAM_LABELS),)
    central = EXAM_LABELS.index("central_pe")
    for i, (key, _) in enumerate(dataset.index):
        # Clot labels are targets only where the chunk shows PE.
        if dataset.labels[i] == 0:
            assert dataset.aux_targets[i, central] == 0
        elif cache.entries[key].exam_labels["central_pe"]:
            assert dataset.aux_targets[i, central] == 1


def test_stage1_resumes_after_an_interruption(tiny_cache: tuple[SeriesCache, list[str]], tmp_path: Path) -> None:
    cache, keys = tiny_cache
    context = init_distributed("cpu")
    first = train_stage1(cache, keys[:6], keys[6:], TINY, tmp_path, context=context, progress=False)
    assert len(first.history) == 1 and (tmp_path / "epoch_000.pt").is_file()
    # "Interrupted" after epoch 1 of 2: a run with 2 epochs continues from the saved state.
    (tmp_path / "encoder.pt").unlink()
    two = Stage1Config(**{**TINY.to_dict(), "epochs": 2})
    with pytest.raises(CheckpointStateError):
        train_stage1(cache, keys[:6], keys[6:], two, tmp_path, context=context, progress=False)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    state["config"] = two.to_dict()
    torch.save(state, tmp_path / "state.pt")
    second = train_stage1(cache, keys[:6], keys[6:], two, tmp_path, context=context, progress=False)
    assert [h["epoch"] for h in second.history] == [0.0, 1.0]
    assert (tmp_path / "epoch_001.pt").is_file()
    encoder = load_encoder(second.encoder_path)
    assert encoder.width == 4
    assert second.best_validation_auroc is None or 0.0 <= second.best_validation_auroc <= 1.0


def test_features_and_stage2(tiny_cache: tuple[SeriesCache, list[str]], tmp_path: Path) -> None:
    cache, keys = tiny_cache
    context = init_distributed("cpu")
    stage1 = train_stage1(cache, keys[:6], keys[6:], TINY, tmp_path / "s1", context=context, progress=False)
    extract_features(cache, keys, stage1.encoder_path, tmp_path / "features", input_size=32, context=context,
                     progress=False)
    exam = load_exam_features(tmp_path / "features", keys[0])
    assert exam.features.shape == (cache.entries[keys[0]].num_chunks, 32)
    assert np.array_equal(exam.chunk_labels, np.array(cache.entries[keys[0]].chunk_labels, dtype=np.float32))

    # Fitting: long exams are resized (steps weighted by L / seq_len), short ones padded.
    short = fit_exam(exam, exam.features.shape[0] + 5)
    assert short.mask.sum() == exam.features.shape[0] and short.step_weights.sum() == exam.features.shape[0]
    long = fit_exam(exam, 4)
    assert long.mask.all() and abs(long.step_weights.sum() - exam.features.shape[0]) < 1e-4

    labels = {k: dict(cache.entries[k].exam_labels) for k in keys}
    for kind in ("tcn", "gru"):
        config = Stage2Config(kind=kind, hidden=8, seq_len=8, epochs=3, batch_size=4)
        result = train_stage2(tmp_path / "features", keys[:6], keys[6:], labels, config, tmp_path / kind,
                              context=context, progress=False)
        assert len(result.history) == 3 and result.best_validation_loss is not None
        model = load_sequence_model(result.sequence_path)
        predictions = predict_exams(model, tmp_path / "features", keys, config.seq_len)
        for key in keys:
            exam_probs, chunk_probs = predictions[key]
            assert exam_probs.shape == (9,) and np.all((exam_probs >= 0) & (exam_probs <= 1))
            assert chunk_probs.shape == (cache.entries[key].num_chunks,)


def test_stage1_starts_from_a_torchvision_r3d18_state_dict(tiny_cache: tuple[SeriesCache, list[str]],
                                                           tmp_path: Path) -> None:
    from pe_model.errors import CheckpointError
    from pe_model.networks.r3d18 import R3D18

    cache, keys = tiny_cache
    context = init_distributed("cpu")
    kinetics = R3D18(width=64, num_classes=400)  # torchvision's key layout, Kinetics' 400 classes
    torch.save(kinetics.state_dict(), tmp_path / "r3d_18.pth")
    config = Stage1Config(encoder_width=64, input_size=32, epochs=1, batch_size=4, positive_fraction=0.5,
                          samples_per_epoch=4, amp=False, init_weights=str(tmp_path / "r3d_18.pth"))
    result = train_stage1(cache, keys[:2], [], config, tmp_path / "run", context=context, progress=False)
    encoder = load_encoder(result.encoder_path)
    assert encoder.width == 64 and encoder.fc.out_features == 1
    # One Adam step at lr 4e-4 moves the weights only a little from the Kinetics start.
    start = kinetics.state_dict()["stem.0.weight"]
    assert float((encoder.state_dict()["stem.0.weight"] - start).abs().max()) < 0.01
    narrow = Stage1Config(**{**config.to_dict(), "encoder_width": 4})
    with pytest.raises(CheckpointError, match="width 64"):
        train_stage1(cache, keys[:2], [], narrow, tmp_path / "narrow", context=context, progress=False)


def test_a_preset_that_starts_from_kinetics_refuses_to_start_without_the_weights(
        tiny_cache: tuple[SeriesCache, list[str]], tmp_path: Path) -> None:
    from training.errors import TrainingError

    cache, keys = tiny_cache
    config = Stage1Config(**{**TINY.to_dict(), "pretrained_required": True})
    with pytest.raises(TrainingError, match="--init-weights PATH.*r3d_18.*--no-pretrained"):
        train_stage1(cache, keys[:6], keys[6:], config, tmp_path, context=init_distributed("cpu"), progress=False)
    assert not any(tmp_path.iterdir())
