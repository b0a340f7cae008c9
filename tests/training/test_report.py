"""Evaluation outputs: submission.csv round trip, metrics.json, ROC PNGs and report.md."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pe_model.labels import EXAM_LABELS, IMAGE_LABEL
from training.errors import EvaluationInputError
from training.metrics import evaluate_predictions
from training.report import (
    read_submission_csv,
    write_metrics_json,
    write_report,
    write_submission_csv,
)


def _uids(prefix: str, count: int) -> list[str]:
    return [f"1.2.826.0.1.3680043.8.498.{prefix}.{index + 1}" for index in range(count)]


def test_submission_round_trip_and_row_count(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    studies = _uids("1", 3)
    sops = _uids("2", 17)
    exam_pred = {label: rng.random(3) for label in EXAM_LABELS}
    image_pred = rng.random(17)
    path = tmp_path / "out" / "submission.csv"

    write_submission_csv(path, studies, exam_pred, sops, image_pred)

    with path.open(newline="") as stream:
        rows = list(csv.reader(stream))
    assert rows[0] == ["id", "label"]
    assert len(rows) - 1 == 17 + 9 * 3
    ids = [row[0] for row in rows[1:]]
    assert len(set(ids)) == len(ids)
    assert f"{studies[1]}_rv_lv_ratio_gte_1" in ids and sops[16] in ids

    images, exams = read_submission_csv(path)
    assert images == {sop: float(value) for sop, value in zip(sops, image_pred, strict=True)}
    assert len(exams) == 27
    for index, study in enumerate(studies):
        for label in EXAM_LABELS:
            assert exams[(study, label)] == float(exam_pred[label][index])  # exact: values are written with repr
    assert not list(tmp_path.joinpath("out").glob(".*.tmp"))


def test_submission_refuses_inputs_that_do_not_fit(tmp_path: Path) -> None:
    studies = _uids("1", 2)
    exam_pred = {label: np.full(2, 0.5) for label in EXAM_LABELS}
    path = tmp_path / "submission.csv"
    with pytest.raises(EvaluationInputError, match="3 image predictions for 2"):
        write_submission_csv(path, studies, exam_pred, _uids("2", 2), np.full(3, 0.5))
    with pytest.raises(EvaluationInputError, match="must be unique"):
        write_submission_csv(path, [studies[0], studies[0]], exam_pred, _uids("2", 2), np.full(2, 0.5))
    with pytest.raises(EvaluationInputError, match="lack the label"):
        write_submission_csv(path, studies, {"central_pe": np.full(2, 0.5)}, _uids("2", 2), np.full(2, 0.5))
    bad = dict(exam_pred, central_pe=np.array([0.5, 1.2]))
    with pytest.raises(EvaluationInputError, match=r"probabilities in \[0, 1\]"):
        write_submission_csv(path, studies, bad, _uids("2", 2), np.full(2, 0.5))
    assert not path.exists()  # nothing half-written is left behind
    assert not list(tmp_path.glob(".*.tmp"))


def test_reading_a_file_that_is_not_a_submission_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("StudyInstanceUID,p\n1.2.3,0.5\n")
    with pytest.raises(EvaluationInputError, match="first line must be 'id,label'"):
        read_submission_csv(path)
    path.write_text("id,label\n1.2.3_central_pe,0.5\n1.2.3_central_pe,0.4\n")
    with pytest.raises(EvaluationInputError, match="appears twice"):
        read_submission_csv(path)
    path.write_text("id,label\n1.2.3,high\n")
    with pytest.raises(EvaluationInputError, match="line 2: 'high' is not a number"):
        read_submission_csv(path)


def test_metrics_json_is_strict_json(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_metrics_json(path, {"a": float("nan"), "b": np.float32(0.25), "c": [np.int64(3), float("inf")], "d": {"e": True}})
    assert json.loads(path.read_text()) == {"a": None, "b": 0.25, "c": [3, None], "d": {"e": True}}


def _evaluation() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(1)
    n_exams = 24
    exam_true = {label: (rng.random(n_exams) < 0.5).astype(float) for label in EXAM_LABELS}
    exam_true["indeterminate"] = np.zeros(n_exams)  # one class only: no curve
    exam_pred = {label: np.clip(0.5 * exam_true[label] + 0.5 * rng.random(n_exams), 0, 1) for label in EXAM_LABELS}
    image_true = [(rng.random(6) < 0.4).astype(int) for _ in range(n_exams)]
    image_pred = [np.clip(0.4 * images + 0.6 * rng.random(6), 0, 1) for images in image_true]
    return exam_true, exam_pred, image_true, image_pred


def test_report_writes_metrics_pngs_and_markdown(tmp_path: Path) -> None:
    exam_true, exam_pred, image_true, image_pred = _evaluation()
    metrics = evaluate_predictions(exam_true, exam_pred, image_true, image_pred)
    out = tmp_path / "report"

    written = write_report(out, metrics, exam_true, exam_pred, np.concatenate(image_true), np.concatenate(image_pred))

    assert all(path.is_file() and path.parent == out for path in written)
    loaded = json.loads((out / "metrics.json").read_text())
    assert loaded["rsna_weighted_log_loss"] == pytest.approx(metrics["rsna_weighted_log_loss"])
    assert loaded["labels"]["indeterminate"]["auroc"] is None

    pngs = sorted(path.name for path in written if path.suffix == ".png")
    expected = {f"roc_{label}.png" for label in EXAM_LABELS if label != "indeterminate"}
    assert set(pngs) == expected | {f"roc_{IMAGE_LABEL}.png", "roc_all.png"}
    for name in pngs:
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG"
        with Image.open(out / name) as image:
            assert image.size == (500, 500)
            assert len(set(image.convert("L").getdata())) > 2  # something is drawn

    report = (out / "report.md").read_text()
    central = metrics["labels"]["central_pe"]
    assert f"| central_pe | {central['n_pos']} / {central['n_neg']} | {central['auroc']:.3f} " in report
    assert f"[{central['ci_low']:.3f}-{central['ci_high']:.3f}]" in report
    assert "| indeterminate | 0 / 24 | n/a [n/a-n/a] |" in report
    assert f"{metrics['rsna_weighted_log_loss']:.3f}" in report
    assert "![roc_all](roc_all.png)" in report
    before = metrics["consistency_violations"]["before"]
    assert f"rules: before {before}, after correction n/a" in report  # no corrected predictions given


def test_report_without_image_arrays_has_exam_curves_only(tmp_path: Path) -> None:
    exam_true, exam_pred, image_true, image_pred = _evaluation()
    metrics = evaluate_predictions(exam_true, exam_pred, image_true, image_pred)
    written = write_report(tmp_path, metrics, exam_true, exam_pred)
    names = {path.name for path in written}
    assert f"roc_{IMAGE_LABEL}.png" not in names
    assert {"metrics.json", "report.md", "roc_all.png", "roc_central_pe.png"} <= names
