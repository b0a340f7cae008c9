"""`--preset seed` item by item against the seed's own definitions (train_sequence_tcn_or_gru.py,
data_splits.ipynb, train_r3d_18.py, the run scripts)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pe_model.labels import EXAM_LABEL_WEIGHTS, EXAM_LABELS, IMAGE_WEIGHT
from pe_model.preprocessing import preprocess_preset
from training.dataset import read_rsna_dataset, seed_split
from training.distributed import init_distributed
from training.features import ExamFeatures
from training.loss import seed_loss
from training.pipeline import RunPaths, make_split, preset
from training.stage2 import Stage2Config, fit_exam, train_stage2
from training.synthetic import PhantomRecord

SEED_LOSS_WEIGHTS = {"pe_present_on_image": 0.07361963, **EXAM_LABEL_WEIGHTS}


def _seed_batch_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], mask: torch.Tensor,
                     q_i: torch.Tensor, series_len: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The loss lines of the seed's training loop, verbatim in their arithmetic."""
    criterion = nn.BCEWithLogitsLoss(reduction="none", pos_weight=torch.tensor([1.0]))
    criterion_exam_level = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0]))
    adjustment = torch.tensor([series_len[i].item() / seq_len if series_len[i] > seq_len else 1.0
                               for i in range(mask.size(0))], dtype=torch.float32)
    loss_pe_weights = (torch.tensor(SEED_LOSS_WEIGHTS["pe_present_on_image"]) * q_i * adjustment).unsqueeze(1)
    pe = criterion(logits["pe_present_on_image"].squeeze(-1), labels["pe_present_on_image"])
    loss = (pe * mask * loss_pe_weights).sum() / mask.sum()
    for key in EXAM_LABELS:
        loss = loss + criterion_exam_level(logits[key].view(-1), labels[key]) * SEED_LOSS_WEIGHTS[key]
    return loss


def test_seed_loss_is_the_seeds_normalisation() -> None:
    generator = torch.Generator().manual_seed(0)
    seq_len = 6
    lengths = [3, 6, 9]  # padded, full, resized (the seed weights its steps by 9 / 6)
    items = []
    for length in lengths:
        labels = (torch.rand(length, generator=generator) > 0.5).float().numpy()
        exam = ExamFeatures(key="k", features=np.zeros((length, 4), np.float32), chunk_logits=np.zeros(length, np.float32),
                            chunk_labels=labels)
        items.append(fit_exam(exam, seq_len))
    mask = torch.tensor(np.stack([i.mask for i in items]), dtype=torch.float32)
    step_weights = torch.tensor(np.stack([i.step_weights for i in items]))
    chunk_targets = torch.tensor(np.stack([i.chunk_targets for i in items]))
    q = torch.tensor([i.q for i in items], dtype=torch.float32)
    chunk_logits = torch.randn(3, seq_len, generator=generator)
    exam_logits = torch.randn(3, 9, generator=generator)
    exam_targets = (torch.rand(3, 9, generator=generator) > 0.5).float()

    ours = seed_loss(exam_logits, exam_targets, chunk_logits, chunk_targets, step_weights, q, mask)
    logits = {"pe_present_on_image": chunk_logits.unsqueeze(-1),
              **{label: exam_logits[:, j:j + 1] for j, label in enumerate(EXAM_LABELS)}}
    labels = {"pe_present_on_image": chunk_targets, **{label: exam_targets[:, j] for j, label in enumerate(EXAM_LABELS)}}
    expected = _seed_batch_loss(logits, labels, mask, q, torch.tensor(lengths), seq_len)
    assert abs(float(ours) - float(expected)) < 1e-6
    assert IMAGE_WEIGHT == pytest.approx(SEED_LOSS_WEIGHTS["pe_present_on_image"])


def test_seed_split_is_the_notebooks_and_a_dropped_exam_moves_no_other() -> None:
    rng = np.random.default_rng(1)
    keys = [f"1.2.{rng.integers(1e9)}_1.3.{rng.integers(1e9)}" for _ in range(7279)]
    paths = sorted(set(keys))  # data_splits.ipynb, cell 2
    np.random.seed(100)
    np.random.shuffle(paths)
    split = seed_split(keys)
    assert list(split.test) == paths[:1000]
    assert list(split.validation) == paths[1000:2000]
    assert list(split.train) == paths[2000:]


def test_make_split_uses_every_exam_the_csv_lists(small_dataset: tuple[Path, list[PhantomRecord]],
                                                  tmp_path: Path) -> None:
    root, _ = small_dataset
    whole = make_split(read_rsna_dataset(root), RunPaths(tmp_path / "whole"))
    # Break one exam's labels in a copy: the reader drops it, every other exam keeps its part.
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    with (broken / "train.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    dropped = whole.test[0]
    for row in rows:
        if f"{row['StudyInstanceUID']}_{row['SeriesInstanceUID']}" == dropped:
            row["negative_exam_for_pe"], row["indeterminate"] = "1", "1"
    with (broken / "train.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    dataset = read_rsna_dataset(broken)
    assert dropped not in {r.key for r in dataset.series} and dropped in dataset.listed_keys
    split = make_split(dataset, RunPaths(tmp_path / "after"))
    for part in ("train", "validation", "test"):
        assert list(getattr(split, part)) == [k for k in getattr(whole, part) if k != dropped]


def test_seed_preset_is_the_published_recipe() -> None:
    settings = preset("seed")
    assert settings.preprocess == preprocess_preset("seed", input_size=192) and settings.train_size == 224
    s1 = settings.stage1
    assert (s1.encoder_width, s1.input_size, s1.epochs, s1.batch_size, s1.learning_rate) == (64, 192, 20, 16, 4e-4)
    assert s1.pretrained_required and s1.positive_fraction is None and s1.aux_exam_weight == 0.0
    assert (s1.rotation_probability, s1.rotation_degrees, s1.rotation_symmetric, s1.rotation_padding) == (
        15 / 360, 15.0, False, "border")
    s2 = settings.stage2
    assert (s2.kind, s2.hidden, s2.levels, s2.kernel_size, s2.dropout, s2.seq_len) == ("tcn", 128, 2, 3, 0.2, 40)
    assert (s2.batch_size, s2.learning_rate, s2.weight_decay, s2.epochs) == (64, 5e-4, 0.0, 200)
    assert (s2.loss, s2.lr_step, s2.lr_gamma, s2.padding, s2.train_features) == ("seed", 20, 0.9, "seed", "augmented")
    gru = Stage2Config(**{**s2.to_dict(), "kind": "gru"}).sequence_config(512)
    assert (gru.kind, gru.levels, gru.bidirectional, gru.padding) == ("gru", 1, True, "seed")
    project = Stage2Config(kind="bigru2").sequence_config(512)
    assert (project.kind, project.levels, project.padding) == ("gru", 2, "masked")


def test_stage2_steps_the_learning_rate_like_steplr(tmp_path: Path) -> None:
    features = tmp_path / "features"
    features.mkdir()
    rng = np.random.default_rng(0)
    keys = [f"s{i}_t{i}" for i in range(4)]
    labels = {}
    for i, key in enumerate(keys):
        n = 3 + i
        np.savez(features / f"{key}.npz", features=rng.normal(size=(n, 8)).astype(np.float32),
                 chunk_logits=np.zeros(n, np.float32), chunk_labels=(np.arange(n) == 1).astype(np.float32) * (i % 2))
        labels[key] = {name: 0 for name in EXAM_LABELS}
        labels[key]["negative_exam_for_pe" if i % 2 == 0 else "central_pe"] = 1
        if i % 2:
            labels[key]["rv_lv_ratio_lt_1"] = 1
    config = Stage2Config(hidden=4, seq_len=6, epochs=5, batch_size=2, learning_rate=1e-3, loss="seed", lr_step=2,
                          lr_gamma=0.5, padding="seed")
    result = train_stage2(features, keys[:3], keys[3:], labels, config, tmp_path / "s2",
                          context=init_distributed("cpu"), progress=False)
    optimizer = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=1e-3)
    reference = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    expected = []
    for _ in range(5):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    assert [h["learning_rate"] for h in result.history] == pytest.approx(expected)
