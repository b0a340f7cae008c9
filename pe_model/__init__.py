"""The two-stage PE model as a library: DICOM series in, consistent findings and Grad-CAM out.

The model-side names (Predictor, checkpoints, consistency) load lazily on first use, so that
``import pe_model.labels`` (used by the agent's light commands) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pe_model.errors import CheckpointError, PEModelError, SeriesError
from pe_model.labels import EXAM_LABELS
from pe_model.prediction import Heatmap, KeyImage, ModelInfo, Prediction

if TYPE_CHECKING:
    from pe_model.checkpoint import (
        Checkpoint,
        ModelCard,
        ModelConfig,
        build_initial_checkpoint,
        load_checkpoint,
        save_checkpoint,
    )
    from pe_model.consistency import ConsistentResult, make_consistent, violations
    from pe_model.predictor import Predictor

_LAZY: dict[str, str] = {
    "Checkpoint": "pe_model.checkpoint",
    "ModelCard": "pe_model.checkpoint",
    "ModelConfig": "pe_model.checkpoint",
    "build_initial_checkpoint": "pe_model.checkpoint",
    "load_checkpoint": "pe_model.checkpoint",
    "save_checkpoint": "pe_model.checkpoint",
    "ConsistentResult": "pe_model.consistency",
    "make_consistent": "pe_model.consistency",
    "violations": "pe_model.consistency",
    "Predictor": "pe_model.predictor",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pe_model' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "EXAM_LABELS",
    "Checkpoint",
    "CheckpointError",
    "ConsistentResult",
    "Heatmap",
    "KeyImage",
    "ModelCard",
    "ModelConfig",
    "ModelInfo",
    "PEModelError",
    "Prediction",
    "Predictor",
    "SeriesError",
    "build_initial_checkpoint",
    "load_checkpoint",
    "make_consistent",
    "save_checkpoint",
    "violations",
]
