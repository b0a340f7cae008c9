"""The whole training pipeline as resumable steps: prepare -> stage 1 -> features -> stage 2 -> evaluate -> package.

Work directory layout (every step skips itself when its output exists)::

    <work>/split.json  dataset_problems.json  cache/  stage1/encoder.pt  features/
    <work>/stage2/sequence.pt  eval/metrics.json  model.pt

Presets: ``seed`` (the published recipe, item by item: docs/METHOD.md), ``project`` (the
project's own choices, kept for comparison), ``smoke`` (tiny, for CI) and ``demo`` (a narrow
model that trains on CPU in minutes on phantoms).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from pe_model.checkpoint import ModelCard, ModelConfig, save_checkpoint
from pe_model.preprocessing import PreprocessConfig, preprocess_preset
from training.cache import SeriesCache, build_cache
from training.dataset import (
    RSNADataset,
    Split,
    patient_kfold,
    read_patient_groups,
    read_rsna_dataset,
    seed_split,
    usable_split,
)
from training.distributed import DistributedContext
from training.errors import TrainingError
from training.features import extract_features
from training.stage1 import Stage1Config, check_pretrained, load_encoder, train_stage1
from training.stage2 import Stage2Config, load_sequence_model, train_stage2

log = structlog.get_logger(__name__)

PRESETS: tuple[str, ...] = ("seed", "project", "smoke", "demo")


@dataclass(frozen=True)
class Preset:
    """Everything a pipeline run needs besides the data: preprocessing, both stages, workers."""

    name: str
    #: The preprocessing the packaged checkpoint records and the Predictor runs; its
    #: ``input_size`` is the network input (192 in the seed).
    preprocess: PreprocessConfig
    #: Slice size of the cached training chunks that random crops are cut from (224 in the seed).
    train_size: int
    stage1: Stage1Config
    stage2: Stage2Config
    cache_workers: int = 1
    feature_batch_size: int = 32

    def __post_init__(self) -> None:
        if self.preprocess.input_size != self.stage1.input_size:
            raise TrainingError(
                f"preset {self.name}: preprocessing input {self.preprocess.input_size} differs from the "
                f"stage-1 input {self.stage1.input_size}"
            )
        if self.train_size < self.preprocess.input_size:
            raise TrainingError(f"preset {self.name}: train_size is smaller than the network input")

    @property
    def inference_preprocess(self) -> PreprocessConfig:
        """What the packaged checkpoint records and the Predictor uses."""
        return self.preprocess

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "preprocess": self.preprocess.to_dict(),
            "train_size": self.train_size,
            "stage1": self.stage1.to_dict(),
            "stage2": self.stage2.to_dict(),
            "cache_workers": self.cache_workers,
            "feature_batch_size": self.feature_batch_size,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preset:
        stage1 = Stage1Config.from_dict(data["stage1"])
        if "preprocess" in data:
            preprocess = PreprocessConfig.from_dict(dict(data["preprocess"]))
            train_size = int(data["train_size"])
        else:  # preset.json of a run made before the cache kept the network input (project preprocessing)
            cached = PreprocessConfig.from_dict(dict(data["cache_preprocess"]))
            preprocess = replace(cached, input_size=stage1.input_size)
            train_size = cached.input_size
        return cls(
            name=str(data["name"]),
            preprocess=preprocess,
            train_size=train_size,
            stage1=stage1,
            stage2=Stage2Config.from_dict(data["stage2"]),
            cache_workers=int(data.get("cache_workers", 1)),
            feature_batch_size=int(data.get("feature_batch_size", 32)),
        )

    def with_overrides(self, *, cache_workers: int | None = None, init_weights: str | None = None,
                       no_pretrained: bool = False, sequence_kind: str | None = None,
                       stage1_epochs: int | None = None, stage2_epochs: int | None = None,
                       num_workers: int | None = None) -> Preset:
        """This preset with the command-line overrides that were given (None/False: keep)."""
        stage1 = self.stage1
        if init_weights is not None:
            stage1 = replace(stage1, init_weights=init_weights)
        if no_pretrained:
            stage1 = replace(stage1, pretrained_required=False)
        if stage1_epochs is not None:
            stage1 = replace(stage1, epochs=stage1_epochs)
        if num_workers is not None:
            stage1 = replace(stage1, num_workers=num_workers)
        stage2 = self.stage2
        if sequence_kind is not None:
            stage2 = replace(stage2, kind=sequence_kind)
        if stage2_epochs is not None:
            stage2 = replace(stage2, epochs=stage2_epochs)
        return replace(self, stage1=stage1, stage2=stage2,
                       cache_workers=self.cache_workers if cache_workers is None else cache_workers)


#: The seed's stage-1 rotation: a uniform draw in [0, 360) degrees, applied when <= 15.
SEED_ROTATION_DEGREES = 15.0
SEED_ROTATION_PROBABILITY = SEED_ROTATION_DEGREES / 360.0


def seed_stage1(**overrides: Any) -> Stage1Config:
    """The seed's stage 1 (train_r3d_18.py, run_r3d_18_chunk10_batch16_epoch20.sh)."""
    values: dict[str, Any] = {
        "encoder_width": 64, "input_size": 192, "epochs": 20, "batch_size": 16, "learning_rate": 4e-4,
        "rotation_probability": SEED_ROTATION_PROBABILITY, "rotation_degrees": SEED_ROTATION_DEGREES,
        "rotation_symmetric": False, "rotation_padding": "border", "pretrained_required": True,
    }
    values.update(overrides)
    return Stage1Config(**values)


def seed_stage2(**overrides: Any) -> Stage2Config:
    """The seed's stage 2 (train_sequence_tcn_or_gru.py, run_sequence_tcn_or_gru_r3d_18.sh)."""
    values: dict[str, Any] = {
        "kind": "tcn", "hidden": 128, "levels": 2, "kernel_size": 3, "dropout": 0.2, "seq_len": 40,
        "batch_size": 64, "learning_rate": 5e-4, "weight_decay": 0.0, "epochs": 200, "loss": "seed",
        "lr_step": 20, "lr_gamma": 0.9, "padding": "seed", "train_features": "augmented",
    }
    values.update(overrides)
    return Stage2Config(**values)


def preset(name: str) -> Preset:
    """The named preset: "seed", "project", "smoke" or "demo"."""
    if name == "seed":
        return Preset(name="seed", preprocess=preprocess_preset("seed", input_size=192), train_size=224,
                      stage1=seed_stage1(), stage2=seed_stage2(), cache_workers=8, feature_batch_size=64)
    if name == "project":
        return Preset(name="project", preprocess=preprocess_preset("project", input_size=192), train_size=224,
                      stage1=Stage1Config(), stage2=Stage2Config(), cache_workers=8, feature_batch_size=64)
    if name == "smoke":
        return Preset(
            name="smoke",
            preprocess=preprocess_preset("project", input_size=32),
            train_size=40,
            stage1=Stage1Config(encoder_width=4, input_size=32, epochs=2, batch_size=8,
                                positive_fraction=0.5, samples_per_epoch=32, amp=False),
            stage2=Stage2Config(hidden=16, seq_len=16, epochs=4, batch_size=4),
            cache_workers=1,
            feature_batch_size=16,
        )
    if name == "demo":
        # Narrow (width 4) but at input 160: Grad-CAM is read off layer4 (input / 16 cells), so
        # the input size sets how finely the heatmap can point at a clot.
        return Preset(
            name="demo",
            preprocess=preprocess_preset("project", input_size=160),
            train_size=168,
            stage1=Stage1Config(encoder_width=4, input_size=160, epochs=16, batch_size=16,
                                learning_rate=2e-3, positive_fraction=0.5, samples_per_epoch=600,
                                rotation_probability=0.1, rotation_degrees=10.0, aux_exam_weight=0.3,
                                matched_negative_fraction=0.7, max_head_weight=1.0, validation_chunks=96),
            stage2=Stage2Config(hidden=32, seq_len=40, epochs=150, batch_size=16, learning_rate=1e-3,
                                dropout=0.2, patience=40, chunk_weight_floor=0.1),
            cache_workers=2,
            feature_batch_size=32,
        )
    raise TrainingError(f"unknown preset {name!r}; choose {', '.join(PRESETS)}")


@dataclass(frozen=True)
class RunPaths:
    """Where each step of a run writes."""

    work: Path

    @property
    def split(self) -> Path:
        return self.work / "split.json"

    @property
    def problems(self) -> Path:
        return self.work / "dataset_problems.json"

    @property
    def cache(self) -> Path:
        return self.work / "cache"

    @property
    def stage1(self) -> Path:
        return self.work / "stage1"

    @property
    def encoder(self) -> Path:
        return self.stage1 / "encoder.pt"

    @property
    def features(self) -> Path:
        return self.work / "features"

    @property
    def stage2(self) -> Path:
        return self.work / "stage2"

    @property
    def sequence(self) -> Path:
        return self.stage2 / "sequence.pt"

    @property
    def evaluation(self) -> Path:
        return self.work / "eval"

    @property
    def model(self) -> Path:
        return self.work / "model.pt"


def load_dataset(data_dir: str | Path) -> RSNADataset:
    return read_rsna_dataset(data_dir)


def make_split(dataset: RSNADataset, paths: RunPaths, *, kfold: int | None = None, fold: int = 0) -> Split:
    """The split of this run, written once to split.json and reused on every re-run."""
    if paths.split.is_file():
        return Split.from_json_dict(json.loads(paths.split.read_text()))
    # The seed's split of every exam the CSV lists; exams the reader dropped leave only their own place.
    listed = dataset.listed_keys or tuple(record.key for record in dataset.series)
    split = usable_split(seed_split(listed), (record.key for record in dataset.series))
    if kfold is not None:
        # Keep the seed's test set; regroup train + validation into patient-grouped folds.
        groups = read_patient_groups(dataset)
        pool = {k: groups[k] for k in (*split.train, *split.validation)}
        folds = patient_kfold(pool, kfold)
        if not 0 <= fold < kfold:
            raise TrainingError(f"fold {fold} does not exist in a {kfold}-fold split")
        split = Split(train=folds[fold].train, validation=folds[fold].validation, test=split.test)
    paths.work.mkdir(parents=True, exist_ok=True)
    paths.split.write_text(json.dumps(split.to_json_dict(), indent=1))
    return split


def prepare(dataset: RSNADataset, paths: RunPaths, settings: Preset, *, progress: bool = True) -> SeriesCache:
    paths.work.mkdir(parents=True, exist_ok=True)
    paths.problems.write_text(json.dumps([p.to_json_dict() for p in dataset.problems], indent=1))
    build_cache(dataset.series, paths.cache, settings.preprocess, train_size=settings.train_size,
                workers=settings.cache_workers, progress=progress)
    return SeriesCache(paths.cache)


def _usable(keys: tuple[str, ...], cache: SeriesCache) -> list[str]:
    return [k for k in keys if k in cache.entries]


def package(paths: RunPaths, settings: Preset, card: ModelCard, out: str | Path | None = None) -> str:
    """Write the deployable checkpoint (both stages + preprocessing + card); returns its sha256.

    The checkpoint records the preprocessing the cache was built with, which is what stage 1 was
    trained and evaluated on; a preset that no longer matches the cache is refused.
    """
    if (paths.cache / "manifest.json").is_file():
        cached = SeriesCache(paths.cache).preprocess
        if PreprocessConfig.from_dict(cached) != settings.preprocess:
            raise TrainingError(
                f"the cache in {paths.cache} was built with other preprocessing than preset {settings.name!r}; "
                "package with the preset the run used"
            )
    encoder = load_encoder(paths.encoder)
    sequence = load_sequence_model(paths.sequence)
    return save_checkpoint(
        out or paths.model,
        encoder_state=encoder.state_dict(),
        sequence_state=sequence.state_dict(),
        model_config=ModelConfig(encoder_width=encoder.width, sequence=sequence.config),
        preprocess_config=settings.preprocess,
        card=card,
    )


def default_card(settings: Preset, dataset: RSNADataset, metrics: Mapping[str, Any] | None) -> ModelCard:
    figures: dict[str, float] = {}
    if metrics:
        for key in ("rsna_weighted_log_loss", "rsna_weighted_log_loss_corrected"):
            if isinstance(metrics.get(key), (int, float)):
                figures[f"test_{key}"] = float(metrics[key])
        for level in ("chunk", "chunk_stage1", "image", "exam_pe"):
            summary = metrics.get(level) or {}
            if isinstance(summary.get("auroc"), (int, float)):
                figures[f"test_{level}_auroc"] = float(summary["auroc"])
    return ModelCard(
        name=f"pe-triage-{settings.name}",
        version=datetime.now(UTC).strftime("%Y.%m.%d"),
        training_data=f"RSNA-STR layout dataset at {dataset.root.name} ({len(dataset.series)} series)",
        intended_use="research model trained by pe-train; unverified AI output, not a medical device",
        metrics=figures,
        not_for_clinical_use=True,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def feature_transform(settings: Preset, train_keys: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """extract_features keyword arguments: the seed extracts training exams' features with the
    stage-1 training transform."""
    if settings.stage2.train_features != "augmented":
        return {}
    return {"augmented_keys": tuple(train_keys), "augmentation": settings.stage1.augmentation(),
            "seed": settings.stage1.seed}


def run_pipeline(
    data_dir: str | Path,
    work_dir: str | Path,
    settings: Preset,
    *,
    context: DistributedContext,
    kfold: int | None = None,
    fold: int = 0,
    progress: bool = True,
    card: ModelCard | None = None,
) -> Path:
    """Run every step that is not done yet; returns the packaged checkpoint path."""
    paths = RunPaths(Path(work_dir))
    if not paths.encoder.is_file():
        check_pretrained(settings.stage1)
    dataset = load_dataset(data_dir)
    if context.is_main:
        make_split(dataset, paths, kfold=kfold, fold=fold)
        (paths.work / "preset.json").write_text(json.dumps(settings.to_dict(), indent=1))
        prepare(dataset, paths, settings, progress=progress)
    context.barrier()
    split = Split.from_json_dict(json.loads(paths.split.read_text()))
    cache = SeriesCache(paths.cache)
    train_keys, validation_keys, test_keys = (_usable(part, cache) for part in
                                              (split.train, split.validation, split.test))
    log.info("pipeline.split", train=len(train_keys), validation=len(validation_keys), test=len(test_keys))
    if not paths.encoder.is_file():
        train_stage1(cache, train_keys, validation_keys, settings.stage1, paths.stage1, context=context,
                     progress=progress)
    else:
        log.info("pipeline.skip", step="stage1", reason="encoder.pt exists")
    all_keys = sorted(cache.entries)
    extract_features(cache, all_keys, paths.encoder, paths.features, input_size=settings.stage1.input_size,
                     context=context, batch_size=settings.feature_batch_size, progress=progress,
                     amp=settings.stage1.amp, **feature_transform(settings, train_keys))
    labels = {k: dict(cache.entries[k].exam_labels) for k in all_keys}
    if not paths.sequence.is_file():
        train_stage2(paths.features, train_keys, validation_keys, labels, settings.stage2, paths.stage2,
                     context=context, progress=progress)
    else:
        log.info("pipeline.skip", step="stage2", reason="sequence.pt exists")
    metrics: dict[str, Any] | None = None
    if context.is_main:
        metrics_path = paths.evaluation / "metrics.json"
        if test_keys and not metrics_path.is_file():
            from training.evaluate import evaluate_split

            evaluate_split(cache, dataset.by_key(), test_keys, paths.features, paths.sequence, paths.evaluation)
        if metrics_path.is_file():
            metrics = json.loads(metrics_path.read_text())
        if not paths.model.is_file():
            sha = package(paths, settings, card or default_card(settings, dataset, metrics))
            log.info("pipeline.packaged", path=str(paths.model), sha256=sha)
    context.barrier()
    return paths.model
