"""deploy/gpu_check.py, the prepared device script: agreement check, timings, exit codes.

Without a GPU the script runs with ``--cpu-only`` (CPU fp32 against CPU bf16 autocast, the precision
path CUDA takes) on a small phantom and model; on a CUDA machine the full check runs (marked gpu).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "gpu_check.py"
SMALL = ["--slices", "48", "--size", "64", "--spacing", "2.5", "--width", "4", "--input-size", "32", "--repeats", "1"]


def _script() -> ModuleType:
    """deploy/gpu_check.py as a module (deploy/ is not a package), run in-process like pynetdicom's apps."""
    if "gpu_check" in sys.modules:
        return sys.modules["gpu_check"]
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def test_cpu_only_run_agrees_and_reports_every_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "check.json"
    code = _script().main(["--cpu-only", *SMALL, "--json-out", str(out)])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0
    assert printed == json.loads(out.read_text())
    assert printed["exit_code"] == 0 and printed["agreement"]["agree"] is True
    assert 0.0 < printed["agreement"]["max_abs_difference"] <= 0.02  # bf16 differs from fp32, a little
    assert printed["accelerated_path"] == {
        "device": "cpu", "precision": "bf16", "autocast_dtype": "torch.bfloat16",
        "stage1_weights_channels_last_3d": True, "stage1_batch_size": 2,
    }
    stages = {"read", "load", "preprocess", "stage1", "stage2", "gradcam", "predict", "reports", "analysis"}
    assert set(printed["reference"]["timings_s"]) == stages
    assert set(printed["accelerated"]["timings_s_median"]) == stages
    timings = printed["reference"]["timings_s"]
    assert timings["analysis"] >= timings["predict"] >= timings["stage1"] > 0
    assert printed["reference"]["objects_written"] == printed["accelerated"]["objects_written"] == 4  # SR + 3 SC
    assert printed["phantom"]["slices"] == 48 and printed["agreement"]["chunks"] > 1


def test_disagreement_beyond_the_tolerance_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    code = _script().main(["--cpu-only", *SMALL, "--tolerance", "0"])
    captured = capsys.readouterr()
    assert code == 1
    assert json.loads(captured.out)["agreement"]["agree"] is False
    assert "probabilities differ by" in captured.err and "tolerance 0.0" in captured.err


def test_without_cuda_and_without_cpu_only_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code = _script().main(SMALL)
    captured = capsys.readouterr()
    assert code == 2
    assert "did not find CUDA" in json.loads(captured.out)["error"] and "--cpu-only" in captured.err


@pytest.mark.gpu
def test_full_check_on_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    code = _script().main([])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0, printed.get("agreement")
    assert printed["accelerated_path"]["device"].startswith("cuda") and printed["accelerated_path"]["precision"] == "bf16"
    assert printed["accelerated_path"]["stage1_weights_channels_last_3d"] is True
