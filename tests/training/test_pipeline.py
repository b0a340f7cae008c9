"""`pe-train run --preset smoke` end to end on 8 phantom series, and the same under torchrun (DDP, gloo)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pe_model.checkpoint import load_checkpoint
from training.cli import main


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("smoke-data")
    code = main(["synthesize", "--out", str(root), "--count", "8", "--seed", "5", "--rows", "64",
                 "--slices", "48", "--no-progress"])
    assert code == 0
    return root


def test_run_smoke_end_to_end_and_rerun_skips(smoke_data: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    assert main(["run", "--data-dir", str(smoke_data), "--work-dir", str(work), "--preset", "smoke",
                 "--device", "cpu", "--no-progress"]) == 0

    split = json.loads((work / "split.json").read_text())
    assert (len(split["train"]), len(split["validation"]), len(split["test"])) == (6, 1, 1)
    checkpoint = load_checkpoint(work / "model.pt")
    assert checkpoint.model_config.encoder_width == 4
    assert checkpoint.preprocess_config_dict["input_size"] == 32  # the eval size, not the cache's 40
    assert checkpoint.card.not_for_clinical_use

    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    assert metrics["n_exams"] == 1 and metrics["rsna_weighted_log_loss"] > 0
    assert metrics["consistency_violations"]["after"] == 0
    with (work / "eval" / "submission.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["id", "label"]
    assert len(rows) - 1 == metrics["n_images"] + 9
    assert all(0.0 <= float(r[1]) <= 1.0 for r in rows[1:])
    assert list((work / "eval").glob("*.png"))

    # Re-running skips every finished step: the packaged model is not rewritten.
    stamp = (work / "model.pt").stat().st_mtime_ns
    encoder_stamp = (work / "stage1" / "encoder.pt").stat().st_mtime_ns
    assert main(["run", "--data-dir", str(smoke_data), "--work-dir", str(work), "--preset", "smoke",
                 "--device", "cpu", "--no-progress"]) == 0
    assert (work / "model.pt").stat().st_mtime_ns == stamp
    assert (work / "stage1" / "encoder.pt").stat().st_mtime_ns == encoder_stamp

    # The packaged checkpoint is what `python -m pe_model predict --checkpoint` loads.
    pytest.importorskip("pe_model.predictor")
    from pe_model.predictor import Predictor

    series_dir = next(p for p in (smoke_data / "train").glob("*/*") if p.is_dir())
    prediction = Predictor.from_checkpoint(work / "model.pt").predict(series_dir)
    assert prediction.model.sha256 == checkpoint.sha256
    assert set(prediction.labels) >= {"negative_exam_for_pe", "central_pe"}

    # One preprocessing path: the test exam's stage-1 input in the training cache is the
    # Predictor's, and `pe-train evaluate` gives the probabilities `python -m pe_model predict` gives.
    from pe_model.cli import main as pe_model_main
    from pe_model.preprocessing import preprocess
    from pe_model.volume import load_series
    from training.cache import SeriesCache

    key = split["test"][0]
    study, series = key.split("_")
    test_dir = smoke_data / "train" / study / series
    predictor = Predictor.from_checkpoint(work / "model.pt")
    served = preprocess(load_series(test_dir), predictor.preprocess_config).chunks
    assert torch.equal(torch.from_numpy(np.array(SeriesCache(work / "cache").chunks(key))), served)
    assert main(["evaluate", "--data-dir", str(smoke_data), "--work-dir", str(work), "--out",
                 str(tmp_path / "eval-again")]) == 0
    with (tmp_path / "eval-again" / "submission.csv").open(newline="") as handle:
        evaluated = {row[0]: float(row[1]) for row in list(csv.reader(handle))[1:]}
    capsys.readouterr()
    assert pe_model_main(["predict", str(test_dir), "--checkpoint", str(work / "model.pt"), "--json",
                          "--gradcam-top-k", "0"]) == 0
    predicted = json.loads(capsys.readouterr().out)["probabilities"]
    for label in ("negative_exam_for_pe", "indeterminate", "chronic_pe", "acute_and_chronic_pe", "central_pe",
                  "leftsided_pe", "rightsided_pe", "rv_lv_ratio_gte_1", "rv_lv_ratio_lt_1"):
        assert abs(evaluated[f"{study}_{label}"] - predicted[label]) < 1e-5, label


def test_missing_dataset_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--data-dir", str(tmp_path / "nowhere"), "--work-dir", str(tmp_path / "w"),
                 "--preset", "smoke", "--device", "cpu", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pe-train: no train.csv")


@pytest.mark.slow
def test_torchrun_ddp_two_processes_on_gloo(smoke_data: Path, tmp_path: Path) -> None:
    work = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "training.cli", "run", "--data-dir", str(smoke_data), "--work-dir", str(work),
               "--preset", "smoke", "--device", "cpu", "--no-progress"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stderr[-3000:]
    state = __import__("torch").load(work / "stage1" / "state.pt", weights_only=True)
    assert [h["epoch"] for h in state["history"]] == [0.0, 1.0]
    # Each rank trained on its half: 32 samples per epoch over 2 ranks -> 16 per rank, 2 batches of 8.
    assert load_checkpoint(work / "model.pt").model_config.encoder_width == 4
    assert (work / "stage2" / "sequence.pt").is_file()
    assert (work / "eval" / "metrics.json").is_file()
    # Rank 0 alone logged progress; rank 1 only warnings.
    assert result.stderr.count("stage1.done") == 1


def test_the_seed_preset_refuses_to_start_without_kinetics_weights(smoke_data: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--data-dir", str(smoke_data), "--work-dir", str(tmp_path / "w"), "--preset", "seed",
                 "--device", "cpu", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--init-weights PATH" in err and "r3d_18" in err and "--no-pretrained" in err
    assert not (tmp_path / "w" / "cache").exists()
    # A weights file that is not there, or not r3d_18's, is refused before any caching too.
    code = main(["run", "--data-dir", str(smoke_data), "--work-dir", str(tmp_path / "w"), "--preset", "seed",
                 "--init-weights", str(tmp_path / "missing.pth"), "--device", "cpu", "--no-progress"])
    assert code == 2 and "missing.pth does not exist" in capsys.readouterr().err
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    code = main(["run", "--data-dir", str(smoke_data), "--work-dir", str(tmp_path / "w2"), "--preset", "seed",
                 "--init-weights", str(tmp_path / "other.pth"), "--device", "cpu", "--no-progress"])
    assert code == 2 and "not a torchvision r3d_18 state dict" in capsys.readouterr().err
    assert not (tmp_path / "w" / "cache").exists() and not (tmp_path / "w2" / "cache").exists()


def test_a_small_seed_recipe_runs_end_to_end_and_serves_what_it_evaluated(
        smoke_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The seed preset's items (windowing, crop, rotation, augmented training features, seed
    padding, loss and StepLR) wired through the real pipeline, at a size a CPU runs in seconds."""
    from pe_model.preprocessing import preprocess, preprocess_preset
    from pe_model.predictor import Predictor
    from pe_model.volume import load_series
    from training.cache import SeriesCache
    from training.distributed import init_distributed
    from training.evaluate import evaluate_split
    from training.pipeline import RunPaths, load_dataset, preset, run_pipeline, seed_stage1, seed_stage2

    seed = preset("seed")
    small = type(seed)(
        name="seed", preprocess=preprocess_preset("seed", input_size=32), train_size=40,
        stage1=seed_stage1(encoder_width=4, input_size=32, epochs=1, batch_size=8, amp=False,
                           pretrained_required=False, rotation_probability=0.5),
        stage2=seed_stage2(hidden=8, seq_len=16, epochs=3, batch_size=4, lr_step=2),
        cache_workers=1, feature_batch_size=16)
    work = tmp_path / "seed"
    model = run_pipeline(smoke_data, work, small, context=init_distributed("cpu"), progress=False)
    split = json.loads((work / "split.json").read_text())
    stamp = json.loads((work / "features" / "features.json").read_text())
    assert stamp["augmented_keys"] == sorted(split["train"])  # training exams: the training transform
    checkpoint = load_checkpoint(model)
    assert checkpoint.preprocess_config == preprocess_preset("seed", input_size=32)
    assert checkpoint.model_config.sequence.padding == "seed"
    state = torch.load(work / "stage2" / "state.pt", weights_only=True)
    assert [h["learning_rate"] for h in state["history"]] == pytest.approx([5e-4, 5e-4, 4.5e-4])
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    assert {"chunk", "chunk_stage1", "image", "exam_pe", "labels"} <= set(metrics)

    # Served == evaluated for the seed preprocessing too.
    key = split["test"][0]
    study, series = key.split("_")
    directory = smoke_data / "train" / study / series
    predictor = Predictor.from_checkpoint(model, gradcam_top_k=0)
    served = preprocess(load_series(directory), predictor.preprocess_config).chunks
    assert torch.equal(torch.from_numpy(np.array(SeriesCache(work / "cache").chunks(key))), served)
    result = evaluate_split(SeriesCache(work / "cache"), load_dataset(smoke_data).by_key(), [key],
                            RunPaths(work).features, RunPaths(work).sequence, tmp_path / "eval")
    prediction = predictor.predict(directory)
    with (tmp_path / "eval" / "submission.csv").open(newline="") as handle:
        evaluated = {row[0]: float(row[1]) for row in list(csv.reader(handle))[1:]}
    assert result.metrics["n_exams"] == 1
    for label in ("negative_exam_for_pe", "central_pe", "rv_lv_ratio_gte_1"):
        assert abs(evaluated[f"{study}_{label}"] - prediction.probabilities[label]) < 1e-5
