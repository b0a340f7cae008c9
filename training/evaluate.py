"""Evaluation of a trained two-stage model on a split of the dataset.

Writes ``submission.csv`` (Kaggle format, after the consistency correction, as a submission
must be), ``metrics.json`` (RSNA weighted log loss before and after correction, per-label AUROC
with 95% DeLong CI, sensitivity/specificity, violation counts), ``report.md`` and ROC PNGs.
Image-level probabilities: each source image takes the PE probability of the chunk that covers
it (images outside the lung crop take the nearest chunk's). AUROC is reported at the three levels
a reader of the paper and of the competition expects (docs/METHOD.md, "Evaluation"): window
(chunk: ``chunk`` from stage 2's chunk head, ``chunk_stage1`` from stage 1's own logit, the level
the paper reports), image (``image``) and exam (``labels`` per exam label, ``exam_pe``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from pe_model.consistency import make_consistent
from pe_model.labels import EXAM_LABELS
from training.cache import SeriesCache
from training.dataset import SeriesRecord
from training.errors import TrainingError
from training.features import load_exam_features
from training.metrics import evaluate_predictions, label_summary
from training.report import write_report, write_submission_csv
from training.stage2 import load_sequence_model, predict_exams

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class EvaluationResult:
    metrics: dict[str, Any]
    files: tuple[Path, ...]


def image_probabilities(cache: SeriesCache, record: SeriesRecord, chunk_probs: np.ndarray) -> np.ndarray:
    """(images,) PE probability of each CSV image of the exam, in the record's order."""
    labels = cache.labels(record.key)
    meta = cache.meta(record.key)
    sop_chunk = {sop: int(c) for sop, c in zip(meta["sop_instance_uids"], labels["sop_chunk_index"], strict=True)}
    fallback = float(np.mean(chunk_probs)) if len(chunk_probs) else 0.0
    return np.array([float(chunk_probs[sop_chunk[s]]) if s in sop_chunk else fallback
                     for s in record.sop_instance_uids], dtype=np.float64)


def evaluate_split(
    cache: SeriesCache,
    records: Mapping[str, SeriesRecord],
    keys: Sequence[str],
    features_dir: str | Path,
    sequence_path: str | Path,
    out_dir: str | Path,
) -> EvaluationResult:
    """Predict ``keys`` with the trained stage 2 on stored features and write the evaluation files."""
    keys = [k for k in keys if k in cache.entries and k in records]
    if not keys:
        raise TrainingError("nothing to evaluate: no exam of the split is in the cache")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = load_sequence_model(sequence_path)
    predictions = predict_exams(model, features_dir, keys, model.config.seq_len)
    exam_true = {name: np.array([records[k].exam_labels[name] for k in keys], dtype=np.float64)
                 for name in EXAM_LABELS}
    exam_pred = {name: np.zeros(len(keys)) for name in EXAM_LABELS}
    exam_fixed = {name: np.zeros(len(keys)) for name in EXAM_LABELS}
    image_true: list[np.ndarray] = []
    image_pred: list[np.ndarray] = []
    image_fixed: list[np.ndarray] = []
    chunk_true: list[np.ndarray] = []
    chunk_pred: list[np.ndarray] = []
    chunk_stage1: list[np.ndarray] = []
    for i, key in enumerate(keys):
        exam_probs, chunk_probs = predictions[key]
        stored = load_exam_features(features_dir, key)
        chunk_true.append(np.asarray(cache.entries[key].chunk_labels, dtype=np.float64))
        chunk_pred.append(chunk_probs)
        chunk_stage1.append(1.0 / (1.0 + np.exp(-stored.chunk_logits.astype(np.float64))))
        consistent = make_consistent({n: float(p) for n, p in zip(EXAM_LABELS, exam_probs, strict=True)},
                                     [float(p) for p in chunk_probs])
        for j, name in enumerate(EXAM_LABELS):
            exam_pred[name][i] = exam_probs[j]
            exam_fixed[name][i] = consistent.probabilities[name]
        record = records[key]
        image_true.append(np.array(record.image_labels, dtype=np.float64))
        image_pred.append(image_probabilities(cache, record, chunk_probs))
        image_fixed.append(image_probabilities(cache, record, np.array(consistent.chunk_probabilities)))
    metrics = evaluate_predictions(exam_true, exam_pred, image_true, image_pred,
                                   exam_pred_corrected=exam_fixed, image_pred_corrected=image_fixed)
    windows_true = np.concatenate(chunk_true)
    metrics["chunk"] = label_summary(windows_true, np.concatenate(chunk_pred))
    metrics["chunk_stage1"] = label_summary(windows_true, np.concatenate(chunk_stage1))
    metrics["n_chunks"] = int(windows_true.shape[0])
    submission = out / "submission.csv"
    write_submission_csv(
        submission,
        [records[k].study_instance_uid for k in keys],
        exam_fixed,
        [sop for k in keys for sop in records[k].sop_instance_uids],
        np.concatenate(image_fixed),
    )
    files = [submission, *write_report(out, metrics, exam_true, exam_pred,
                                       np.concatenate(image_true), np.concatenate(image_pred))]
    log.info("evaluate.done", exams=len(keys), rsna_weighted_log_loss=metrics.get("rsna_weighted_log_loss"),
             chunk_auroc=metrics["chunk"]["auroc"], chunk_stage1_auroc=metrics["chunk_stage1"]["auroc"],
             image_auroc=metrics["image"]["auroc"],
             rsna_weighted_log_loss_corrected=metrics.get("rsna_weighted_log_loss_corrected"),
             folder=str(out))
    return EvaluationResult(metrics=metrics, files=tuple(files))
