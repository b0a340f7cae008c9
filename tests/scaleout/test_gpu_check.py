"""deploy/gpu_check.py and deploy/gpu_checks.sh, the prepared device scripts: agreement check,
stage-1 training throughput from the on-disk cache, timings, exit codes.

Without a GPU the scripts run with ``--cpu-only`` (CPU fp32 against CPU bf16 autocast, the precision
path CUDA takes; stage 1 trained on the CPU) at toy sizes; on a CUDA machine the full checks run
(marked gpu).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "gpu_check.py"
ENTRY = Path(__file__).resolve().parents[2] / "deploy" / "gpu_checks.sh"
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
    assert printed["reference"]["objects_written"] == printed["accelerated"]["objects_written"] == 5  # SR + 3 SC + the key-image KOS
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


# The training check at toy size: 2 phantoms of 64 x 64 x 40 in a cache at input 32 / training size 40,
# an R3D-18 of width 4, 2 epochs of 8 chunks (the first is warm-up), one DataLoader worker.
TRAINING_SMALL = ["--train-series", "2", "--train-phantom-size", "64", "--train-phantom-slices", "40",
                  "--train-width", "4", "--train-input-size", "32", "--train-size", "40", "--train-batch-size", "4",
                  "--train-samples", "8", "--train-epochs", "2", "--loader-workers", "1", "--prep-workers", "1"]


def _training_run(capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict[str, Any], str]:
    code = _script().main(["--check", "training", "--cpu-only", *TRAINING_SMALL, *extra])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def test_training_check_trains_stage1_from_the_cache_files_it_built(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache_dir = tmp_path / "cache"
    code, report, _ = _training_run(capsys, "--cache-dir", str(cache_dir))
    assert code == 0 and report["exit_code"] == 0, report.get("error")
    assert report["check"] == "training" and report["date"].startswith("20")
    assert report["machine"]["device"] == "cpu" and report["machine"]["torch"]
    cache = report["cache"]
    assert cache["reused"] is False and cache["series"] == 2 and cache["failures"] == 0
    assert cache["phantom_write_s"] > 0 and cache["build_s"] > 0
    assert (cache["input_size"], cache["train_size"]) == (32, 40)
    assert cache["training_reads"] == ["train_chunks.npy"]  # the 40 px training chunks, cropped to 32
    train_files = sorted(cache_dir.glob("*/*/train_chunks.npy"))
    assert len(train_files) == 2
    assert cache["training_read_bytes_on_disk"] == sum(p.stat().st_size for p in train_files)
    assert cache["chunks"] == sum(np.load(p, mmap_mode="r").shape[0] for p in train_files) > 2
    stage1 = report["stage1"]
    assert stage1["preset"] == "seed" and stage1["optimizer"] == "Adam lr 0.0004"
    assert (stage1["encoder_width"], stage1["input_size"], stage1["batch_size"]) == (4, 32, 4)
    assert stage1["autocast"] is None and stage1["channels_last_3d"] is False  # CPU: fp32, as train_stage1 does
    throughput = report["throughput"]
    assert len(throughput["epoch_chunks_per_second"]) == 2 and all(r > 0 for r in throughput["epoch_chunks_per_second"])
    assert throughput["chunks_per_second"] == pytest.approx(
        float(np.median(throughput["epoch_chunks_per_second"][1:])), abs=0.01)  # the warm-up epoch is left out
    assert throughput["loss_finite"] is True and throughput["chunks_trained"] == 16
    assert "target" not in report  # the 400 chunks/s target is judged on CUDA only

    # The device session's entry point, on the cache built above: reused, not rebuilt.
    out = tmp_path / "entry.json"
    completed = subprocess.run(
        ["bash", str(ENTRY), str(out), "--check", "training", "--cpu-only", *TRAINING_SMALL, "--cache-dir", str(cache_dir)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHON": sys.executable, "WHEELS_DIR": str(tmp_path / "no-wheels")},  # this venv has them
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    entry = json.loads(out.read_text())
    assert entry == json.loads(completed.stdout)
    assert entry["cache"]["reused"] is True and entry["cache"]["build_s"] is None
    assert entry["throughput"]["loss_finite"] is True

    # The chunks really come from those files: narrow the cached training slices below the network
    # input, and stage 1's loader fails on them (exit 2, the reason named).
    for path in train_files:
        chunks = np.load(path)
        np.save(path, np.ascontiguousarray(chunks[..., :24, :24]))
    code, report, err = _training_run(capsys, "--cache-dir", str(cache_dir))
    assert code == 2 and report["cache"]["reused"] is True
    assert "cached slices are 24 px, smaller than the 32 px network input" in report["error"]
    assert "gpu_check: training:" in err


def test_training_check_refuses_a_cache_built_otherwise(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / "manifest.json").write_text(json.dumps({"format": 1, "preprocess": {}, "entries": {}}))
    code, report, err = _training_run(capsys, "--cache-dir", str(cache_dir))
    assert code == 2 and "CacheError" in report["error"] and "format 1" in report["error"]
    assert "gpu_check: training: CacheError" in err


def test_all_without_cuda_reports_both_checks_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code = _script().main(["--check", "all", *SMALL, *TRAINING_SMALL])
    report = json.loads(capsys.readouterr().out)
    assert code == 2 and report["exit_code"] == 2 and report["checks"] == ["predictor", "training"]
    for name in ("predictor", "training"):
        assert report[name]["exit_code"] == 2 and "did not find CUDA" in report[name]["error"]


@pytest.mark.gpu
def test_training_check_on_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    code = _script().main(["--check", "training"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report.get("error")
    assert report["stage1"]["channels_last_3d"] is True and report["stage1"]["autocast"]
    assert report["throughput"]["chunks_per_second"] > 0 and "met" in report["target"]
