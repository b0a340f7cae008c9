"""Optional FRACTIONAL segmentation of the Grad-CAM heatmaps (settings.outputs.segmentation).

A viewer can show it as a colour overlay that the reader can switch off, unlike the burned-in SC.
Values are a PROBABILITY-type saliency in [0, 1] stored in 8 bits; the segment says it is a
Grad-CAM saliency, not a delineation of the embolus.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from highdicom.content import AlgorithmIdentificationSequence
from highdicom.seg import Segmentation, SegmentAlgorithmTypeValues, SegmentationTypeValues, SegmentDescription
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes

from pacs_agent.errors import ReportError
from pacs_agent.reports import codes
from pacs_agent.reports.provenance import contributing_equipment, keep_one_processing_item, long_string, series_description
from pacs_agent.reports.sc import ranked_heatmaps
from pacs_agent.settings import OutputSettings
from pe_model.labels import THRESHOLD
from pe_model.prediction import Heatmap, Prediction

#: Series Number of the SEG series (a new series in the source study).
SEG_SERIES_NUMBER = 9903
#: Device Serial Number is type 1 in the SEG's Enhanced General Equipment module.
DEVICE_SERIAL_NUMBER = "pe-triage"


def _fit(values: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """A heatmap as (rows, columns) float32 in [0, 1], resampled when its grid differs."""
    values = np.asarray(values, dtype=np.float32)
    if values.shape != (rows, columns):
        values = np.asarray(
            Image.fromarray(values, mode="F").resize((columns, rows), Image.Resampling.BILINEAR), dtype=np.float32
        )
    return np.clip(np.nan_to_num(values), 0.0, 1.0)


def _frames(heatmaps: Sequence[Heatmap], by_uid: dict[str, Dataset]) -> tuple[list[Dataset], np.ndarray]:
    """Source images and the (frames, Rows, Columns) fractional array that lines up with them."""
    multi = [h for h in heatmaps if h.frame_number is not None]
    if multi:
        source = by_uid[multi[0].sop_instance_uid]
        rows, columns, n_frames = int(source.Rows), int(source.Columns), int(source.get("NumberOfFrames", 1))
        array = np.zeros((n_frames, rows, columns), dtype=np.float32)
        for h in multi:
            if h.sop_instance_uid != multi[0].sop_instance_uid:
                continue
            frame = int(h.frame_number or 1)
            array[frame - 1] = np.maximum(array[frame - 1], _fit(h.values, rows, columns))
        return [source], array
    sources = [by_uid[h.sop_instance_uid] for h in heatmaps]
    array = np.stack([_fit(h.values, int(s.Rows), int(s.Columns)) for h, s in zip(heatmaps, sources, strict=True)])
    return sources, array


def build_segmentation(
    prediction: Prediction,
    source_datasets: Sequence[Dataset],
    settings: OutputSettings,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
) -> Segmentation | None:
    """The SEG of the top key slices' heatmaps, or None when the prediction has no heatmap."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source_datasets}
    heatmaps = ranked_heatmaps(prediction, max(settings.key_slices, 1))
    if not heatmaps:
        return None
    missing = [h.sop_instance_uid for h in heatmaps if h.sop_instance_uid not in by_uid]
    if missing:
        raise ReportError(f"heatmap slice {missing[0]} is not among the source images of series {prediction.series_instance_uid}")
    sources, array = _frames(heatmaps, by_uid)
    model = prediction.model
    algorithm = AlgorithmIdentificationSequence(
        name=long_string(model.name),
        family=dicom_codes.cid7162.ArtificialIntelligence,
        version=long_string(model.version),
        source=long_string(settings.manufacturer) if settings.manufacturer else None,
        parameters={
            "checkpoint_sha256": model.sha256,
            "decision_threshold": str(THRESHOLD),
            "not_for_clinical_use": str(model.not_for_clinical_use).lower(),
        },
    )
    segment = SegmentDescription(
        segment_number=1,
        segment_label="PE Grad-CAM heatmap",
        segmented_property_category=codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        segmented_property_type=dicom_codes.cid7151.Embolus,
        algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    try:
        seg = Segmentation(
            source_images=sources,
            pixel_array=array,
            segmentation_type=SegmentationTypeValues.FRACTIONAL,
            segment_descriptions=[segment],
            series_instance_uid=series_instance_uid,
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer=settings.manufacturer,
            manufacturer_model_name=long_string(model.name),
            software_versions=long_string(model.version),
            device_serial_number=DEVICE_SERIAL_NUMBER,
            content_description=long_string("Grad-CAM saliency, unverified AI output"),
            content_label="PE_GRADCAM",
            series_description=series_description("AI PE heatmap segmentation", model),
            # Enhanced CT: only the key frames are kept; an all-zero array keeps its frames (SEG needs one).
            omit_empty_frames=bool(np.any(np.rint(array * 255) > 0)),
            contributing_equipment=[contributing_equipment(model, settings.manufacturer)],
            specific_character_set="ISO_IR 192",
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ReportError(f"heatmap segmentation for series {prediction.series_instance_uid} could not be built: {exc}") from exc
    keep_one_processing_item(seg, model)
    return seg
