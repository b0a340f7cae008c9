"""``python -m benchmarks.model``: per-stage time and peak RSS of ``Predictor.predict``.

Writes a synthetic CTPA phantom (``phantoms``) to a temporary folder in a separate
process, so the phantom's own memory does not count, then loads a checkpoint (a given file, or a
random-init model of the chosen width and input size) and runs ``predict`` ``repeats`` times:
the first run is cold (allocator and kernel warm-up), later runs show the steady state of a
worker that keeps the model loaded. Peak RSS is ``ru_maxrss`` of this process.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import resource
import tempfile
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import structlog
import torch
from rich.console import Console
from rich.table import Table

from pe_model.checkpoint import ModelCard, build_initial_checkpoint, small_sequence_config
from pe_model.networks.sequence import SequenceConfig
from phantoms import PhantomSpec, write_phantom_series
from pe_model.predictor import Predictor
from pe_model.preprocessing import PreprocessConfig

STAGES: tuple[str, ...] = ("load", "preprocess", "stage1", "stage2", "gradcam", "total")


@dataclass(frozen=True)
class BenchmarkSpec:
    """What to time. Without ``checkpoint`` a random-init model of ``width`` at ``input_size``."""

    slices: int = 400
    size: int = 512
    spacing_mm: float = 0.7
    checkpoint: str | None = None
    width: int = 64
    input_size: int = 192
    device: str = "cpu"
    repeats: int = 2
    gradcam_top_k: int = 3
    precision: str = "auto"
    batch_size: int | None = None
    #: torch threads (None: the predictor's default, one per available core).
    threads: int | None = None


@dataclass(frozen=True)
class BenchmarkResult:
    """Timings of each predict run (seconds per stage), peak RSS and the machine."""

    spec: BenchmarkSpec
    runs: tuple[dict[str, float], ...]
    #: Process CPU seconds (all threads) of each predict run: the work done, whatever the load.
    cpu_s: tuple[float, ...]
    #: 1-minute load average before and after the runs: other processes inflate wall times.
    load_average: tuple[float, float]
    chunks: int
    peak_rss_mb: float
    phantom_write_s: float
    model_load_s: float
    model: dict[str, Any]
    machine: dict[str, Any]
    date: str

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "spec": asdict(self.spec),
            "runs": [dict(run) for run in self.runs],
            "cpu_s": [round(c, 2) for c in self.cpu_s],
            "load_average": [round(v, 2) for v in self.load_average],
            "chunks": self.chunks,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "phantom_write_s": round(self.phantom_write_s, 2),
            "model_load_s": round(self.model_load_s, 2),
            "model": self.model,
            "machine": self.machine,
            "date": self.date,
        }


def cpu_model_name() -> str:
    """``model name`` of /proc/cpuinfo (what ``lscpu`` shows), else the platform's processor."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_native_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def machine_description(device: torch.device) -> dict[str, Any]:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    info: dict[str, Any] = {
        "cpu": cpu_model_name(),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "cpu_native_bf16": _cpu_native_bf16(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _write_phantom(directory: str, slices: int, size: int, spacing_mm: float) -> None:
    write_phantom_series(
        directory,
        PhantomSpec(
            n_slices=slices,
            rows=size,
            columns=size,
            pixel_spacing_mm=spacing_mm,
            slice_spacing_mm=spacing_mm,
            locations=("central", "right"),
        ),
    )


def _load_average() -> float:
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return float("nan")


def _peak_rss_mb() -> float:
    # Linux reports kilobytes, macOS bytes.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if platform.system() == "Darwin" else peak / 1024.0


def run_benchmark(spec: BenchmarkSpec) -> BenchmarkResult:
    """Write the phantom, load the model, time ``spec.repeats`` predict runs."""
    if spec.repeats < 1:
        raise ValueError("repeats must be at least 1")
    with tempfile.TemporaryDirectory(prefix="pe-benchmark-") as temporary:
        folder = Path(temporary) / "series"
        mark = time.perf_counter()
        context = multiprocessing.get_context("spawn")
        writer = context.Process(
            target=_write_phantom, args=(str(folder), spec.slices, spec.size, spec.spacing_mm)
        )
        writer.start()
        writer.join()
        if writer.exitcode != 0:
            raise RuntimeError(f"writing the phantom failed (exit code {writer.exitcode})")
        phantom_write_s = time.perf_counter() - mark

        checkpoint: str | Path
        if spec.checkpoint is not None:
            checkpoint = spec.checkpoint
        else:
            checkpoint = Path(temporary) / "random.pt"
            sequence: SequenceConfig = (
                SequenceConfig(feature_dim=8 * spec.width)
                if spec.width == 64
                else small_sequence_config(spec.width, hidden=64)
            )
            build_initial_checkpoint(
                checkpoint,
                encoder_width=spec.width,
                sequence=sequence,
                preprocess_config=PreprocessConfig(input_size=spec.input_size),
                card=ModelCard(
                    name=f"benchmark-random-width{spec.width}",
                    version="0",
                    training_data="none (random initialisation)",
                    intended_use="timing only",
                    not_for_clinical_use=True,
                ),
            )
        mark = time.perf_counter()
        predictor = Predictor.from_checkpoint(
            checkpoint,
            device=spec.device,
            gradcam_top_k=spec.gradcam_top_k,
            precision=spec.precision,
            batch_size=spec.batch_size,
            num_threads=spec.threads,
        )
        model_load_s = time.perf_counter() - mark
        runs: list[dict[str, float]] = []
        cpu_s: list[float] = []
        chunks = 0
        load_before = _load_average()
        for _ in range(spec.repeats):
            cpu_mark = time.process_time()
            prediction = predictor.predict(folder)
            cpu_s.append(time.process_time() - cpu_mark)
            runs.append({stage: float(prediction.timings_s[stage]) for stage in STAGES})
            chunks = len(prediction.chunk_probabilities)
        load_after = _load_average()
    info = predictor.model_info
    return BenchmarkResult(
        spec=spec,
        runs=tuple(runs),
        cpu_s=tuple(cpu_s),
        load_average=(load_before, load_after),
        chunks=chunks,
        peak_rss_mb=_peak_rss_mb(),
        phantom_write_s=phantom_write_s,
        model_load_s=model_load_s,
        model={
            "name": info.name,
            "sha256": info.sha256,
            "encoder_width": predictor.checkpoint.model_config.encoder_width,
            "input_size": predictor.preprocess_config.input_size,
            "precision": predictor.precision,
            "batch_size": predictor.batch_size,
            "sequence": predictor.checkpoint.model_config.sequence.to_dict(),
        },
        machine=machine_description(predictor.device),
        date=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def print_benchmark(result: BenchmarkResult, console: Console) -> None:
    spec = result.spec
    console.print(
        f"phantom {spec.slices} x {spec.size} x {spec.size} at {spec.spacing_mm} mm "
        f"({result.chunks} chunks); model width {result.model['encoder_width']}, "
        f"input {result.model['input_size']}, {result.model['precision']}, "
        f"batch {result.model['batch_size']}; Grad-CAM top {spec.gradcam_top_k}"
    )
    machine = result.machine
    console.print(
        f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), device {machine['device']}; {result.date}"
    )
    table = Table(title="predict, seconds per stage")
    table.add_column("run")
    for stage in STAGES:
        table.add_column(stage, justify="right")
    table.add_column("CPU s", justify="right")
    for index, (run, cpu) in enumerate(zip(result.runs, result.cpu_s, strict=True)):
        label = "cold" if index == 0 else f"warm {index}"
        table.add_row(label, *(f"{run[s]:.2f}" for s in STAGES), f"{cpu:.1f}")
    console.print(table)
    console.print(
        f"peak RSS {result.peak_rss_mb:.0f} MB; model load {result.model_load_s:.2f} s; "
        f"phantom written in {result.phantom_write_s:.1f} s (separate process, not counted); "
        f"load average {result.load_average[0]:.1f} -> {result.load_average[1]:.1f}"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model", description="time predict on a synthetic phantom")
    parser.add_argument("--slices", type=int, default=400)
    parser.add_argument("--size", type=int, default=512, help="rows and columns")
    parser.add_argument("--spacing", type=float, default=0.7, help="pixel and slice spacing, mm")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default=None, help="checkpoint to time (default: random init)")
    source.add_argument("--width", type=int, default=64, help="encoder width of a random-init model")
    parser.add_argument("--input-size", type=int, default=192, help="input size of a random-init model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="predict runs (the first is cold)")
    parser.add_argument("--gradcam-top-k", type=int, default=3)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print a table (or, with ``--json``, one JSON object); exit code 2 for an
    unusable checkpoint."""
    from pe_model.errors import PEModelError

    args = _parser().parse_args(list(argv) if argv is not None else None)
    spec = BenchmarkSpec(
        slices=args.slices,
        size=args.size,
        spacing_mm=args.spacing,
        checkpoint=args.checkpoint,
        width=args.width,
        input_size=args.input_size,
        device=args.device,
        repeats=args.repeats,
        gradcam_top_k=args.gradcam_top_k,
        precision=args.precision,
        batch_size=args.batch_size,
        threads=args.threads,
    )
    previous = structlog.get_config()
    # Progress and warnings go to stderr: stdout is the result (a table, or one JSON object).
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    try:
        result = run_benchmark(spec)
    except PEModelError as error:
        sys.stderr.write(f"benchmarks.model: error: {' '.join(str(error).split())}\n")
        return 2
    finally:
        structlog.configure(**previous)
    if args.json:
        sys.stdout.write(json.dumps(result.to_json_dict(), indent=2) + "\n")
    else:
        print_benchmark(result, Console(width=120))
    return 0


if __name__ == "__main__":
    sys.exit(main())
