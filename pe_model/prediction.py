"""Value types that the predictor returns and every consumer (CLI, report writers, agent) reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pe_model.labels import EXAM_LABELS, SERIES_PE_KEY

if TYPE_CHECKING:  # pe_model.quality pulls in scipy and pydicom; importing pe_model stays light
    from pe_model.quality import QualityReport


@dataclass(frozen=True)
class ModelInfo:
    """Provenance written into every output: which model made it."""

    name: str
    version: str
    sha256: str
    intended_use: str
    training_data: str
    not_for_clinical_use: bool

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "intended_use": self.intended_use,
            "training_data": self.training_data,
            "not_for_clinical_use": self.not_for_clinical_use,
        }


@dataclass(frozen=True)
class KeyImage:
    """A source image of a chunk that the model ranks high for PE."""

    sop_instance_uid: str
    pe_probability: float
    chunk_index: int
    #: 1-based frame number for Enhanced (multi-frame) CT, else None.
    frame_number: int | None = None


@dataclass(frozen=True, eq=False)
class Heatmap:
    """3-D Grad-CAM of one chunk, resampled onto one source slice.

    ``values`` has shape (Rows, Columns) of the source image, float32 in [0, 1], so an overlay
    lines up with the original pixels.
    """

    sop_instance_uid: str
    chunk_index: int
    values: np.ndarray
    #: Patient coordinates (mm, LPS) of the heatmap's peak voxel.
    peak_position_patient: tuple[float, float, float]
    frame_number: int | None = None


@dataclass(frozen=True, eq=False)
class Prediction:
    """What the model says about one series.

    ``probabilities`` holds the nine exam labels (EXAM_LABELS) and SERIES_PE_KEY (max chunk
    probability); ``labels`` the nine final labels after consistency correction.
    """

    study_instance_uid: str
    series_instance_uid: str
    pe_present: bool
    probabilities: dict[str, float]
    labels: dict[str, bool]
    chunk_probabilities: tuple[float, ...]
    #: For each chunk, the SOP Instance UIDs of the source images it covers (nearest source slice
    #: of each resampled slice, deduplicated, in order).
    chunk_sop_instance_uids: tuple[tuple[str, ...], ...]
    key_images: tuple[KeyImage, ...]
    #: Attention weights over the chunk sequence, one tuple per exam label.
    attention: dict[str, tuple[float, ...]]
    heatmaps: tuple[Heatmap, ...]
    model: ModelInfo
    timings_s: dict[str, float]
    #: SOP Instance UIDs of every image the volume was built from (the evidence).
    source_sop_instance_uids: tuple[str, ...] = field(default=())
    #: Images of the series left out of the volume, each (SOP Instance UID, reason): localizers,
    #: other sizes or orientations, implausible header or pixel values (``pe_model.volume``). A report
    #: must say the analysis did not see them.
    skipped_images: tuple[tuple[str, str], ...] = field(default=())
    #: The input-quality gate's measurements and verdict (pe_model.quality); None when not run.
    quality: QualityReport | None = None
    #: The arithmetic the model ran in: "fp32" or "bf16" (pe_model.precision).
    precision: str = "fp32"

    @property
    def series_pe_probability(self) -> float:
        return self.probabilities[SERIES_PE_KEY]

    def to_json_dict(self) -> dict[str, Any]:
        """The `python -m pe_model predict --json` object."""
        return {
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "pe_present": self.pe_present,
            "probabilities": {k: round(float(v), 6) for k, v in self.probabilities.items()},
            "labels": {k: bool(self.labels[k]) for k in EXAM_LABELS},
            "key_images": [
                {
                    "sop_instance_uid": k.sop_instance_uid,
                    "pe_probability": round(float(k.pe_probability), 6),
                    "chunk_index": k.chunk_index,
                    **({"frame_number": k.frame_number} if k.frame_number is not None else {}),
                }
                for k in self.key_images
            ],
            "chunk_probabilities": [round(float(p), 6) for p in self.chunk_probabilities],
            "skipped_images": [{"sop_instance_uid": uid, "reason": reason} for uid, reason in self.skipped_images],
            "model": self.model.to_json_dict(),
            "precision": self.precision,
            "timings_s": {k: round(float(v), 4) for k, v in self.timings_s.items()},
            "quality": None if self.quality is None else self.quality.to_json_dict(),
        }
