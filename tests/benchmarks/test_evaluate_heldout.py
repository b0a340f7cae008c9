"""The held-out evaluation: writes the family, runs the real Predictor, scores and writes JSON + Markdown."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.evaluate_heldout import (
    SeriesOutcome,
    bootstrap_auroc_ci,
    main,
    summarize,
    wilson,
)
from pe_model.checkpoint import build_initial_checkpoint, small_sequence_config
from pe_model.labels import EXAM_LABELS
from pe_model.preprocessing import PreprocessConfig
from phantoms.heldout import ClotSpec, HeldoutSpec, generate_heldout_volume


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.pt"
    build_initial_checkpoint(path, encoder_width=4, sequence=small_sequence_config(4, hidden=16),
                             preprocess_config=PreprocessConfig(input_size=32), seed=0)
    return path


def test_cli_writes_json_and_markdown_for_a_small_set(tmp_path: Path, tiny_checkpoint: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    kept = tmp_path / "series"
    code = main(["--count", "2", "--seed", "3", "--matrix", "40", "--min-thickness-mm", "3",
                 "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--bootstrap", "200",
                 "--keep-series", str(kept), "--quiet"])
    assert code == 0
    document = json.loads((out / "heldout.json").read_text())
    assert document["meta"]["count"] == 2 and document["meta"]["matrix"] == 40
    assert len(document["meta"]["model_sha256"]) == 64
    rows = document["series"]
    assert [r["pe"] for r in rows] == [True, False]
    assert all(r["flag"] in {"CRITICAL", "HIGH", "REVIEW", "ROUTINE"} for r in rows)
    assert all(0.0 <= r["pe_probability"] <= 1.0 for r in rows)
    assert rows[0]["truth_sides"] and rows[1]["truth_sides"] == []
    summary = document["summary"]
    assert summary["series"] == 2 and summary["positives"] == 1
    assert summary["exam_pe_auroc"]["value"] in (0.0, 0.5, 1.0)
    table = (out / "heldout.md").read_text()
    assert "| exam PE AUROC" in table and "| false CRITICAL on negatives |" in table
    assert "(sha256 " in table
    # The kept series are real DICOM folders with their truth beside them.
    assert len(list((kept / "series-0000").glob("*.dcm"))) > 10
    truth = json.loads((kept / "series-0000.truth.json").read_text())
    assert truth["pe"] is True and truth["clots"]
    assert "| correct side set" in capsys.readouterr().out


def test_cli_refuses_bad_arguments_and_reports_a_missing_checkpoint(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["--count", "1"])
    assert raised.value.code == 2
    code = main(["--count", "2", "--matrix", "40", "--checkpoint", str(tmp_path / "missing.pt"),
                 "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 1
    assert "error:" in capsys.readouterr().err


def _outcome(index: int, clots: tuple[ClotSpec, ...], *, p: float, labels: set[str], flag: str,
             cam: float | None) -> SeriesOutcome:
    _, truth = generate_heldout_volume(HeldoutSpec(seed=index, clots=clots, rows=32, columns=32, fov_mm=340.0,
                                                   slice_thickness_mm=8.0, slice_spacing_mm=8.0, rv_lv_ratio=1.2))
    return SeriesOutcome(index=index, truth=truth, pe_probability=p, negative_exam_probability=1.0 - p,
                         pe_present=p > 0.5, labels={k: k in labels for k in EXAM_LABELS}, flag=flag,
                         gradcam_distance_mm=cam, seconds=0.1)


def test_summary_scores_sides_rv_lv_gradcam_and_false_critical() -> None:
    saddle = (ClotSpec(level="saddle", form="central"),)
    left = (ClotSpec(level="lobar", form="occlusive", side="left"),)
    outcomes = [
        # Right side set and RV/LV call, Grad-CAM hit.
        _outcome(1, saddle, p=0.9, labels={"central_pe", "leftsided_pe", "rightsided_pe", "rv_lv_ratio_gte_1"},
                 flag="CRITICAL", cam=4.0),
        # Wrong side (right for left), RV/LV < 1 called for a ratio of 1.2, Grad-CAM miss.
        _outcome(2, left, p=0.7, labels={"rightsided_pe", "rv_lv_ratio_lt_1"}, flag="HIGH", cam=40.0),
        _outcome(3, (), p=0.2, labels={"negative_exam_for_pe"}, flag="ROUTINE", cam=None),
        # A false CRITICAL on a negative.
        _outcome(4, (), p=0.8, labels={"central_pe", "rv_lv_ratio_gte_1"}, flag="CRITICAL", cam=None),
    ]
    summary = summarize(outcomes, bootstrap_rounds=200, seed=0)
    assert summary["exam_pe_auroc"]["value"] == pytest.approx(0.75)
    assert summary["side_set_accuracy_on_positives"]["value"] == 0.5
    assert summary["rv_lv_gte_1_accuracy_on_positives"]["value"] == 0.5
    assert summary["gradcam_within_15mm_of_clot"]["value"] == 0.5
    assert summary["false_critical_on_negatives"]["count"] == 1
    assert summary["specificity_at_0_5"]["value"] == 0.5


def test_bootstrap_ci_brackets_the_auroc_and_wilson_matches_known_values() -> None:
    rng = np.random.default_rng(0)
    truth = np.array([True] * 30 + [False] * 30)
    scores = np.where(truth, rng.normal(1.0, 1.0, 60), rng.normal(0.0, 1.0, 60))
    low, high = bootstrap_auroc_ci(truth, scores, rounds=500, seed=1)
    from training.metrics import auroc

    assert low < auroc(truth, scores) < high and 0.0 <= low and high <= 1.0
    assert bootstrap_auroc_ci(np.array([True, True]), np.array([0.1, 0.2]), rounds=100, seed=0) == (
        pytest.approx(math.nan, nan_ok=True), pytest.approx(math.nan, nan_ok=True))
    value, lo, hi = wilson(8, 10)
    assert value == 0.8 and lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert all(math.isnan(v) for v in wilson(0, 0))
