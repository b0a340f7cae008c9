"""The worklist flag under the input-quality gate: a non-diagnostic series is REVIEW with its reason,
whatever the model said; an adequate one keeps the model's flag."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pacs_agent.db.models import Flag, Result
from pacs_agent.worklist import flag_for, non_diagnostic_reason, summarize
from pe_model.labels import EXAM_LABELS
from pe_model.prediction import ModelInfo, Prediction
from pe_model.quality import QualityReport, assess_quality
from pe_model.volume import load_series
from phantoms import PhantomSpec, write_phantom_series
from phantoms.heldout import HeldoutSpec, write_heldout_series

MODEL = ModelInfo(name="tiny", version="0", sha256="0" * 64, intended_use="test", training_data="none", not_for_clinical_use=True)


def _prediction(p: float, quality: QualityReport | None, **true: bool) -> Prediction:
    labels = {k: k in true for k in EXAM_LABELS}
    return Prediction(
        study_instance_uid="1.2", series_instance_uid="1.2.3", pe_present=p > 0.5,
        probabilities={**{k: 0.1 for k in EXAM_LABELS}, "pe_present": p}, labels=labels,
        chunk_probabilities=(p,), chunk_sop_instance_uids=(("1.2.3.1",),), key_images=(), attention={},
        heatmaps=(), model=MODEL, timings_s={}, source_sop_instance_uids=("1.2.3.1",), quality=quality,
    )


@pytest.fixture(scope="module")
def heldout_reports(tmp_path_factory: pytest.TempPathFactory) -> dict[float, QualityReport]:
    root = tmp_path_factory.mktemp("heldout")
    reports = {}
    for hu in (60.0, 350.0):
        spec = HeldoutSpec(seed=4, rows=96, columns=96, fov_mm=340.0, slice_thickness_mm=3.0,
                           slice_spacing_mm=3.0, pulmonary_artery_hu=hu)
        write_heldout_series(root / str(hu), spec)
        reports[hu] = assess_quality(load_series(root / str(hu)))
    return reports


def test_arteries_at_60_hu_are_review_with_the_reason(heldout_reports: dict[float, QualityReport]) -> None:
    poor = heldout_reports[60.0]
    negative = _prediction(0.05, poor, negative_exam_for_pe=True)
    assert flag_for(negative, review_margin=0.1) == Flag.REVIEW
    assert summarize(negative).startswith("non-diagnostic: ")
    assert "HU < 250 HU" in summarize(negative) and summarize(negative).endswith("model: no PE (p=0.05)")
    # Whatever the model says on such a series, a human reads it: never ROUTINE, and not CRITICAL either.
    positive = _prediction(0.95, poor, central_pe=True, rv_lv_ratio_gte_1=True)
    assert flag_for(positive, review_margin=0.1) == Flag.REVIEW
    assert non_diagnostic_reason(positive) == poor.summary


def test_arteries_at_350_hu_keep_the_model_flag(heldout_reports: dict[float, QualityReport]) -> None:
    good = heldout_reports[350.0]
    assert good.passed
    assert flag_for(_prediction(0.05, good, negative_exam_for_pe=True), review_margin=0.1) == Flag.ROUTINE
    assert flag_for(_prediction(0.95, good, central_pe=True, rv_lv_ratio_lt_1=True), review_margin=0.1) == Flag.CRITICAL
    assert summarize(_prediction(0.05, good, negative_exam_for_pe=True)) == "no PE (p=0.05)"


def test_ctpa_generator_without_contrast_is_review(tmp_path: Path) -> None:
    write_phantom_series(tmp_path / "plain", PhantomSpec(rows=64, columns=64, n_slices=60, contrast=False, pe=False))
    report = assess_quality(load_series(tmp_path / "plain"))
    assert flag_for(_prediction(0.02, report, negative_exam_for_pe=True), review_margin=0.1) == Flag.REVIEW


def test_stored_results_follow_the_same_rule(heldout_reports: dict[float, QualityReport]) -> None:
    poor = heldout_reports[60.0].to_json_dict()
    result = Result(pe_present=False, pe_probability=0.05, labels={"negative_exam_for_pe": True}, flag=Flag.REVIEW,
                    quality=poor)
    assert flag_for(result, review_margin=0.1) == Flag.REVIEW
    assert summarize(result).startswith(poor["summary"])
    # An unverified gate, or a result stored before the gate existed, leaves the model's flag.
    unverified = dataclasses.replace(heldout_reports[350.0], unmeasured=("pulmonary trunk not found: contrast not verified",))
    assert unverified.status == "unverified"
    for quality in ({}, unverified.to_json_dict()):
        stored = Result(pe_present=False, pe_probability=0.05, labels={"negative_exam_for_pe": True},
                        flag=Flag.ROUTINE, quality=quality)
        assert flag_for(stored, review_margin=0.1) == Flag.ROUTINE
