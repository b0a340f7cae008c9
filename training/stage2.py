"""Stage 2: the multitask sequence model over each exam's chunk features.

The seed's recipe (docs/METHOD.md, "Stage 2"): TCN (or its one-layer bidirectional GRU) over
sequences fitted to ``seq_len`` 40 (zero padding + mask when shorter, the seed's linear resize
when longer), Adam 5e-4, batch 64, 200 epochs, StepLR(20, 0.9), the seed's loss normalisation,
the epoch with the lowest validation loss (normalised as the competition metric) kept. The
project's variant (``bigru2`` two-layer GRU, masked padding, the metric's normalisation as the
loss, no scheduler) stays available through the same settings.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pe_model.labels import EXAM_LABELS, IMAGE_WEIGHT
from pe_model.networks.sequence import SequenceConfig, SequenceModel, fit_sequence, restore_sequence
from training.distributed import DistributedContext, broadcast_flag
from training.errors import CheckpointStateError, TrainingError
from training.features import ExamFeatures, load_exam_features
from training.loss import exam_label_weights, rsna_weighted_loss, seed_loss
from training.stage1 import EpochSampler

log = structlog.get_logger(__name__)


#: Stage-2 sequence models: the seed's TCN, the seed's GRU (one bidirectional layer), and the
#: project's two-layer bidirectional GRU.
STAGE2_KINDS: tuple[str, ...] = ("tcn", "gru", "bigru2")
STAGE2_LOSSES: tuple[str, ...] = ("seed", "rsna")
FEATURE_MODES: tuple[str, ...] = ("eval", "augmented")


@dataclass(frozen=True)
class Stage2Config:
    """Hyper-parameters of stage 2 (defaults: the project's variant; ``seed`` preset: the seed's)."""

    kind: str = "tcn"
    hidden: int = 128
    levels: int = 2
    kernel_size: int = 3
    dropout: float = 0.2
    seq_len: int = 40
    batch_size: int = 64
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    epochs: int = 200
    #: Stop after this many epochs without a better validation loss (None: run every epoch).
    patience: int | None = None
    seed: int = 0
    #: Chunk terms are weighted 0.0736 * q_i (docs/METHOD.md), which gives the chunks of PE-negative
    #: exams no weight at all. A floor > 0 (``0.0736 * max(q_i, floor)``) also teaches the chunk
    #: head to stay low on negative exams, which the consistency rules read as "no PE".
    chunk_weight_floor: float = 0.0
    #: "seed" (training.loss.seed_loss) or "rsna" (the metric's normalisation, the project's).
    loss: str = "rsna"
    #: StepLR every ``lr_step`` epochs by ``lr_gamma`` (the seed: 20, 0.9); None: constant rate.
    lr_step: int | None = None
    lr_gamma: float = 1.0
    #: Padded steps: "seed" (the seed's arithmetic) or "masked" (pe_model.networks.sequence).
    padding: str = "masked"
    #: Training exams' features: "augmented" (the seed: stage-1 training transform) or "eval".
    train_features: str = "eval"

    def __post_init__(self) -> None:
        if self.kind not in STAGE2_KINDS:
            raise TrainingError(f"stage-2 kind must be one of {', '.join(STAGE2_KINDS)}, not {self.kind!r}")
        if self.loss not in STAGE2_LOSSES:
            raise TrainingError(f"stage-2 loss must be one of {', '.join(STAGE2_LOSSES)}, not {self.loss!r}")
        if self.train_features not in FEATURE_MODES:
            raise TrainingError(f"train_features must be one of {', '.join(FEATURE_MODES)}")
        if self.lr_step is not None and self.lr_step < 1:
            raise TrainingError("lr_step must be a positive number of epochs")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Stage2Config:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def sequence_config(self, feature_dim: int) -> SequenceConfig:
        """The network: ``levels`` TCN blocks; the seed's GRU has one layer, ``bigru2`` two."""
        kind = "tcn" if self.kind == "tcn" else "gru"
        levels = self.levels if self.kind == "tcn" else (1 if self.kind == "gru" else 2)
        return SequenceConfig(kind=kind, feature_dim=feature_dim, hidden=self.hidden,
                              levels=levels, kernel_size=self.kernel_size, dropout=self.dropout,
                              seq_len=self.seq_len, num_labels=len(EXAM_LABELS), padding=self.padding,
                              bidirectional=True)


def resize_steps(values: np.ndarray, length: int) -> np.ndarray:
    """Linear resize along the first axis (align_corners=False, as cv2.resize in the seed)."""
    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    squeeze = tensor.ndim == 1
    if squeeze:
        tensor = tensor[:, None]
    out = F.interpolate(tensor.T[None], size=length, mode="linear", align_corners=False)[0].T
    return (out[:, 0] if squeeze else out).numpy()


def _as_numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)


@dataclass(frozen=True)
class SequenceItem:
    """One exam fitted to ``seq_len`` steps."""

    features: np.ndarray  # (T, F)
    mask: np.ndarray  # (T,) bool
    chunk_targets: np.ndarray  # (T,) in [0, 1]
    step_weights: np.ndarray  # (T,) 0 on padding, L/T per resized step, 1 otherwise
    q: float  # fraction of positive chunks
    num_chunks: int


def fit_exam(exam: ExamFeatures, seq_len: int) -> SequenceItem:
    """Fit one exam with pe_model's own ``fit_sequence`` (the Predictor's code path), labels alongside."""
    length = int(exam.features.shape[0])
    fitted = fit_sequence(torch.from_numpy(exam.features), seq_len)
    features = _as_numpy(fitted.features).astype(np.float32)
    mask_np = _as_numpy(fitted.mask).astype(bool)
    if length > seq_len:
        targets = resize_steps(exam.chunk_labels, seq_len)
        weights = np.full(seq_len, length / seq_len, dtype=np.float32)
    else:
        targets = np.zeros(seq_len, dtype=np.float32)
        targets[:length] = exam.chunk_labels
        weights = mask_np.astype(np.float32)
    q = float(exam.chunk_labels.mean()) if length else 0.0
    return SequenceItem(features=features, mask=mask_np, chunk_targets=targets.astype(np.float32),
                        step_weights=weights, q=q, num_chunks=length)


class SequenceDataset(Dataset[tuple[Tensor, ...]]):
    """Exams as fitted sequences with their exam labels (all held in memory: 40 x F per exam)."""

    def __init__(self, features_dir: str | Path, keys: Sequence[str], exam_labels: Mapping[str, Mapping[str, int]],
                 seq_len: int) -> None:
        self.keys = list(keys)
        self.items = [fit_exam(load_exam_features(features_dir, k), seq_len) for k in self.keys]
        self.exam_targets = np.array(
            [[exam_labels[k][name] for name in EXAM_LABELS] for k in self.keys], dtype=np.float32
        ).reshape(len(self.keys), len(EXAM_LABELS))
        self.labels = (self.exam_targets[:, 0] == 0).astype(np.int64)  # PE-positive exams, for sampling

    @property
    def feature_dim(self) -> int:
        return int(self.items[0].features.shape[1]) if self.items else 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        item = self.items[i]
        return (torch.from_numpy(item.features), torch.from_numpy(item.mask),
                torch.from_numpy(item.chunk_targets), torch.from_numpy(item.step_weights),
                torch.tensor(item.q, dtype=torch.float32), torch.from_numpy(self.exam_targets[i]))


@dataclass(frozen=True)
class Stage2Result:
    sequence_path: Path
    best_epoch: int
    best_validation_loss: float | None
    history: tuple[dict[str, float | None], ...]


def _batch_loss(model: nn.Module, batch: Sequence[Tensor], device: torch.device, floor: float = 0.0,
                loss: str = "rsna") -> Tensor:
    features, mask, chunk_targets, step_weights, q, exam_targets = (t.to(device) for t in batch)
    output = model(features, mask)
    if loss == "seed":
        return seed_loss(output.exam_logits, exam_targets, output.chunk_logits, chunk_targets, step_weights,
                         q.clamp_min(floor), mask)
    return rsna_weighted_loss(output.exam_logits, exam_targets, output.chunk_logits, chunk_targets,
                              step_weights, q.clamp_min(floor))


@torch.inference_mode()
def validation_loss(model: nn.Module, dataset: SequenceDataset, device: torch.device, batch_size: int) -> float:
    """RSNA weighted loss over the whole set, normalised over the whole set as the metric is."""
    model.eval()
    numerator = 0.0
    denominator = 0.0
    w_sum = float(exam_label_weights().sum())
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        features, mask, chunk_targets, step_weights, q, exam_targets = (t.to(device) for t in batch)
        output = model(features, mask)
        loss = rsna_weighted_loss(output.exam_logits, exam_targets, output.chunk_logits, chunk_targets,
                                  step_weights, q)
        batch_denominator = w_sum * features.shape[0] + float((IMAGE_WEIGHT * q[:, None] * step_weights).sum())
        numerator += float(loss) * batch_denominator
        denominator += batch_denominator
    return numerator / max(denominator, 1e-12)


def train_stage2(
    features_dir: str | Path,
    train_keys: Sequence[str],
    validation_keys: Sequence[str],
    exam_labels: Mapping[str, Mapping[str, int]],
    config: Stage2Config,
    out_dir: str | Path,
    *,
    context: DistributedContext,
    progress: bool = True,
) -> Stage2Result:
    """Train (or resume) stage 2 and write ``<out_dir>/sequence.pt`` (best by validation loss)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = context.device
    torch.manual_seed(config.seed)
    train_set = SequenceDataset(features_dir, train_keys, exam_labels, config.seq_len)
    validation_set = SequenceDataset(features_dir, validation_keys, exam_labels, config.seq_len)
    if len(train_set) == 0:
        raise TrainingError("stage 2 has no training exam")
    sequence_config = config.sequence_config(train_set.feature_dim)
    net = SequenceModel(sequence_config).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = (torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step, gamma=config.lr_gamma)
                 if config.lr_step is not None else None)
    start_epoch = 0
    history: list[dict[str, float | None]] = []
    best_loss: float | None = None
    best_epoch = -1
    stale = 0
    state_path = out / "state.pt"
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("config") != config.to_dict():
            raise CheckpointStateError(
                f"{state_path} was written by a stage-2 run with other settings; use a new work directory"
            )
        net.load_state_dict(state["net"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
        history = list(state["history"])
        best_loss = state["best_loss"]
        best_epoch = int(state["best_epoch"])
        stale = int(state["stale"])
        log.info("stage2.resume", from_epoch=start_epoch)
    sampler = EpochSampler(train_set.labels, rank=context.rank, world_size=context.world_size, seed=config.seed)
    loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler)
    model: nn.Module = net
    if context.distributed:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    bar = tqdm(range(start_epoch, config.epochs), desc="stage2", unit="epoch",
               disable=not (progress and context.is_main))
    stop = False
    for epoch in bar:
        if stop:
            break
        sampler.set_epoch(epoch)
        model.train()
        started = time.perf_counter()
        total = 0.0
        batches = 0
        for batch in loader:
            loss = _batch_loss(model, batch, device, config.chunk_weight_floor, config.loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.item())
            batches += 1
        record: dict[str, float | None] = {"epoch": float(epoch), "train_loss": total / max(batches, 1),
                                           "validation_loss": None,
                                           "learning_rate": float(optimizer.param_groups[0]["lr"])}
        if scheduler is not None:
            scheduler.step()  # after the epoch, as the seed steps it
        if context.is_main:
            evaluated = validation_set if len(validation_set) else train_set
            val = validation_loss(net, evaluated, device, config.batch_size)
            record["validation_loss"] = val
            history.append(record)
            if best_loss is None or val < best_loss:
                best_loss, best_epoch, stale = val, epoch, 0
                torch.save(net.state_dict(), out / "best_sequence.pt")
            else:
                stale += 1
            tmp = out / "state.pt.tmp"
            torch.save({"config": config.to_dict(), "net": net.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else {},
                        "epoch": epoch, "history": history, "best_loss": best_loss, "best_epoch": best_epoch,
                        "stale": stale}, tmp)
            tmp.replace(state_path)
            bar.set_postfix(train=f"{record['train_loss']:.4f}", val=f"{val:.4f}")
            log.debug("stage2.epoch", epoch=epoch + 1, train_loss=record["train_loss"], validation_loss=val,
                      seconds=round(time.perf_counter() - started, 2))
        stop = broadcast_flag(context, config.patience is not None and stale >= config.patience)
        context.barrier()
    bar.close()
    sequence_path = out / "sequence.pt"
    if context.is_main:
        best = torch.load(out / "best_sequence.pt", map_location="cpu", weights_only=True)
        torch.save({"sequence": best, "config": sequence_config.to_dict(), "best_epoch": best_epoch,
                    "best_validation_loss": best_loss, "history": history}, sequence_path)
        log.info("stage2.done", best_epoch=best_epoch + 1, best_validation_loss=best_loss)
    context.barrier()
    return Stage2Result(sequence_path=sequence_path, best_epoch=best_epoch, best_validation_loss=best_loss,
                        history=tuple(history))


def load_sequence_model(path: str | Path) -> SequenceModel:
    data = torch.load(Path(path), map_location="cpu", weights_only=True)
    model = SequenceModel(SequenceConfig.from_dict(data["config"]))
    model.load_state_dict(data["sequence"])
    return model.eval()


@torch.inference_mode()
def predict_exams(model: SequenceModel, features_dir: str | Path, keys: Sequence[str], seq_len: int
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Exam probabilities (9,) and per-chunk PE probabilities (L,) of each exam (chunks mapped back after resizing)."""
    model.eval()
    results: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key in keys:
        exam = load_exam_features(features_dir, key)
        item = fit_exam(exam, seq_len)
        output = model(torch.from_numpy(item.features)[None], torch.from_numpy(item.mask)[None])
        exam_probs = torch.sigmoid(output.exam_logits[0].float()).numpy()
        step_probs = torch.sigmoid(output.chunk_logits[0].float()).numpy()
        length = item.num_chunks
        chunk_probs = restore_sequence(step_probs, length).numpy()
        results[key] = (exam_probs.astype(np.float64), np.clip(chunk_probs, 0.0, 1.0).astype(np.float64))
    if math.isnan(sum(float(v[0].sum()) for v in results.values())):
        raise TrainingError("stage 2 produced NaN probabilities")
    return results
