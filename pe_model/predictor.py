"""The Predictor: one CT series in, a consistent Prediction with key images and Grad-CAM out.

Flow per series: load (DICOM -> HU Volume) -> input-quality gate (pe_model.quality: trunk
attenuation, lung coverage, slice thickness, noise) -> preprocess (isotropic, lung crop, windows,
chunks) -> stage 1 (R3D-18 features and layer4 maps of every chunk) -> stage 2 (sequence model: nine
exam probabilities, per-chunk PE probabilities, attention) -> consistency correction -> Grad-CAM
of the top chunks from the kept layer4 maps -> key images and heatmaps on the source pixel grid.

Decisions:
- ``chunk_probabilities`` come from stage 2's chunk head (it sees the whole exam); the stage-1
  chunk logit is used only as the Grad-CAM target, the network it explains.
- ``probabilities`` and ``chunk_probabilities`` are the consistency-corrected values
  (``pe_model.consistency.make_consistent``): every output satisfies the RSNA rules, and a value
  differs from the model's raw output only where a rule forced it across 0.5.
- Key images: the ``gradcam_top_k`` chunks (at least one) with the highest PE probability, best
  first; each names the source image where that chunk's Grad-CAM peaks (the middle source slice
  of the chunk when its map is empty), with one Heatmap on that image.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
import torch
from pydicom import Dataset
from torch import Tensor

from pe_model.checkpoint import BUILTIN_DEMO, Checkpoint, load_checkpoint
from pe_model.consistency import make_consistent
from pe_model.errors import PEModelError
from pe_model.gradcam import grad_cam_from_maps
from pe_model.labels import EXAM_LABELS, SERIES_PE_KEY
from pe_model.networks.r3d18 import R3D18, to_network_input
from pe_model.networks.sequence import SequenceModel, fit_sequence, restore_sequence
from pe_model.precision import PRECISIONS, Answer, PrecisionDecision, choose_precision
from pe_model.prediction import Heatmap, KeyImage, ModelInfo, Prediction
from pe_model.preprocessing import PreprocessConfig, PreprocessedSeries, preprocess
from pe_model.validation import DEFAULT_LIMITS, SeriesLimits, check_resampled_size
from pe_model.quality import assess_quality
from pe_model.volume import Volume, load_series

log = structlog.get_logger(__name__)

SeriesInput = str | Path | Sequence[str | Path] | Sequence[Dataset] | Volume


class DeviceError(PEModelError):
    """The requested compute device is not available."""


@dataclass(frozen=True, eq=False)
class StageOneOutput:
    """Stage-1 results of one series: ``features (N, F)`` float32 and layer4 ``maps (N, C, d, h, w)``
    on the CPU (small: C x 2 x 6 x 6 per chunk at input 192)."""

    features: Tensor
    maps: Tensor


@dataclass(frozen=True, eq=False)
class StageTwoOutput:
    """Raw stage-2 probabilities: ``exam (9,)``, ``chunks (N,)``, ``attention (9, N)``."""

    exam: np.ndarray
    chunks: np.ndarray
    attention: np.ndarray


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else must be usable now."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} was asked for but CUDA is not available")
    if resolved.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {device!r} is not supported (use cpu, cuda or auto)")
    return resolved


def return_freed_memory() -> None:
    """Give the C heap's free pages back to the operating system (glibc ``malloc_trim``; elsewhere nothing).

    Loading a checkpoint allocates the file's bytes, the unpickled weights and the unfolded network,
    then frees them; glibc keeps those pages in the process (the full-width model's worker: ~600 MB
    resident after loading, ~400 MB after a trim, measured 2026-11-27).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


def _available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class Predictor:
    """Runs the two-stage model. Load once with :meth:`from_checkpoint`, call :meth:`predict` for
    each series; not safe to call from several threads at once."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        device: str = "cpu",
        gradcam_top_k: int = 3,
        batch_size: int | None = None,
        precision: str = "auto",
        num_threads: int | None = None,
        limits: SeriesLimits = DEFAULT_LIMITS,
    ) -> None:
        if gradcam_top_k < 0:
            raise ValueError("gradcam_top_k must be zero or more")
        if batch_size is not None and batch_size < 1:
            raise ValueError("batch_size must be positive")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        self.device = resolve_device(device)
        self.gradcam_top_k = gradcam_top_k
        #: What a series may look like and cost before it is refused (pe_model.validation).
        self.limits = limits
        # On CPU a batch of 2 is as fast per chunk as 8 and needs far less memory.
        self.batch_size = batch_size or (8 if self.device.type == "cuda" else 2)
        if num_threads is not None:
            torch.set_num_threads(max(1, num_threads))
        elif torch.get_num_threads() > _available_cores():
            # Never more threads than cores this process may run on: oversubscription makes
            # convolutions many times slower. Fewer threads set by the caller are kept.
            torch.set_num_threads(_available_cores())
        self.preprocess_config: PreprocessConfig = checkpoint.preprocess_config
        encoder = checkpoint.build_encoder()
        # Stage 1 runs a BN-folded copy in channels_last_3d (faster on CPU and CUDA); Grad-CAM
        # needs only the pooling and classifier, identical in both.
        self.encoder: R3D18 = encoder.fused_for_inference().to(self.device)
        self.encoder = self.encoder.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        del encoder
        self.sequence_model: SequenceModel = checkpoint.build_sequence_model().to(self.device)
        # Keep the identity and configuration, not a second copy of the weights.
        self.checkpoint = dataclasses.replace(checkpoint, encoder_state={}, sequence_state={})
        self._autocast_dtype: torch.dtype | None = None
        # "auto": bf16 only on native-bf16 hardware and after a self-check (pe_model.precision).
        self.precision_decision: PrecisionDecision = choose_precision(
            precision, self.device, self._answer, self.preprocess_config)
        self.precision: str = self.precision_decision.precision
        self._autocast_dtype = torch.bfloat16 if self.precision == "bf16" else None

    @classmethod
    def from_checkpoint(
        cls,
        ref: str | Path = BUILTIN_DEMO,
        *,
        device: str = "cpu",
        expected_sha256: str | None = None,
        gradcam_top_k: int = 3,
        batch_size: int | None = None,
        precision: str = "auto",
        num_threads: int | None = None,
        limits: SeriesLimits = DEFAULT_LIMITS,
    ) -> Predictor:
        """Load and verify a checkpoint (a path or ``builtin:demo``) and build both stages.

        ``device``: cpu, cuda, cuda:N or auto (CUDA when available). ``batch_size``: chunks per
        stage-1 pass (default 8 on CUDA, 2 on CPU). ``precision``: auto (bf16 autocast on CUDA and
        on CPUs with native bf16, after a self-check that bf16 answers as fp32 does; else fp32),
        fp32, or bf16 (pe_model.precision).
        """
        checkpoint = load_checkpoint(ref, expected_sha256=expected_sha256)
        predictor = cls(
            checkpoint,
            device=device,
            gradcam_top_k=gradcam_top_k,
            batch_size=batch_size,
            precision=precision,
            num_threads=num_threads,
            limits=limits,
        )
        del checkpoint  # the file's bytes and the unfolded weights: the predictor keeps neither
        return_freed_memory()
        return predictor

    @property
    def model_info(self) -> ModelInfo:
        return self.checkpoint.model_info

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self._autocast_dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=self._autocast_dtype):
            yield

    # -- stages ----------------------------------------------------------------------------

    def run_stage_one(self, chunks: Tensor) -> StageOneOutput:
        """Chunks ``(N, 3, D, S, S)`` uint8 -> features ``(N, F)`` and layer4 maps, in batches."""
        features: list[Tensor] = []
        maps: list[Tensor] = []
        with torch.inference_mode():
            for start in range(0, chunks.shape[0], self.batch_size):
                batch = chunks[start : start + self.batch_size].to(self.device, non_blocking=True)
                batch = to_network_input(batch).contiguous(memory_format=torch.channels_last_3d)
                with self._autocast():
                    layer4 = self.encoder.feature_maps(batch)
                    pooled = self.encoder.pool(layer4)
                features.append(pooled.float().cpu())
                maps.append(layer4.float().cpu())
        return StageOneOutput(features=torch.cat(features), maps=torch.cat(maps))

    def run_stage_two(self, features: Tensor) -> StageTwoOutput:
        """Chunk features ``(N, F)`` -> exam, chunk and attention probabilities for the N chunks."""
        length = int(features.shape[0])
        fitted = fit_sequence(features, self.sequence_model.config.seq_len)
        with torch.inference_mode():
            out = self.sequence_model(
                fitted.features.unsqueeze(0).to(self.device), fitted.mask.unsqueeze(0).to(self.device)
            )
            exam = torch.sigmoid(out.exam_logits[0].float()).cpu()
            steps = torch.sigmoid(out.chunk_logits[0].float()).cpu()
            attention = out.attention[0].float().cpu()  # (9, seq_len)
        chunk_probs = restore_sequence(steps, length).clamp(0.0, 1.0)
        per_chunk = restore_sequence(attention.T, length).T.clamp_min(0.0)  # (9, N)
        per_chunk = per_chunk / per_chunk.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return StageTwoOutput(
            exam=exam.numpy().astype(np.float64),
            chunks=chunk_probs.numpy().astype(np.float64),
            attention=per_chunk.numpy().astype(np.float64),
        )

    def _answer(self, chunks: Tensor, dtype: torch.dtype | None) -> Answer:
        """Exam probabilities and consistent labels of preprocessed chunks at autocast ``dtype``
        (None: fp32); the precision self-check compares two of these."""
        saved = self._autocast_dtype
        self._autocast_dtype = dtype
        try:
            stage_two = self.run_stage_two(self.run_stage_one(chunks).features)
        finally:
            self._autocast_dtype = saved
        consistent = make_consistent(
            {label: float(p) for label, p in zip(EXAM_LABELS, stage_two.exam, strict=True)},
            [float(p) for p in stage_two.chunks],
        )
        probabilities = dict(consistent.probabilities)
        probabilities[SERIES_PE_KEY] = float(max(consistent.chunk_probabilities))
        return probabilities, dict(consistent.labels), consistent.pe_present

    # -- the whole series ------------------------------------------------------------------

    def load(self, series: SeriesInput) -> Volume:
        """A Volume as is; anything else through ``pe_model.volume.load_series``."""
        if isinstance(series, Volume):
            return series
        return load_series(series, limits=self.limits)  # type: ignore[arg-type]

    def predict(self, series: SeriesInput) -> Prediction:
        """Analyse one series (a folder, a list of paths, a list of datasets, or a Volume).

        Raises a ``SeriesError`` subclass when the series cannot be analysed.
        """
        timings: dict[str, float] = {}
        started = time.perf_counter()

        mark = time.perf_counter()
        volume = self.load(series)
        timings["load"] = time.perf_counter() - mark

        _, rows, columns = volume.shape
        check_resampled_size(
            float(volume.positions_mm[-1] - volume.positions_mm[0]), rows, columns, volume.pixel_spacing_mm,
            self.preprocess_config.spacing_mm, self.limits,
        )
        mark = time.perf_counter()
        quality = assess_quality(volume)
        timings["quality"] = time.perf_counter() - mark

        mark = time.perf_counter()
        prepared = preprocess(volume, self.preprocess_config)
        timings["preprocess"] = time.perf_counter() - mark

        mark = time.perf_counter()
        stage_one = self.run_stage_one(prepared.chunks)
        timings["stage1"] = time.perf_counter() - mark

        mark = time.perf_counter()
        stage_two = self.run_stage_two(stage_one.features)
        consistent = make_consistent(
            {label: float(p) for label, p in zip(EXAM_LABELS, stage_two.exam, strict=True)},
            [float(p) for p in stage_two.chunks],
        )
        timings["stage2"] = time.perf_counter() - mark

        mark = time.perf_counter()
        chunk_probabilities = np.asarray(consistent.chunk_probabilities, dtype=np.float64)
        key_images, heatmaps = self._key_images(volume, prepared, stage_one.maps, chunk_probabilities)
        timings["gradcam"] = time.perf_counter() - mark
        timings["total"] = time.perf_counter() - started

        probabilities = dict(consistent.probabilities)
        probabilities[SERIES_PE_KEY] = float(chunk_probabilities.max())
        prediction = Prediction(
            study_instance_uid=volume.study_instance_uid,
            series_instance_uid=volume.series_instance_uid,
            pe_present=consistent.pe_present,
            probabilities=probabilities,
            labels=dict(consistent.labels),
            chunk_probabilities=tuple(float(p) for p in chunk_probabilities),
            chunk_sop_instance_uids=tuple(
                _unique(volume.sop_instance_uids[k] for k in prepared.chunk_source_indices(i))
                for i in range(prepared.num_chunks)
            ),
            key_images=key_images,
            attention={
                label: tuple(float(a) for a in stage_two.attention[j])
                for j, label in enumerate(EXAM_LABELS)
            },
            heatmaps=heatmaps,
            model=self.model_info,
            timings_s=timings,
            source_sop_instance_uids=_unique(volume.sop_instance_uids),
            skipped_images=tuple(volume.skipped),
            quality=quality,
            precision=self.precision,
        )
        log.info(
            "pe_model.predicted",
            series_instance_uid=volume.series_instance_uid,
            chunks=prepared.num_chunks,
            skipped_images=len(volume.skipped),
            pe_present=prediction.pe_present,
            consistency=consistent.chosen,
            quality=quality.status,
            model_sha256=self.model_info.sha256[:12],
            timings_s={k: round(v, 3) for k, v in timings.items()},
        )
        return prediction

    def _key_images(
        self,
        volume: Volume,
        prepared: PreprocessedSeries,
        maps: Tensor,
        chunk_probabilities: np.ndarray,
    ) -> tuple[tuple[KeyImage, ...], tuple[Heatmap, ...]]:
        """Key images of the top chunks (best first) and, with Grad-CAM on, one heatmap each."""
        count = min(max(self.gradcam_top_k, 1), prepared.num_chunks)
        # Stable: ties keep the earlier (more inferior) chunk first.
        order = np.argsort(-chunk_probabilities, kind="stable")[:count]
        cams: np.ndarray | None = None
        if self.gradcam_top_k > 0:
            chosen = torch.as_tensor(order.copy(), dtype=torch.long)
            size = tuple(int(s) for s in prepared.chunks.shape[2:])
            top_maps = maps.index_select(0, chosen).to(self.device)
            cams = grad_cam_from_maps(self.encoder, top_maps, size).cpu().numpy()
        key_images: list[KeyImage] = []
        heatmaps: list[Heatmap] = []
        for rank, chunk_index in enumerate(int(i) for i in order):
            source_indices = prepared.chunk_source_indices(chunk_index)
            slice_index = int(source_indices[len(source_indices) // 2])
            heatmap_values: np.ndarray | None = None
            if cams is not None:
                on_source = prepared.heatmap_to_source(volume, chunk_index, cams[rank])
                peaks = {k: float(v.max()) for k, v in on_source.items()}
                if peaks and max(peaks.values()) > 0.0:
                    slice_index = max(peaks, key=lambda k: (peaks[k], -k))
                heatmap_values = on_source.get(slice_index)
            sop_instance_uid = volume.sop_instance_uids[slice_index]
            frame_number = volume.frame_numbers[slice_index]
            key_images.append(
                KeyImage(
                    sop_instance_uid=sop_instance_uid,
                    pe_probability=float(chunk_probabilities[chunk_index]),
                    chunk_index=chunk_index,
                    frame_number=frame_number,
                )
            )
            if heatmap_values is not None:
                heatmaps.append(
                    Heatmap(
                        sop_instance_uid=sop_instance_uid,
                        chunk_index=chunk_index,
                        values=heatmap_values,
                        peak_position_patient=_peak_position(volume, slice_index, heatmap_values),
                        frame_number=frame_number,
                    )
                )
        return tuple(key_images), tuple(heatmaps)


def _peak_position(volume: Volume, slice_index: int, values: np.ndarray) -> tuple[float, float, float]:
    """LPS mm of a heatmap's maximum on its source slice (the image centre for an empty map)."""
    if float(values.max()) > 0.0:
        row, column = np.unravel_index(int(np.argmax(values)), values.shape)
    else:
        row, column = (values.shape[0] - 1) / 2.0, (values.shape[1] - 1) / 2.0
    x, y, z = volume.patient_position(float(slice_index), float(row), float(column))
    return float(x), float(y), float(z)


def _unique(uids: Iterator[str] | Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(uids))
