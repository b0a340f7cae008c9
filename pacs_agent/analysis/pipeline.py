"""The analysis chain: DICOM files -> datasets -> Prediction -> report objects.

The worker runs it on a series from the spool; `pe-agent analyze DIR` (pacs_agent.node.cli) runs it on a
folder with no network and no database. The model is loaded by the caller (once per process) and passed in.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pacs_agent.analysis.results import AnalysisOutcome
from pacs_agent.errors import AgentError
from pacs_agent.logs import get_logger, protect_patient_values
from pacs_agent.settings import OutputSettings, Settings

if TYPE_CHECKING:
    from pe_model.prediction import Prediction
    from pe_model.predictor import Predictor

log = get_logger(__name__)


class SourceReadError(AgentError):
    """The source files of a series cannot be read (missing from the spool, unreadable)."""


def dicom_files(directory: Path) -> list[Path]:
    """Every regular file below ``directory`` (sorted), hidden files and folders excluded."""
    return sorted(
        p for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


@dataclass(frozen=True)
class SourceImage:
    """One received file: its header (read without pixel data) and the byte length of its pixel
    data as stored (None when it has none or it is encapsulated: compressed frames)."""

    path: Path
    header: Dataset
    pixel_data_length: int | None = None


#: Pixel data larger than this is not read when a header is read (its length is kept).
_DEFER_BYTES = 4096
_UNDEFINED_LENGTH = 0xFFFFFFFF


def _read(path: Path, *, headers_only: bool) -> Dataset:
    try:
        return pydicom.dcmread(path, defer_size=_DEFER_BYTES) if headers_only else pydicom.dcmread(path)
    except FileNotFoundError:
        raise SourceReadError(f"{path} is missing from the spool") from None
    except OSError as exc:
        raise SourceReadError(f"{path} cannot be read: {exc.strerror or exc}") from None


def _drop_pixel_data(ds: Dataset) -> int | None:
    """Remove the (deferred, unread) pixel data from a header; returns its stored length."""
    length: int | None = None
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            element = ds.get_item(keyword, keep_deferred=True)
            stored = int(getattr(element, "length", 0) or 0) if element is not None else 0
            length = None if stored == _UNDEFINED_LENGTH else stored
            del ds[keyword]
    return length


def read_sources(paths: Iterable[Path], *, skip_non_dicom: bool = False) -> list[SourceImage]:
    """Read the headers of DICOM files (pixel data skipped, its length kept); patient values are
    registered so logs can mask them.

    ``skip_non_dicom``: ignore files that are not DICOM (a folder given by a user); otherwise any
    unreadable file is an error (the spool holds only what the receiver stored).
    """
    sources: list[SourceImage] = []
    for path in paths:
        try:
            ds = _read(path, headers_only=True)
        except InvalidDicomError:
            if skip_non_dicom:
                continue
            raise SourceReadError(f"{path.name} is not a DICOM file") from None
        length = _drop_pixel_data(ds)
        protect_patient_values(ds)
        sources.append(SourceImage(path=path, header=ds, pixel_data_length=length))
    return sources


def report_datasets(prediction: Prediction, sources: Sequence[SourceImage]) -> list[Dataset]:
    """The datasets the report writers get: headers, and full datasets for the heatmap slices only.

    The SR needs headers; the SC and SEG draw on the slices of ``prediction.heatmaps`` (a few), so
    a 600-slice series never sits in memory twice (pe_model has already read it into its volume).
    """
    with_pixels = {h.sop_instance_uid for h in prediction.heatmaps}
    datasets: list[Dataset] = []
    for source in sources:
        if str(source.header.get("SOPInstanceUID", "")) in with_pixels:
            try:
                ds = _read(source.path, headers_only=False)
            except InvalidDicomError:
                raise SourceReadError(f"{source.path.name} is no longer a DICOM file") from None
            datasets.append(ds)
        else:
            datasets.append(source.header)
    return datasets


def analyze_sources(
    predictor: Predictor,
    sources: Sequence[SourceImage],
    outputs: OutputSettings,
    out_dir: Path,
    *,
    previous_report: Dataset | None = None,
) -> AnalysisOutcome:
    """Predict on one series from its files and write its reports into ``out_dir``.

    pe_model reads the pixel data itself into one preallocated volume; only the heatmap slices
    are read again for the SC/SEG. Raises pe_model.SeriesError for a series the model cannot
    analyse (pe_model also refuses native pixel data whose length contradicts its header), SourceReadError for vanished files, ReportError when writing fails.
    """
    if not sources:
        raise SourceReadError("no source images were given")
    prediction = predictor.predict([source.path for source in sources])
    return _write(prediction, report_datasets(prediction, sources), outputs, out_dir, previous_report)


def analyze_datasets(
    predictor: Predictor,
    datasets: Sequence[Dataset],
    outputs: OutputSettings,
    out_dir: Path,
    *,
    previous_report: Dataset | None = None,
) -> AnalysisOutcome:
    """Predict on one series already in memory (datasets with pixel data) and write its reports.

    Raises pe_model.SeriesError for a series the model cannot analyse, ReportError when writing fails.
    """
    prediction = predictor.predict(list(datasets))
    return _write(prediction, datasets, outputs, out_dir, previous_report)


def _write(
    prediction: Prediction, datasets: Sequence[Dataset], outputs: OutputSettings, out_dir: Path, previous_report: Dataset | None
) -> AnalysisOutcome:
    """Write the reports; the datasets' malformed demographics are repaired in place first."""
    from pacs_agent.reports import write_reports
    from pacs_agent.reports.sources import repair_demographics

    for ds in datasets:
        repair_demographics(ds)
    produced = write_reports(prediction, datasets, outputs, out_dir, previous_report=previous_report)
    return AnalysisOutcome(prediction=prediction, produced=tuple(produced))


def load_predictor(settings: Settings, *, checkpoint: str | None = None, processes: int = 1) -> Predictor:
    """The model of ``settings.model`` (or ``checkpoint``), loaded once and checked by hash, at
    ``model.precision`` (pe_model's meaning: "auto" is bf16 autocast on CUDA, fp32 on CPU).

    ``processes``: how many model processes share this machine; without ``model.torch_threads``
    each gets an equal share of the cores (oversubscribed cores slow every convolution down).
    """
    from pe_model.predictor import Predictor

    model = settings.model
    threads = model.torch_threads or max(1, (os.cpu_count() or 1) // max(processes, 1))
    return Predictor.from_checkpoint(
        checkpoint or model.checkpoint,
        device=model.device,
        expected_sha256=model.checkpoint_sha256 or None,
        gradcam_top_k=settings.outputs.key_slices,
        precision=model.precision,
        num_threads=threads,
    )
