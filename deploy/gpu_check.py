"""The GPU path, proven in one run (<= 5 minutes on a GPU machine): CPU and CUDA give the same answer.

Writes a 400-slice CTPA phantom (512 x 512, 0.7 mm) as DICOM files, then runs the worker's analysis
chain on it exactly as a worker does (read the files, ``Predictor.predict`` on the datasets, write
the SR and Grad-CAM SCs) twice: a reference on CPU in fp32, and with ``device="auto"`` (CUDA: bf16
autocast and channels_last_3d, see pe_model/predictor.py). It checks that every exam probability and
every chunk probability agree within ``--tolerance`` (0.02), prints one JSON document with the
per-stage timings of both runs, the machine and the checks, and exits

    0  the probabilities agree (and, on CUDA, ``device="auto"`` picked CUDA),
    1  they disagree by more than the tolerance,
    2  no CUDA device was found (without ``--cpu-only``) or the check could not run.

``--cpu-only`` runs the same check on a machine without a GPU: the second run is the CPU in bf16
autocast (the same precision path as CUDA), so the script itself can be tested anywhere.

    python deploy/gpu_check.py                       # on the GPU machine (model: width 64, input 192)
    python deploy/gpu_check.py --cpu-only --slices 120 --width 8 --input-size 128   # a quick CPU smoke run
    python deploy/gpu_check.py --checkpoint model.pt --json-out gpu_check.json

Without ``--checkpoint`` the model is randomly initialised with a fixed seed (timings do not depend
on the weights; both runs use the same weights). The issue's target: the whole analysis on an H200
<= 3 s (``accelerated.analysis_s`` below, the median of ``--repeats`` runs after one warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

EXIT_AGREE = 0
EXIT_DISAGREE = 1
EXIT_CANNOT_RUN = 2
TARGET_SECONDS = 3.0
STAGES = ("read", "load", "preprocess", "stage1", "stage2", "gradcam", "predict", "reports", "analysis")


@dataclass(frozen=True)
class RunResult:
    """One analysis of the phantom: its probabilities and per-stage seconds."""

    probabilities: dict[str, float]
    chunk_probabilities: tuple[float, ...]
    timings_s: dict[str, float]
    objects_written: int


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-only", action="store_true", help="No GPU here: compare CPU fp32 with CPU bf16 autocast.")
    parser.add_argument("--checkpoint", help="A checkpoint file (default: a random-init model of --width/--input-size).")
    parser.add_argument("--width", type=int, default=64, help="Encoder width of the random-init model (64: full size).")
    parser.add_argument("--input-size", type=int, default=192, help="Input size of the random-init model.")
    parser.add_argument("--slices", type=int, default=400, help="Phantom slices (default 400).")
    parser.add_argument("--size", type=int, default=512, help="Phantom rows and columns (default 512).")
    parser.add_argument("--spacing", type=float, default=0.7, help="Phantom pixel and slice spacing in mm.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs on the accelerated device (after one warm-up on CUDA).")
    parser.add_argument("--tolerance", type=float, default=0.02, help="Largest allowed probability difference.")
    parser.add_argument("--json-out", type=Path, help="Also write the JSON document to this file.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary folder (phantom, reports).")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def _machine(torch: Any, device: Any) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "cuda_available": bool(torch.cuda.is_available()),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), bf16_supported=bool(torch.cuda.is_bf16_supported()))
    return info


def _path_checks(torch: Any, predictor: Any) -> dict[str, Any]:
    """What the accelerated predictor really runs: device, precision, stage-1 weights in channels_last_3d."""
    conv_weights = [p for p in predictor.encoder.parameters() if p.dim() == 5]
    return {
        "device": str(predictor.device),
        "precision": predictor.precision,
        "autocast_dtype": str(predictor._autocast_dtype) if predictor._autocast_dtype is not None else None,
        "stage1_weights_channels_last_3d": bool(conv_weights)
        and all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in conv_weights),
        "stage1_batch_size": predictor.batch_size,
    }


def _analyse(predictor: Any, files: Sequence[Path], out_dir: Path, torch: Any) -> RunResult:
    """The worker's chain on the phantom: read the headers, predict from the files, write the reports (timed)."""
    from pacs_agent.analysis.pipeline import analyze_sources, read_sources
    from pacs_agent.settings import OutputSettings

    if predictor.device.type == "cuda":
        torch.cuda.synchronize(predictor.device)
    started = time.perf_counter()
    sources = read_sources(files)
    read_s = time.perf_counter() - started
    shutil.rmtree(out_dir, ignore_errors=True)
    outcome = analyze_sources(predictor, sources, OutputSettings(key_slices=3), out_dir)
    if predictor.device.type == "cuda":
        torch.cuda.synchronize(predictor.device)
    analysis_s = time.perf_counter() - started
    prediction = outcome.prediction
    timings = {k: float(v) for k, v in prediction.timings_s.items()}
    predict_s = timings.pop("total")
    timings.update(read=read_s, predict=predict_s, reports=analysis_s - read_s - predict_s, analysis=analysis_s)
    return RunResult(
        probabilities={k: float(v) for k, v in prediction.probabilities.items()},
        chunk_probabilities=tuple(float(p) for p in prediction.chunk_probabilities),
        timings_s={k: timings[k] for k in STAGES if k in timings},
        objects_written=len(outcome.produced),
    )


def _largest_difference(reference: RunResult, other: RunResult) -> tuple[float, str]:
    """Largest absolute probability difference over exam labels and chunks, and where it is."""
    if set(reference.probabilities) != set(other.probabilities) or len(reference.chunk_probabilities) != len(other.chunk_probabilities):
        return float("inf"), "the two runs produced different outputs (labels or chunk count)"
    pairs = [(abs(reference.probabilities[k] - other.probabilities[k]), k) for k in reference.probabilities]
    pairs += [(abs(a - b), f"chunk {i}") for i, (a, b) in enumerate(zip(reference.chunk_probabilities, other.chunk_probabilities, strict=True))]
    return max(pairs)


def _median_timings(runs: Sequence[RunResult]) -> dict[str, float]:
    return {k: round(statistics.median(r.timings_s[k] for r in runs), 3) for k in runs[0].timings_s}


def run_check(args: argparse.Namespace, workdir: Path) -> tuple[int, dict[str, Any]]:
    import torch

    from pe_model.checkpoint import build_initial_checkpoint, small_sequence_config
    from phantoms import PhantomSpec, write_phantom_series
    from pe_model.predictor import Predictor, resolve_device
    from pe_model.preprocessing import PreprocessConfig

    report: dict[str, Any] = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu_only": args.cpu_only,
                              "tolerance": args.tolerance}
    device = resolve_device("cpu" if args.cpu_only else "auto")
    report["machine"] = _machine(torch, device)
    if not args.cpu_only and device.type != "cuda":
        report["error"] = 'device "auto" did not find CUDA (torch.cuda.is_available() is False); use --cpu-only to test the script'
        return EXIT_CANNOT_RUN, report

    mark = time.perf_counter()
    truth = write_phantom_series(
        workdir / "phantom",
        PhantomSpec(n_slices=args.slices, rows=args.size, columns=args.size, pixel_spacing_mm=args.spacing,
                    slice_spacing_mm=args.spacing, locations=("central", "right")),
    )
    report["phantom"] = {"slices": args.slices, "size": args.size, "spacing_mm": args.spacing,
                         "write_s": round(time.perf_counter() - mark, 2)}
    files = sorted(set(truth.files))

    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
    else:
        checkpoint = workdir / "model.pt"
        build_initial_checkpoint(
            checkpoint, encoder_width=args.width, sequence=small_sequence_config(args.width, hidden=128),
            preprocess_config=PreprocessConfig(input_size=args.input_size), seed=0,
        )
    report["model"] = {"checkpoint": str(args.checkpoint or f"random init, width {args.width}, input {args.input_size}")}

    mark = time.perf_counter()
    reference_predictor = Predictor.from_checkpoint(checkpoint, device="cpu", precision="fp32")
    load_cpu_s = time.perf_counter() - mark
    reference = _analyse(reference_predictor, files, workdir / "out-cpu", torch)
    del reference_predictor

    mark = time.perf_counter()
    if args.cpu_only:
        accelerated_predictor = Predictor.from_checkpoint(checkpoint, device="cpu", precision="bf16")
    else:
        accelerated_predictor = Predictor.from_checkpoint(checkpoint, device="auto")
    load_accelerated_s = time.perf_counter() - mark
    report["accelerated_path"] = _path_checks(torch, accelerated_predictor)
    warmup: RunResult | None = None
    if accelerated_predictor.device.type == "cuda":
        warmup = _analyse(accelerated_predictor, files, workdir / "out-accelerated", torch)
    runs = [_analyse(accelerated_predictor, files, workdir / "out-accelerated", torch) for _ in range(args.repeats)]

    difference, where = _largest_difference(reference, runs[0])
    agree = difference <= args.tolerance
    accelerated_s = statistics.median(r.timings_s["analysis"] for r in runs)
    report["reference"] = {"device": "cpu", "precision": "fp32", "model_load_s": round(load_cpu_s, 2),
                           "timings_s": {k: round(v, 3) for k, v in reference.timings_s.items()},
                           "objects_written": reference.objects_written}
    report["accelerated"] = {
        "device": str(accelerated_predictor.device), "precision": accelerated_predictor.precision,
        "model_load_s": round(load_accelerated_s, 2),
        "warmup_timings_s": {k: round(v, 3) for k, v in warmup.timings_s.items()} if warmup else None,
        "timings_s_median": _median_timings(runs),
        "analysis_s_runs": [round(r.timings_s["analysis"], 3) for r in runs],
        "analysis_s": round(accelerated_s, 3),
        "objects_written": runs[0].objects_written,
    }
    report["agreement"] = {
        "max_abs_difference": round(difference, 5), "where": where, "agree": agree,
        "series_pe_probability": {"reference": round(max(reference.chunk_probabilities), 5),
                                  "accelerated": round(max(runs[0].chunk_probabilities), 5)},
        "chunks": len(reference.chunk_probabilities),
    }
    if accelerated_predictor.device.type == "cuda":
        report["target"] = {"analysis_s_at_most": TARGET_SECONDS, "met": accelerated_s <= TARGET_SECONDS,
                            "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    return (EXIT_AGREE if agree else EXIT_DISAGREE), report


def main(argv: Sequence[str] | None = None) -> int:
    import structlog

    args = _parse(argv)
    # Log lines go to stderr so that stdout is the JSON document alone.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    workdir = Path(tempfile.mkdtemp(prefix="pe-gpu-check-"))
    try:
        try:
            code, report = run_check(args, workdir)
        except (ImportError, OSError, RuntimeError, ValueError) as exc:
            code, report = EXIT_CANNOT_RUN, {"error": f"{type(exc).__name__}: {exc}"}
        report["exit_code"] = code
        text = json.dumps(report, indent=2)
        print(text)
        if args.json_out is not None:
            args.json_out.write_text(text + "\n")
        if code == EXIT_DISAGREE:
            agreement = report["agreement"]
            print(f"gpu_check: probabilities differ by {agreement['max_abs_difference']} at {agreement['where']} "
                  f"(tolerance {args.tolerance})", file=sys.stderr)
        elif code == EXIT_CANNOT_RUN:
            print(f"gpu_check: {report['error']}", file=sys.stderr)
        return code
    finally:
        if args.keep:
            print(f"gpu_check: files kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
