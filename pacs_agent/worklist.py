"""Worklist priority flags: one row per study, most urgent flag of its series' latest outcomes first.

Flags, from the final consistent labels:
- CRITICAL: PE and (RV/LV >= 1 or central PE);
- HIGH: PE;
- REVIEW: no PE, but the exam is indeterminate or the PE probability is within ``review_margin`` of 0.5;
  and every series the input-quality gate (``pe_model.quality``) calls non-diagnostic, whatever the
  model said: its answer cannot be trusted either way, so a human reads it;
- ROUTINE: no PE, confidently, on a series that passed the gate (or whose quality is unverified);
- ERROR: the analysis failed for good — a human must read the study.
A positive near the threshold stays HIGH/CRITICAL: the more urgent flag wins, never a quieter one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacs_agent.db.models import Flag, Job, JobStatus, Result, Series, Study, utcnow

if TYPE_CHECKING:  # pe_model pulls in torch; the admin CLI reads the worklist without it
    from pe_model.prediction import Prediction

#: pe_model.labels.THRESHOLD: the decision threshold of the consistency rules.
THRESHOLD = 0.5


@dataclass(frozen=True)
class WorklistEntry:
    """One study on the reading worklist."""

    study_instance_uid: str
    accession_number: str
    flag: Flag
    pe_probability: float | None
    series_instance_uid: str
    job_id: int | None
    summary: str
    first_received_at: datetime
    updated_at: datetime

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "accession_number": self.accession_number,
            "flag": self.flag.value,
            "pe_probability": None if self.pe_probability is None else round(self.pe_probability, 6),
            "series_instance_uid": self.series_instance_uid,
            "job_id": self.job_id,
            "summary": self.summary,
            "first_received_at": self.first_received_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


def _finding(finding: Prediction | Result) -> tuple[bool, float, Mapping[str, Any]]:
    if isinstance(finding, Result):
        return bool(finding.pe_present), float(finding.pe_probability), finding.labels or {}
    return bool(finding.pe_present), float(finding.series_pe_probability), finding.labels


def non_diagnostic_reason(finding: Prediction | Result) -> str | None:
    """The gate's "non-diagnostic: <reasons with values>" line, or None when the series passed
    (or was analysed before the gate existed)."""
    if isinstance(finding, Result):
        quality: Mapping[str, Any] = finding.quality or {}
        if quality.get("status") == "non-diagnostic":
            return str(quality.get("summary") or "non-diagnostic")
        return None
    if finding.quality is not None and not finding.quality.passed:
        return finding.quality.summary
    return None


def flag_for(finding: Prediction | Result, review_margin: float) -> Flag:
    """The worklist flag of one analysed series (a Prediction, or the Result stored from one)."""
    if non_diagnostic_reason(finding) is not None:
        return Flag.REVIEW
    pe_present, probability, labels = _finding(finding)
    if pe_present:
        if labels.get("rv_lv_ratio_gte_1") or labels.get("central_pe"):
            return Flag.CRITICAL
        return Flag.HIGH
    if labels.get("indeterminate") or abs(probability - THRESHOLD) < review_margin:
        return Flag.REVIEW
    return Flag.ROUTINE


def summarize(finding: Prediction | Result) -> str:
    """One line for the worklist, e.g. "PE (p=0.93): central, right; RV/LV >= 1; acute", or for a
    series the gate failed "non-diagnostic: pulmonary trunk 62 HU < 250 HU; model: no PE (p=0.08)"."""
    reason = non_diagnostic_reason(finding)
    model = _model_summary(finding)
    return model if reason is None else f"{reason}; model: {model}"


def _model_summary(finding: Prediction | Result) -> str:
    pe_present, probability, labels = _finding(finding)
    if not pe_present:
        kind = "indeterminate exam" if labels.get("indeterminate") else "no PE"
        return f"{kind} (p={probability:.2f})"
    sites = [name for key, name in (("central_pe", "central"), ("leftsided_pe", "left"), ("rightsided_pe", "right")) if labels.get(key)]
    parts = [f"PE (p={probability:.2f})" + (f": {', '.join(sites)}" if sites else "")]
    parts.append("RV/LV >= 1" if labels.get("rv_lv_ratio_gte_1") else "RV/LV < 1")
    if labels.get("chronic_pe"):
        parts.append("chronic")
    elif labels.get("acute_and_chronic_pe"):
        parts.append("acute and chronic")
    else:
        parts.append("acute")
    return "; ".join(parts)


def refresh_study(session: Session, study_instance_uid: str) -> Study | None:
    """Recompute a study's worklist row from the latest finished job of each of its series.

    Finished means SUCCEEDED (flag from its Result) or FAILED (ERROR). Returns None when no series
    of the study has a finished job yet (nothing to show).
    """
    series_rows = list(session.scalars(select(Series).where(Series.study_instance_uid == study_instance_uid)))
    if not series_rows:
        return None
    candidates: list[tuple[int, datetime, Flag, float | None, str, int, str]] = []
    for series in series_rows:
        job = session.scalars(
            select(Job)
            .where(Job.series_id == series.id, Job.status.in_((JobStatus.SUCCEEDED, JobStatus.FAILED)))
            .order_by(Job.id.desc())
            .limit(1)
        ).first()
        if job is None:
            continue
        finished = job.finished_at or utcnow()
        if job.status == JobStatus.FAILED:
            candidates.append((Flag.ERROR.rank, finished, Flag.ERROR, None, series.series_instance_uid, job.id, f"analysis failed: {job.error}"))
            continue
        result = session.scalars(select(Result).where(Result.job_id == job.id)).first()
        if result is None:
            continue
        candidates.append((result.flag.rank, finished, result.flag, result.pe_probability, series.series_instance_uid, job.id, summarize(result)))
    if not candidates:
        return None
    rank, finished, flag, probability, series_uid, job_id, summary = min(candidates, key=lambda c: (c[0], -c[1].timestamp()))
    study = session.get(Study, study_instance_uid)
    if study is None:
        study = Study(study_instance_uid=study_instance_uid)
        session.add(study)
    study.accession_number = next((s.accession_number for s in series_rows if s.accession_number), "")
    study.flag = flag
    study.flag_rank = rank
    study.pe_probability = probability
    study.series_instance_uid = series_uid
    study.job_id = job_id
    study.summary = summary[:1000]
    study.first_received_at = min(s.first_received_at for s in series_rows)
    study.updated_at = utcnow()
    session.flush()
    return study


def list_worklist(session: Session, *, flags: tuple[Flag, ...] = (), limit: int | None = None) -> list[WorklistEntry]:
    """Studies ordered by flag (most urgent first), then by arrival (oldest first)."""
    stmt = select(Study).order_by(Study.flag_rank, Study.first_received_at, Study.study_instance_uid)
    if flags:
        stmt = stmt.where(Study.flag.in_(flags))
    if limit is not None:
        stmt = stmt.limit(limit)
    return [
        WorklistEntry(
            study_instance_uid=s.study_instance_uid,
            accession_number=s.accession_number,
            flag=s.flag,
            pe_probability=s.pe_probability,
            series_instance_uid=s.series_instance_uid,
            job_id=s.job_id,
            summary=s.summary,
            first_received_at=s.first_received_at,
            updated_at=s.updated_at,
        )
        for s in session.scalars(stmt)
    ]


def flag_counts(session: Session) -> dict[str, int]:
    """Number of studies per flag (every flag present, zero included)."""
    counts = {flag.value: 0 for flag in Flag}
    for flag, count in session.execute(select(Study.flag, func.count()).group_by(Study.flag)):
        counts[Flag(flag).value] = int(count)
    return counts
