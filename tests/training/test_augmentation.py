"""Stage-1 training augmentations of the demo recipe: mirrored chunks swap left and right, photometric changes keep the layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pe_model.labels import EXAM_LABELS
from pe_model.preprocessing import PreprocessConfig
from training.cache import SeriesCache, build_cache
from training.dataset import read_rsna_dataset
from training.pipeline import preset
from training.stage1 import ChunkDataset, photometric_augment
from training.synthetic import PhantomRecord

LEFT, RIGHT = EXAM_LABELS.index("leftsided_pe"), EXAM_LABELS.index("rightsided_pe")


@pytest.fixture(scope="module")
def cache(small_dataset: tuple[Path, list[PhantomRecord]], tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[SeriesCache, list[str]]:
    root, _ = small_dataset
    dataset = read_rsna_dataset(root)
    cache_dir = tmp_path_factory.mktemp("cache-augment")
    build_cache(dataset.series, cache_dir, PreprocessConfig(input_size=32), train_size=32, progress=False)
    return SeriesCache(cache_dir), [s.key for s in dataset.series]


def _one_sided_positive(dataset: ChunkDataset) -> int:
    for i in range(len(dataset)):
        aux = dataset.aux_targets[i]
        if dataset.labels[i] == 1 and aux[LEFT] != aux[RIGHT]:
            return i
    pytest.skip("no chunk of a one-sided PE exam in the small dataset")


def test_a_left_right_mirror_swaps_the_side_labels_with_the_pixels(cache: tuple[SeriesCache, list[str]]) -> None:
    series_cache, keys = cache
    plain = ChunkDataset(series_cache, keys, input_size=32, train=True)
    mirrored = ChunkDataset(series_cache, keys, input_size=32, train=True, flip_lr_probability=1.0)
    i = _one_sided_positive(plain)
    torch.manual_seed(3)
    chunk, label, aux = plain[i]
    torch.manual_seed(3)
    flipped, flipped_label, flipped_aux = mirrored[i]
    assert torch.equal(flipped, chunk.flip(-1)), "the same crop, mirrored along the columns"
    assert flipped_label == label
    assert (flipped_aux[LEFT], flipped_aux[RIGHT]) == (aux[RIGHT], aux[LEFT])
    others = [k for k in range(len(EXAM_LABELS)) if k not in (LEFT, RIGHT)]
    assert torch.equal(flipped_aux[others], aux[others])
    assert plain.aux_targets[i, LEFT] != plain.aux_targets[i, RIGHT], "the dataset's own targets are untouched"


def test_a_head_foot_mirror_keeps_every_label(cache: tuple[SeriesCache, list[str]]) -> None:
    series_cache, keys = cache
    plain = ChunkDataset(series_cache, keys, input_size=32, train=True)
    mirrored = ChunkDataset(series_cache, keys, input_size=32, train=True, flip_z_probability=1.0)
    i = _one_sided_positive(plain)
    torch.manual_seed(5)
    chunk, _, aux = plain[i]
    torch.manual_seed(5)
    flipped, _, flipped_aux = mirrored[i]
    assert torch.equal(flipped, chunk.flip(1)) and torch.equal(flipped_aux, aux)


def test_photometric_changes_keep_dtype_and_layout_and_change_the_pixels() -> None:
    generator = torch.Generator().manual_seed(0)
    chunk = torch.randint(0, 256, (3, 10, 24, 24), dtype=torch.uint8, generator=generator)
    assert photometric_augment(chunk, 0.0) is chunk
    torch.manual_seed(1)
    changed = photometric_augment(chunk, 1.0)
    assert changed.dtype == torch.uint8 and changed.shape == chunk.shape
    difference = (changed.float() - chunk.float()).abs().mean()
    assert 1.0 < float(difference) < 60.0, "a visible change, not a different image"
    flat = torch.full((3, 10, 24, 24), 128, dtype=torch.uint8)
    torch.manual_seed(2)
    blurred = photometric_augment(flat, 1.0)
    assert float(blurred.float().std()) > 0.5, "noise was added"


def test_the_demo_preset_trains_with_the_augmentations() -> None:
    demo = preset("demo").stage1
    assert demo.flip_lr_probability > 0 and demo.flip_z_probability > 0 and demo.photometric_probability > 0
    assert np.isclose(demo.augmentation()["flip_lr_probability"], demo.flip_lr_probability)
