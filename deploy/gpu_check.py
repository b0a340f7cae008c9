"""The GPU checks of a device session, in one run (<= 5 minutes on a GPU machine), one JSON document.

``--check predictor`` (the default): CPU and CUDA give the same answer, fast. ``--check training``:
stage-1 training throughput fed from the on-disk preprocessing cache. ``--check all``: both, one JSON
document with a "predictor" and a "training" part (the exit code is the worse of the two).

Predictor check. Writes a 400-slice CTPA phantom (512 x 512, 0.7 mm) as DICOM files, then runs the worker's analysis
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

Training check. Builds a preprocessing cache (training/cache.py, the seed preset's preprocessing:
chunks at the network input 192 and training chunks at 224) from ``--train-series`` varied phantoms
written in the RSNA layout and read back by training/dataset.py, or reuses the cache in
``--cache-dir`` when it already holds them; then runs ``training.stage1.train_stage1`` itself (the
seed's Stage1Config: R3D-18 width 64, Adam 4e-4, batch 16, AMP bf16 and channels_last_3d on CUDA,
its ChunkDataset / EpochSampler / DataLoader reading the memory-mapped cache files) for
``--train-epochs`` epochs of ``--train-samples`` chunks. The first epoch is warm-up (DataLoader
workers, CUDA kernels); ``chunks_per_second`` is the median of the later epochs, as train_stage1
reports it. Only the start weights differ from a real run: random, not Kinetics-400 (the device
machine has no copy; the time of a step does not depend on the weights). The issue's target on an
H200: >= 400 chunks/s. The small cache sits in the page cache, so disk bandwidth is not measured.

    python deploy/gpu_check.py --check all --json-out gpu_check.json          # a device session
    python deploy/gpu_check.py --check training --cpu-only --train-series 2 --train-phantom-size 64 \
        --train-phantom-slices 40 --train-width 4 --train-input-size 32 --train-size 40 \
        --train-batch-size 4 --train-samples 16 --loader-workers 1 --prep-workers 1   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import math
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
TARGET_CHUNKS_PER_SECOND = 400.0
CHECKS = ("predictor", "training", "all")
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
    parser.add_argument("--check", choices=CHECKS, default="predictor",
                        help="predictor (default), training (stage-1 throughput from the cache) or all.")
    training = parser.add_argument_group("training check (defaults: the seed preset, sized for an H200)")
    training.add_argument("--cache-dir", type=Path,
                          help="Preprocessing cache to build, or to reuse when it already holds --train-series "
                               "series (default: a temporary folder).")
    training.add_argument("--train-series", type=int, default=16, help="Phantom series in the cache (default 16).")
    training.add_argument("--train-phantom-size", type=int,
                          help="Rows and columns of each phantom (default: the varied phantoms' own, 128).")
    training.add_argument("--train-phantom-slices", type=int,
                          help="Slices of each phantom (default: the varied phantoms' own, 260-340 mm of chest).")
    training.add_argument("--train-width", type=int, default=64, help="R3D-18 encoder width (64: the seed's).")
    training.add_argument("--train-input-size", type=int, default=192, help="Network input size (192: the seed's).")
    training.add_argument("--train-size", type=int, default=224, help="Cached training slice size, cropped to the input (224).")
    training.add_argument("--train-batch-size", type=int, default=16, help="Batch size (16: the seed's).")
    training.add_argument("--train-samples", type=int, default=4000, help="Chunks per epoch (default 4000).")
    training.add_argument("--train-epochs", type=int, default=3, help="Epochs; the first is warm-up (default 3).")
    training.add_argument("--loader-workers", type=int, default=8, help="DataLoader worker processes (default 8).")
    training.add_argument("--prep-workers", type=int, default=min(8, os.cpu_count() or 1),
                          help="Processes writing phantoms and building the cache (default: up to 8).")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.train_epochs < 2:
        parser.error("--train-epochs must be at least 2 (the first one is warm-up)")
    for name in ("train_series", "train_samples", "train_batch_size", "prep_workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.loader_workers < 0:
        parser.error("--loader-workers must not be negative")
    if args.train_size < args.train_input_size:
        parser.error("--train-size must be at least --train-input-size (training crops are cut from it)")
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


@dataclass(frozen=True)
class TrainingCache:
    """The preprocessing cache the training check reads, and what it took to build it."""

    root: Path
    reused: bool
    phantom_write_s: float | None
    build_s: float | None


def _one_line(exc: BaseException) -> str:
    """An exception as one line; a DataLoader worker's re-raised error keeps only its original last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def _training_cache(args: argparse.Namespace, workdir: Path, preprocess: Any) -> TrainingCache:
    """Reuse ``--cache-dir`` when it holds enough series built like this, else write phantoms and build it.

    The phantoms go through the real data path: RSNA layout on disk (training/synthetic.py), read back
    and validated by training/dataset.py, preprocessed by training/cache.py (which refuses a cache
    built with another configuration).
    """
    from pe_model.preprocessing import PreprocessConfig
    from training.cache import MANIFEST_NAME, SeriesCache, build_cache
    from training.dataset import read_rsna_dataset
    from training.synthetic import demo_specs, write_synthetic_dataset

    root = args.cache_dir if args.cache_dir is not None else workdir / "cache"
    if (root / MANIFEST_NAME).is_file():
        existing = SeriesCache(root)
        if (len(existing.entries) >= args.train_series and existing.train_size == args.train_size
                and PreprocessConfig.from_dict(existing.preprocess) == preprocess):
            return TrainingCache(root=root, reused=True, phantom_write_s=None, build_s=None)
    overrides: dict[str, Any] = {}
    if args.train_phantom_size is not None:
        overrides.update(rows=args.train_phantom_size, columns=args.train_phantom_size)
    if args.train_phantom_slices is not None:
        overrides.update(n_slices=args.train_phantom_slices)
    mark = time.perf_counter()
    data_dir = workdir / "training-data"
    write_synthetic_dataset(data_dir, demo_specs(args.train_series, seed=13, **overrides),
                            workers=args.prep_workers, progress=False)
    phantom_write_s = time.perf_counter() - mark
    mark = time.perf_counter()
    dataset = read_rsna_dataset(data_dir)
    build_cache(dataset.series, root, preprocess, train_size=args.train_size, workers=args.prep_workers,
                progress=False)
    return TrainingCache(root=root, reused=False, phantom_write_s=round(phantom_write_s, 2),
                         build_s=round(time.perf_counter() - mark, 2))


def _cache_summary(cache: Any, built: TrainingCache, keys: Sequence[str]) -> dict[str, Any]:
    """What the training read: series, chunks, slice sizes and the bytes of the chunk files on disk."""
    train_files = [built.root / cache.entries[k].directory / "train_chunks.npy" for k in keys]
    input_files = [built.root / cache.entries[k].directory / "chunks.npy" for k in keys]
    read_files = train_files if cache.train_size != cache.input_size else input_files
    return {
        "dir": str(built.root), "reused": built.reused, "phantom_write_s": built.phantom_write_s,
        "build_s": built.build_s, "series": len(keys),
        "chunks": sum(cache.entries[k].num_chunks for k in keys),
        "positive_chunks": sum(sum(cache.entries[k].chunk_labels) for k in keys),
        "input_size": cache.input_size, "train_size": cache.train_size,
        "training_reads": sorted({p.name for p in read_files}),
        "training_read_bytes_on_disk": sum(p.stat().st_size for p in read_files),
        "bytes_on_disk": sum(p.stat().st_size for p in built.root.rglob("*") if p.is_file()),
        "failures": len(cache.failures),
    }


def run_training_check(args: argparse.Namespace, workdir: Path) -> tuple[int, dict[str, Any]]:
    """Stage-1 training throughput (chunks/s) by ``train_stage1`` itself, fed from the on-disk cache."""
    from dataclasses import replace

    import torch

    from pe_model.preprocessing import preprocess_preset
    from training.cache import SeriesCache
    from training.distributed import DistributedContext, resolve_device
    from training.errors import TrainingError
    from training.pipeline import preset
    from training.stage1 import train_stage1

    started = time.perf_counter()
    report: dict[str, Any] = {"check": "training", "date": datetime.now(UTC).isoformat(timespec="seconds"),
                              "cpu_only": args.cpu_only}
    device = resolve_device("cpu" if args.cpu_only else "auto")
    report["machine"] = _machine(torch, device)
    # DataLoader workers hand batches over in /dev/shm (8 workers x 4 batches x 16 chunks x 1.1 MB =
    # 0.6 GB at the defaults); a container's small /dev/shm is the usual reason such a run dies.
    shm = Path("/dev/shm")
    if shm.is_dir():
        stat = os.statvfs(shm)
        report["machine"]["dev_shm_free_gb"] = round(stat.f_bavail * stat.f_frsize / 2**30, 2)
    if not args.cpu_only and device.type != "cuda":
        report["error"] = 'device "auto" did not find CUDA (torch.cuda.is_available() is False); use --cpu-only to test the script'
        return EXIT_CANNOT_RUN, report
    try:
        seed = preset("seed")
        preprocess = preprocess_preset("seed", input_size=args.train_input_size)
        built = _training_cache(args, workdir, preprocess)
        cache = SeriesCache(built.root)
        keys = sorted(cache.entries)[: args.train_series]
        if not keys:
            raise TrainingError(f"the cache {built.root} holds no series ({len(cache.failures)} failed)")
        report["cache"] = _cache_summary(cache, built, keys)
        positives = report["cache"]["positive_chunks"] / max(report["cache"]["chunks"], 1)
        # The seed's stage 1, sized by the arguments; every epoch draws --train-samples chunks with
        # the cache's own share of positive chunks (the seed's "each chunk once" epoch would last
        # under a second on a GPU with this small cache).
        config = replace(
            seed.stage1, encoder_width=args.train_width, input_size=args.train_input_size,
            batch_size=args.train_batch_size, epochs=args.train_epochs, num_workers=args.loader_workers,
            positive_fraction=positives, samples_per_epoch=args.train_samples, init_weights=None,
            pretrained_required=False, validation_chunks=None,
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        context = DistributedContext(rank=0, world_size=1, local_rank=0, device=device)
        mark = time.perf_counter()
        result = train_stage1(cache, keys, [], config, workdir / "stage1", context=context, progress=False)
        train_s = time.perf_counter() - mark
    except TrainingError as exc:
        report["error"] = _one_line(exc)
        return EXIT_CANNOT_RUN, report
    rates = [float(epoch["chunks_per_second"] or 0.0) for epoch in result.history]
    losses = [float(epoch["train_loss"] or 0.0) for epoch in result.history]
    steady = statistics.median(rates[1:])
    autocast = None
    if device.type == "cuda" and config.amp:
        autocast = "torch.bfloat16" if torch.cuda.is_bf16_supported() else "torch.float16 + GradScaler"
    report["stage1"] = {
        "preset": seed.name, "encoder_width": config.encoder_width, "input_size": config.input_size,
        "batch_size": config.batch_size, "optimizer": f"Adam lr {config.learning_rate}",
        "autocast": autocast, "channels_last_3d": device.type == "cuda",
        "loader_workers": config.num_workers, "pin_memory": device.type == "cuda",
        "start_weights": "random (the recipe's Kinetics-400 weights do not change the time of a step)",
        "samples_per_epoch": config.samples_per_epoch, "epochs": config.epochs, "warmup_epochs": 1,
    }
    finite = all(math.isfinite(loss) for loss in losses)
    report["throughput"] = {
        "chunks_per_second": round(steady, 2),
        "epoch_chunks_per_second": [round(r, 2) for r in rates],
        "epoch_train_loss": [round(loss, 5) for loss in losses],
        "loss_finite": finite,
        "chunks_trained": config.epochs * (config.samples_per_epoch or 0),
        "train_s": round(train_s, 2),
    }
    if device.type == "cuda":
        report["target"] = {"chunks_per_second_at_least": TARGET_CHUNKS_PER_SECOND,
                            "met": steady >= TARGET_CHUNKS_PER_SECOND,
                            "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}
    report["script_s"] = round(time.perf_counter() - started, 1)
    if not finite:
        report["error"] = "the training loss was not finite"
        return EXIT_DISAGREE, report
    return EXIT_AGREE, report


def _run_guarded(check: Any, args: argparse.Namespace, workdir: Path) -> tuple[int, dict[str, Any]]:
    """One check; an expected failure (no library, file, device memory...) becomes exit 2 and a reason."""
    try:
        return check(args, workdir)
    except (ImportError, OSError, RuntimeError, ValueError) as exc:
        return EXIT_CANNOT_RUN, {"error": _one_line(exc)}


def _failure_lines(name: str, code: int, report: dict[str, Any], tolerance: float) -> list[str]:
    if code == EXIT_DISAGREE and "agreement" in report:
        agreement = report["agreement"]
        return [f"gpu_check: {name}: probabilities differ by {agreement['max_abs_difference']} at "
                f"{agreement['where']} (tolerance {tolerance})"]
    if code != EXIT_AGREE:
        return [f"gpu_check: {name}: {report.get('error', 'failed')}"]
    return []


def main(argv: Sequence[str] | None = None) -> int:
    import structlog

    args = _parse(argv)
    # Log lines go to stderr so that stdout is the JSON document alone.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    workdir = Path(tempfile.mkdtemp(prefix="pe-gpu-check-"))
    try:
        checks = {"predictor": run_check, "training": run_training_check}
        names = ("predictor", "training") if args.check == "all" else (args.check,)
        results: dict[str, tuple[int, dict[str, Any]]] = {}
        for name in names:
            (workdir / name).mkdir()
            results[name] = _run_guarded(checks[name], args, workdir / name)
        code = max(c for c, _ in results.values())
        if args.check == "all":
            report: dict[str, Any] = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "checks": list(names)}
            for name, (part_code, part) in results.items():
                part["exit_code"] = part_code
                report[name] = part
        else:
            report = results[args.check][1]
        report["exit_code"] = code
        text = json.dumps(report, indent=2)
        print(text)
        if args.json_out is not None:
            args.json_out.write_text(text + "\n")
        for name, (part_code, part) in results.items():
            for line in _failure_lines(name, part_code, part, args.tolerance):
                print(line, file=sys.stderr)
        return code
    finally:
        if args.keep:
            print(f"gpu_check: files kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
