"""``python -m pe_model predict``: JSON fields, readable summary, exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pe_model.cli import main
from pe_model.labels import EXAM_LABELS, SERIES_PE_KEY
from phantoms import PhantomTruth

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPOSITORY = Path(__file__).resolve().parents[2]


def test_predict_json_has_the_documented_fields(
    phantom_series: tuple[Path, PhantomTruth],
    tiny_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    directory, truth = phantom_series
    code = main(["predict", str(directory), "--checkpoint", str(tiny_checkpoint), "--json"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "Traceback" not in err
    result = json.loads(out)
    assert result["study_instance_uid"] == truth.study_instance_uid
    assert result["series_instance_uid"] == truth.series_instance_uid
    assert isinstance(result["pe_present"], bool)
    assert set(result["probabilities"]) == {*EXAM_LABELS, SERIES_PE_KEY}
    assert set(result["labels"]) == set(EXAM_LABELS)
    assert all(isinstance(v, bool) for v in result["labels"].values())
    assert result["key_images"], "at least one key image"
    probabilities = [k["pe_probability"] for k in result["key_images"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert {k["sop_instance_uid"] for k in result["key_images"]} <= set(truth.sop_instance_uids)
    assert {"name", "version", "sha256", "intended_use"} <= set(result["model"])
    assert len(result["model"]["sha256"]) == 64
    assert set(result["timings_s"]) == {"load", "preprocess", "stage1", "stage2", "gradcam", "total"}
    assert result["pe_present"] == (result["probabilities"][SERIES_PE_KEY] > 0.5)


def test_predict_prints_a_readable_summary(
    phantom_series: tuple[Path, PhantomTruth],
    tiny_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    directory, truth = phantom_series
    code = main(["predict", str(directory), "--checkpoint", str(tiny_checkpoint)])
    out, _ = capsys.readouterr()
    assert code == 0
    assert truth.series_instance_uid in out
    assert "NOT FOR CLINICAL USE" in out
    for label in EXAM_LABELS:
        assert label in out
    assert "Key images" in out


def test_unreadable_folder_exits_2_with_one_line(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.dcm").write_bytes(b"\x00" * 300)
    code = main(["predict", str(tmp_path), "--checkpoint", str(tiny_checkpoint), "--json"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("pe-model: error: ")


def test_tampered_checkpoint_exits_2_with_one_line(
    phantom_series: tuple[Path, PhantomTruth],
    tiny_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["metadata"]["card"]["intended_use"] = "anything"
    tampered = tmp_path / "tampered.pt"
    torch.save(payload, tampered)
    directory, _ = phantom_series
    code = main(["predict", str(directory), "--checkpoint", str(tampered)])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err == (
        f"pe-model: error: checkpoint {tampered} is corrupted or was modified: "
        "content digest mismatch\n"
    )


def test_module_entry_point_exit_code_in_a_real_process(tmp_path: Path, tiny_checkpoint: Path) -> None:
    missing = tmp_path / "no-such-folder"
    done = subprocess.run(
        [sys.executable, "-m", "pe_model", "predict", str(missing), "--checkpoint", str(tiny_checkpoint)],
        capture_output=True,
        text=True,
        cwd=REPOSITORY,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-folder" in lines[0] and "Traceback" not in done.stderr
