"""What one analysis gives: the prediction and the objects written from it, as JSON or a readable summary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pacs_agent.reports import ProducedObject
    from pe_model.prediction import Prediction


@dataclass(frozen=True)
class AnalysisOutcome:
    """A prediction and the DICOM objects written from it."""

    prediction: Prediction
    produced: tuple[ProducedObject, ...]

    def to_json_dict(self) -> dict[str, Any]:
        return {
            **self.prediction.to_json_dict(),
            "written": [
                {"kind": p.kind.value, "path": str(p.path), "sop_class_uid": p.sop_class_uid,
                 "sop_instance_uid": p.sop_instance_uid, "series_instance_uid": p.series_instance_uid}
                for p in self.produced
            ],
        }

    def summary(self, review_margin: float) -> str:
        """Readable lines: flag, finding, model (with NOT FOR CLINICAL USE for a demo model), objects written."""
        from pacs_agent.worklist import flag_for, summarize

        p = self.prediction
        lines = [
            f"series {p.series_instance_uid}",
            f"flag: {flag_for(p, review_margin).value}   {summarize(p)}",
            f"model: {p.model.name} {p.model.version} (sha256 {p.model.sha256[:16]}...)"
            + ("  NOT FOR CLINICAL USE" if p.model.not_for_clinical_use else ""),
            "labels: " + ", ".join(k for k, v in p.labels.items() if v),
        ]
        lines += [f"wrote {o.kind.value}: {o.path}" for o in self.produced]
        return "\n".join(lines)
