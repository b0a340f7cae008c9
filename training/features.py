"""Feature extraction: the trained stage-1 encoder over every cached chunk.

Exams are read as the Predictor reads them (the cache's input-size chunks), except the exams in
``augmented_keys``: the seed extracts its stage-2 *training* features with the stage-1 training
transform (random crop of the 224 px slices, rare rotation), one pass, so stage 2 learns on
features like those stage 1 was trained on (docs/METHOD.md, "Stage-2 training features").

Writes one ``<key>.npz`` per exam holding ``features`` (N, F) float32, ``chunk_logits`` (N,)
(stage 1's own PE logit) and ``chunk_labels`` (N,), plus ``features.json`` naming the encoder
it came from and the augmented exams. Exams already extracted with the same encoder are skipped;
under torchrun each rank extracts its share of the exams.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from training.cache import SeriesCache
from training.distributed import DistributedContext
from training.errors import TrainingError
from training.stage1 import ChunkDataset, _autocast, _to_device, load_encoder

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ExamFeatures:
    """Stage-1 outputs of one exam's chunks."""

    key: str
    features: np.ndarray  # (N, F) float32
    chunk_logits: np.ndarray  # (N,) float32
    chunk_labels: np.ndarray  # (N,) float32


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def feature_path(features_dir: str | Path, key: str) -> Path:
    return Path(features_dir) / f"{key}.npz"


def load_exam_features(features_dir: str | Path, key: str) -> ExamFeatures:
    path = feature_path(features_dir, key)
    if not path.is_file():
        raise TrainingError(f"no stage-1 features for exam {key} in {features_dir}; run the features step")
    with np.load(path) as data:
        return ExamFeatures(key=key, features=data["features"].astype(np.float32),
                            chunk_logits=data["chunk_logits"].astype(np.float32),
                            chunk_labels=data["chunk_labels"].astype(np.float32))


def extract_features(
    cache: SeriesCache,
    keys: Sequence[str],
    encoder_path: str | Path,
    features_dir: str | Path,
    *,
    input_size: int,
    context: DistributedContext,
    batch_size: int = 32,
    num_workers: int = 0,
    amp: bool = True,
    progress: bool = True,
    augmented_keys: Collection[str] = (),
    augmentation: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> Path:
    """Extract features of ``keys`` (this rank's share) into ``features_dir``; returns the folder.

    ``augmented_keys`` are read through the training transform ``augmentation`` (ChunkDataset
    keyword arguments, ``Stage1Config.augmentation()``), seeded per exam with ``seed``.
    """
    out = Path(features_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoder_digest = _file_digest(Path(encoder_path))
    augmented = sorted(set(augmented_keys) & set(keys))
    if augmented and augmentation is None:
        raise TrainingError("augmented feature extraction needs the training transform's settings")
    stamp_data = {"encoder_sha256": encoder_digest, "input_size": input_size,
                  "augmented_keys": augmented, "augmentation": dict(augmentation or {}) if augmented else {},
                  "seed": seed}
    stamp_path = out / "features.json"
    if stamp_path.is_file():
        stamp = json.loads(stamp_path.read_text())
        if {k: stamp.get(k) for k in stamp_data} != json.loads(json.dumps(stamp_data)):
            raise TrainingError(
                f"{out} holds features of another encoder, input size or transform; remove it to re-extract"
            )
    context.barrier()
    if context.is_main:
        stamp_path.write_text(json.dumps(stamp_data))
    augmented_set = set(augmented)
    mine = [k for i, k in enumerate(keys) if i % context.world_size == context.rank]
    todo = [k for k in mine if not feature_path(out, k).is_file()]
    device = context.device
    encoder = load_encoder(encoder_path).to(device)
    if device.type == "cuda":
        encoder = encoder.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    bar = tqdm(total=len(todo), desc="features", unit="exam", disable=not (progress and context.is_main))
    for key in todo:
        if key in augmented_set:
            torch.manual_seed(seed + int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))
            dataset = ChunkDataset(cache, [key], input_size=input_size, train=True, **dict(augmentation or {}))
        else:
            dataset = ChunkDataset(cache, [key], input_size=input_size, train=False)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        feats: list[np.ndarray] = []
        logits: list[np.ndarray] = []
        with torch.inference_mode():
            for chunks, _, _ in loader:
                with _autocast(device, amp):
                    f = encoder.features(_to_device(chunks, device))
                    z = encoder.fc(f).squeeze(-1)
                feats.append(f.float().cpu().numpy())
                logits.append(z.float().cpu().numpy())
        tmp = out / f".{key}.tmp.npz"
        np.savez(tmp, features=np.concatenate(feats).astype(np.float32),
                 chunk_logits=np.concatenate(logits).astype(np.float32),
                 chunk_labels=dataset.labels.astype(np.float32))
        tmp.replace(feature_path(out, key))
        bar.update(1)
    bar.close()
    context.barrier()
    if context.is_main:
        log.info("features.done", exams=len(keys), extracted=len(todo), folder=str(out))
    return out
