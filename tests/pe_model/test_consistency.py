"""Label consistency: the rules (docs/METHOD.md) and the minimal expected-loss correction."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pe_model.consistency import (
    RULE_NEGATIVE_NO_FINDINGS,
    RULE_NEGATIVE_ONE_OF,
    RULE_POSITIVE_CHRONICITY,
    RULE_POSITIVE_LOCATION,
    RULE_POSITIVE_NOT_NEGATIVE,
    RULE_POSITIVE_RV_LV,
    expected_weighted_loss,
    make_consistent,
    violations,
)
from pe_model.labels import EXAM_LABELS

probability = st.one_of(
    st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
    st.sampled_from([0.0, 0.5, 0.5000001, 0.4999999, 1.0]),
)
exam_probabilities = st.fixed_dictionaries({label: probability for label in EXAM_LABELS})
chunk_probabilities = st.lists(probability, min_size=1, max_size=50)


def _exam(**overrides: float) -> dict[str, float]:
    values = {label: 0.1 for label in EXAM_LABELS}
    values.update(overrides)
    return values


@settings(max_examples=600, deadline=None)
@given(exam=exam_probabilities, chunks=chunk_probabilities)
def test_make_consistent_never_emits_an_inconsistent_set(
    exam: dict[str, float], chunks: list[float]
) -> None:
    result = make_consistent(exam, chunks)
    assert violations(list(result.chunk_probabilities), result.probabilities) == []
    assert violations(max(result.chunk_probabilities), result.probabilities) == []
    assert len(result.chunk_probabilities) == len(chunks)
    assert result.pe_present == (max(result.chunk_probabilities) > 0.5)
    assert result.pe_present == (result.chosen == "positive")
    assert result.labels == {k: result.probabilities[k] > 0.5 for k in EXAM_LABELS}
    chosen_loss = (
        result.expected_loss_positive if result.pe_present else result.expected_loss_negative
    )
    assert chosen_loss <= min(result.expected_loss_positive, result.expected_loss_negative)
    assert chosen_loss == pytest.approx(
        expected_weighted_loss(exam, chunks, result.probabilities, result.chunk_probabilities)
    )
    for value in [*result.probabilities.values(), *result.chunk_probabilities]:
        assert 0.0 <= value <= 1.0


@settings(max_examples=300, deadline=None)
@given(exam=exam_probabilities, chunks=chunk_probabilities)
def test_consistent_input_is_left_unchanged(exam: dict[str, float], chunks: list[float]) -> None:
    if violations(chunks, exam):
        return
    result = make_consistent(exam, chunks)
    assert result.probabilities == exam
    assert list(result.chunk_probabilities) == chunks


def test_violations_name_each_broken_rule() -> None:
    assert violations(0.9, _exam()) == [
        RULE_POSITIVE_RV_LV,
        RULE_POSITIVE_LOCATION,
    ]
    assert violations(
        [0.2, 0.7],
        _exam(
            rv_lv_ratio_gte_1=0.8,
            central_pe=0.9,
            chronic_pe=0.6,
            acute_and_chronic_pe=0.7,
            indeterminate=0.6,
        ),
    ) == [RULE_POSITIVE_CHRONICITY, RULE_POSITIVE_NOT_NEGATIVE]
    assert violations(0.2, _exam()) == [RULE_NEGATIVE_ONE_OF]
    assert violations(0.5, _exam(negative_exam_for_pe=0.9, leftsided_pe=0.51)) == [
        RULE_NEGATIVE_NO_FINDINGS
    ]
    assert violations(0.3, _exam(negative_exam_for_pe=0.9)) == []
    assert violations(
        [0.3, 0.51], _exam(rv_lv_ratio_lt_1=0.7, rightsided_pe=0.6)
    ) == []


def test_confident_positive_exam_is_completed_minimally() -> None:
    exam = _exam(
        negative_exam_for_pe=0.6,
        rv_lv_ratio_gte_1=0.3,
        rv_lv_ratio_lt_1=0.45,
        leftsided_pe=0.4,
        rightsided_pe=0.2,
        central_pe=0.1,
    )
    result = make_consistent(exam, [0.1, 0.95, 0.97, 0.2])
    assert result.chosen == "positive" and result.pe_present
    assert result.labels["rv_lv_ratio_lt_1"] and not result.labels["rv_lv_ratio_gte_1"]
    assert result.labels["leftsided_pe"]
    assert not result.labels["rightsided_pe"] and not result.labels["central_pe"]
    assert result.probabilities["negative_exam_for_pe"] == 0.5
    assert result.probabilities["rv_lv_ratio_lt_1"] == pytest.approx(0.501)
    assert result.chunk_probabilities == (0.1, 0.95, 0.97, 0.2)
    assert result.expected_loss_positive < result.expected_loss_negative


def test_weak_single_positive_chunk_becomes_negative() -> None:
    exam = _exam(negative_exam_for_pe=0.9, indeterminate=0.05, central_pe=0.02)
    result = make_consistent(exam, [0.1, 0.52, 0.1])
    assert result.chosen == "negative" and not result.pe_present
    assert result.chunk_probabilities == (0.1, 0.5, 0.1)
    assert result.labels["negative_exam_for_pe"]
    assert not any(result.labels[k] for k in EXAM_LABELS if k != "negative_exam_for_pe")


def test_negative_exam_picks_the_cheaper_of_negative_and_indeterminate() -> None:
    result = make_consistent(_exam(negative_exam_for_pe=0.3, indeterminate=0.45), [0.05, 0.1])
    assert result.chosen == "negative"
    assert result.labels["indeterminate"] and not result.labels["negative_exam_for_pe"]
    both = make_consistent(_exam(negative_exam_for_pe=0.9, indeterminate=0.7), [0.05])
    assert both.labels["negative_exam_for_pe"] and not both.labels["indeterminate"]
    assert both.probabilities["indeterminate"] == 0.5


def test_invalid_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="missing"):
        make_consistent({"negative_exam_for_pe": 0.5}, [0.2])
    with pytest.raises(ValueError, match="at least one chunk"):
        make_consistent(_exam(), [])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        make_consistent(_exam(central_pe=1.2), [0.2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        violations(float("nan"), _exam())
