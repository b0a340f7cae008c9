"""The two-stage PE model as a library: DICOM series in, consistent findings and Grad-CAM out."""

from pe_model.errors import CheckpointError, PEModelError, SeriesError
from pe_model.labels import EXAM_LABELS
from pe_model.prediction import Heatmap, KeyImage, ModelInfo, Prediction

__all__ = [
    "EXAM_LABELS",
    "CheckpointError",
    "Heatmap",
    "KeyImage",
    "ModelInfo",
    "PEModelError",
    "Prediction",
    "SeriesError",
]
