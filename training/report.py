"""Evaluation outputs: the Kaggle-format submission.csv, metrics.json, ROC curve PNGs and a short report.md.

Every file is written to a temporary name beside its target and then renamed, so an interrupted
evaluation never leaves a half-written file that a re-run would take for finished work.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import structlog
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pe_model.labels import EXAM_LABELS, IMAGE_LABEL
from training.errors import EvaluationInputError
from training.metrics import EXAM_PE_KEY, REPORTED_SPECIFICITY, auroc, roc_curve

log = structlog.get_logger(__name__)

#: Header of a Kaggle RSNA-STR PE submission.
SUBMISSION_HEADER: tuple[str, str] = ("id", "label")

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
COMBINED_ROC_FILE = "roc_all.png"


@contextmanager
def _atomic_text(path: Path) -> Iterator[IO[str]]:
    """Open a temporary file beside ``path`` for writing; rename it onto ``path`` only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            yield stream
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _probability(value: float, what: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise EvaluationInputError(f"{what} is {number}; a submission holds probabilities in [0, 1]")
    return number


def write_submission_csv(
    path: str | Path,
    study_instance_uids: Sequence[str],
    exam_pred: Mapping[str, np.ndarray],
    sop_instance_uids: Sequence[str],
    image_pred: Sequence[float] | np.ndarray,
) -> None:
    """Write predictions in the RSNA-STR Kaggle format: header ``id,label``.

    One row ``<StudyInstanceUID>_<label>`` per exam and exam label (exam_pred[label] has shape (E,), in the
    order of ``study_instance_uids``), then one row ``<SOPInstanceUID>`` per image with its PE probability
    (image_pred (N,), in the order of ``sop_instance_uids``). Values are written exactly (``repr``).
    """
    studies = [str(uid) for uid in study_instance_uids]
    images = [str(uid) for uid in sop_instance_uids]
    if len(set(studies)) != len(studies):
        raise EvaluationInputError("the StudyInstanceUIDs of a submission must be unique")
    if len(set(images)) != len(images):
        raise EvaluationInputError("the SOPInstanceUIDs of a submission must be unique")
    missing = [label for label in EXAM_LABELS if label not in exam_pred]
    if missing:
        raise EvaluationInputError(f"exam predictions lack the label(s) {', '.join(missing)}")
    image_values = np.asarray(image_pred, dtype=np.float64).reshape(-1)
    if image_values.shape[0] != len(images):
        raise EvaluationInputError(
            f"{image_values.shape[0]} image predictions for {len(images)} SOPInstanceUIDs"
        )
    exam_values = {label: np.asarray(exam_pred[label], dtype=np.float64).reshape(-1) for label in EXAM_LABELS}
    for label, values in exam_values.items():
        if values.shape[0] != len(studies):
            raise EvaluationInputError(
                f"{values.shape[0]} predictions of {label} for {len(studies)} StudyInstanceUIDs"
            )
    with _atomic_text(Path(path)) as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(SUBMISSION_HEADER)
        for index, study in enumerate(studies):
            for label in EXAM_LABELS:
                value = _probability(exam_values[label][index], f"{label} of exam {index}")
                writer.writerow((f"{study}_{label}", repr(value)))
        for index, sop in enumerate(images):
            writer.writerow((sop, repr(_probability(image_values[index], f"image prediction {index}"))))
    log.info("submission_written", path=str(path), exams=len(studies), images=len(images))


def read_submission_csv(path: str | Path) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    """Read a Kaggle-format submission: ``({SOPInstanceUID: p}, {(StudyInstanceUID, label): p})``."""
    # Longest suffix first: "_acute_and_chronic_pe" also ends with "_chronic_pe".
    suffixes = {label: f"_{label}" for label in sorted(EXAM_LABELS, key=len, reverse=True)}
    images: dict[str, float] = {}
    exams: dict[tuple[str, str], float] = {}
    with Path(path).open(encoding="utf-8", newline="") as stream:
        reader = csv.reader(stream)
        header = next(reader, None)
        if header is None or tuple(cell.strip() for cell in header) != SUBMISSION_HEADER:
            raise EvaluationInputError(f"{path} is not a submission: the first line must be 'id,label'")
        for line_number, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 2:
                raise EvaluationInputError(f"{path} line {line_number}: expected 2 columns, found {len(row)}")
            identifier = row[0].strip()
            try:
                value = float(row[1])
            except ValueError as exc:
                raise EvaluationInputError(f"{path} line {line_number}: {row[1]!r} is not a number") from exc
            exam_label = next((label for label, suffix in suffixes.items() if identifier.endswith(suffix)), None)
            if exam_label is None:
                if identifier in images:
                    raise EvaluationInputError(f"{path} line {line_number}: image {identifier} appears twice")
                images[identifier] = value
            else:
                key = (identifier[: -len(suffixes[exam_label])], exam_label)
                if key in exams:
                    raise EvaluationInputError(f"{path} line {line_number}: {identifier} appears twice")
                exams[key] = value
    return images, exams


def _json_safe(value: Any) -> Any:
    """Plain Python values with NaN and infinities replaced by None (strict JSON has neither)."""
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.ndarray):
        return [_json_safe(item) for item in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else None
    return value


def write_metrics_json(path: str | Path, metrics: Mapping[str, Any]) -> None:
    """Write ``metrics`` as strict JSON (NaN -> null), keys sorted, for people and for diffing runs."""
    with _atomic_text(Path(path)) as stream:
        json.dump(_json_safe(metrics), stream, indent=2, sort_keys=True, allow_nan=False)
        stream.write("\n")


def _roc_figure(title: str) -> Figure:
    figure = Figure(figsize=(5.0, 5.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="0.6", linewidth=1.0, label="chance")
    axes.set_xlim(0.0, 1.0)
    axes.set_ylim(0.0, 1.0)
    axes.set_aspect("equal")
    axes.set_xlabel("1 - specificity")
    axes.set_ylabel("sensitivity")
    axes.set_title(title)
    return figure


def _curves(
    exam_true: Mapping[str, np.ndarray],
    exam_pred: Mapping[str, np.ndarray],
    image_true_flat: np.ndarray | None,
    image_pred_flat: np.ndarray | None,
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, truth, scores) of every label whose ROC curve is defined (both classes present)."""
    candidates: list[tuple[str, np.ndarray, np.ndarray]] = [
        (label, np.asarray(exam_true[label]), np.asarray(exam_pred[label])) for label in EXAM_LABELS
    ]
    if image_true_flat is not None and image_pred_flat is not None:
        candidates.append((IMAGE_LABEL, np.asarray(image_true_flat), np.asarray(image_pred_flat)))
    defined = []
    for name, truth, scores in candidates:
        if math.isnan(auroc(truth, scores)):
            log.warning("roc_curve_skipped", label=name, reason="only one class present")
            continue
        defined.append((name, truth, scores))
    return defined


def plot_roc_curves(
    out_dir: str | Path,
    exam_true: Mapping[str, np.ndarray],
    exam_pred: Mapping[str, np.ndarray],
    image_true_flat: np.ndarray | None = None,
    image_pred_flat: np.ndarray | None = None,
) -> list[Path]:
    """One ROC PNG per label (``roc_<label>.png``) and all of them in ``roc_all.png``; returns the paths.

    Exam arrays (E,), image arrays (N,). A label with only one class present has no curve and no file.
    """
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    curves = _curves(exam_true, exam_pred, image_true_flat, image_pred_flat)
    written: list[Path] = []
    combined = _roc_figure("ROC curves")
    combined_axes = combined.axes[0]
    for name, truth, scores in curves:
        fpr, tpr, _ = roc_curve(truth, scores)
        area = auroc(truth, scores)
        figure = _roc_figure(name)
        figure.axes[0].plot(fpr, tpr, linewidth=1.5, label=f"AUROC {area:.3f}")
        figure.axes[0].legend(loc="lower right")
        target = directory / f"roc_{name}.png"
        figure.savefig(target, format="png")
        written.append(target)
        combined_axes.plot(fpr, tpr, linewidth=1.2, label=f"{name} ({area:.3f})")
    combined_axes.legend(loc="lower right", fontsize="x-small")
    target = directory / COMBINED_ROC_FILE
    combined.savefig(target, format="png")
    written.append(target)
    return written


def _number(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


def _count(value: Any) -> str:
    return "n/a" if value is None else str(int(value))


def _row(name: str, summary: Mapping[str, Any]) -> str:
    area = _number(summary.get("auroc"))
    interval = f"[{_number(summary.get('ci_low'))}-{_number(summary.get('ci_high'))}]"
    return (
        f"| {name} | {summary.get('n_pos', 'n/a')} / {summary.get('n_neg', 'n/a')} | {area} {interval} "
        f"| {_number(summary.get('threshold'))} | {_number(summary.get('sensitivity'))} "
        f"| {_number(summary.get('specificity'))} |"
    )


def _markdown(metrics: Mapping[str, Any], figures: Sequence[Path]) -> str:
    violations = metrics.get("consistency_violations", {})
    lines = [
        "# Evaluation report",
        "",
        f"- exams: {metrics.get('n_exams', 'n/a')}, images: {metrics.get('n_images', 'n/a')}",
        f"- RSNA weighted log loss: {_number(metrics.get('rsna_weighted_log_loss'))}"
        f" (after consistency correction: {_number(metrics.get('rsna_weighted_log_loss_corrected'))})",
        f"- exams violating the label consistency rules: before {_count(violations.get('before'))},"
        f" after correction {_count(violations.get('after'))}",
    ]
    image = metrics.get("image", {})
    if "sensitivity_at_0.85_specificity" in image:
        lines.append(
            f"- image level: sensitivity {_number(image.get('sensitivity_at_0.85_specificity'))} at specificity"
            f" {_number(image.get('specificity_at_0.85_specificity'))} (target {REPORTED_SPECIFICITY:.2f},"
            f" threshold {_number(image.get('threshold_at_0.85_specificity'))})"
        )
    lines += [
        "",
        "| label | positives / negatives | AUROC [95% DeLong CI] | threshold | sensitivity | specificity |",
        "|---|---|---|---|---|---|",
    ]
    for label in EXAM_LABELS:
        summary = metrics.get("labels", {}).get(label)
        if summary is not None:
            lines.append(_row(label, summary))
    if metrics.get("chunk"):
        lines.append(_row("window (chunk), stage 2", metrics["chunk"]))
    if metrics.get("chunk_stage1"):
        lines.append(_row("window (chunk), stage 1", metrics["chunk_stage1"]))
    if image:
        lines.append(_row(IMAGE_LABEL, image))
    if metrics.get(EXAM_PE_KEY):
        lines.append(_row(f"{EXAM_PE_KEY} (highest image probability)", metrics[EXAM_PE_KEY]))
    lines += ["", "## ROC curves", ""]
    lines += [f"![{figure.stem}]({figure.name})" for figure in figures]
    return "\n".join(lines) + "\n"


def write_report(
    out_dir: str | Path,
    metrics: Mapping[str, Any],
    exam_true: Mapping[str, np.ndarray],
    exam_pred: Mapping[str, np.ndarray],
    image_true_flat: np.ndarray | None = None,
    image_pred_flat: np.ndarray | None = None,
) -> list[Path]:
    """Write metrics.json, the ROC PNGs and report.md into ``out_dir``; returns every path written.

    ``metrics`` is what :func:`training.metrics.evaluate_predictions` returns. Exam arrays (E,),
    image arrays (N,) (all images of all exams, flattened); without them the image curve is left out.
    """
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    metrics_path = directory / METRICS_FILE
    write_metrics_json(metrics_path, metrics)
    figures = plot_roc_curves(directory, exam_true, exam_pred, image_true_flat, image_pred_flat)
    report_path = directory / REPORT_FILE
    with _atomic_text(report_path) as stream:
        stream.write(_markdown(metrics, figures))
    log.info("evaluation_report_written", directory=str(directory), figures=len(figures))
    return [metrics_path, *figures, report_path]
