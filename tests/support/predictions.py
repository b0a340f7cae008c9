"""Hand-built `Prediction` values over a list of source datasets, for report and delivery tests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset

from pe_model.labels import EXAM_LABELS, SERIES_PE_KEY
from pe_model.prediction import Heatmap, KeyImage, ModelInfo, Prediction

DEMO_SHA256 = "0f" * 32
CLINICAL_SHA256 = "ab" * 32


def model_info(*, not_for_clinical_use: bool = True) -> ModelInfo:
    return ModelInfo(
        name="pe-r3d18-tcn-demo" if not_for_clinical_use else "pe-r3d18-tcn",
        version="0.1.0",
        sha256=DEMO_SHA256 if not_for_clinical_use else CLINICAL_SHA256,
        intended_use="triage of CT pulmonary angiograms for pulmonary embolism (decision support)",
        training_data="synthetic phantoms" if not_for_clinical_use else "RSNA-STR PE CT",
        not_for_clinical_use=not_for_clinical_use,
    )


def _heatmap(rows: int, columns: int, centre: tuple[float, float]) -> np.ndarray:
    """(Rows, Columns) float32 in [0, 1]: a Gaussian blob around ``centre`` (row, column)."""
    yy, xx = np.mgrid[0:rows, 0:columns].astype(np.float32)
    sigma = max(rows, columns) / 8
    blob = np.exp(-(((yy - centre[0]) ** 2) + ((xx - centre[1]) ** 2)) / (2 * sigma**2))
    return (blob / blob.max()).astype(np.float32)


def make_prediction(
    datasets: Sequence[Dataset],
    *,
    pe_present: bool = True,
    rv_lv_gte_1: bool = True,
    chronic: bool = False,
    not_for_clinical_use: bool = True,
    n_key_images: int = 3,
    chunk_size: int = 2,
) -> Prediction:
    """A consistent prediction (docs/METHOD.md label rules) whose key images are among ``datasets``.

    One multi-frame dataset (Enhanced CT) is cut into chunks of frames; key images and heatmaps then
    carry 1-based frame numbers.
    """
    multi_frame = len(datasets) == 1 and int(datasets[0].get("NumberOfFrames", 1) or 1) > 1
    if multi_frame:
        uid = str(datasets[0].SOPInstanceUID)
        units: list[tuple[str, int | None]] = [(uid, f) for f in range(1, int(datasets[0].NumberOfFrames) + 1)]
    else:
        units = [(str(ds.SOPInstanceUID), None) for ds in datasets]
    uids = list(dict.fromkeys(u for u, _ in units))
    unit_chunks = [units[i : i + chunk_size] for i in range(0, len(units), chunk_size)]
    chunks = tuple(tuple(dict.fromkeys(u for u, _ in chunk)) for chunk in unit_chunks)
    p_pe = 0.93 if pe_present else 0.08
    chunk_probabilities = tuple(
        (p_pe if i == 1 else 0.6 - 0.05 * i if pe_present else 0.05 + 0.01 * i) for i in range(len(chunks))
    )
    probabilities = {
        "negative_exam_for_pe": 0.04 if pe_present else 0.9,
        "indeterminate": 0.02 if pe_present else 0.05,
        "chronic_pe": 0.7 if (pe_present and chronic) else 0.1,
        "acute_and_chronic_pe": 0.05,
        "central_pe": 0.8 if pe_present else 0.02,
        "leftsided_pe": 0.3 if pe_present else 0.03,
        "rightsided_pe": 0.85 if pe_present else 0.04,
        "rv_lv_ratio_gte_1": 0.75 if (pe_present and rv_lv_gte_1) else 0.1,
        "rv_lv_ratio_lt_1": 0.25 if (pe_present and rv_lv_gte_1) else (0.8 if pe_present else 0.1),
        SERIES_PE_KEY: max(chunk_probabilities),
    }
    labels = {name: probabilities[name] > 0.5 for name in EXAM_LABELS}
    ranked = sorted(range(len(chunks)), key=lambda i: -chunk_probabilities[i])[:n_key_images]
    middle = {i: unit_chunks[i][len(unit_chunks[i]) // 2] for i in ranked}
    key_images = tuple(
        KeyImage(sop_instance_uid=middle[i][0], pe_probability=chunk_probabilities[i], chunk_index=i, frame_number=middle[i][1])
        for i in ranked
    )
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    heatmaps = tuple(
        Heatmap(
            sop_instance_uid=k.sop_instance_uid,
            chunk_index=k.chunk_index,
            values=_heatmap(int(by_uid[k.sop_instance_uid].Rows), int(by_uid[k.sop_instance_uid].Columns), (20.0, 40.0)),
            peak_position_patient=(0.0, 0.0, 0.0),
            frame_number=k.frame_number,
        )
        for k in key_images
    )
    return Prediction(
        study_instance_uid=str(datasets[0].StudyInstanceUID),
        series_instance_uid=str(datasets[0].SeriesInstanceUID),
        pe_present=pe_present,
        probabilities=probabilities,
        labels=labels,
        chunk_probabilities=chunk_probabilities,
        chunk_sop_instance_uids=chunks,
        key_images=key_images,
        attention={name: tuple(1 / len(chunks) for _ in chunks) for name in EXAM_LABELS},
        heatmaps=heatmaps,
        model=model_info(not_for_clinical_use=not_for_clinical_use),
        timings_s={"total": 1.0},
        source_sop_instance_uids=tuple(uids),
    )
