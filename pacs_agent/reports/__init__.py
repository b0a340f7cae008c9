"""Report writers: the model's findings as DICOM objects that go back to PACS in the source study.

- SR (sr.py): Comprehensive SR, TID 1500 measurement report with the findings and provenance;
- SC (sc.py): Grad-CAM overlays of the key slices with a burned-in legend, one new series;
- SEG (seg.py, optional): the heatmaps as a FRACTIONAL segmentation.
Each object gets new UIDs (a re-analysis never overwrites an earlier object) and is written to
``out_dir/<SOPInstanceUID>.dcm`` through a temporary file and a rename.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom
from pydicom.dataset import Dataset

from pacs_agent.errors import ReportError
from pacs_agent.logs import get_logger
from pacs_agent.reports.kinds import ObjectKind
from pacs_agent.reports.sc import build_secondary_captures
from pacs_agent.reports.seg import build_segmentation
from pacs_agent.reports.sr import build_structured_report
from pacs_agent.settings import OutputSettings
from pe_model.prediction import Prediction

__all__ = ["ProducedObject", "write_reports"]

log = get_logger(__name__)


@dataclass(frozen=True)
class ProducedObject:
    """A DICOM file this node made, ready for the dispatcher."""

    kind: ObjectKind
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str


def _save(ds: Dataset, kind: ObjectKind, out_dir: Path) -> ProducedObject:
    path = out_dir / f"{ds.SOPInstanceUID}.dcm"
    tmp = out_dir / f".{ds.SOPInstanceUID}.dcm.tmp"
    try:
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ReportError(f"cannot write {kind.value} to {out_dir}: {exc.strerror or exc}") from exc
    return ProducedObject(
        kind=kind,
        path=path,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
    )


def write_reports(
    prediction: Prediction,
    source_datasets: Sequence[Dataset],
    settings: OutputSettings,
    out_dir: Path,
    *,
    previous_report: Dataset | None = None,
) -> list[ProducedObject]:
    """Write the SR, SCs and (optionally) SEG of one prediction; returns them in that order.

    ``source_datasets``: the series' instances, with pixel data (the SCs draw on them).
    ``previous_report``: the earlier SR of the same series; the new SR references and supersedes it.
    """
    if not source_datasets:
        raise ReportError(f"no source images for series {prediction.series_instance_uid}")
    studies = {str(ds.StudyInstanceUID) for ds in source_datasets}
    if studies != {prediction.study_instance_uid}:
        raise ReportError(
            f"source images belong to study {', '.join(sorted(studies))}, the prediction to {prediction.study_instance_uid}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    produced: list[ProducedObject] = []
    if settings.structured_report:
        sr = build_structured_report(
            prediction,
            source_datasets,
            settings,
            series_instance_uid=highdicom.UID(),
            sop_instance_uid=highdicom.UID(),
            previous_report=previous_report,
        )
        produced.append(_save(sr, ObjectKind.SR, out_dir))
    if settings.secondary_capture and settings.key_slices > 0:
        sc_series = highdicom.UID()
        for sc in build_secondary_captures(prediction, source_datasets, settings, series_instance_uid=sc_series):
            produced.append(_save(sc, ObjectKind.SC, out_dir))
    if settings.segmentation:
        seg = build_segmentation(
            prediction, source_datasets, settings, series_instance_uid=highdicom.UID(), sop_instance_uid=highdicom.UID()
        )
        if seg is not None:
            produced.append(_save(seg, ObjectKind.SEG, out_dir))
    log.info(
        "reports_written",
        series_instance_uid=prediction.series_instance_uid,
        objects={kind.value: sum(p.kind == kind for p in produced) for kind in ObjectKind},
        supersedes=str(previous_report.SOPInstanceUID) if previous_report is not None else None,
    )
    return produced
