"""Evaluation metrics: the RSNA weighted log loss, AUROC with a DeLong 95% CI, operating points, consistency.

Everything here works on plain numpy arrays so that `pe-train evaluate`, the tests and a user with the
real RSNA-STR data compute the same numbers. Conventions:

- exam labels and predictions are mappings ``label -> (E,)`` over the nine labels of
  :data:`pe_model.labels.EXAM_LABELS`;
- image (or chunk) labels and predictions are sequences of ``E`` one-dimensional arrays, one per exam,
  holding that exam's images in any order;
- a prediction is positive when its probability is strictly above the threshold (docs/METHOD.md: ``> 0.5``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

from pe_model.consistency import violations
from pe_model.labels import EXAM_LABEL_WEIGHTS, EXAM_LABELS, IMAGE_LABEL, IMAGE_WEIGHT, THRESHOLD
from training.errors import EvaluationInputError

#: Specificity at which the image-level sensitivity is reported (the seed's abstract: 0.86 at 0.85).
REPORTED_SPECIFICITY: float = 0.85

#: Key of the exam-level PE result (truth: any positive image; score: the highest image probability).
EXAM_PE_KEY: str = "exam_pe"


def _as_binary(y_true: np.ndarray | Sequence[float], name: str) -> np.ndarray:
    """Validate 0/1 labels and return them as a 1-D bool array."""
    array = np.asarray(y_true)
    if array.ndim != 1:
        raise EvaluationInputError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.dtype == bool:
        return array
    if not np.issubdtype(array.dtype, np.number):
        raise EvaluationInputError(f"{name} must hold 0/1 labels, got dtype {array.dtype}")
    if not np.all((array == 0) | (array == 1)):
        raise EvaluationInputError(f"{name} must hold only 0 and 1")
    return array.astype(bool)


def _as_scores(y_score: np.ndarray | Sequence[float], name: str, length: int) -> np.ndarray:
    """Validate finite scores of the expected length and return them as a 1-D float64 array."""
    try:
        array = np.asarray(y_score, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise EvaluationInputError(f"{name} must hold numbers") from exc
    if array.ndim != 1:
        raise EvaluationInputError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.shape[0] != length:
        raise EvaluationInputError(f"{name} has {array.shape[0]} values but the labels have {length}")
    if not np.all(np.isfinite(array)):
        raise EvaluationInputError(f"{name} holds NaN or infinite values")
    return array


def _as_probabilities(values: np.ndarray | Sequence[float], name: str, length: int) -> np.ndarray:
    """Like :func:`_as_scores`, and also require every value in [0, 1]."""
    array = _as_scores(values, name, length)
    if np.any((array < 0.0) | (array > 1.0)):
        raise EvaluationInputError(f"{name} holds values outside [0, 1]; expected probabilities")
    return array


def _labels_and_scores(
    y_true: np.ndarray | Sequence[float], y_score: np.ndarray | Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    truth = _as_binary(y_true, "y_true")
    return truth, _as_scores(y_score, "y_score", truth.shape[0])


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` (N,), ties sharing the mean of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    before = np.cumsum(counts) - counts
    return (before + (counts + 1) / 2.0)[inverse]


def _bce(y_true: np.ndarray, y_pred: np.ndarray, eps: float) -> np.ndarray:
    """Element-wise binary cross-entropy; each log's argument (p or 1 - p) is floored at ``eps``.

    Flooring ``1 - p`` rather than clipping ``p`` to ``1 - eps`` keeps a certain mistake at exactly
    ``-ln(eps)`` (``1 - 1e-15`` is not representable in float64).
    """
    log_p = np.log(np.maximum(y_pred, eps))
    log_not_p = np.log(np.maximum(1.0 - y_pred, eps))
    return -(y_true * log_p + (1.0 - y_true) * log_not_p)


def _check_exam_mapping(values: Mapping[str, Any], name: str, n_exams: int) -> dict[str, np.ndarray]:
    """Exam probabilities as float64 arrays (E,) for the nine labels, validated."""
    missing = [label for label in EXAM_LABELS if label not in values]
    if missing:
        raise EvaluationInputError(f"{name} lacks the exam label(s) {', '.join(missing)}")
    out: dict[str, np.ndarray] = {}
    for label in EXAM_LABELS:
        array = np.asarray(values[label], dtype=np.float64)
        if array.ndim != 1:
            raise EvaluationInputError(f"{name}[{label!r}] must be one-dimensional, got shape {array.shape}")
        out[label] = _as_probabilities(array, f"{name}[{label!r}]", n_exams)
    return out


def _check_exam_labels(values: Mapping[str, Any], n_exams: int) -> dict[str, np.ndarray]:
    """Exam truth as float 0/1 arrays (E,), validated."""
    truth = _check_exam_mapping(values, "exam_true", n_exams)
    for label, array in truth.items():
        _as_binary(array, f"exam_true[{label!r}]")
    return truth


def _check_images(
    image_true: Sequence[np.ndarray], image_pred: Sequence[np.ndarray], n_exams: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if len(image_true) != n_exams or len(image_pred) != n_exams:
        raise EvaluationInputError(
            f"image labels and predictions must hold one array per exam ({n_exams}), "
            f"got {len(image_true)} and {len(image_pred)}"
        )
    truths: list[np.ndarray] = []
    preds: list[np.ndarray] = []
    for index, (truth, pred) in enumerate(zip(image_true, image_pred, strict=True)):
        truth_array = _as_binary(np.asarray(truth), f"image_true[{index}]").astype(np.float64)
        if truth_array.shape[0] == 0:
            raise EvaluationInputError(f"exam {index} has no images; every exam needs at least one")
        truths.append(truth_array)
        preds.append(_as_probabilities(pred, f"image_pred[{index}]", truth_array.shape[0]))
    return truths, preds


def rsna_weighted_log_loss(
    exam_true: Mapping[str, np.ndarray],
    exam_pred: Mapping[str, np.ndarray],
    image_true: Sequence[np.ndarray],
    image_pred: Sequence[np.ndarray],
    eps: float = 1e-15,
) -> float:
    """The RSNA-STR competition metric, exactly as docs/METHOD.md defines it (lower is better).

    ``total = (sum_ij w_j BCE_ij + sum_ik w q_i BCE_ik) / (sum_ij w_j + sum_ik w q_i)`` with exam label
    weights ``w_j``, image weight ``w`` and ``q_i`` = positive images / images of exam ``i``. The images of
    an exam with no positive image therefore carry no weight, in the numerator and in the denominator.
    Shapes: exam arrays (E,); image_true[i], image_pred[i] (K_i,).
    """
    n_exams = len(image_true)
    if n_exams == 0:
        raise EvaluationInputError("the weighted log loss needs at least one exam")
    truth = _check_exam_labels(exam_true, n_exams)
    pred = _check_exam_mapping(exam_pred, "exam_pred", n_exams)
    images_true, images_pred = _check_images(image_true, image_pred, n_exams)

    numerator = 0.0
    denominator = 0.0
    for label in EXAM_LABELS:
        weight = EXAM_LABEL_WEIGHTS[label]
        numerator += weight * float(_bce(truth[label], pred[label], eps).sum())
        denominator += weight * n_exams
    for truth_images, pred_images in zip(images_true, images_pred, strict=True):
        q = float(truth_images.mean())
        numerator += IMAGE_WEIGHT * q * float(_bce(truth_images, pred_images, eps).sum())
        denominator += IMAGE_WEIGHT * q * truth_images.shape[0]
    return numerator / denominator


def auroc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half); NaN when either class is absent. Shapes (N,)."""
    truth, scores = _labels_and_scores(y_true, y_score)
    n_pos = int(truth.sum())
    n_neg = truth.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _midranks(scores)
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def delong_ci(y_true: np.ndarray, y_score: np.ndarray, alpha: float = 0.95) -> tuple[float, float, float]:
    """AUROC with its DeLong confidence interval at level ``alpha``: ``(auc, low, high)``.

    Uses the fast midrank algorithm of Sun & Xu (IEEE SPL 2014), O(N log N), which gives exactly the
    variance of DeLong, DeLong & Clarke-Pearson (1988). The interval is the normal one, clipped to [0, 1]
    like pROC's. NaN bounds when either class has fewer than two members (the variance is undefined);
    all NaN when a class is absent. Shapes (N,).
    """
    if not 0.0 < alpha < 1.0:
        raise EvaluationInputError(f"the confidence level must lie strictly between 0 and 1, got {alpha}")
    truth, scores = _labels_and_scores(y_true, y_score)
    positives = scores[truth]
    negatives = scores[~truth]
    m, n = positives.shape[0], negatives.shape[0]
    if m == 0 or n == 0:
        return math.nan, math.nan, math.nan
    combined = _midranks(np.concatenate([positives, negatives]))
    auc = float((combined[:m].sum() - m * (m + 1) / 2.0) / (m * n))
    if m < 2 or n < 2:
        return auc, math.nan, math.nan
    # Placement values: v10[i] = share of negatives below positive i; v01[j] = share of positives above negative j.
    v10 = (combined[:m] - _midranks(positives)) / n
    v01 = 1.0 - (combined[m:] - _midranks(negatives)) / m
    variance = float(np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n)
    half_width = NormalDist().inv_cdf(0.5 + alpha / 2.0) * math.sqrt(max(variance, 0.0))
    return auc, max(0.0, auc - half_width), min(1.0, auc + half_width)


def roc_curve(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr, thresholds)``, each (T,), from (0, 0) to (1, 1).

    Point ``t`` counts as positive every score ``>= thresholds[t]``; the first threshold is ``+inf``.
    Raises when either class is absent (the curve is undefined).
    """
    truth, scores = _labels_and_scores(y_true, y_score)
    n_pos = int(truth.sum())
    n_neg = truth.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        raise EvaluationInputError("a ROC curve needs at least one positive and one negative case")
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    sorted_truth = truth[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.shape[0] - 1]
    true_positives = np.cumsum(sorted_truth)[last_of_value]
    false_positives = (last_of_value + 1) - true_positives
    tpr = np.r_[0.0, true_positives / n_pos]
    fpr = np.r_[0.0, false_positives / n_neg]
    thresholds = np.r_[np.inf, sorted_scores[last_of_value]]
    return fpr, tpr, thresholds


def sensitivity_specificity(
    y_true: np.ndarray, y_score: np.ndarray, threshold: float = THRESHOLD
) -> tuple[float, float]:
    """Sensitivity and specificity when scores strictly above ``threshold`` are called positive.

    Either value is NaN when its class is absent. Shapes (N,).
    """
    truth, scores = _labels_and_scores(y_true, y_score)
    called = scores > threshold
    n_pos = int(truth.sum())
    n_neg = truth.shape[0] - n_pos
    sensitivity = float((called & truth).sum() / n_pos) if n_pos else math.nan
    specificity = float((~called & ~truth).sum() / n_neg) if n_neg else math.nan
    return sensitivity, specificity


def threshold_at_specificity(y_true: np.ndarray, y_score: np.ndarray, specificity: float) -> float:
    """The lowest threshold whose specificity (scores ``<= threshold`` called negative) is at least the target.

    The lowest such threshold gives the highest sensitivity at that specificity. It is always one of the
    negative cases' scores, except for a target of 0, where it lies just below the lowest score.
    Shapes (N,).
    """
    if not 0.0 <= specificity <= 1.0:
        raise EvaluationInputError(f"the target specificity must lie in [0, 1], got {specificity}")
    truth, scores = _labels_and_scores(y_true, y_score)
    negatives = np.sort(scores[~truth])
    if negatives.shape[0] == 0:
        raise EvaluationInputError("a threshold at a given specificity needs at least one negative case")
    # The target is met within 1e-9 of specificity (not of the count: a target of 1e-9 asks for nothing).
    needed = math.ceil((specificity - 1e-9) * negatives.shape[0])
    if needed <= 0:
        return float(np.nextafter(scores.min(), -np.inf))
    return float(negatives[needed - 1])


def count_violations(
    pe_probabilities: np.ndarray | Sequence[np.ndarray], exam_pred: Mapping[str, np.ndarray]
) -> int:
    """Number of exams whose outputs break at least one consistency rule (docs/METHOD.md).

    The rules are those of :func:`pe_model.consistency.violations`, the same check the predictor's
    outputs pass, so training and inference count violations alike.

    ``pe_probabilities`` is either the exam-level PE probability (E,) (the highest image/chunk probability)
    or one array of image/chunk probabilities per exam, of which the highest is taken.
    """
    if isinstance(pe_probabilities, np.ndarray) and pe_probabilities.ndim == 1 and pe_probabilities.dtype != object:
        exam_pe = _as_probabilities(pe_probabilities, "pe_probabilities", pe_probabilities.shape[0])
    else:
        maxima = []
        for index, images in enumerate(pe_probabilities):
            array = np.asarray(images, dtype=np.float64)
            if array.ndim != 1 or array.shape[0] == 0:
                raise EvaluationInputError(f"image probabilities of exam {index} must be a non-empty 1-D array")
            maxima.append(float(_as_probabilities(array, f"image probabilities of exam {index}", array.shape[0]).max()))
        exam_pe = np.asarray(maxima, dtype=np.float64)
    preds = _check_exam_mapping(exam_pred, "exam_pred", exam_pe.shape[0])
    return sum(
        1
        for index in range(exam_pe.shape[0])
        if violations(float(exam_pe[index]), {label: float(preds[label][index]) for label in EXAM_LABELS})
    )


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def label_summary(truth: np.ndarray, scores: np.ndarray, threshold: float = THRESHOLD) -> dict[str, Any]:
    """AUROC [95% DeLong CI], class counts and the operating point at ``threshold`` of one binary label."""
    return _label_summary(np.asarray(truth), np.asarray(scores), threshold)


def _label_summary(truth: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """AUROC [95% CI], class counts and the operating point at ``threshold`` of one label."""
    auc, low, high = delong_ci(truth, scores)
    sensitivity, specificity = sensitivity_specificity(truth, scores, threshold)
    n_pos = int(np.asarray(truth).astype(bool).sum())
    return {
        "auroc": _none_if_nan(auc),
        "ci_low": _none_if_nan(low),
        "ci_high": _none_if_nan(high),
        "n_pos": n_pos,
        "n_neg": int(np.asarray(truth).shape[0]) - n_pos,
        "threshold": float(threshold),
        "sensitivity": _none_if_nan(sensitivity),
        "specificity": _none_if_nan(specificity),
    }


def evaluate_predictions(
    exam_true: Mapping[str, np.ndarray],
    exam_pred: Mapping[str, np.ndarray],
    image_true: Sequence[np.ndarray],
    image_pred: Sequence[np.ndarray],
    *,
    exam_pred_corrected: Mapping[str, np.ndarray] | None = None,
    image_pred_corrected: Sequence[np.ndarray] | None = None,
    thresholds: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Everything `metrics.json` reports, JSON-safe (NaN becomes None).

    ``thresholds`` maps an exam label or ``pe_present_on_image`` to its decision threshold (default 0.5).
    The corrected predictions are those after the consistency correction; when neither is given the
    corrected loss and the violations "after" are None. The result holds ``rsna_weighted_log_loss``,
    ``rsna_weighted_log_loss_corrected``, ``labels`` (per exam label: auroc, ci_low, ci_high, n_pos, n_neg,
    threshold, sensitivity, specificity), ``image`` (the same for the image/chunk PE label plus the
    sensitivity at 0.85 specificity), ``exam_pe`` (the same for the exam-level PE call from the highest image
    probability), ``consistency_violations`` {before, after}, ``n_exams`` and ``n_images``.
    """
    chosen = dict(thresholds or {})
    unknown = sorted(set(chosen) - set(EXAM_LABELS) - {IMAGE_LABEL, EXAM_PE_KEY})
    if unknown:
        raise EvaluationInputError(f"thresholds given for unknown label(s) {', '.join(unknown)}")
    loss = rsna_weighted_log_loss(exam_true, exam_pred, image_true, image_pred)
    n_exams = len(image_true)
    truth = _check_exam_labels(exam_true, n_exams)
    pred = _check_exam_mapping(exam_pred, "exam_pred", n_exams)
    images_true, images_pred = _check_images(image_true, image_pred, n_exams)

    corrected = exam_pred_corrected is not None or image_pred_corrected is not None
    exam_after = exam_pred_corrected if exam_pred_corrected is not None else exam_pred
    image_after = image_pred_corrected if image_pred_corrected is not None else image_pred
    loss_corrected = (
        rsna_weighted_log_loss(exam_true, exam_after, image_true, image_after) if corrected else None
    )

    labels = {
        label: _label_summary(truth[label], pred[label], chosen.get(label, THRESHOLD)) for label in EXAM_LABELS
    }
    flat_true = np.concatenate(images_true)
    flat_pred = np.concatenate(images_pred)
    image_summary = _label_summary(flat_true, flat_pred, chosen.get(IMAGE_LABEL, THRESHOLD))
    n_image_neg = image_summary["n_neg"]
    if n_image_neg and image_summary["n_pos"]:
        at = threshold_at_specificity(flat_true, flat_pred, REPORTED_SPECIFICITY)
        sensitivity, specificity = sensitivity_specificity(flat_true, flat_pred, at)
        image_summary["threshold_at_0.85_specificity"] = at
        image_summary["sensitivity_at_0.85_specificity"] = _none_if_nan(sensitivity)
        image_summary["specificity_at_0.85_specificity"] = _none_if_nan(specificity)
    else:
        image_summary["threshold_at_0.85_specificity"] = None
        image_summary["sensitivity_at_0.85_specificity"] = None
        image_summary["specificity_at_0.85_specificity"] = None
    exam_pe_true = np.asarray([truth_images.max() for truth_images in images_true])
    exam_pe_score = np.asarray([pred_images.max() for pred_images in images_pred])
    exam_pe = _label_summary(exam_pe_true, exam_pe_score, chosen.get(EXAM_PE_KEY, THRESHOLD))

    return {
        "rsna_weighted_log_loss": float(loss),
        "rsna_weighted_log_loss_corrected": None if loss_corrected is None else float(loss_corrected),
        "labels": labels,
        "image": image_summary,
        EXAM_PE_KEY: exam_pe,
        "consistency_violations": {
            "before": count_violations(list(images_pred), pred),
            "after": count_violations(list(image_after), exam_after) if corrected else None,
        },
        "n_exams": int(n_exams),
        "n_images": int(flat_true.shape[0]),
    }
