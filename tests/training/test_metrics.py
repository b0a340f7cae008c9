"""The evaluation metrics against hand-computed values, brute force and resampling."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pe_model.labels import EXAM_LABEL_WEIGHTS, EXAM_LABELS, IMAGE_WEIGHT
from training.errors import EvaluationInputError, TrainingError
from training.metrics import (
    auroc,
    count_violations,
    delong_ci,
    evaluate_predictions,
    roc_curve,
    rsna_weighted_log_loss,
    sensitivity_specificity,
    threshold_at_specificity,
)

LN2 = math.log(2.0)
W_EXAM = sum(EXAM_LABEL_WEIGHTS.values())


def _exams(value: float, n: int) -> dict[str, np.ndarray]:
    return {label: np.full(n, value) for label in EXAM_LABELS}


def _three_exams() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Exam A (4 images, 2 positive), exam B (3 images, none positive), exam C (3 images, 2 positive)."""
    exam_true = _exams(0.0, 3)
    exam_true["central_pe"] = np.array([1.0, 0.0, 1.0])
    exam_true["negative_exam_for_pe"] = np.array([0.0, 1.0, 0.0])
    exam_pred = _exams(0.5, 3)
    exam_pred["central_pe"] = np.array([0.9, 0.5, 0.5])
    image_true = [np.array([1, 1, 0, 0]), np.array([0, 0, 0]), np.array([0, 1, 1])]
    image_pred = [np.array([0.9, 0.6, 0.2, 0.5]), np.array([0.99, 0.99, 0.99]), np.array([0.1, 0.7, 0.4])]
    return exam_true, exam_pred, image_true, image_pred


def test_weighted_log_loss_matches_the_hand_computed_value() -> None:
    exam_true, exam_pred, image_true, image_pred = _three_exams()
    w_central = EXAM_LABEL_WEIGHTS["central_pe"]
    # Exam terms: every prediction is 0.5 (BCE ln 2) except central_pe of exam A: truth 1, p 0.9.
    exam_numerator = 3 * W_EXAM * LN2 - w_central * LN2 + w_central * -math.log(0.9)
    exam_denominator = 3 * W_EXAM
    # Exam A: q = 2/4; BCE 1@0.9, 1@0.6, 0@0.2, 0@0.5.
    a_bce = -math.log(0.9) - math.log(0.6) - math.log(0.8) + LN2
    # Exam B: q = 0, its images (all predicted 0.99 on negative truth) weigh nothing.
    # Exam C: q = 2/3; BCE 0@0.1, 1@0.7, 1@0.4.
    c_bce = -math.log(0.9) - math.log(0.7) - math.log(0.4)
    image_numerator = IMAGE_WEIGHT * 0.5 * a_bce + IMAGE_WEIGHT * (2 / 3) * c_bce
    image_denominator = IMAGE_WEIGHT * 0.5 * 4 + IMAGE_WEIGHT * (2 / 3) * 3
    expected = (exam_numerator + image_numerator) / (exam_denominator + image_denominator)

    got = rsna_weighted_log_loss(exam_true, exam_pred, image_true, image_pred)

    assert got == pytest.approx(expected, rel=1e-12)


def test_images_of_an_exam_without_positive_images_carry_no_weight() -> None:
    exam_true, exam_pred, image_true, image_pred = _three_exams()
    baseline = rsna_weighted_log_loss(exam_true, exam_pred, image_true, image_pred)
    image_pred[1] = np.array([0.0, 1.0, 0.5])  # exam B: wildly different, including a certain error
    assert rsna_weighted_log_loss(exam_true, exam_pred, image_true, image_pred) == pytest.approx(baseline, rel=1e-12)
    image_pred[0] = np.array([0.5, 0.5, 0.5, 0.5])  # exam A does count
    assert rsna_weighted_log_loss(exam_true, exam_pred, image_true, image_pred) != pytest.approx(baseline)


def test_weighted_log_loss_is_a_normalised_average() -> None:
    # Every prediction 0.5: every term is ln 2, so the weighted average is ln 2 whatever the weights.
    exam_true, _, image_true, _ = _three_exams()
    half_images = [np.full(len(images), 0.5) for images in image_true]
    assert rsna_weighted_log_loss(exam_true, _exams(0.5, 3), image_true, half_images) == pytest.approx(LN2)
    # Perfect predictions score (almost) zero; one exam alone gives the same as the exam repeated.
    perfect_exams = {label: exam_true[label].copy() for label in EXAM_LABELS}
    perfect_images = [images.astype(float) for images in image_true]
    assert rsna_weighted_log_loss(exam_true, perfect_exams, image_true, perfect_images) < 1e-12
    one = rsna_weighted_log_loss(
        {k: v[:1] for k, v in exam_true.items()}, {k: np.full(1, 0.3) for k in EXAM_LABELS}, image_true[:1],
        [np.full(4, 0.3)],
    )
    twice = rsna_weighted_log_loss(
        {k: np.r_[v[:1], v[:1]] for k, v in exam_true.items()}, {k: np.full(2, 0.3) for k in EXAM_LABELS},
        [image_true[0], image_true[0]], [np.full(4, 0.3), np.full(4, 0.3)],
    )
    assert one == pytest.approx(twice, rel=1e-12)


def test_weighted_log_loss_of_a_single_negative_exam_uses_only_exam_labels() -> None:
    exam_true = _exams(0.0, 1)
    exam_true["negative_exam_for_pe"] = np.array([1.0])
    exam_pred = _exams(0.2, 1)
    exam_pred["negative_exam_for_pe"] = np.array([0.8])
    # Every label: BCE = -ln 0.8 (truth 0 at 0.2, truth 1 at 0.8); the images weigh nothing.
    got = rsna_weighted_log_loss(exam_true, exam_pred, [np.zeros(5)], [np.full(5, 0.9)])
    assert got == pytest.approx(-math.log(0.8), rel=1e-12)


def test_weighted_log_loss_clips_certain_mistakes() -> None:
    exam_true = _exams(0.0, 1)
    exam_pred = _exams(0.0, 1)
    exam_pred["central_pe"] = np.array([1.0])  # certain and wrong
    got = rsna_weighted_log_loss(exam_true, exam_pred, [np.zeros(2)], [np.zeros(2)], eps=1e-15)
    expected = EXAM_LABEL_WEIGHTS["central_pe"] * -math.log(1e-15) / W_EXAM
    assert math.isfinite(got)
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t, p, it, ip: t.pop("chronic_pe"), "lacks the exam label"),
        (lambda t, p, it, ip: p.__setitem__("central_pe", np.array([0.5, 1.5, 0.5])), "outside"),
        (lambda t, p, it, ip: p.__setitem__("central_pe", np.array([0.5, 0.5])), "values but the labels have"),
        (lambda t, p, it, ip: t.__setitem__("central_pe", np.array([0.5, 0.0, 1.0])), "only 0 and 1"),
        (lambda t, p, it, ip: ip.pop(), "one array per exam"),
        (lambda t, p, it, ip: ip.__setitem__(0, np.array([0.5, 0.5])), "values but the labels have"),
        (lambda t, p, it, ip: ip.__setitem__(2, np.array([0.1, np.nan, 0.4])), "NaN"),
        (lambda t, p, it, ip: ip.__setitem__(0, ["high", "low", "low", "low"]), "must hold numbers"),
    ],
)
def test_weighted_log_loss_rejects_inputs_that_do_not_fit(change, message) -> None:  # type: ignore[no-untyped-def]
    exam_true, exam_pred, image_true, image_pred = _three_exams()
    change(exam_true, exam_pred, image_true, image_pred)
    with pytest.raises(EvaluationInputError, match=message) as raised:
        rsna_weighted_log_loss(exam_true, exam_pred, image_true, image_pred)
    assert isinstance(raised.value, TrainingError)


def test_an_exam_without_images_is_refused() -> None:
    exam_true, exam_pred, image_true, image_pred = _three_exams()
    image_true[1] = np.array([], dtype=int)
    image_pred[1] = np.array([])
    with pytest.raises(EvaluationInputError, match="exam 1 has no images"):
        rsna_weighted_log_loss(exam_true, exam_pred, image_true, image_pred)


def _pairwise_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    positives = y_score[y_true == 1]
    negatives = y_score[y_true == 0]
    wins = (positives[:, None] > negatives[None, :]).sum() + 0.5 * (positives[:, None] == negatives[None, :]).sum()
    return float(wins / (positives.size * negatives.size))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 6)), min_size=2, max_size=40))
def test_auroc_equals_the_pairwise_count(cases: list[tuple[bool, int]]) -> None:
    y_true = np.array([int(label) for label, _ in cases])
    y_score = np.array([score / 6 for _, score in cases])  # few distinct values: many ties
    if y_true.min() == y_true.max():
        assert math.isnan(auroc(y_true, y_score))
    else:
        assert auroc(y_true, y_score) == pytest.approx(_pairwise_auc(y_true, y_score), abs=1e-12)


def test_auroc_of_a_known_ranking() -> None:
    # Positives 0.9, 0.4; negatives 0.5, 0.1, 0.4: pairs won 3 + 1 + tie 0.5 out of 6.
    y_true = np.array([1, 1, 0, 0, 0])
    y_score = np.array([0.9, 0.4, 0.5, 0.1, 0.4])
    assert auroc(y_true, y_score) == pytest.approx(4.5 / 6)
    assert math.isnan(auroc(np.ones(4), np.linspace(0, 1, 4)))
    assert all(math.isnan(value) for value in delong_ci(np.zeros(4), np.linspace(0, 1, 4)))


def _brute_force_delong_variance(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """DeLong et al. (1988) straight from the definition: structural components by explicit pairs."""
    positives = y_score[y_true == 1]
    negatives = y_score[y_true == 0]
    psi = (positives[:, None] > negatives[None, :]) + 0.5 * (positives[:, None] == negatives[None, :])
    v10 = psi.mean(axis=1)
    v01 = psi.mean(axis=0)
    return float(np.var(v10, ddof=1) / positives.size + np.var(v01, ddof=1) / negatives.size)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 9)), min_size=4, max_size=50))
def test_fast_delong_equals_the_definition(cases: list[tuple[bool, int]]) -> None:
    y_true = np.array([int(label) for label, _ in cases])
    y_score = np.array([float(score) for _, score in cases])
    if y_true.sum() < 2 or (1 - y_true).sum() < 2:
        return
    auc, low, high = delong_ci(y_true, y_score, alpha=0.95)
    half_width = 1.959963984540054 * math.sqrt(_brute_force_delong_variance(y_true, y_score))
    assert auc == pytest.approx(_pairwise_auc(y_true, y_score), abs=1e-12)
    assert low == pytest.approx(max(0.0, auc - half_width), abs=1e-12)
    assert high == pytest.approx(min(1.0, auc + half_width), abs=1e-12)
    assert low <= auc <= high


def test_delong_on_the_hanley_mcneil_rating_data() -> None:
    # Hanley & McNeil, Radiology 1982, table 1: 58 normal and 51 abnormal scans rated 1 (definitely normal)
    # to 5 (definitely abnormal). Published area 0.893, standard error 0.032 (their approximation; DeLong's
    # nonparametric estimate is close to it).
    normal = np.repeat([1, 2, 3, 4, 5], [33, 6, 6, 11, 2])
    abnormal = np.repeat([1, 2, 3, 4, 5], [3, 2, 2, 11, 33])
    y_true = np.r_[np.zeros(normal.size), np.ones(abnormal.size)]
    y_score = np.r_[normal, abnormal].astype(float)
    auc, low, high = delong_ci(y_true, y_score)
    assert auc == pytest.approx(0.893, abs=5e-4)
    assert (high - low) / (2 * 1.959964) == pytest.approx(0.032, abs=0.002)


def _binormal(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.r_[np.ones(n // 2), np.zeros(n - n // 2)]
    y_score = np.r_[rng.normal(1.0, 1.0, n // 2), rng.normal(0.0, 1.0, n - n // 2)]
    return y_true, y_score


def test_delong_interval_narrows_with_more_cases() -> None:
    rng = np.random.default_rng(7)
    widths = []
    for n in (40, 400, 4000):
        auc, low, high = delong_ci(*_binormal(rng, n))
        assert low < auc < high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    # The standard error falls like 1/sqrt(n): 10x the cases, about a third of the width.
    assert widths[1] / widths[2] == pytest.approx(math.sqrt(10), rel=0.25)


def test_delong_standard_error_agrees_with_a_stratified_bootstrap() -> None:
    rng = np.random.default_rng(11)
    y_true, y_score = _binormal(rng, 300)
    auc, low, high = delong_ci(y_true, y_score)
    delong_se = (high - low) / (2 * 1.959964)
    positives, negatives = y_score[y_true == 1], y_score[y_true == 0]
    labels = np.r_[np.ones(positives.size), np.zeros(negatives.size)]
    areas = [
        auroc(labels, np.r_[rng.choice(positives, positives.size), rng.choice(negatives, negatives.size)])
        for _ in range(1500)
    ]
    assert float(np.std(areas, ddof=1)) == pytest.approx(delong_se, rel=0.15)


def test_delong_level_and_degenerate_cases() -> None:
    rng = np.random.default_rng(3)
    y_true, y_score = _binormal(rng, 200)
    auc, low90, high90 = delong_ci(y_true, y_score, alpha=0.90)
    _, low99, high99 = delong_ci(y_true, y_score, alpha=0.99)
    assert low99 < low90 < auc < high90 < high99
    assert delong_ci(np.array([1, 1, 0, 0]), np.array([0.9, 0.8, 0.2, 0.1])) == (1.0, 1.0, 1.0)
    auc_one, low_one, high_one = delong_ci(np.array([1, 0, 0, 0]), np.array([0.9, 0.8, 0.2, 0.1]))
    assert auc_one == 1.0 and math.isnan(low_one) and math.isnan(high_one)
    with pytest.raises(EvaluationInputError, match="confidence level"):
        delong_ci(y_true, y_score, alpha=95)


def test_roc_curve_points() -> None:
    fpr, tpr, thresholds = roc_curve(np.array([1, 1, 0, 0, 0]), np.array([0.9, 0.4, 0.5, 0.1, 0.4]))
    np.testing.assert_allclose(thresholds, [np.inf, 0.9, 0.5, 0.4, 0.1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 2 / 3, 1.0])
    # Trapezoid area under the curve equals the AUROC (ties form a diagonal segment).
    assert float(np.trapezoid(tpr, fpr)) == pytest.approx(4.5 / 6)
    with pytest.raises(EvaluationInputError, match="at least one positive and one negative"):
        roc_curve(np.zeros(3), np.array([0.1, 0.2, 0.3]))


def test_sensitivity_and_specificity_at_a_threshold() -> None:
    y_true = np.array([1, 1, 1, 1, 0, 0, 0])
    y_score = np.array([0.9, 0.6, 0.5, 0.2, 0.7, 0.5, 0.1])
    # Positive means strictly above 0.5: TP 2 of 4, TN 2 of 3 (0.5 counts as negative).
    assert sensitivity_specificity(y_true, y_score) == pytest.approx((0.5, 2 / 3))
    assert sensitivity_specificity(y_true, y_score, threshold=0.15) == pytest.approx((1.0, 1 / 3))
    sensitivity, specificity = sensitivity_specificity(np.ones(3), np.array([0.1, 0.6, 0.9]))
    assert sensitivity == pytest.approx(2 / 3) and math.isnan(specificity)


def test_threshold_at_specificity_is_the_lowest_that_reaches_it() -> None:
    y_true = np.r_[np.zeros(20), np.ones(5)]
    negatives = np.arange(20) / 20.0  # 0.00 .. 0.95
    y_score = np.r_[negatives, [0.99, 0.9, 0.84, 0.83, 0.3]]
    threshold = threshold_at_specificity(y_true, y_score, 0.85)
    # 17 of 20 negatives (0.85) must be <= the threshold: the 17th lowest negative score, 0.80.
    assert threshold == pytest.approx(0.80)
    sensitivity, specificity = sensitivity_specificity(y_true, y_score, threshold)
    assert specificity == pytest.approx(0.85)
    assert sensitivity == pytest.approx(4 / 5)
    assert sensitivity_specificity(y_true, y_score, 0.75)[1] < 0.85  # one negative score lower fails
    assert threshold_at_specificity(y_true, y_score, 1.0) == pytest.approx(0.95)
    assert sensitivity_specificity(y_true, y_score, threshold_at_specificity(y_true, y_score, 0.0)) == (1.0, 0.0)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 20)), min_size=2, max_size=60),
    st.floats(0.0, 1.0),
)
def test_threshold_at_specificity_reaches_the_target(cases: list[tuple[bool, int]], target: float) -> None:
    y_true = np.array([int(label) for label, _ in cases])
    y_score = np.array([score / 20 for _, score in cases])
    if y_true.min() == 1:
        with pytest.raises(EvaluationInputError, match="negative case"):
            threshold_at_specificity(y_true, y_score, target)
        return
    threshold = threshold_at_specificity(y_true, y_score, target)
    specificity = sensitivity_specificity(y_true, y_score, threshold)[1]
    assert specificity >= target - 1e-9
    lower = y_score[y_score < threshold]
    if lower.size:  # any lower candidate threshold misses the target
        assert sensitivity_specificity(y_true, y_score, float(lower.max()))[1] < target - 1e-9


def _consistent_positive() -> dict[str, float]:
    probabilities = dict.fromkeys(EXAM_LABELS, 0.1)
    probabilities.update(rv_lv_ratio_lt_1=0.8, rightsided_pe=0.7)
    return probabilities


def _consistent_negative() -> dict[str, float]:
    probabilities = dict.fromkeys(EXAM_LABELS, 0.1)
    probabilities.update(negative_exam_for_pe=0.9)
    return probabilities


def _as_columns(exams: list[dict[str, float]]) -> dict[str, np.ndarray]:
    return {label: np.array([exam[label] for exam in exams]) for label in EXAM_LABELS}


@pytest.mark.parametrize(
    "positive, change",
    [
        (True, {"rv_lv_ratio_gte_1": 0.6}),  # both RV/LV labels
        (True, {"rv_lv_ratio_lt_1": 0.5}),  # neither RV/LV label (0.5 is not above 0.5)
        (True, {"rightsided_pe": 0.2}),  # no location
        (True, {"chronic_pe": 0.6, "acute_and_chronic_pe": 0.7}),  # chronic and acute-and-chronic
        (True, {"negative_exam_for_pe": 0.6}),
        (True, {"indeterminate": 0.51}),
        (False, {"negative_exam_for_pe": 0.3}),  # neither negative nor indeterminate
        (False, {"indeterminate": 0.7}),  # both
        (False, {"central_pe": 0.6}),
        (False, {"rv_lv_ratio_lt_1": 0.9}),
        (False, {"acute_and_chronic_pe": 0.9}),
    ],
)
def test_each_consistency_rule_is_counted(positive: bool, change: dict[str, float]) -> None:
    broken = _consistent_positive() if positive else _consistent_negative()
    broken.update(change)
    exams = [_consistent_positive(), broken, _consistent_negative()]
    images = [np.array([0.2, 0.9]), np.array([0.1, 0.7 if positive else 0.5]), np.array([0.3, 0.4])]
    assert count_violations(images, _as_columns(exams)) == 1
    assert count_violations(np.array([image.max() for image in images]), _as_columns(exams)) == 1


def test_consistent_exams_have_no_violations() -> None:
    exams = [_consistent_positive(), _consistent_negative(), _consistent_positive()]
    both_rv_lv = dict(_consistent_positive(), rv_lv_ratio_gte_1=0.9)
    # The same labels read as a negative exam are inconsistent: the PE probability decides which rules apply.
    assert count_violations([np.array([0.6]), np.array([0.5]), np.array([0.01, 0.99])], _as_columns(exams)) == 0
    assert count_violations(np.array([0.4, 0.5, 0.99]), _as_columns(exams)) == 1
    assert count_violations(np.array([0.9, 0.1, 0.9]), _as_columns([both_rv_lv, *exams[1:]])) == 1


def _evaluation_inputs() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(5)
    n_exams = 30
    exam_true = {label: (rng.random(n_exams) < 0.4).astype(float) for label in EXAM_LABELS}
    exam_true["chronic_pe"] = np.zeros(n_exams)  # a label with one class only: no AUROC
    exam_pred = {label: np.clip(0.6 * exam_true[label] + 0.4 * rng.random(n_exams), 0, 1) for label in EXAM_LABELS}
    image_true = [(rng.random(int(rng.integers(3, 9))) < 0.3).astype(int) for _ in range(n_exams)]
    image_pred = [np.clip(0.5 * images + 0.5 * rng.random(images.size), 0, 1) for images in image_true]
    return exam_true, exam_pred, image_true, image_pred


def test_evaluate_predictions_reports_every_figure_json_safe() -> None:
    exam_true, exam_pred, image_true, image_pred = _evaluation_inputs()
    corrected = {label: (values > 0.5).astype(float) * 0.98 + 0.01 for label, values in exam_pred.items()}
    metrics = evaluate_predictions(
        exam_true, exam_pred, image_true, image_pred,
        exam_pred_corrected=corrected, thresholds={"central_pe": 0.3, "pe_present_on_image": 0.6},
    )
    json.loads(json.dumps(metrics, allow_nan=False))  # strict JSON: no NaN anywhere

    assert metrics["rsna_weighted_log_loss"] == pytest.approx(
        rsna_weighted_log_loss(exam_true, exam_pred, image_true, image_pred)
    )
    assert metrics["rsna_weighted_log_loss_corrected"] == pytest.approx(
        rsna_weighted_log_loss(exam_true, corrected, image_true, image_pred)
    )
    assert metrics["n_exams"] == 30
    assert metrics["n_images"] == sum(images.size for images in image_true)
    assert set(metrics["labels"]) == set(EXAM_LABELS)

    central = metrics["labels"]["central_pe"]
    auc, low, high = delong_ci(exam_true["central_pe"], exam_pred["central_pe"])
    assert (central["auroc"], central["ci_low"], central["ci_high"]) == pytest.approx((auc, low, high))
    assert central["threshold"] == 0.3
    assert (central["sensitivity"], central["specificity"]) == pytest.approx(
        sensitivity_specificity(exam_true["central_pe"], exam_pred["central_pe"], 0.3)
    )
    assert central["n_pos"] + central["n_neg"] == 30
    assert central["n_pos"] == int(exam_true["central_pe"].sum())

    chronic = metrics["labels"]["chronic_pe"]
    assert chronic["auroc"] is None and chronic["ci_low"] is None and chronic["sensitivity"] is None
    assert chronic["specificity"] is not None and chronic["n_pos"] == 0

    image = metrics["image"]
    flat_true, flat_pred = np.concatenate(image_true), np.concatenate(image_pred)
    assert image["auroc"] == pytest.approx(auroc(flat_true, flat_pred))
    assert image["threshold"] == 0.6
    assert image["specificity_at_0.85_specificity"] >= 0.85
    assert image["sensitivity_at_0.85_specificity"] == pytest.approx(
        sensitivity_specificity(flat_true, flat_pred, image["threshold_at_0.85_specificity"])[0]
    )
    exam_pe = metrics["exam_pe"]
    assert exam_pe["n_pos"] == sum(int(images.max()) for images in image_true)

    violations = metrics["consistency_violations"]
    assert violations["before"] == count_violations(image_pred, exam_pred)
    assert violations["after"] == count_violations(image_pred, corrected)


def test_evaluate_predictions_without_correction_and_with_unknown_thresholds() -> None:
    exam_true, exam_pred, image_true, image_pred = _evaluation_inputs()
    metrics = evaluate_predictions(exam_true, exam_pred, image_true, image_pred)
    assert metrics["rsna_weighted_log_loss_corrected"] is None
    assert metrics["consistency_violations"]["after"] is None
    assert metrics["labels"]["central_pe"]["threshold"] == 0.5
    with pytest.raises(EvaluationInputError, match="unknown label"):
        evaluate_predictions(exam_true, exam_pred, image_true, image_pred, thresholds={"centralpe": 0.4})


def test_correction_by_pe_model_removes_every_violation() -> None:
    from pe_model.consistency import make_consistent

    exam_true, exam_pred, image_true, image_pred = _evaluation_inputs()
    results = [
        make_consistent({label: float(exam_pred[label][index]) for label in EXAM_LABELS}, image_pred[index])
        for index in range(len(image_pred))
    ]
    exam_corrected = {label: np.array([result.probabilities[label] for result in results]) for label in EXAM_LABELS}
    image_corrected = [np.array(result.chunk_probabilities) for result in results]

    metrics = evaluate_predictions(
        exam_true, exam_pred, image_true, image_pred,
        exam_pred_corrected=exam_corrected, image_pred_corrected=image_corrected,
    )

    assert metrics["consistency_violations"]["before"] > 0  # random outputs break the rules
    assert metrics["consistency_violations"]["after"] == 0
    assert metrics["rsna_weighted_log_loss_corrected"] == pytest.approx(
        rsna_weighted_log_loss(exam_true, exam_corrected, image_true, image_corrected)
    )
