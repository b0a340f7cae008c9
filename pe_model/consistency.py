"""RSNA label-consistency rules and their minimal-loss correction (docs/METHOD.md).

Every output we send must satisfy the rules. ``make_consistent`` builds the minimally adjusted
consistent-positive and consistent-negative versions of the model's probabilities and keeps the
one with the lower expected RSNA weighted log loss, taking the model's own probabilities as the
distribution of the truth (the Kaggle winners' approach). Under that expectation each label's
loss is smallest at its own probability, so the best adjusted value of a label that must change
side is the threshold itself (0.5, or 0.5 + MARGIN above it); where one of several labels must
change side, the cheapest one is moved.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from pe_model.labels import EXAM_LABEL_WEIGHTS, EXAM_LABELS, IMAGE_WEIGHT, THRESHOLD

#: How far above the threshold a probability is pushed when it must count as positive.
MARGIN: Final[float] = 1e-3
_CLIP: Final[float] = 1e-7

RULE_POSITIVE_RV_LV: Final[str] = (
    "positive exam: exactly one of rv_lv_ratio_gte_1 / rv_lv_ratio_lt_1 must be > 0.5"
)
RULE_POSITIVE_LOCATION: Final[str] = (
    "positive exam: at least one of central_pe / rightsided_pe / leftsided_pe must be > 0.5"
)
RULE_POSITIVE_CHRONICITY: Final[str] = (
    "positive exam: chronic_pe and acute_and_chronic_pe must not both be > 0.5"
)
RULE_POSITIVE_NOT_NEGATIVE: Final[str] = (
    "positive exam: negative_exam_for_pe and indeterminate must both be <= 0.5"
)
RULE_NEGATIVE_ONE_OF: Final[str] = (
    "negative exam: exactly one of negative_exam_for_pe / indeterminate must be > 0.5"
)
RULE_NEGATIVE_NO_FINDINGS: Final[str] = (
    "negative exam: rv_lv_ratio_gte_1, rv_lv_ratio_lt_1, central_pe, rightsided_pe, "
    "leftsided_pe, chronic_pe, acute_and_chronic_pe must all be <= 0.5"
)

_NEGATIVE_SET: Final[tuple[str, str]] = ("negative_exam_for_pe", "indeterminate")
_RV_LV: Final[tuple[str, str]] = ("rv_lv_ratio_gte_1", "rv_lv_ratio_lt_1")
_LOCATIONS: Final[tuple[str, str, str]] = ("central_pe", "rightsided_pe", "leftsided_pe")
_CHRONICITY: Final[tuple[str, str]] = ("chronic_pe", "acute_and_chronic_pe")
_FINDINGS: Final[tuple[str, ...]] = _RV_LV + _LOCATIONS + _CHRONICITY


@dataclass(frozen=True)
class ConsistentResult:
    """A consistent set of outputs; ``probabilities`` holds the nine adjusted exam labels and
    ``chunk_probabilities`` the adjusted chunk PE probabilities (same length as given)."""

    pe_present: bool
    labels: dict[str, bool]
    probabilities: dict[str, float]
    chunk_probabilities: tuple[float, ...]
    chosen: Literal["positive", "negative"]
    expected_loss_positive: float
    expected_loss_negative: float


def _positive(p: float) -> bool:
    return p > THRESHOLD


def _validated(exam_probs: Mapping[str, float], chunk_probs: Iterable[float]) -> tuple[dict[str, float], list[float]]:
    missing = [label for label in EXAM_LABELS if label not in exam_probs]
    if missing:
        raise ValueError(f"missing exam label probabilities: {missing}")
    exam = {label: float(exam_probs[label]) for label in EXAM_LABELS}
    chunks = [float(p) for p in chunk_probs]
    if not chunks:
        raise ValueError("at least one chunk probability is needed")
    for value in [*exam.values(), *chunks]:
        if not (0.0 <= value <= 1.0) or math.isnan(value):
            raise ValueError(f"probabilities must lie in [0, 1], got {value}")
    return exam, chunks


def violations(
    pe_probability: float | Sequence[float], exam_probs: Mapping[str, float]
) -> list[str]:
    """Names of the rules that ``exam_probs`` break, given the series PE probability or the
    chunk probabilities (the exam is positive when any of them is > 0.5). Empty when consistent."""
    given: list[float] = (
        [float(pe_probability)]
        if isinstance(pe_probability, numbers.Real)
        else [float(p) for p in pe_probability]  # type: ignore[union-attr]
    )
    exam, chunks = _validated(exam_probs, given)
    broken: list[str] = []
    if any(_positive(p) for p in chunks):
        if sum(_positive(exam[label]) for label in _RV_LV) != 1:
            broken.append(RULE_POSITIVE_RV_LV)
        if not any(_positive(exam[label]) for label in _LOCATIONS):
            broken.append(RULE_POSITIVE_LOCATION)
        if all(_positive(exam[label]) for label in _CHRONICITY):
            broken.append(RULE_POSITIVE_CHRONICITY)
        if any(_positive(exam[label]) for label in _NEGATIVE_SET):
            broken.append(RULE_POSITIVE_NOT_NEGATIVE)
    else:
        if sum(_positive(exam[label]) for label in _NEGATIVE_SET) != 1:
            broken.append(RULE_NEGATIVE_ONE_OF)
        if any(_positive(exam[label]) for label in _FINDINGS):
            broken.append(RULE_NEGATIVE_NO_FINDINGS)
    return broken


def _bce(p: float, q: float) -> float:
    """Expected binary cross-entropy of output q when the truth is 1 with probability p."""
    q = min(max(q, _CLIP), 1.0 - _CLIP)
    return -(p * math.log(q) + (1.0 - p) * math.log(1.0 - q))


def _low(p: float) -> float:
    """Best output <= threshold."""
    return min(p, THRESHOLD)


def _high(p: float) -> float:
    """Best output > threshold."""
    return p if p > THRESHOLD else THRESHOLD + MARGIN


def _label_cost(label: str, p: float, q: float) -> float:
    return EXAM_LABEL_WEIGHTS[label] * _bce(p, q)


def _cheapest_exactly_one(exam: Mapping[str, float], labels: Sequence[str]) -> dict[str, float]:
    """Of ``labels``, exactly one above the threshold, at the least expected cost."""
    best: dict[str, float] = {}
    best_cost = math.inf
    for winner in labels:
        option = {
            label: _high(exam[label]) if label == winner else _low(exam[label]) for label in labels
        }
        cost = sum(_label_cost(label, exam[label], option[label]) for label in labels)
        if cost < best_cost:
            best, best_cost = option, cost
    return best


def _cheapest_at_least_one(exam: Mapping[str, float], labels: Sequence[str]) -> dict[str, float]:
    """At least one of ``labels`` above the threshold; raises only the cheapest one if none is."""
    option = {label: exam[label] for label in labels}
    if any(_positive(exam[label]) for label in labels):
        return option
    raised = min(
        labels,
        key=lambda label: _label_cost(label, exam[label], _high(exam[label]))
        - _label_cost(label, exam[label], exam[label]),
    )
    option[raised] = _high(exam[raised])
    return option


def _cheapest_not_both(exam: Mapping[str, float], labels: Sequence[str]) -> dict[str, float]:
    """Not every one of ``labels`` above the threshold; lowers only the cheapest one if needed."""
    option = {label: exam[label] for label in labels}
    if not all(_positive(exam[label]) for label in labels):
        return option
    lowered = min(
        labels,
        key=lambda label: _label_cost(label, exam[label], _low(exam[label]))
        - _label_cost(label, exam[label], exam[label]),
    )
    option[lowered] = _low(exam[lowered])
    return option


def _consistent_positive(exam: dict[str, float], chunks: list[float]) -> tuple[dict[str, float], list[float]]:
    adjusted_chunks = list(chunks)
    if not any(_positive(p) for p in chunks):
        top = max(range(len(chunks)), key=lambda i: chunks[i])
        adjusted_chunks[top] = _high(chunks[top])
    adjusted = dict(exam)
    adjusted.update(_cheapest_exactly_one(exam, _RV_LV))
    adjusted.update(_cheapest_at_least_one(exam, _LOCATIONS))
    adjusted.update(_cheapest_not_both(exam, _CHRONICITY))
    for label in _NEGATIVE_SET:
        adjusted[label] = _low(exam[label])
    return adjusted, adjusted_chunks


def _consistent_negative(exam: dict[str, float], chunks: list[float]) -> tuple[dict[str, float], list[float]]:
    adjusted = dict(exam)
    adjusted.update(_cheapest_exactly_one(exam, _NEGATIVE_SET))
    for label in _FINDINGS:
        adjusted[label] = _low(exam[label])
    return adjusted, [_low(p) for p in chunks]


def expected_weighted_loss(
    exam_truth: Mapping[str, float],
    chunk_truth: Sequence[float],
    exam_output: Mapping[str, float],
    chunk_output: Sequence[float],
) -> float:
    """Expected RSNA weighted log loss of an output when the truth is distributed as the model's
    own probabilities. The chunk term is weighted by IMAGE_WEIGHT * q with q the expected fraction
    of positive chunks (mean chunk probability)."""
    q = sum(chunk_truth) / len(chunk_truth)
    numerator = sum(
        _label_cost(label, exam_truth[label], exam_output[label]) for label in EXAM_LABELS
    )
    numerator += sum(
        IMAGE_WEIGHT * q * _bce(p, o) for p, o in zip(chunk_truth, chunk_output, strict=True)
    )
    denominator = sum(EXAM_LABEL_WEIGHTS.values()) + IMAGE_WEIGHT * q * len(chunk_truth)
    return numerator / denominator


def make_consistent(exam_probs: Mapping[str, float], chunk_probs: Iterable[float]) -> ConsistentResult:
    """Consistent labels and probabilities with the lower expected weighted loss (docs/METHOD.md rules)."""
    exam, chunks = _validated(exam_probs, chunk_probs)
    positive_exam, positive_chunks = _consistent_positive(exam, chunks)
    negative_exam, negative_chunks = _consistent_negative(exam, chunks)
    loss_positive = expected_weighted_loss(exam, chunks, positive_exam, positive_chunks)
    loss_negative = expected_weighted_loss(exam, chunks, negative_exam, negative_chunks)
    if loss_positive < loss_negative or (
        loss_positive == loss_negative and any(_positive(p) for p in chunks)
    ):
        chosen: Literal["positive", "negative"] = "positive"
        final_exam, final_chunks = positive_exam, positive_chunks
    else:
        chosen = "negative"
        final_exam, final_chunks = negative_exam, negative_chunks
    return ConsistentResult(
        pe_present=chosen == "positive",
        labels={label: _positive(final_exam[label]) for label in EXAM_LABELS},
        probabilities={label: final_exam[label] for label in EXAM_LABELS},
        chunk_probabilities=tuple(final_chunks),
        chosen=chosen,
        expected_loss_positive=loss_positive,
        expected_loss_negative=loss_negative,
    )
