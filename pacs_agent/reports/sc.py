"""Grad-CAM overlays of the key slices as Secondary Capture images (one new series per job).

Each image: the source slice in the PE window (L 100 / W 700) as RGB, the heatmap blended in
with a jet colormap where it exceeds HEATMAP_FLOOR, scaled up to at least MIN_WIDTH pixels so the
legend is legible, and a legend band below the anatomy (so nothing clinical is hidden) that
says "AI heatmap - not for diagnosis", the model, and NOT FOR CLINICAL USE for the demo model.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom
import matplotlib
import numpy as np
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from pacs_agent.errors import ReportError
from pacs_agent.reports.provenance import (
    HEATMAP_LEGEND,
    NOT_FOR_CLINICAL_USE,
    disclaimer,
    long_string,
    series_description,
)
from pacs_agent.reports.sources import header, hounsfield, patient_orientation
from pacs_agent.settings import OutputSettings
from pe_model.prediction import Heatmap, ModelInfo, Prediction

#: Series Number of the SC series (a new series in the source study).
SC_SERIES_NUMBER = 9902
#: PE-specific window (SEED.md): level 100 HU, width 700 HU.
WINDOW_LEVEL = 100.0
WINDOW_WIDTH = 700.0
#: Heatmap values at or below this are not drawn.
HEATMAP_FLOOR = 0.2
#: Largest opacity of the heatmap (at value 1).
MAX_ALPHA = 0.5
MIN_WIDTH = 256
_LINE_HEIGHT = 14
_MARGIN = 4


def window_to_rgb(hu: np.ndarray, level: float = WINDOW_LEVEL, width: float = WINDOW_WIDTH) -> np.ndarray:
    """(Rows, Columns) HU -> (Rows, Columns, 3) uint8 grey."""
    low = level - width / 2
    grey = np.clip((hu - low) / width, 0.0, 1.0) * 255.0
    return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)


def blend_heatmap(rgb: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Blend a (Rows, Columns) heatmap in [0, 1] onto a (Rows, Columns, 3) uint8 image."""
    if values.shape != rgb.shape[:2]:
        resized = Image.fromarray(np.asarray(values, dtype=np.float32), mode="F").resize(
            (rgb.shape[1], rgb.shape[0]), Image.Resampling.BILINEAR
        )
        values = np.asarray(resized)
    values = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0)
    colours = matplotlib.colormaps["jet"](values)[..., :3] * 255.0
    alpha = np.where(values > HEATMAP_FLOOR, MAX_ALPHA * values, 0.0)[..., None]
    out = rgb.astype(np.float32) * (1 - alpha) + colours * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def legend_lines(model: ModelInfo, chunk_probability: float | None) -> list[str]:
    lines = [HEATMAP_LEGEND, f"{model.name} {model.version}"]
    if chunk_probability is not None:
        lines.append(f"chunk P(PE) = {chunk_probability:.2f}")
    if model.not_for_clinical_use:
        lines.append(NOT_FOR_CLINICAL_USE)
    return lines


def add_legend(rgb: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """Scale the image to at least MIN_WIDTH wide and add a black band with ``lines`` below it."""
    image = Image.fromarray(rgb, mode="RGB")
    scale = max(1, -(-MIN_WIDTH // image.width))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    band = _MARGIN * 2 + _LINE_HEIGHT * len(lines)
    canvas = Image.new("RGB", (image.width, image.height + band), (0, 0, 0))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, line in enumerate(lines):
        colour = (255, 64, 64) if line == NOT_FOR_CLINICAL_USE else (255, 255, 0)
        draw.text((_MARGIN, image.height + _MARGIN + i * _LINE_HEIGHT), line, fill=colour, font=font)
    return np.asarray(canvas, dtype=np.uint8)


def render_overlay(source: Dataset, heatmap: Heatmap, model: ModelInfo, chunk_probability: float | None) -> np.ndarray:
    """(H, W, 3) uint8 picture of one key slice: windowed slice + heatmap + legend band."""
    hu = hounsfield(source, heatmap.frame_number)
    return add_legend(blend_heatmap(window_to_rgb(hu), heatmap.values), legend_lines(model, chunk_probability))


def ranked_heatmaps(prediction: Prediction, limit: int) -> list[Heatmap]:
    """Heatmaps of the top chunks (highest chunk PE probability first), one per slice, at most ``limit``."""

    def probability(h: Heatmap) -> float:
        if 0 <= h.chunk_index < len(prediction.chunk_probabilities):
            return float(prediction.chunk_probabilities[h.chunk_index])
        return 0.0

    chosen: list[Heatmap] = []
    seen: set[tuple[str, int | None]] = set()
    for h in sorted(prediction.heatmaps, key=probability, reverse=True):
        key = (h.sop_instance_uid, h.frame_number)
        if key in seen:
            continue
        seen.add(key)
        chosen.append(h)
        if len(chosen) == limit:
            break
    return chosen


#: Unpaired body parts (PS3.16 CID 4031) for which General Series Laterality stays absent.
_UNPAIRED_BODY_PARTS = frozenset({"CHEST", "ABDOMEN", "PELVIS", "HEART", "CHESTABDOMEN", "CHESTABDPELVIS", "ABDOMENPELVIS", "WHOLEBODY"})


def _set_body_part(sc: SCImage, source: Dataset) -> None:
    """Copy Body Part Examined; Laterality (type 2C) is left empty unless the part is known unpaired."""
    body_part = str(source.get("BodyPartExamined", "") or "").upper()
    if body_part:
        sc.BodyPartExamined = body_part
    if body_part not in _UNPAIRED_BODY_PARTS:
        sc.Laterality = ""


def _source_reference(source: Dataset, frame_number: int | None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame_number is not None:
        item.ReferencedFrameNumber = frame_number
    purpose = Dataset()
    purpose.CodeValue = "121322"
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    item.PurposeOfReferenceCodeSequence = [purpose]
    return item


def build_secondary_captures(
    prediction: Prediction,
    source_datasets: Sequence[Dataset],
    settings: OutputSettings,
    *,
    series_instance_uid: str,
) -> list[SCImage]:
    """One SC image per top key slice (settings.key_slices), all in ``series_instance_uid``."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source_datasets}
    model = prediction.model
    images: list[SCImage] = []
    for number, heatmap in enumerate(ranked_heatmaps(prediction, settings.key_slices), start=1):
        source = by_uid.get(heatmap.sop_instance_uid)
        if source is None:
            raise ReportError(
                f"heatmap slice {heatmap.sop_instance_uid} is not among the source images of series {prediction.series_instance_uid}"
            )
        probability = (
            float(prediction.chunk_probabilities[heatmap.chunk_index])
            if 0 <= heatmap.chunk_index < len(prediction.chunk_probabilities)
            else None
        )
        pixels = render_overlay(source, heatmap, model, probability)
        reference = header(source)
        try:
            sc = SCImage.from_ref_dataset(
                ref_dataset=reference,
                pixel_array=pixels,
                photometric_interpretation="RGB",
                bits_allocated=8,
                coordinate_system="PATIENT",
                series_instance_uid=series_instance_uid,
                series_number=SC_SERIES_NUMBER,
                sop_instance_uid=highdicom.UID(),
                instance_number=number,
                manufacturer=settings.manufacturer,
                patient_orientation=patient_orientation(source, heatmap.frame_number),
                series_description=series_description("AI PE heatmaps", model),
                manufacturer_model_name=long_string(model.name),
                software_versions=long_string(model.version),
                institution_name=settings.institution_name or None,
            )
        except (ValueError, TypeError, AttributeError) as exc:
            raise ReportError(f"heatmap image for series {prediction.series_instance_uid} could not be built: {exc}") from exc
        sc.copy_patient_and_study_information(reference)
        sc.BurnedInAnnotation = "YES"
        _set_body_part(sc, source)
        sc.RecognizableVisualFeatures = "NO"
        sc.LossyImageCompression = "00"
        sc.SourceImageSequence = [_source_reference(source, heatmap.frame_number)]
        sc.DerivationDescription = long_string("Grad-CAM heatmap over source slice, PE window L100/W700")
        sc.ImageComments = disclaimer(model)
        images.append(sc)
    return images
