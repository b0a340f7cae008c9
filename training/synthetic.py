"""Synthetic datasets in the exact RSNA-STR layout, made from pe_model's phantoms.

``train/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` plus a ``train.csv`` with
all 17 columns and labels consistent per docs/METHOD.md, so the real pipeline runs on it unchanged.
A ``phantom_truth.json`` beside it keeps what the CSV cannot say (clot centres in patient mm)
for the demo's localisation check; the pipeline itself never reads it.
"""

from __future__ import annotations

import concurrent.futures as futures
import csv
import json
import multiprocessing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from tqdm import tqdm

from pe_model.labels import EXAM_LABELS
from phantoms import PhantomSpec, PhantomTruth, random_spec, write_phantom_series
from training.dataset import CSV_COLUMNS

log = structlog.get_logger(__name__)

TRUTH_NAME = "phantom_truth.json"


@dataclass(frozen=True)
class PhantomRecord:
    """Ground truth of one written phantom series, JSON-friendly (what the demo checks against)."""

    study_instance_uid: str
    series_instance_uid: str
    directory: Path
    pe: bool
    locations: tuple[str, ...]
    exam_labels: Mapping[str, bool]
    clot_centers_patient_mm: tuple[tuple[float, float, float], ...]
    clot_locations: tuple[str, ...]

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "directory": str(self.directory),
            "pe": self.pe,
            "locations": list(self.locations),
            "exam_labels": {k: bool(v) for k, v in self.exam_labels.items()},
            "clot_centers_patient_mm": [list(c) for c in self.clot_centers_patient_mm],
            "clot_locations": list(self.clot_locations),
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> PhantomRecord:
        return cls(
            study_instance_uid=str(data["study_instance_uid"]),
            series_instance_uid=str(data["series_instance_uid"]),
            directory=Path(data["directory"]),
            pe=bool(data["pe"]),
            locations=tuple(data["locations"]),
            exam_labels={str(k): bool(v) for k, v in data["exam_labels"].items()},
            clot_centers_patient_mm=tuple(
                (float(c[0]), float(c[1]), float(c[2])) for c in data["clot_centers_patient_mm"]
            ),
            clot_locations=tuple(data["clot_locations"]),
        )


def _csv_rows(truth: PhantomTruth) -> list[dict[str, str]]:
    labels = {name: int(bool(truth.exam_labels[name])) for name in EXAM_LABELS}
    informational = {
        "qa_motion": int(truth.spec.indeterminate),
        "qa_contrast": int(not truth.spec.contrast),
        "flow_artifact": 0,
        "true_filling_defect_not_pe": 0,
    }
    rows = []
    for sop, present in zip(truth.sop_instance_uids, truth.slice_pe_present, strict=True):
        values: dict[str, Any] = {
            "StudyInstanceUID": truth.study_instance_uid,
            "SeriesInstanceUID": truth.series_instance_uid,
            "SOPInstanceUID": sop,
            "pe_present_on_image": int(bool(present)),
            **labels,
            **informational,
        }
        rows.append({name: str(values[name]) for name in CSV_COLUMNS})
    return rows


def _write_one(args: tuple[str, PhantomSpec]) -> tuple[list[dict[str, str]], dict[str, Any]]:
    import torch

    torch.set_num_threads(1)
    root, spec = args
    # The study/series UIDs come from the spec; write into a scratch folder, then move into place.
    scratch = Path(root) / ".incoming" / f"{spec.seed}-{spec.patient_id}"
    truth = write_phantom_series(scratch, spec, file_names="sop")
    target = Path(root) / "train" / truth.study_instance_uid / truth.series_instance_uid
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch.replace(target)
    record = PhantomRecord(
        study_instance_uid=truth.study_instance_uid,
        series_instance_uid=truth.series_instance_uid,
        directory=target,
        pe=bool(spec.has_pe),
        locations=tuple(spec.locations) if spec.has_pe else (),
        exam_labels=dict(truth.exam_labels),
        clot_centers_patient_mm=tuple(tuple(float(v) for v in c.center_patient_mm) for c in truth.clots),  # type: ignore[misc]
        clot_locations=tuple(c.location for c in truth.clots),
    )
    return _csv_rows(truth), record.to_json_dict()


def write_synthetic_dataset(
    out_dir: str | Path,
    specs: Sequence[PhantomSpec],
    *,
    workers: int = 1,
    progress: bool = True,
) -> list[PhantomRecord]:
    """Write ``specs`` as an RSNA-layout dataset under ``out_dir`` (train/ + train.csv + truth JSON)."""
    root = Path(out_dir)
    (root / "train").mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), spec) for spec in specs]
    results: list[tuple[list[dict[str, str]], dict[str, Any]]] = []
    bar = tqdm(total=len(jobs), desc="phantoms", unit="series", disable=not progress)
    if workers <= 1:
        for job in jobs:
            results.append(_write_one(job))
            bar.update(1)
    else:
        context = multiprocessing.get_context("forkserver")
        with futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            for result in pool.map(_write_one, jobs):
                results.append(result)
                bar.update(1)
    bar.close()
    with (root / "train.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        for rows, _ in results:
            writer.writerows(rows)
    truths = [record for _, record in results]
    (root / TRUTH_NAME).write_text(json.dumps(truths, indent=1))
    incoming = root / ".incoming"
    if incoming.exists():
        incoming.rmdir()
    log.info("synthetic.written", root=str(root), series=len(specs),
             positives=sum(1 for t in truths if t["pe"]))
    return [PhantomRecord.from_json_dict(t) for t in truths]


def read_phantom_truth(out_dir: str | Path) -> list[PhantomRecord]:
    data = json.loads((Path(out_dir) / TRUTH_NAME).read_text())
    return [PhantomRecord.from_json_dict(item) for item in data]


def demo_specs(count: int, *, seed: int, **overrides: Any) -> list[PhantomSpec]:
    """``count`` varied CTPA phantom specs (phantoms.random_spec), reproducible from ``seed``.

    Every phantom gets its own patient ID so the patient-grouped split treats them as patients.
    """
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(count):
        values = {"patient_id": f"SYN-{seed:04d}-{i:05d}", **overrides}
        specs.append(random_spec(rng, **values))
    return specs
