"""``python -m benchmarks.model``: every stage timed, peak memory, the model and machine described."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.model import main


@pytest.mark.slow
def test_benchmark_reports_every_stage_and_peak_rss(
    tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "--slices", "24",
            "--size", "64",
            "--spacing", "4",
            "--checkpoint", str(tiny_checkpoint),
            "--repeats", "2",
            "--json",
        ]
    )
    out, _ = capsys.readouterr()
    assert code == 0
    result = json.loads(out)
    assert len(result["runs"]) == 2
    for run in result["runs"]:
        assert set(run) == {"load", "preprocess", "stage1", "stage2", "gradcam", "total"}
        assert run["total"] >= run["stage1"] >= 0.0
    assert result["chunks"] >= 1
    assert result["peak_rss_mb"] > 50
    assert result["machine"]["cores"] >= 1 and result["machine"]["cpu"]
    assert result["model"]["encoder_width"] == 4
