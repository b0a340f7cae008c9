"""``pe-train``: prepare RSNA-STR data, train both stages, evaluate, package, build the demo checkpoint.

Every step can run on its own (``prepare``, ``stage1``, ``features``, ``stage2``, ``evaluate``,
``package``) or all together with ``run``; each skips what is already done in the work
directory. Under ``torchrun`` the training steps run data-parallel (DDP).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Optional

import structlog
import typer

from pe_model.errors import PEModelError
from training.errors import TrainingError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train and evaluate the two-stage PE model on the RSNA-STR layout.")

DataDir = Annotated[Path, typer.Option("--data-dir", help="folder with train.csv and train/<Study>/<Series>/<SOP>.dcm")]
WorkDir = Annotated[Path, typer.Option("--work-dir", help="output folder of the run (created, resumable)")]
PresetName = Annotated[str, typer.Option("--preset", help="seed | project | smoke | demo (docs/METHOD.md)")]
NoPretrained = Annotated[bool, typer.Option("--no-pretrained", help="let the seed preset start stage 1 from random weights")]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]
Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="show progress bars")]


def configure_logging(verbose: bool = False) -> None:
    """structlog to stderr: readable lines on a terminal, JSON lines otherwise; rank > 0 only warns."""
    import os

    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer() if sys.stderr.isatty() else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True),
                    renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def _settings(work_dir: Path, preset_name: str, **overrides: object):  # type: ignore[no-untyped-def]
    """The run's preset: the one recorded in the work directory if there is one, else the named one."""
    from training.pipeline import Preset, preset

    recorded = work_dir / "preset.json"
    base = Preset.from_dict(json.loads(recorded.read_text())) if recorded.is_file() else preset(preset_name)
    return base.with_overrides(**overrides)  # type: ignore[arg-type]


def _split_and_cache(work_dir: Path):  # type: ignore[no-untyped-def]
    from training.cache import SeriesCache
    from training.dataset import Split
    from training.pipeline import RunPaths

    paths = RunPaths(work_dir)
    if not paths.split.is_file():
        raise TrainingError(f"{work_dir} has no split.json; run `pe-train prepare` first")
    split = Split.from_json_dict(json.loads(paths.split.read_text()))
    cache = SeriesCache(paths.cache)
    return paths, split, cache


@app.command()
def synthesize(
    out: Annotated[Path, typer.Option("--out", help="dataset folder to write (RSNA layout)")],
    count: Annotated[int, typer.Option("--count", help="number of phantom series")] = 8,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    rows: Annotated[Optional[int], typer.Option("--rows", help="image rows (default: phantom default)")] = None,
    n_slices: Annotated[Optional[int], typer.Option("--slices", help="slices per series")] = None,
    workers: Annotated[int, typer.Option("--workers")] = 1,
    progress: Progress = True,
) -> None:
    """Write synthetic CTPA phantoms as an RSNA-STR layout dataset (train.csv + DICOM files)."""
    from training.synthetic import demo_specs, write_synthetic_dataset

    overrides: dict[str, object] = {}
    if rows is not None:
        overrides.update(rows=rows, columns=rows, pixel_spacing_mm=2.6 * 128 / rows)
    if n_slices is not None:
        overrides.update(n_slices=n_slices, slice_spacing_mm=300.0 / n_slices)
    records = write_synthetic_dataset(out, demo_specs(count, seed=seed, **overrides), workers=workers,
                                      progress=progress)
    typer.echo(f"wrote {len(records)} series ({sum(r.pe for r in records)} with PE) to {out}")


@app.command()
def prepare(
    data_dir: DataDir,
    work_dir: WorkDir,
    preset: PresetName = "seed",
    workers: Annotated[Optional[int], typer.Option("--workers", help="preprocessing processes")] = None,
    kfold: Annotated[Optional[int], typer.Option("--kfold", help="patient-grouped k folds instead of the seed's train/validation")] = None,
    fold: Annotated[int, typer.Option("--fold")] = 0,
    progress: Progress = True,
) -> None:
    """Validate the dataset, write the split and build the preprocessing cache (resumable)."""
    from training.pipeline import RunPaths, load_dataset, make_split
    from training.pipeline import prepare as prepare_cache

    settings = _settings(work_dir, preset, cache_workers=workers)
    paths = RunPaths(work_dir)
    dataset = load_dataset(data_dir)
    split = make_split(dataset, paths, kfold=kfold, fold=fold)
    (work_dir / "preset.json").write_text(json.dumps(settings.to_dict(), indent=1))
    cache = prepare_cache(dataset, paths, settings, progress=progress)
    typer.echo(f"{len(dataset.series)} exams ({len(dataset.problems)} problems); split "
               f"{len(split.train)}/{len(split.validation)}/{len(split.test)}; cache holds "
               f"{len(cache.entries)} series, {len(cache.failures)} failed")


@app.command()
def stage1(
    work_dir: WorkDir,
    preset: PresetName = "seed",
    device: Device = "auto",
    init_weights: Annotated[Optional[str], typer.Option("--init-weights", help="torchvision r3d_18 state-dict file (Kinetics)")] = None,
    no_pretrained: NoPretrained = False,
    epochs: Annotated[Optional[int], typer.Option("--epochs")] = None,
    num_workers: Annotated[Optional[int], typer.Option("--num-workers", help="DataLoader workers")] = None,
    progress: Progress = True,
) -> None:
    """Train (or resume) the stage-1 chunk encoder; DDP under torchrun."""
    from training.distributed import init_distributed, shutdown_distributed
    from training.stage1 import check_pretrained, train_stage1

    settings = _settings(work_dir, preset, init_weights=init_weights, no_pretrained=no_pretrained,
                         stage1_epochs=epochs, num_workers=num_workers)
    check_pretrained(settings.stage1)
    context = init_distributed(device)
    try:
        paths, split, cache = _split_and_cache(work_dir)
        result = train_stage1(cache, [k for k in split.train if k in cache.entries],
                              [k for k in split.validation if k in cache.entries], settings.stage1,
                              paths.stage1, context=context, progress=progress)
        if context.is_main:
            typer.echo(f"stage 1: best epoch {result.best_epoch + 1}, validation AUROC "
                       f"{result.best_validation_auroc}; {result.encoder_path}")
    finally:
        shutdown_distributed()


@app.command()
def features(work_dir: WorkDir, preset: PresetName = "seed", device: Device = "auto",
             progress: Progress = True) -> None:
    """Extract stage-1 features of every cached exam."""
    from training.distributed import init_distributed, shutdown_distributed
    from training.features import extract_features
    from training.pipeline import feature_transform

    context = init_distributed(device)
    try:
        settings = _settings(work_dir, preset)
        paths, split, cache = _split_and_cache(work_dir)
        extract_features(cache, sorted(cache.entries), paths.encoder, paths.features,
                         input_size=settings.stage1.input_size, context=context,
                         batch_size=settings.feature_batch_size, amp=settings.stage1.amp, progress=progress,
                         **feature_transform(settings, [k for k in split.train if k in cache.entries]))
    finally:
        shutdown_distributed()


@app.command()
def stage2(
    work_dir: WorkDir,
    preset: PresetName = "seed",
    device: Device = "auto",
    kind: Annotated[Optional[str], typer.Option("--kind", help="tcn | gru (the seed's) | bigru2 (the project's)")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs")] = None,
    progress: Progress = True,
) -> None:
    """Train (or resume) the stage-2 sequence model with the RSNA-weighted loss; DDP under torchrun."""
    from training.distributed import init_distributed, shutdown_distributed
    from training.stage2 import train_stage2

    context = init_distributed(device)
    try:
        settings = _settings(work_dir, preset, sequence_kind=kind, stage2_epochs=epochs)
        paths, split, cache = _split_and_cache(work_dir)
        labels = {k: dict(e.exam_labels) for k, e in cache.entries.items()}
        result = train_stage2(paths.features, [k for k in split.train if k in cache.entries],
                              [k for k in split.validation if k in cache.entries], labels, settings.stage2,
                              paths.stage2, context=context, progress=progress)
        if context.is_main:
            typer.echo(f"stage 2: best epoch {result.best_epoch + 1}, validation loss "
                       f"{result.best_validation_loss}; {result.sequence_path}")
    finally:
        shutdown_distributed()


@app.command()
def evaluate(
    data_dir: DataDir,
    work_dir: WorkDir,
    split_name: Annotated[str, typer.Option("--split", help="test | validation | train")] = "test",
    out: Annotated[Optional[Path], typer.Option("--out", help="output folder (default <work>/eval)")] = None,
) -> None:
    """Write submission.csv, metrics.json, report.md and ROC curves for one split."""
    from training.evaluate import evaluate_split
    from training.pipeline import load_dataset

    paths, split, cache = _split_and_cache(work_dir)
    keys = {"test": split.test, "validation": split.validation, "train": split.train}.get(split_name)
    if keys is None:
        raise TrainingError(f"unknown split {split_name!r}; choose test, validation or train")
    dataset = load_dataset(data_dir)
    result = evaluate_split(cache, dataset.by_key(), keys, paths.features, paths.sequence,
                            out or paths.evaluation)
    metrics = result.metrics
    aurocs = ", ".join(f"{level} {(metrics.get(key) or {}).get('auroc')}" for level, key in
                       (("window", "chunk"), ("window stage 1", "chunk_stage1"), ("image", "image"), ("exam PE", "exam_pe")))
    typer.echo(f"RSNA weighted log loss {metrics.get('rsna_weighted_log_loss')} "
               f"(after consistency correction {metrics.get('rsna_weighted_log_loss_corrected')}); "
               f"AUROC {aurocs}; files in {out or paths.evaluation}")


@app.command()
def package(
    data_dir: DataDir,
    work_dir: WorkDir,
    out: Annotated[Path, typer.Option("--out", help="checkpoint file to write")],
    preset: PresetName = "seed",
) -> None:
    """Package both trained stages into one checkpoint loadable by `python -m pe_model predict`."""
    from training.pipeline import RunPaths, default_card, load_dataset
    from training.pipeline import package as package_checkpoint

    settings = _settings(work_dir, preset)
    paths = RunPaths(work_dir)
    metrics_path = paths.evaluation / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    sha = package_checkpoint(paths, settings, default_card(settings, load_dataset(data_dir), metrics), out)
    typer.echo(f"{out} sha256={sha}")


@app.command()
def run(
    data_dir: DataDir,
    work_dir: WorkDir,
    preset: PresetName = "seed",
    device: Device = "auto",
    workers: Annotated[Optional[int], typer.Option("--workers", help="preprocessing processes")] = None,
    num_workers: Annotated[Optional[int], typer.Option("--num-workers", help="DataLoader workers")] = None,
    kfold: Annotated[Optional[int], typer.Option("--kfold")] = None,
    fold: Annotated[int, typer.Option("--fold")] = 0,
    init_weights: Annotated[Optional[str], typer.Option("--init-weights", help="torchvision r3d_18 state-dict file (Kinetics)")] = None,
    no_pretrained: NoPretrained = False,
    kind: Annotated[Optional[str], typer.Option("--kind", help="tcn | gru (the seed's) | bigru2 (the project's)")] = None,
    progress: Progress = True,
) -> None:
    """prepare -> stage 1 -> features -> stage 2 -> evaluate -> package; skips what is done."""
    from training.distributed import init_distributed, shutdown_distributed
    from training.pipeline import run_pipeline

    settings = _settings(work_dir, preset, cache_workers=workers, init_weights=init_weights,
                         no_pretrained=no_pretrained, sequence_kind=kind, num_workers=num_workers)
    context = init_distributed(device)
    try:
        model = run_pipeline(data_dir, work_dir, settings, context=context, kfold=kfold, fold=fold,
                             progress=progress)
        if context.is_main:
            typer.echo(f"model: {model}")
    finally:
        shutdown_distributed()


@app.command("demo-checkpoint")
def demo_checkpoint(
    out: Annotated[Path, typer.Option("--out", help="where to write the checkpoint")] = Path("pe_model/data/demo.pt"),
    work_dir: Annotated[Path, typer.Option("--work-dir")] = Path("build/demo-checkpoint"),
    n_train: Annotated[int, typer.Option("--n-train", help="training phantom series")] = 160,
    n_eval: Annotated[int, typer.Option("--n-eval", help="unseen phantom series to judge the model")] = 48,
    seed: Annotated[int, typer.Option("--seed")] = 2026,
    workers: Annotated[int, typer.Option("--workers")] = 2,
    force: Annotated[bool, typer.Option("--force", help="write even if a threshold is missed")] = False,
    progress: Progress = True,
) -> None:
    """Train the built-in demo model on phantoms and write it if it passes the quality thresholds."""
    from training.demo import build_demo_checkpoint
    from training.distributed import init_distributed

    evaluation = build_demo_checkpoint(work_dir, out, context=init_distributed("cpu"), n_train=n_train,
                                       n_eval=n_eval, seed=seed, workers=workers, force=force,
                                       progress=progress)
    typer.echo(json.dumps(evaluation.card_metrics()))


@app.command("benchmark-loader")
def benchmark_loader(
    cache_dir: Annotated[Path, typer.Option("--cache", help="a preprocessing cache folder")],
    workers: Annotated[int, typer.Option("--workers", help="DataLoader workers")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 16,
    input_size: Annotated[int, typer.Option("--input-size", help="random crop size")] = 192,
    seconds: Annotated[float, typer.Option("--seconds", help="measure for this long")] = 20.0,
) -> None:
    """Chunks per second the stage-1 training loader delivers from the cache."""
    from training.benchmark import benchmark_chunk_loader

    result = benchmark_chunk_loader(cache_dir, workers=workers, batch_size=batch_size, input_size=input_size,
                                    seconds=seconds)
    typer.echo(json.dumps(result.to_json_dict()))


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code (2 on an expected error, with one line on stderr)."""
    configure_logging()
    try:
        app(args=list(argv) if argv is not None else None, prog_name="pe-train", standalone_mode=False)
    except (TrainingError, PEModelError) as exc:
        typer.echo(f"pe-train: {exc}", err=True)
        return 2
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        typer.echo("pe-train: aborted", err=True)
        return 130
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
