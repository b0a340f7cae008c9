"""Stage 1: the R3D-18 chunk encoder trained on chunk-level PE labels from the cache.

The seed's recipe (docs/METHOD.md, "Stage 1"): Kinetics-400 initialisation, Adam 4e-4, batch 16,
20 epochs, BCE on one logit; training chunks come from the cache at 224 and are randomly cropped
to 192 (the same crop for the whole chunk), rotated by 0-15 degrees with probability 15/360;
validation reads the cache's input-size chunks, the Predictor's exact input. AMP (bf16, else
fp16 + GradScaler) and channels_last_3d on CUDA. One state file per epoch allows resuming after
an interruption; the encoder with the best validation AUROC is kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm import tqdm

from pe_model.labels import EXAM_LABELS
from pe_model.networks.r3d18 import R3D18, to_network_input
from training.cache import SeriesCache
from training.distributed import DistributedContext
from training.errors import CheckpointStateError, TrainingError

log = structlog.get_logger(__name__)

#: Exam labels that describe the clot itself: an auxiliary target only on chunks that show PE.
_CLOT_LABELS = ("chronic_pe", "acute_and_chronic_pe", "central_pe", "leftsided_pe", "rightsided_pe")
_CLOT_MASK = np.array([name in _CLOT_LABELS for name in EXAM_LABELS], dtype=bool)


@dataclass(frozen=True)
class Stage1Config:
    """Hyper-parameters of stage 1 (defaults: the seed's)."""

    encoder_width: int = 64
    input_size: int = 192
    epochs: int = 20
    batch_size: int = 16
    learning_rate: float = 4e-4
    rotation_probability: float = 0.1
    rotation_degrees: float = 15.0
    #: None: every training chunk once per epoch, shuffled (the seed). A fraction: each epoch
    #: draws ``samples_per_epoch`` chunks with that share of positive chunks (for tiny datasets).
    positive_fraction: float | None = None
    samples_per_epoch: int | None = None
    #: Weight of an auxiliary head predicting the exam labels from chunk features (0 = seed, off).
    #: Clot labels (location, chronicity) are targets only on positive chunks. The head is dropped
    #: after training; it only teaches the features where and what the clot is.
    aux_exam_weight: float = 0.0
    #: With ``positive_fraction``: this share of the negatives is drawn from PE-negative exams at
    #: the same relative height (chunk index / chunks) as a drawn PE chunk, so the network must
    #: see the clot itself rather than the anatomy of the level where clots sit.
    matched_negative_fraction: float = 0.0
    #: Weight of a second, training-only PE logit read from the *maximum* of the layer4 maps
    #: (multiple-instance style). A small clot is diluted 1:200 by global average pooling; the max
    #: head's gradient goes to where the clot is, so the maps learn a localised clot detector that
    #: the average-pooled classifier (and Grad-CAM) then read. 0 = off (the seed).
    max_head_weight: float = 0.0
    num_workers: int = 0
    seed: int = 0
    #: Validate on at most this many chunks each epoch (every positive chunk first, then evenly
    #: spaced negatives); None: every validation chunk, as the seed.
    validation_chunks: int | None = None
    #: A torchvision r3d_18 state-dict file (Kinetics) to start from (width 64 only).
    init_weights: str | None = None
    #: Refuse to start without ``init_weights`` (the seed starts from Kinetics-400).
    pretrained_required: bool = False
    #: Rotation angles in [-deg, deg] (True) or the seed's [0, deg] (False).
    rotation_symmetric: bool = True
    #: grid_sample padding of a rotated chunk: "zeros" or the seed's "border".
    rotation_padding: str = "zeros"
    amp: bool = True

    def __post_init__(self) -> None:
        if self.rotation_padding not in ("zeros", "border", "reflection"):
            raise TrainingError(f"rotation_padding must be zeros, border or reflection, not {self.rotation_padding!r}")
        if not 0.0 <= self.rotation_probability <= 1.0:
            raise TrainingError(f"rotation_probability must be in [0, 1], not {self.rotation_probability}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def augmentation(self) -> dict[str, Any]:
        """The training transform's settings, as ChunkDataset keyword arguments."""
        return {"rotation_probability": self.rotation_probability, "rotation_degrees": self.rotation_degrees,
                "rotation_symmetric": self.rotation_symmetric, "rotation_padding": self.rotation_padding}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Stage1Config:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


KINETICS_HINT = (
    "torchvision's r3d_18 Kinetics-400 state dict (R3D_18_Weights.KINETICS400_V1): where torchvision is "
    "installed run python -c \"import torch, torchvision; torch.save(torchvision.models.video.r3d_18("
    "weights='KINETICS400_V1').state_dict(), 'r3d_18_kinetics400.pth')\", or download "
    "https://download.pytorch.org/models/r3d_18-b3b3357e.pth"
)


def check_pretrained(config: Stage1Config, *, read_weights: bool = True) -> None:
    """Refuse a run whose recipe starts from Kinetics-400 weights it was not given, or was given a
    file that is not a torchvision r3d_18 state dict for this encoder, before hours of caching."""
    if config.pretrained_required and not config.init_weights:
        raise TrainingError(
            "this preset starts stage 1 from Kinetics-400 weights: give --init-weights PATH, "
            f"{KINETICS_HINT}; or --no-pretrained to start from random weights"
        )
    if config.init_weights and read_weights:
        if not Path(config.init_weights).is_file():
            raise TrainingError(f"--init-weights {config.init_weights} does not exist; it should be {KINETICS_HINT}")
        R3D18(width=config.encoder_width, num_classes=1).load_torchvision_state_dict(config.init_weights)


def augment_chunk(chunk: Tensor, size: int, rotation_probability: float, rotation_degrees: float, *,
                  symmetric: bool = True, padding: str = "zeros") -> Tensor:
    """Training path: random ``size`` crop shared by all slices, then rarely a small rotation.

    chunk (3, D, S, S) uint8 with S >= size -> (3, D, size, size) uint8. The angle is uniform in
    [-deg, deg] (``symmetric``) or in [0, deg] (the seed); ``padding`` is grid_sample's.
    """
    side = chunk.shape[-1]
    if side < size:
        raise TrainingError(f"cached slices are {side} px, smaller than the {size} px network input")
    top = int(torch.randint(0, chunk.shape[-2] - size + 1, ()).item())
    left = int(torch.randint(0, side - size + 1, ()).item())
    out = chunk[:, :, top:top + size, left:left + size]
    if rotation_probability > 0 and float(torch.rand(())) < rotation_probability:
        low = -rotation_degrees if symmetric else 0.0
        angle = math.radians(float(torch.empty(()).uniform_(low, rotation_degrees)))
        cos, sin = math.cos(angle), math.sin(angle)
        theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=torch.float32)
        slices = out.permute(1, 0, 2, 3).float()  # (D, 3, s, s)
        grid = F.affine_grid(theta.expand(slices.shape[0], 2, 3), list(slices.shape), align_corners=False)
        rotated = F.grid_sample(slices, grid, mode="bilinear", padding_mode=padding, align_corners=False)
        out = rotated.round_().clamp_(0, 255).to(torch.uint8).permute(1, 0, 2, 3)
    return out.contiguous()


class ChunkDataset(Dataset[tuple[Tensor, Tensor, Tensor]]):
    """Every chunk of the given exams, read from the memory-mapped cache.

    ``train``: random crops (and rotations) of the training-size chunks; otherwise the cache's
    input-size chunks unchanged, the Predictor's own stage-1 input.
    Items: (chunk (3, D, s, s) uint8, label () float32, aux target (9,) float32).
    """

    def __init__(self, cache: SeriesCache, keys: Sequence[str], *, input_size: int, train: bool,
                 rotation_probability: float = 0.0, rotation_degrees: float = 15.0,
                 rotation_symmetric: bool = True, rotation_padding: str = "zeros") -> None:
        if not train and cache.input_size != input_size:
            raise TrainingError(
                f"the cache holds {cache.input_size} px network inputs, not the {input_size} px this step needs"
            )
        self.cache = cache
        self.input_size = input_size
        self.train = train
        self.rotation_probability = rotation_probability
        self.rotation_degrees = rotation_degrees
        self.rotation_symmetric = rotation_symmetric
        self.rotation_padding = rotation_padding
        index: list[tuple[str, int]] = []
        labels: list[int] = []
        aux: list[np.ndarray] = []
        positions: list[float] = []
        negative_exam: list[bool] = []
        for key in keys:
            entry = cache.entries[key]
            exam = np.array([entry.exam_labels[name] for name in EXAM_LABELS], dtype=np.float32)
            for c, label in enumerate(entry.chunk_labels):
                index.append((key, c))
                labels.append(int(label))
                positions.append((c + 0.5) / max(entry.num_chunks, 1))
                negative_exam.append(not entry.pe_present)
                aux.append(exam if label else np.where(_CLOT_MASK, 0.0, exam).astype(np.float32))
        self.index = index
        self.labels = np.asarray(labels, dtype=np.int64)
        #: Relative height of each chunk in its exam (0 = first chunk) and whether its exam is PE-negative.
        self.positions = np.asarray(positions, dtype=np.float64)
        self.negative_exam = np.asarray(negative_exam, dtype=bool)
        self.aux_targets = np.stack(aux) if aux else np.zeros((0, len(EXAM_LABELS)), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        key, c = self.index[i]
        if self.train:
            chunk = torch.from_numpy(np.array(self.cache.train_chunks(key)[c]))  # copy out of the memory map
            chunk = augment_chunk(chunk, self.input_size, self.rotation_probability, self.rotation_degrees,
                                  symmetric=self.rotation_symmetric, padding=self.rotation_padding)
        else:
            chunk = torch.from_numpy(np.array(self.cache.chunks(key)[c]))
        return (chunk, torch.tensor(float(self.labels[i])), torch.from_numpy(self.aux_targets[i]))


class EpochSampler(Sampler[int]):
    """Indices of one epoch, sharded over ranks like DistributedSampler.

    Without ``positive_fraction``: a seeded permutation of all items (what DistributedSampler
    does). With it: ``samples_per_epoch`` draws, that share positive (with replacement when
    there are few positives), the rest negative — for small synthetic datasets where PE chunks
    are rare.
    """

    def __init__(self, labels: np.ndarray, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 positive_fraction: float | None = None, samples_per_epoch: int | None = None,
                 positions: np.ndarray | None = None, negative_exam: np.ndarray | None = None,
                 matched_negative_fraction: float = 0.0, match_window: float = 0.05) -> None:
        self.labels = np.asarray(labels)
        self.positions = positions
        self.negative_exam = negative_exam
        self.matched_negative_fraction = matched_negative_fraction
        self.match_window = match_window
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.positive_fraction = positive_fraction
        self.samples_per_epoch = samples_per_epoch or len(self.labels)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _epoch_indices(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.positive_fraction is None:
            order = rng.permutation(len(self.labels))
        else:
            positives = np.flatnonzero(self.labels == 1)
            negatives = np.flatnonzero(self.labels == 0)
            n_pos = int(round(self.samples_per_epoch * self.positive_fraction)) if len(positives) else 0
            n_neg = self.samples_per_epoch - n_pos
            pos = rng.choice(positives, n_pos, replace=n_pos > len(positives)) if n_pos else positives[:0]
            n_matched = self._matched_count(n_neg, len(pos))
            neg = (rng.choice(negatives, n_neg - n_matched, replace=n_neg - n_matched > len(negatives))
                   if len(negatives) and n_neg - n_matched else negatives[:0])
            if n_matched:
                neg = np.concatenate([neg, self._matched_negatives(rng, pos, n_matched)])
            order = rng.permutation(np.concatenate([pos, neg]))
        per_rank = math.ceil(len(order) / self.world_size)
        padded = np.resize(order, per_rank * self.world_size) if len(order) else order
        return padded[self.rank::self.world_size]

    def _matched_count(self, n_neg: int, n_pos: int) -> int:
        if self.positions is None or self.negative_exam is None or not n_pos or self.matched_negative_fraction <= 0:
            return 0
        if not np.any(self.negative_exam & (self.labels == 0)):
            return 0
        return int(round(n_neg * self.matched_negative_fraction))

    def _matched_negatives(self, rng: np.random.Generator, positives: np.ndarray, count: int) -> np.ndarray:
        """Chunks of negative exams at about the relative height of randomly chosen drawn positives."""
        assert self.positions is not None and self.negative_exam is not None
        pool = np.flatnonzero(self.negative_exam & (self.labels == 0))
        order = np.argsort(self.positions[pool], kind="stable")
        pool, heights = pool[order], self.positions[pool][order]
        chosen = np.empty(count, dtype=np.int64)
        targets = self.positions[rng.choice(positives, count)]
        lo = np.searchsorted(heights, targets - self.match_window, side="left")
        hi = np.searchsorted(heights, targets + self.match_window, side="right")
        for i in range(count):
            a, b = int(lo[i]), int(hi[i])
            if b <= a:  # nothing that close: the nearest one
                a = min(max(a - 1, 0), len(pool) - 1)
                b = a + 1
            chosen[i] = pool[int(rng.integers(a, b))]
        return chosen

    def __iter__(self) -> Iterator[int]:
        return iter(int(i) for i in self._epoch_indices())

    def __len__(self) -> int:
        return math.ceil(
            (self.samples_per_epoch if self.positive_fraction is not None else len(self.labels))
            / self.world_size
        )


def validation_subset(labels: np.ndarray, limit: int) -> list[int]:
    """At most ``limit`` indices: every positive (up to half the limit), the rest evenly spaced negatives."""
    positives = np.flatnonzero(labels == 1)[: max(limit // 2, 1)]
    negatives = np.flatnonzero(labels == 0)
    room = max(limit - len(positives), 0)
    if len(negatives) > room:
        negatives = negatives[np.linspace(0, len(negatives) - 1, room).round().astype(int)] if room else negatives[:0]
    return sorted(int(i) for i in np.concatenate([positives, negatives]))


class Stage1Net(nn.Module):
    """The encoder plus the optional training-only heads (one module for DDP)."""

    def __init__(self, width: int, aux: bool, max_head: bool = False) -> None:
        super().__init__()
        self.encoder = R3D18(width=width, num_classes=1)
        self.aux = nn.Linear(self.encoder.feature_dim, len(EXAM_LABELS)) if aux else None
        self.max_head = nn.Linear(self.encoder.feature_dim, 1) if max_head else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x (N, 3, D, H, W) float -> (PE logit (N,), aux logits (N, 9) or None, max-head logit (N,) or None)."""
        maps = self.encoder.feature_maps(x)
        features = self.encoder.pool(maps)
        logit = self.encoder.fc(features).squeeze(-1)
        aux = self.aux(features) if self.aux is not None else None
        peak = self.max_head(maps.amax(dim=(2, 3, 4))).squeeze(-1) if self.max_head is not None else None
        return logit, aux, peak


@dataclass(frozen=True)
class Stage1Result:
    """Where the trained encoder is and how good it was."""

    encoder_path: Path
    best_epoch: int
    best_validation_auroc: float | None
    history: tuple[dict[str, float | None], ...]


def _autocast(device: torch.device, enabled: bool) -> Any:
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def _to_device(x: Tensor, device: torch.device) -> Tensor:
    x = to_network_input(x.to(device, non_blocking=True))
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x


@torch.inference_mode()
def predict_chunks(encoder: R3D18, loader: DataLoader[Any], device: torch.device, *, amp: bool = True,
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """PE probabilities and labels of every chunk a loader yields (eval mode)."""
    encoder.eval()
    scores: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for chunks, label, _ in tqdm(loader, desc="validate", disable=not progress, leave=False):
        with _autocast(device, amp):
            logits = encoder(_to_device(chunks, device)).squeeze(-1)
        scores.append(torch.sigmoid(logits.float()).cpu().numpy())
        labels.append(label.numpy())
    if not scores:
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.float32)
    return np.concatenate(scores), np.concatenate(labels)


def _validation_auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    from training.metrics import auroc

    if len(np.unique(labels)) < 2:
        return None
    value = float(auroc(labels.astype(np.int64), scores))
    return None if math.isnan(value) else value


def train_stage1(
    cache: SeriesCache,
    train_keys: Sequence[str],
    validation_keys: Sequence[str],
    config: Stage1Config,
    out_dir: str | Path,
    *,
    context: DistributedContext,
    progress: bool = True,
) -> Stage1Result:
    """Train (or resume) stage 1 and write ``<out_dir>/encoder.pt`` (best encoder state dict).

    Per epoch rank 0 writes ``epoch_NNN.pt`` (encoder weights) and ``state.pt`` (everything
    needed to resume: weights, optimizer, scaler, epoch, history). Re-running after an
    interruption continues after the last finished epoch.
    """
    check_pretrained(config, read_weights=False)  # they are read just below
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = context.device
    torch.manual_seed(config.seed + context.rank)
    net = Stage1Net(config.encoder_width, aux=config.aux_exam_weight > 0, max_head=config.max_head_weight > 0)
    if config.init_weights:
        net.encoder.load_torchvision_state_dict(config.init_weights)
        log.info("stage1.init_weights", path=config.init_weights)
    net.to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    optimizer = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    use_scaler = device.type == "cuda" and config.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    start_epoch = 0
    history: list[dict[str, float | None]] = []
    best_auroc: float | None = None
    best_epoch = -1
    state_path = out / "state.pt"
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("config") != config.to_dict():
            raise CheckpointStateError(
                f"{state_path} was written by a stage-1 run with other settings; use a new work directory"
            )
        net.load_state_dict(state["net"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"]) + 1
        history = list(state["history"])
        best_auroc = state["best_auroc"]
        best_epoch = int(state["best_epoch"])
        log.info("stage1.resume", from_epoch=start_epoch)

    train_set = ChunkDataset(cache, train_keys, input_size=config.input_size, train=True,
                             **config.augmentation())
    validation_chunks = ChunkDataset(cache, validation_keys, input_size=config.input_size, train=False)
    validation_set: ChunkDataset | Subset[tuple[Tensor, Tensor, Tensor]] = validation_chunks
    if config.validation_chunks is not None:
        validation_set = Subset(validation_chunks, validation_subset(validation_chunks.labels,
                                                                      config.validation_chunks))
    if len(train_set) == 0:
        raise TrainingError("stage 1 has no training chunk (is the cache empty?)")
    sampler = EpochSampler(train_set.labels, rank=context.rank, world_size=context.world_size,
                           seed=config.seed, positive_fraction=config.positive_fraction,
                           samples_per_epoch=config.samples_per_epoch, positions=train_set.positions,
                           negative_exam=train_set.negative_exam,
                           matched_negative_fraction=config.matched_negative_fraction)
    loader_args: dict[str, Any] = {
        "num_workers": config.num_workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": config.num_workers > 0,
    }
    if config.num_workers > 0:
        loader_args["prefetch_factor"] = 4
    train_loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, drop_last=False,
                              **loader_args)
    validation_loader = DataLoader(validation_set, batch_size=config.batch_size, shuffle=False,
                                   **loader_args)
    model: nn.Module = net
    if context.distributed:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)

    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch)
        model.train()
        started = time.perf_counter()
        total_loss = 0.0
        seen = 0
        bar = tqdm(train_loader, desc=f"stage1 epoch {epoch + 1}/{config.epochs}",
                   disable=not (progress and context.is_main), leave=False)
        for chunks, labels, aux_targets in bar:
            x = _to_device(chunks, device)
            y = labels.to(device)
            with _autocast(device, config.amp):
                logits, aux_logits, peak_logits = model(x)
            loss = F.binary_cross_entropy_with_logits(logits.float(), y)
            if peak_logits is not None:
                loss = loss + config.max_head_weight * F.binary_cross_entropy_with_logits(peak_logits.float(), y)
            if aux_logits is not None:
                loss = loss + config.aux_exam_weight * F.binary_cross_entropy_with_logits(
                    aux_logits.float(), aux_targets.to(device))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total_loss += float(loss.item()) * len(labels)
            seen += len(labels)
            bar.set_postfix(loss=f"{total_loss / max(seen, 1):.4f}")
        seconds = time.perf_counter() - started
        record: dict[str, float | None] = {
            "epoch": float(epoch),
            "train_loss": total_loss / max(seen, 1),
            "chunks_per_second": seen * context.world_size / max(seconds, 1e-9),
            "validation_auroc": None,
        }
        if context.is_main:
            if len(validation_set):
                scores, labels_np = predict_chunks(net.encoder, validation_loader, device, amp=config.amp)
                record["validation_auroc"] = _validation_auroc(scores, labels_np)
            history.append(record)
            auc = record["validation_auroc"]
            improved = best_epoch < 0 or (auc is not None and (best_auroc is None or auc > best_auroc))
            if improved:
                best_auroc, best_epoch = auc, epoch
                torch.save(net.encoder.state_dict(), out / "best_encoder.pt")
            torch.save(net.encoder.state_dict(), out / f"epoch_{epoch:03d}.pt")
            tmp = out / "state.pt.tmp"
            torch.save({
                "config": config.to_dict(),
                "net": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "history": history,
                "best_auroc": best_auroc,
                "best_epoch": best_epoch,
            }, tmp)
            tmp.replace(state_path)
            log.info("stage1.epoch", epoch=epoch + 1, epochs=config.epochs,
                     train_loss=round(float(record["train_loss"] or 0.0), 5),
                     validation_auroc=None if auc is None else round(auc, 4),
                     chunks_per_second=round(float(record["chunks_per_second"] or 0.0), 1),
                     seconds=round(seconds, 1))
        context.barrier()

    encoder_path = out / "encoder.pt"
    if context.is_main:
        best = torch.load(out / "best_encoder.pt", map_location="cpu", weights_only=True)
        torch.save({"encoder": best, "width": config.encoder_width, "best_epoch": best_epoch,
                    "best_validation_auroc": best_auroc, "history": history}, encoder_path)
        log.info("stage1.done", best_epoch=best_epoch + 1, best_validation_auroc=best_auroc)
    context.barrier()
    return Stage1Result(encoder_path=encoder_path, best_epoch=best_epoch,
                        best_validation_auroc=best_auroc, history=tuple(history))


def load_encoder(path: str | Path) -> R3D18:
    """The trained encoder written by ``train_stage1`` (eval mode, CPU)."""
    data = torch.load(Path(path), map_location="cpu", weights_only=True)
    encoder = R3D18(width=int(data["width"]), num_classes=1)
    encoder.load_state_dict(data["encoder"])
    return encoder.eval()
