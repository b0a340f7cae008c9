"""The ``seed`` preprocessing against the seed's own definitions (utils.py, dataset.py, data_process.ipynb).

The seed windows each lung-cropped 1 mm slice (clip, per-slice min-max, truncation to uint8), stacks
the three windows, then its evaluation transform (ToTensor, Resize((192, 192))) scales to [0, 1]
and resizes bilinearly. Ours stores that resized image as uint8: at most half a grey level away.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pe_model.networks.r3d18 import to_network_input
from pe_model.preprocessing import (
    PreprocessConfig,
    apply_minmax_windows,
    lung_crop_box,
    preprocess,
    preprocess_preset,
    resample_isotropic,
)
from pe_model.volume import load_series
from phantoms import PhantomTruth
from tests.pe_model.seed_reference import apply_window, mask_to_bbox

SEED_WINDOWS = ((-600, 1500), (100, 700), (40, 400))


def test_minmax_windows_are_the_seeds_apply_window() -> None:
    rng = np.random.default_rng(0)
    slices = rng.integers(-2048, 2500, size=(6, 37, 29)).astype(np.float32)
    slices[2] = 55.0  # constant: the seed divides by zero there; ours is 0
    slices[3, :, :10] = -3000.0  # padding outside the field of view
    ours = apply_minmax_windows(torch.from_numpy(slices), tuple((float(l), float(w)) for l, w in SEED_WINDOWS))
    for c, (level, width) in enumerate(SEED_WINDOWS):
        for z in (0, 1, 3, 4, 5):
            assert np.array_equal(ours[c, z].numpy(), apply_window(slices[z], level, width)), (c, z)
        assert int(ours[c, 2].max()) == 0


def test_the_lung_box_has_no_margin_like_the_seeds_mask_to_bbox() -> None:
    grid = torch.full((90, 90, 90), -1000.0)
    grid[3:87, 6:84, 3:87] = 40.0  # body
    lungs = np.zeros((90, 90, 90), dtype=np.uint8)  # two lungs of 43 ml, on the 3 mm lung-mask grid
    lungs[12:72, 15:39, 9:39] = 1
    lungs[12:72, 51:75, 51:81] = 1
    grid[torch.from_numpy(lungs.astype(bool))] = -850.0
    crop = lung_crop_box(grid, 1.0, preprocess_preset("seed").crop_margin_mm)
    d0, d1, w0, w1, h0, h1 = mask_to_bbox(lungs)
    assert (crop.z0, crop.z1, crop.y0, crop.y1, crop.x0, crop.x1) == (d0, d1 + 1, w0, w1 + 1, h0, h1 + 1)
    assert crop.basis == "lungs"
    project = lung_crop_box(grid, 1.0, preprocess_preset("project").crop_margin_mm)
    assert (project.z0, project.z1) == (d0 - 10, d1 + 1 + 10)


def test_seed_preprocessing_is_the_seeds_evaluation_input(phantom_series: tuple[Path, PhantomTruth]) -> None:
    directory, _ = phantom_series
    config = preprocess_preset("seed", input_size=48)
    assert (config.windowing, config.window_before_resize, config.crop_margin_mm) == ("minmax", True, 0.0)
    volume = load_series(directory)
    prepared = preprocess(volume, config)
    grid, _, _ = resample_isotropic(volume, config.spacing_mm)
    crop = prepared.crop
    cropped = grid[crop.z0:crop.z1, crop.y0:crop.y1, crop.x0:crop.x1].numpy()
    ours = to_network_input(prepared.chunks)  # (N, 3, 10, 48, 48) in [0, 1]
    for z in range(prepared.num_slices):
        image = np.stack([apply_window(cropped[z], level, width) for level, width in SEED_WINDOWS], axis=-1)
        tensor = torch.from_numpy(image).permute(2, 0, 1).float().div(255.0)  # ToTensor
        expected = F.interpolate(tensor[None], size=(48, 48), mode="bilinear", align_corners=False)[0]
        got = ours[z // 10, :, z % 10]
        assert float((got - expected).abs().max()) <= 0.5 / 255 + 1e-6, z
    # The zero-padded tail of the last chunk, as the seed pads a short chunk with zero images.
    tail = prepared.num_slices % 10
    if tail:
        assert int(prepared.chunks[-1, :, tail:].max()) == 0


def test_a_config_that_records_none_of_the_newer_fields_is_the_project_preprocessing() -> None:
    recorded = {"spacing_mm": 1.0, "input_size": 160, "chunk_depth": 10, "crop_margin_mm": 10.0,
                "windows": [[-600.0, 1500.0], [100.0, 700.0], [40.0, 400.0]]}
    config = PreprocessConfig.from_dict(recorded)
    assert config == preprocess_preset("project", input_size=160)
    assert (config.windowing, config.window_before_resize) == ("linear", False)
    with pytest.raises(ValueError, match="windowing"):
        PreprocessConfig(windowing="sigmoid")


def test_the_builtin_demo_checkpoint_is_served_with_the_project_preprocessing() -> None:
    from pe_model.checkpoint import load_checkpoint

    checkpoint = load_checkpoint("builtin:demo")
    assert "windowing" not in checkpoint.preprocess_config_dict  # trained before the field existed
    assert checkpoint.preprocess_config == preprocess_preset("project", input_size=160)
    assert checkpoint.model_config.sequence.padding == "masked"


def test_a_checkpoint_with_preprocessing_the_predictor_cannot_run_is_refused_on_load(tmp_path: Path) -> None:
    from pe_model.checkpoint import build_initial_checkpoint, load_checkpoint
    from pe_model.errors import CheckpointError

    path = tmp_path / "odd.pt"
    build_initial_checkpoint(path, encoder_width=2, preprocess_config={**PreprocessConfig(input_size=16).to_dict(),
                                                                       "windowing": "sigmoid"})
    with pytest.raises(CheckpointError, match="windowing"):
        load_checkpoint(path)
