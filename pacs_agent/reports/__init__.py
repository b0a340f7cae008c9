"""Report writers: the model's findings as DICOM objects that go back to PACS in the source study.

- SC (sc.py): Grad-CAM overlays of the key slices on a fixed probability colour scale, one new
  series; by default only for results a radiologist must look at (CRITICAL, HIGH, REVIEW);
- SEG (seg.py, optional): the heatmaps as a FRACTIONAL segmentation;
- SR (sr.py): IHE AIR Evaluation Result, Comprehensive 3D SR with TID 1500, referencing the key
  CT slices and the SCs, and (re-analysis) its predecessor;
- KOS (kos.py): "key images" listing the key CT slices and the SCs; and, on re-analysis, an IHE
  IOCM rejection note for every object of the superseded result.
Each object gets new UIDs (a re-analysis never overwrites an earlier object) and is written to
``out_dir/<SOPInstanceUID>.dcm`` through a temporary file and a rename. They are returned in the
order they should reach PACS: images before the documents that reference them, the rejection of
the old result last, after its replacement.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom
from pydicom.dataset import Dataset

from pacs_agent.db.models import Flag
from pacs_agent.reports.kinds import ObjectKind
from pacs_agent.errors import ReportError
from pacs_agent.logs import get_logger
from pacs_agent.reports.kos import RejectedInstance, RejectionReason, build_key_images, build_rejection_note
from pacs_agent.reports.sc import build_secondary_captures
from pacs_agent.reports.seg import build_segmentation
from pacs_agent.reports.sr import build_structured_report
from pacs_agent.settings import ModelSettings, OutputSettings
from pe_model.prediction import Prediction

__all__ = ["ProducedObject", "RejectedInstance", "secondary_captures_wanted", "write_reports"]

log = get_logger(__name__)

#: Flags whose results get Grad-CAM SCs under ``outputs.secondary_capture = "positive"``.
_SC_FLAGS = frozenset({Flag.CRITICAL, Flag.HIGH, Flag.REVIEW})


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


def secondary_captures_wanted(settings: OutputSettings, flag: Flag) -> bool:
    """Whether a result with ``flag`` gets Grad-CAM SCs under ``settings.secondary_capture``."""
    if settings.key_slices <= 0 or settings.secondary_capture == "never":
        return False
    return settings.secondary_capture == "always" or flag in _SC_FLAGS


def write_reports(
    prediction: Prediction,
    source_datasets: Sequence[Dataset],
    settings: OutputSettings,
    out_dir: Path,
    *,
    flag: Flag | None = None,
    previous_report: Dataset | None = None,
    superseded: Sequence[RejectedInstance] = (),
) -> list[ProducedObject]:
    """Write the SCs, SEG, SR, key-image KOS and rejection note of one prediction, in that order.

    ``source_datasets``: the series' instances, with pixel data for the heatmap slices (the SCs
    draw on them). ``flag``: the worklist flag of the result (default: computed with the default
    review margin). ``previous_report``: the earlier SR of the same series; the new SR names it in
    Predecessor Documents. ``superseded``: every object of the earlier result; with
    ``settings.retract_superseded`` they get an IOCM rejection note (it needs the new SR).
    """
    from pacs_agent.worklist import flag_for

    if not source_datasets:
        raise ReportError(f"no source images for series {prediction.series_instance_uid}")
    studies = {str(ds.StudyInstanceUID) for ds in source_datasets}
    if studies != {prediction.study_instance_uid}:
        raise ReportError(
            f"source images belong to study {', '.join(sorted(studies))}, the prediction to {prediction.study_instance_uid}"
        )
    if flag is None:
        flag = flag_for(prediction, ModelSettings().review_margin)
    out_dir.mkdir(parents=True, exist_ok=True)
    produced: list[ProducedObject] = []
    secondary_captures: list[Dataset] = []
    if secondary_captures_wanted(settings, flag):
        sc_series = highdicom.UID()
        for sc in build_secondary_captures(prediction, source_datasets, settings, series_instance_uid=sc_series):
            produced.append(_save(sc, ObjectKind.SC, out_dir))
            secondary_captures.append(sc)
    if settings.segmentation:
        seg = build_segmentation(
            prediction, source_datasets, settings, series_instance_uid=highdicom.UID(), sop_instance_uid=highdicom.UID()
        )
        if seg is not None:
            produced.append(_save(seg, ObjectKind.SEG, out_dir))
    report_uid: str | None = None
    if settings.structured_report:
        sr = build_structured_report(
            prediction,
            source_datasets,
            settings,
            series_instance_uid=highdicom.UID(),
            sop_instance_uid=highdicom.UID(),
            flag=flag,
            secondary_captures=secondary_captures,
            previous_report=previous_report,
        )
        produced.append(_save(sr, ObjectKind.SR, out_dir))
        report_uid = str(sr.SOPInstanceUID)
    if settings.key_images and (prediction.key_images or secondary_captures):
        kos = build_key_images(
            prediction, source_datasets, secondary_captures, settings,
            series_instance_uid=highdicom.UID(), sop_instance_uid=highdicom.UID(),
        )
        produced.append(_save(kos, ObjectKind.KOS, out_dir))
    rejected = [r for r in superseded if r.sop_instance_uid not in {p.sop_instance_uid for p in produced}]
    if settings.retract_superseded and rejected:
        note = build_rejection_note(
            rejected,
            source_datasets[0],
            prediction.model,
            settings,
            reason=RejectionReason(settings.rejection_reason),
            replaced_by=report_uid or "(no report configured)",
            series_instance_uid=highdicom.UID(),
            sop_instance_uid=highdicom.UID(),
        )
        produced.append(_save(note, ObjectKind.REJECTION, out_dir))
    log.info(
        "reports_written",
        series_instance_uid=prediction.series_instance_uid,
        flag=flag.value,
        objects={kind.value: sum(p.kind == kind for p in produced) for kind in ObjectKind},
        supersedes=str(previous_report.SOPInstanceUID) if previous_report is not None else None,
        rejected=len(rejected) if settings.retract_superseded else 0,
    )
    return produced
