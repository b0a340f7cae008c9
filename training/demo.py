"""The built-in demo checkpoint: trained on synthetic phantoms, checked on unseen ones.

``pe-train demo-checkpoint`` writes phantoms in the RSNA layout, runs the ordinary pipeline with
the ``demo`` preset, then judges the packaged model with the real ``pe_model.Predictor`` on
unseen phantoms written as DICOM files: exam-level PE AUROC, the right side(s) of the clots,
and whether Grad-CAM peaks near a planted clot. Only a model that meets every threshold is
written (unless forced), with a card that says what it is: NOT FOR CLINICAL USE.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from tqdm import tqdm

from pe_model.checkpoint import ModelCard
from pe_model.labels import SERIES_PE_KEY
from training.distributed import DistributedContext
from training.errors import DemoQualityError
from training.metrics import auroc
from training.pipeline import RunPaths, package, preset, run_pipeline
from training.synthetic import PhantomRecord, randomised_specs, read_phantom_truth, write_synthetic_dataset

log = structlog.get_logger(__name__)

DEMO_NAME = "pe-triage-demo"
DEMO_VERSION = "2.0.0"
DEMO_INTENDED_USE = (
    "demonstration and testing only — trained on synthetic phantoms — NOT FOR CLINICAL USE"
)
_SIDE_LABELS = {"central": "central_pe", "left": "leftsided_pe", "right": "rightsided_pe"}


@dataclass(frozen=True)
class DemoThresholds:
    """What the demo model must reach on unseen phantoms (issue 3, item 8)."""

    min_exam_pe_auroc: float = 0.95
    min_side_accuracy: float = 0.80
    min_gradcam_hit_rate: float = 0.80
    gradcam_radius_mm: float = 15.0


@dataclass(frozen=True)
class DemoEvaluation:
    """Figures of the demo model on unseen phantoms, computed with the real Predictor."""

    n_series: int
    n_positive: int
    exam_pe_auroc: float
    #: Positives whose most probable location (central/left/right) is a planted one.
    side_accuracy: float
    #: Positives whose consistent location labels equal the planted set exactly (stricter).
    side_exact_accuracy: float
    gradcam_hit_rate: float
    gradcam_median_distance_mm: float
    seconds_per_series: float
    #: Positives whose RV/LV >= 1 call (consistent labels) matches the phantom's ratio.
    rv_lv_accuracy: float = float("nan")
    #: Negatives called PE with a central clot or RV/LV >= 1 (what the node flags CRITICAL).
    false_critical_negatives: int = 0
    per_series: tuple[dict[str, Any], ...] = field(default=())

    def passes(self, thresholds: DemoThresholds) -> list[str]:
        """The thresholds missed (empty when all are met)."""
        missed = []
        if not self.exam_pe_auroc >= thresholds.min_exam_pe_auroc:
            missed.append(f"exam PE AUROC {self.exam_pe_auroc:.3f} < {thresholds.min_exam_pe_auroc}")
        if not self.side_accuracy >= thresholds.min_side_accuracy:
            missed.append(f"side accuracy {self.side_accuracy:.3f} < {thresholds.min_side_accuracy}")
        if not self.gradcam_hit_rate >= thresholds.min_gradcam_hit_rate:
            missed.append(f"Grad-CAM within {thresholds.gradcam_radius_mm:g} mm "
                          f"{self.gradcam_hit_rate:.3f} < {thresholds.min_gradcam_hit_rate}")
        return missed

    def card_metrics(self) -> dict[str, float]:
        return {
            "eval_series": float(self.n_series),
            "eval_positive_series": float(self.n_positive),
            "exam_pe_auroc": round(self.exam_pe_auroc, 4),
            "side_accuracy": round(self.side_accuracy, 4),
            "side_exact_accuracy": round(self.side_exact_accuracy, 4),
            "gradcam_within_15mm": round(self.gradcam_hit_rate, 4),
            "gradcam_median_distance_mm": round(self.gradcam_median_distance_mm, 2),
            "rv_lv_accuracy": round(self.rv_lv_accuracy, 4),
            "false_critical_negatives": float(self.false_critical_negatives),
        }

    def confidence_intervals(self, radius_mm: float = 15.0) -> dict[str, tuple[float, float]]:
        """95 % intervals: DeLong for the AUROC, Wilson for the proportions (over the positives)."""
        from scipy.stats import binomtest

        from training.metrics import delong_ci

        rows = self.per_series
        intervals: dict[str, tuple[float, float]] = {}
        y = np.asarray([int(r["pe"]) for r in rows])
        if 0 < y.sum() < len(y):
            _, low, high = delong_ci(y, np.asarray([float(r["pe_probability"]) for r in rows]))
            intervals["exam_pe_auroc"] = (round(float(low), 4), round(min(float(high), 1.0), 4))
        positives = [r for r in rows if r["pe"]]
        hits = {
            "side_accuracy": [r["top_side"] in r["planted_sides"] for r in positives],
            "side_exact_accuracy": [r["predicted_sides"] == r["planted_sides"] for r in positives],
            "rv_lv_accuracy": [r["rv_lv_gte_1_called"] == (r["rv_lv_ratio"] >= 1.0)
                               for r in positives if "rv_lv_ratio" in r],
            "gradcam_within_15mm": [r["gradcam_distance_mm"] is not None and r["gradcam_distance_mm"] <= radius_mm
                                    for r in positives],
        }
        for name, values in hits.items():
            if values:
                ci = binomtest(int(sum(values)), len(values)).proportion_ci(method="wilson")
                intervals[name] = (round(float(ci.low), 4), round(float(ci.high), 4))
        return intervals

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_with_predictor(checkpoint: str | Path, records: list[PhantomRecord], *,
                            radius_mm: float = 15.0, progress: bool = True) -> DemoEvaluation:
    """Run the real Predictor on each phantom folder and score it against the phantom truth.

    Side: the most probable of central/left/right must be a planted location (also reported:
    the consistent location labels equal to the planted set exactly, a positive exam called
    negative counting as wrong). Grad-CAM: the peak of the best key image's
    heatmap (patient mm) must lie within ``radius_mm`` of the centre of a planted clot.
    """
    from pe_model.predictor import Predictor

    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    scores: list[float] = []
    truth: list[int] = []
    side_hits: list[bool] = []
    side_exact: list[bool] = []
    cam_distances: list[float] = []
    rv_lv_hits: list[bool] = []
    false_critical = 0
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for record in tqdm(records, desc="judge demo", unit="series", disable=not progress):
        prediction = predictor.predict(record.directory)
        score = float(prediction.probabilities[SERIES_PE_KEY])
        scores.append(score)
        truth.append(int(record.pe))
        row: dict[str, Any] = {"series_instance_uid": record.series_instance_uid, "pe": record.pe,
                               "pe_probability": round(score, 4), "pe_present": prediction.pe_present,
                               "precision": prediction.precision}
        critical = prediction.pe_present and (prediction.labels["central_pe"] or prediction.labels["rv_lv_ratio_gte_1"])
        if not record.pe and critical:
            false_critical += 1
            row["critical"] = True
        if record.pe:
            predicted_sides = sorted(s for s, label in _SIDE_LABELS.items() if prediction.labels[label])
            planted = sorted(set(record.locations))
            side_probabilities = {s: float(prediction.probabilities[label]) for s, label in _SIDE_LABELS.items()}
            top_side = max(side_probabilities, key=lambda s: side_probabilities[s])
            side_hits.append(top_side in planted)
            side_exact.append(predicted_sides == planted)
            row.update(planted_sides=planted, predicted_sides=predicted_sides, top_side=top_side)
            if record.rv_lv_ratio is not None:
                called = bool(prediction.labels["rv_lv_ratio_gte_1"])
                rv_lv_hits.append(called == (record.rv_lv_ratio >= 1.0))
                row.update(rv_lv_ratio=record.rv_lv_ratio, rv_lv_gte_1_called=called)
            distance = math.inf
            if prediction.heatmaps and record.clot_centers_patient_mm:
                peak = np.asarray(prediction.heatmaps[0].peak_position_patient, dtype=np.float64)
                distance = min(float(np.linalg.norm(peak - np.asarray(c))) for c in record.clot_centers_patient_mm)
            cam_distances.append(distance)
            row["gradcam_distance_mm"] = None if math.isinf(distance) else round(distance, 1)
        rows.append(row)
    seconds = (time.perf_counter() - started) / max(len(records), 1)
    y = np.asarray(truth)
    auc = float(auroc(y, np.asarray(scores))) if 0 < y.sum() < len(y) else float("nan")
    finite = [d for d in cam_distances if math.isfinite(d)]
    return DemoEvaluation(
        n_series=len(records),
        n_positive=int(y.sum()),
        exam_pe_auroc=auc,
        side_accuracy=float(np.mean(side_hits)) if side_hits else float("nan"),
        side_exact_accuracy=float(np.mean(side_exact)) if side_exact else float("nan"),
        gradcam_hit_rate=float(np.mean([d <= radius_mm for d in cam_distances])) if cam_distances else float("nan"),
        gradcam_median_distance_mm=float(np.median(finite)) if finite else float("nan"),
        seconds_per_series=seconds,
        rv_lv_accuracy=float(np.mean(rv_lv_hits)) if rv_lv_hits else float("nan"),
        false_critical_negatives=false_critical,
        per_series=tuple(rows),
    )


def demo_card(n_train: int, evaluation: DemoEvaluation | None) -> ModelCard:
    return ModelCard(
        name=DEMO_NAME,
        version=DEMO_VERSION,
        training_data=f"domain-randomised synthetic CTPA phantoms (phantoms.randomised), {n_train} series",
        intended_use=DEMO_INTENDED_USE,
        metrics=evaluation.card_metrics() if evaluation is not None else {},
        not_for_clinical_use=True,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def build_demo_checkpoint(
    work_dir: str | Path,
    out_path: str | Path,
    *,
    context: DistributedContext,
    n_train: int = 160,
    n_eval: int = 40,
    seed: int = 2026,
    workers: int = 2,
    thresholds: DemoThresholds = DemoThresholds(),
    force: bool = False,
    progress: bool = True,
) -> DemoEvaluation:
    """Generate phantoms, train with the demo preset, judge on unseen phantoms, write ``out_path``.

    Raises DemoQualityError (and writes nothing to ``out_path``) when a threshold is missed,
    unless ``force``. A JSON card with the figures is written beside ``out_path``.
    """
    started = time.perf_counter()
    work = Path(work_dir)
    train_dir, eval_dir = work / "phantoms-train", work / "phantoms-eval"
    if not (train_dir / "train.csv").is_file():
        write_synthetic_dataset(train_dir, randomised_specs(n_train, seed=seed), workers=workers, progress=progress)
    if not (eval_dir / "train.csv").is_file():
        write_synthetic_dataset(eval_dir, randomised_specs(n_eval, seed=seed + 1), workers=workers,
                                progress=progress)
    settings = preset("demo")
    settings = type(settings)(**{**settings.__dict__, "cache_workers": workers})
    run = RunPaths(work / "run")
    run_pipeline(train_dir, run.work, settings, context=context, progress=progress,
                 card=demo_card(n_train, None))
    trained_seconds = time.perf_counter() - started
    evaluation = evaluate_with_predictor(run.model, read_phantom_truth(eval_dir),
                                         radius_mm=thresholds.gradcam_radius_mm, progress=progress)
    log.info("demo.evaluation", **evaluation.card_metrics(), train_seconds=round(trained_seconds, 1))
    report = {
        "evaluation": evaluation.to_json_dict(),
        "thresholds": asdict(thresholds),
        "train_series": n_train,
        "eval_series": n_eval,
        "seed": seed,
        "train_seconds": round(trained_seconds, 1),
        "test_split_metrics": _read_json(run.evaluation / "metrics.json"),
    }
    (work / "demo_report.json").write_text(json.dumps(report, indent=1, default=_json_default))
    missed = evaluation.passes(thresholds)
    if missed and not force:
        raise DemoQualityError("demo model not written: " + "; ".join(missed))
    card = demo_card(n_train, evaluation)
    sha = package(run, settings, card, out_path)
    card_path = Path(out_path).with_suffix(".json")
    card_path.write_text(json.dumps({
        **card.to_dict(),
        "sha256": sha,
        "thresholds_met": not missed,
        "missed": missed,
        "reproduce": f"pe-train demo-checkpoint --n-train {n_train} --n-eval {n_eval} --seed {seed}"
                     + (" --force" if missed else ""),
        "train_seconds": round(trained_seconds, 1),
        "thresholds": asdict(thresholds),
    }, indent=1))
    log.info("demo.written", path=str(out_path), sha256=sha, size_bytes=Path(out_path).stat().st_size,
             seconds=round(time.perf_counter() - started, 1))
    return evaluation


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def evaluate_family(checkpoint: str | Path, work_dir: str | Path, *, family: str, count: int, seed: int,
                    workers: int = 2, progress: bool = True) -> dict[str, Any]:
    """Judge ``checkpoint`` on ``count`` fresh phantoms of a family ("randomised": phantoms.randomised
    at the demo's training ranges; "ctpa": the first-generation phantoms.ctpa) with the Predictor.

    Returns the figures, their 95 % intervals and the per-series rows (also written to
    ``work_dir/evaluation.json``). The series are written under ``work_dir/phantoms`` once.
    """
    from training.synthetic import demo_specs

    if family not in ("randomised", "ctpa"):
        raise DemoQualityError(f"family must be randomised or ctpa, not {family!r}")
    work = Path(work_dir)
    data = work / "phantoms"
    if not (data / "train.csv").is_file():
        specs = randomised_specs(count, seed=seed) if family == "randomised" else demo_specs(count, seed=seed)
        write_synthetic_dataset(data, specs, workers=workers, progress=progress)
    evaluation = evaluate_with_predictor(checkpoint, read_phantom_truth(data), progress=progress)
    result = {"family": family, "count": count, "seed": seed, "checkpoint": str(checkpoint),
              "metrics": evaluation.card_metrics(), "confidence_intervals_95": evaluation.confidence_intervals(),
              "seconds_per_series": round(evaluation.seconds_per_series, 2),
              "per_series": list(evaluation.per_series)}
    (work / "evaluation.json").write_text(json.dumps(result, indent=1, default=_json_default))
    return result
