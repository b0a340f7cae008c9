"""The RSNA-STR PE label set and the competition weights (docs/METHOD.md)."""

from __future__ import annotations

from typing import Final

#: The nine exam-level labels, in the order every tensor and file of this project uses.
EXAM_LABELS: Final[tuple[str, ...]] = (
    "negative_exam_for_pe",
    "indeterminate",
    "chronic_pe",
    "acute_and_chronic_pe",
    "central_pe",
    "leftsided_pe",
    "rightsided_pe",
    "rv_lv_ratio_gte_1",
    "rv_lv_ratio_lt_1",
)

#: RSNA weighted log loss: weight of each exam label.
EXAM_LABEL_WEIGHTS: Final[dict[str, float]] = {
    "negative_exam_for_pe": 0.0736196319,
    "indeterminate": 0.09202453988,
    "chronic_pe": 0.1042944785,
    "acute_and_chronic_pe": 0.1042944785,
    "central_pe": 0.1877300613,
    "leftsided_pe": 0.06257668712,
    "rightsided_pe": 0.06257668712,
    "rv_lv_ratio_gte_1": 0.2346625767,
    "rv_lv_ratio_lt_1": 0.0782208589,
}

#: Weight of one image-level (here: chunk-level) term, scaled per exam by q_i.
IMAGE_WEIGHT: Final[float] = 0.07361963

#: Name of the image-level label in train.csv.
IMAGE_LABEL: Final[str] = "pe_present_on_image"

#: Key of the series-level PE probability (max over chunks) in ``Prediction.probabilities``.
SERIES_PE_KEY: Final[str] = "pe_present"

#: Decision threshold used by the consistency rules.
THRESHOLD: Final[float] = 0.5
