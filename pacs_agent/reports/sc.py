"""Grad-CAM overlays of the key slices as Secondary Capture images (one new series per job).

Each image holds the source slice pixel for pixel (full source resolution, PE window L 100 / W 700,
as RGB) with the heatmap blended in on a FIXED colour scale: the colour of a pixel is its Grad-CAM
saliency (0-1 within the chunk) times the chunk's P(PE), so a negative study (P 0.07) can never look
as hot as a positive one (P 0.97). Beside the slice, a colour bar from P 0 to 1 with a marker at the
chunk's P(PE); on the slice, the patient directions of its four edges (from Image Orientation); below
it, a legend band: "AI heatmap - not for diagnosis", the slice position (Image Position z, mm), the
model and its checksum, and NOT FOR CLINICAL USE for the demo model. Nothing is drawn over anatomy
except the edge letters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom
import matplotlib
import numpy as np
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DSfloat

from pacs_agent.errors import ReportError
from pacs_agent.reports import codes
from pacs_agent.reports.provenance import (
    HEATMAP_LEGEND,
    NOT_FOR_CLINICAL_USE,
    contributing_equipment,
    disclaimer,
    keep_one_processing_item,
    long_string,
    series_description,
)
from pacs_agent.reports.sources import header, hounsfield, image_position, opposite, patient_orientation, pixel_spacing
from pacs_agent.settings import OutputSettings
from pe_model.prediction import Heatmap, ModelInfo, Prediction

#: Series Number of the SC series (a new series in the source study).
SC_SERIES_NUMBER = 9902
#: PE-specific window: level 100 HU, width 700 HU.
WINDOW_LEVEL = 100.0
WINDOW_WIDTH = 700.0
#: Colour map of the fixed scale (0 -> dark blue, 1 -> dark red).
COLORMAP = "turbo"
#: Probability-weighted saliency below this is not drawn (the slice stays grey there).
HEATMAP_FLOOR = 0.1
#: Opacity of the heatmap where it is drawn.
MAX_ALPHA = 0.45
#: The legend band is at least this wide, so its lines fit beside a small source image.
MIN_CANVAS_WIDTH = 360
LEGEND_COLOUR = (255, 255, 0)
WARNING_COLOUR = (255, 64, 64)
_MARGIN = 6


@dataclass(frozen=True)
class OverlayText:
    """What the legend band and the colour bar say for one key slice."""

    lines: tuple[str, ...]
    probability: float
    #: Patient directions at the top, bottom, left and right edges of the slice ("A", "P", "R", "L").
    edges: tuple[str, str, str, str]


def window_to_rgb(hu: np.ndarray, level: float = WINDOW_LEVEL, width: float = WINDOW_WIDTH) -> np.ndarray:
    """(Rows, Columns) HU -> (Rows, Columns, 3) uint8 grey."""
    low = level - width / 2
    grey = np.clip((hu - low) / width, 0.0, 1.0) * 255.0
    return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)


def scale_colours(values: np.ndarray) -> np.ndarray:
    """(...,) values on the fixed 0-1 scale -> (..., 3) uint8 colours of COLORMAP."""
    colours = matplotlib.colormaps[COLORMAP](np.clip(values, 0.0, 1.0))[..., :3] * 255.0
    return np.clip(np.rint(colours), 0, 255).astype(np.uint8)


def blend_heatmap(rgb: np.ndarray, saliency: np.ndarray, probability: float) -> np.ndarray:
    """Blend ``saliency`` (Rows, Columns) in [0, 1] times ``probability`` onto a (Rows, Columns, 3) image."""
    if saliency.shape != rgb.shape[:2]:
        resized = Image.fromarray(np.asarray(saliency, dtype=np.float32), mode="F").resize(
            (rgb.shape[1], rgb.shape[0]), Image.Resampling.BILINEAR
        )
        saliency = np.asarray(resized)
    saliency = np.clip(np.nan_to_num(np.asarray(saliency, dtype=np.float32)), 0.0, 1.0)
    weight = float(np.clip(probability, 0.0, 1.0))
    values = saliency * weight
    alpha = np.where(values >= HEATMAP_FLOOR, MAX_ALPHA, 0.0)[..., None]
    out = rgb.astype(np.float32) * (1 - alpha) + scale_colours(values).astype(np.float32) * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def font_size(columns: int) -> int:
    """Legible text for the image size: 13 px on a 512-wide slice, never under 11."""
    return max(11, round(columns / 40))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _outlined(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
              fill: tuple[int, int, int], anchor: str) -> None:
    draw.text(xy, text, fill=fill, font=font, anchor=anchor, stroke_width=2, stroke_fill=(0, 0, 0))


def compose(anatomy: np.ndarray, text: OverlayText) -> np.ndarray:
    """(H, W, 3) uint8 picture: ``anatomy`` at the top left, unscaled; colour bar right; legend below."""
    rows, columns = anatomy.shape[:2]
    size = font_size(columns)
    font = _font(size)
    panel = 4 * size + 3 * _MARGIN
    band = 2 * _MARGIN + (size + 4) * len(text.lines)
    text_width = max(int(np.ceil(font.getlength(line))) for line in text.lines) + 2 * _MARGIN
    width = max(columns + panel, text_width, MIN_CANVAS_WIDTH)
    height = max(rows, 8 * size) + band
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(Image.fromarray(anatomy, mode="RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)

    top, bottom, left, right = text.edges
    _outlined(draw, (columns / 2, 2), top, font, LEGEND_COLOUR, "mt")
    _outlined(draw, (columns / 2, rows - 2), bottom, font, LEGEND_COLOUR, "mb")
    _outlined(draw, (3, rows / 2), left, font, LEGEND_COLOUR, "lm")
    _outlined(draw, (columns - 3, rows / 2), right, font, LEGEND_COLOUR, "rm")

    # Colour bar: P(PE) 1 at the top, 0 at the bottom, ticks at 0, 0.5, 1 and a marker at the chunk's P.
    bar_left = columns + _MARGIN
    bar_width = size
    bar_top = _MARGIN + size + 4
    bar_height = max(rows, 8 * size) - bar_top - _MARGIN - size // 2
    levels = np.linspace(1.0, 0.0, bar_height, dtype=np.float32)
    bar = np.repeat(scale_colours(levels)[:, None, :], bar_width, axis=1)
    canvas.paste(Image.fromarray(bar, mode="RGB"), (bar_left, bar_top))
    draw.text((bar_left, _MARGIN), "P(PE)", fill=LEGEND_COLOUR, font=font, anchor="lt")
    for value in (0.0, 0.5, 1.0):
        y = bar_top + (1.0 - value) * (bar_height - 1)
        draw.line([(bar_left + bar_width, y), (bar_left + bar_width + 3, y)], fill=LEGEND_COLOUR)
        draw.text((bar_left + bar_width + 5, y), f"{value:.1f}", fill=LEGEND_COLOUR, font=font, anchor="lm")
    marker_y = bar_top + (1.0 - float(np.clip(text.probability, 0.0, 1.0))) * (bar_height - 1)
    draw.polygon(
        [(bar_left - 1, marker_y), (bar_left - 1 - size // 2, marker_y - size // 3), (bar_left - 1 - size // 2, marker_y + size // 3)],
        fill=(255, 255, 255),
    )

    band_top = max(rows, 8 * size) + _MARGIN
    for i, line in enumerate(text.lines):
        colour = WARNING_COLOUR if line == NOT_FOR_CLINICAL_USE else LEGEND_COLOUR
        draw.text((_MARGIN, band_top + i * (size + 4)), line, fill=colour, font=font, anchor="lt")
    return np.asarray(canvas, dtype=np.uint8)


def overlay_text(source: Dataset, heatmap: Heatmap, model: ModelInfo, probability: float, series_probability: float) -> OverlayText:
    """Legend lines, the colour-bar marker and the edge letters of one key slice."""
    row_direction, column_direction = patient_orientation(source, heatmap.frame_number)
    position = image_position(source, heatmap.frame_number)
    where = f"slice z = {position[2]:.1f} mm" if position is not None else "slice position unknown"
    instance = source.get("InstanceNumber")
    if instance not in (None, ""):
        where += f", instance {instance}"
    if heatmap.frame_number is not None:
        where += f", frame {heatmap.frame_number}"
    lines = [
        HEATMAP_LEGEND,
        f"colour = saliency x P(PE) of this slab ({probability:.2f}); series P(PE) {series_probability:.2f}",
        where,
        f"{model.name} {model.version} sha256 {model.sha256[:12]}",
    ]
    if model.not_for_clinical_use:
        lines.append(NOT_FOR_CLINICAL_USE)
    edges = (opposite(column_direction), column_direction, opposite(row_direction), row_direction)
    return OverlayText(lines=tuple(lines), probability=probability, edges=edges)


def render_overlay(source: Dataset, heatmap: Heatmap, model: ModelInfo, probability: float, series_probability: float) -> np.ndarray:
    """(H, W, 3) uint8 picture of one key slice: windowed slice + heatmap + edge letters, colour bar, legend."""
    hu = hounsfield(source, heatmap.frame_number)
    anatomy = blend_heatmap(window_to_rgb(hu), heatmap.values, probability)
    return compose(anatomy, overlay_text(source, heatmap, model, probability, series_probability))


def chunk_probability(prediction: Prediction, heatmap: Heatmap) -> float:
    """P(PE) of the heatmap's chunk; the series P(PE) when the chunk index is unknown."""
    if 0 <= heatmap.chunk_index < len(prediction.chunk_probabilities):
        return float(prediction.chunk_probabilities[heatmap.chunk_index])
    return float(prediction.series_pe_probability)


def ranked_heatmaps(prediction: Prediction, limit: int) -> list[Heatmap]:
    """Heatmaps of the top chunks (highest chunk PE probability first), one per slice, at most ``limit``."""
    chosen: list[Heatmap] = []
    seen: set[tuple[str, int | None]] = set()
    for h in sorted(prediction.heatmaps, key=lambda h: chunk_probability(prediction, h), reverse=True):
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
    purpose.CodeValue = codes.SOURCE_IMAGE_FOR_PROCESSING.value
    purpose.CodingSchemeDesignator = codes.SOURCE_IMAGE_FOR_PROCESSING.scheme_designator
    purpose.CodeMeaning = codes.SOURCE_IMAGE_FOR_PROCESSING.meaning
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
        pixels = render_overlay(source, heatmap, model, chunk_probability(prediction, heatmap), prediction.series_pe_probability)
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
                contributing_equipment=[contributing_equipment(model, settings.manufacturer)],
                specific_character_set="ISO_IR 192",
                transfer_syntax_uid=ExplicitVRLittleEndian,
            )
        except (ValueError, TypeError, AttributeError) as exc:
            raise ReportError(f"heatmap image for series {prediction.series_instance_uid} could not be built: {exc}") from exc
        sc.copy_patient_and_study_information(reference)
        keep_one_processing_item(sc, model)
        sc.SpecificCharacterSet = "ISO_IR 192"
        spacing = pixel_spacing(source, heatmap.frame_number)
        if spacing is not None:  # the slice is pasted 1:1, so the source's spacing holds for it
            sc.PixelSpacing = [DSfloat(v) for v in spacing]
        sc.BurnedInAnnotation = "YES"
        _set_body_part(sc, source)
        sc.RecognizableVisualFeatures = "NO"
        sc.LossyImageCompression = "00"
        sc.SourceImageSequence = [_source_reference(source, heatmap.frame_number)]
        sc.DerivationDescription = long_string("Grad-CAM x P(PE) over source slice, PE window L100/W700")
        sc.ImageComments = disclaimer(model)
        images.append(sc)
    return images
