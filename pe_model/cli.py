"""``python -m pe_model`` / ``pe-model``: the model's prediction for one series.

``predict DIR [--checkpoint X] [--device cpu] [--json]`` prints a readable summary or, with
``--json``, ``Prediction.to_json_dict()``. ``import-seed --stage1 A.pth --stage2 B.pth --out M.pt
[--seq-model tcn|gru]`` turns the authors' two state dicts into a checkpoint (pe_model.seed_import).
A series, checkpoint or state dict that cannot be used exits with code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

import structlog
from rich.console import Console
from rich.table import Table

from pe_model.checkpoint import BUILTIN_DEMO
from pe_model.errors import PEModelError
from pe_model.labels import EXAM_LABELS, SERIES_PE_KEY
from pe_model.prediction import Prediction

EXIT_OK = 0
EXIT_UNUSABLE_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pe-model",
        description="Two-stage PE model for CT pulmonary angiograms (decision support; unverified AI output).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    predict = commands.add_parser("predict", help="predict one series (a folder of DICOM files)")
    predict.add_argument("series", type=Path, help="folder holding the DICOM images of one series")
    predict.add_argument("--checkpoint", default=BUILTIN_DEMO, help="checkpoint file or builtin:demo")
    predict.add_argument("--expected-sha256", default=None, help="refuse a checkpoint with another hash")
    predict.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    predict.add_argument("--gradcam-top-k", type=int, default=3, help="chunks explained by Grad-CAM")
    predict.add_argument(
        "--precision", choices=("auto", "fp32", "bf16"), default="auto",
        help="auto: bf16 autocast on CUDA, fp32 on CPU",
    )
    predict.add_argument("--batch-size", type=int, default=None, help="chunks per stage-1 pass")
    predict.add_argument("--json", action="store_true", help="print one JSON object")
    predict.add_argument("--verbose", action="store_true", help="log progress on stderr")

    seed = commands.add_parser(
        "import-seed", help="write a checkpoint from the seed's stage-1 and stage-2 state dicts"
    )
    seed.add_argument("--stage1", type=Path, required=True, help="torchvision r3d_18 state dict, fc = Linear(512, 1)")
    seed.add_argument("--stage2", type=Path, required=True, help="PEFeatureSequentialNet state dict")
    seed.add_argument("--out", type=Path, required=True, help="checkpoint file to write")
    seed.add_argument("--seq-model", choices=("tcn", "gru"), default=None,
                      help="stage-2 kind (default: read from the state dict's keys)")
    seed.add_argument("--name", default="pe-detection-seed", help="model name on every output")
    return parser


@contextlib.contextmanager
def _cli_logging(verbose: bool, stream: TextIO) -> Iterator[None]:
    """Route structlog to stderr (warnings only unless verbose) so stdout stays the result."""
    previous = structlog.get_config()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO if verbose else logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    try:
        yield
    finally:
        structlog.configure(**previous)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _print_summary(prediction: Prediction, console: Console) -> None:
    model = prediction.model
    decision = "PE PRESENT" if prediction.pe_present else "no PE"
    console.print(f"[bold]{decision}[/bold]  series {prediction.series_instance_uid}")
    console.print(f"study {prediction.study_instance_uid}")
    console.print(
        f"model {model.name} {model.version} (sha256 {model.sha256[:12]}); unverified AI output"
        + ("; NOT FOR CLINICAL USE" if model.not_for_clinical_use else "")
    )
    labels = Table(title="Exam labels (consistent)")
    labels.add_column("label")
    labels.add_column("probability", justify="right")
    labels.add_column("final", justify="center")
    labels.add_row(
        "series PE (max chunk)",
        f"{prediction.probabilities[SERIES_PE_KEY]:.3f}",
        "yes" if prediction.pe_present else "no",
    )
    for label in EXAM_LABELS:
        labels.add_row(
            label, f"{prediction.probabilities[label]:.3f}", "yes" if prediction.labels[label] else "no"
        )
    console.print(labels)
    keys = Table(title="Key images (best first)")
    keys.add_column("SOP Instance UID")
    keys.add_column("frame", justify="right")
    keys.add_column("chunk", justify="right")
    keys.add_column("PE probability", justify="right")
    for key in prediction.key_images:
        keys.add_row(
            key.sop_instance_uid,
            "" if key.frame_number is None else str(key.frame_number),
            str(key.chunk_index),
            f"{key.pe_probability:.3f}",
        )
    console.print(keys)
    console.print(
        "timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in prediction.timings_s.items())
    )


def _predict(args: argparse.Namespace, stdout: TextIO) -> int:
    from pe_model.predictor import Predictor

    predictor = Predictor.from_checkpoint(
        args.checkpoint,
        device=args.device,
        expected_sha256=args.expected_sha256,
        gradcam_top_k=args.gradcam_top_k,
        batch_size=args.batch_size,
        precision=args.precision,
    )
    prediction = predictor.predict(args.series)
    if args.json:
        stdout.write(json.dumps(prediction.to_json_dict(), indent=2) + "\n")
    else:
        _print_summary(prediction, Console(file=stdout, width=120))
    return EXIT_OK


def _import_seed(args: argparse.Namespace, stdout: TextIO) -> int:
    from pe_model.seed_import import import_seed

    imported = import_seed(args.stage1, args.stage2, args.out, seq_model=args.seq_model, name=args.name)
    sequence = imported.model_config.sequence
    stdout.write(
        f"{imported.path} sha256={imported.sha256} (stage 1 r3d_18 width {imported.model_config.encoder_width}; "
        f"stage 2 {sequence.kind} hidden {sequence.hidden} levels {sequence.levels} seq_len {sequence.seq_len}; "
        "seed preprocessing)\n"
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0, or 2 for an unusable series or checkpoint)."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
    stdout, stderr = sys.stdout, sys.stderr
    with _cli_logging(bool(getattr(args, "verbose", False)), stderr):
        try:
            if args.command == "import-seed":
                return _import_seed(args, stdout)
            return _predict(args, stdout)
        except PEModelError as error:
            stderr.write(f"pe-model: error: {_one_line(error)}\n")
            return EXIT_UNUSABLE_INPUT

