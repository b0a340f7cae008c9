"""Preprocessing cache: every series run once through pe_model's own preprocessing.

One code path for training and inference (docs/METHOD.md, "One preprocessing path"): the cache
calls ``pe_model.volume.load_series`` and ``pe_model.preprocessing.preprocess_with_sizes``, the
functions the Predictor calls, with the configuration the packaged checkpoint records. It stores
the chunks at the network input size, exactly the Predictor's stage-1 input (read by validation,
feature extraction and evaluation), and, when training crops from larger slices (the seed resizes
to 224 and crops 192 at random), the same chunks rendered at that training size.

Layout (compact and memory-mappable, never one pickle per slice)::

    <cache>/manifest.json                       config, one entry per finished series, failures
    <cache>/<Study>/<Series>/chunks.npy         (N, 3, chunk_depth, S, S) uint8, np.load(mmap_mode="r")
    <cache>/<Study>/<Series>/train_chunks.npy   (N, 3, chunk_depth, T, T) uint8 when T != S
    <cache>/<Study>/<Series>/labels.npz         slice_labels (Z,), chunk_labels (N,), source_slice_index (Z,),
                                                sop_chunk_index (D,) chunk covering each volume slice
    <cache>/<Study>/<Series>/meta.json          volume SOP Instance UIDs (D,), counts, skipped images

Series are written to a temporary folder and renamed, and the manifest is rewritten atomically
after every finished series, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import concurrent.futures as futures
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import pydicom
import structlog
from tqdm import tqdm

from training.dataset import SeriesRecord
from training.errors import CacheError

log = structlog.get_logger(__name__)

MANIFEST_NAME: Final[str] = "manifest.json"
CACHE_FORMAT: Final[int] = 2


@dataclass(frozen=True)
class CacheEntry:
    """A finished series in the cache (what the loaders need without opening its files)."""

    key: str
    study_instance_uid: str
    series_instance_uid: str
    directory: str  # relative to the cache root
    num_chunks: int
    num_slices: int
    chunk_labels: tuple[int, ...]
    exam_labels: Mapping[str, int]

    @property
    def pe_present(self) -> bool:
        return any(self.chunk_labels)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "directory": self.directory,
            "num_chunks": self.num_chunks,
            "num_slices": self.num_slices,
            "chunk_labels": list(self.chunk_labels),
            "exam_labels": dict(self.exam_labels),
        }

    @classmethod
    def from_json_dict(cls, key: str, data: Mapping[str, Any]) -> CacheEntry:
        return cls(
            key=key,
            study_instance_uid=str(data["study_instance_uid"]),
            series_instance_uid=str(data["series_instance_uid"]),
            directory=str(data["directory"]),
            num_chunks=int(data["num_chunks"]),
            num_slices=int(data["num_slices"]),
            chunk_labels=tuple(int(v) for v in data["chunk_labels"]),
            exam_labels={str(k): int(v) for k, v in data["exam_labels"].items()},
        )


@dataclass(frozen=True)
class _Task:
    key: str
    study_instance_uid: str
    series_instance_uid: str
    files: tuple[str, ...]
    sop_instance_uids: tuple[str, ...]
    image_labels: tuple[bool, ...]
    exam_labels: dict[str, int]
    root: str
    preprocess: dict[str, Any]
    train_size: int


@dataclass(frozen=True)
class _Result:
    key: str
    entry: dict[str, Any] | None
    error: str | None
    unreadable: tuple[tuple[str, str], ...]
    seconds: float


def _preprocess_config_from_dict(data: Mapping[str, Any]) -> Any:
    from pe_model.preprocessing import PreprocessConfig

    return PreprocessConfig.from_dict(dict(data))


def _prepare_series(task: _Task) -> _Result:
    """Worker: read, preprocess and write one series. Never raises: failures come back as text."""
    import torch

    from pe_model.errors import PEModelError
    from pe_model.preprocessing import preprocess_with_sizes
    from pe_model.volume import load_series

    torch.set_num_threads(1)
    started = time.perf_counter()
    unreadable: list[tuple[str, str]] = []
    datasets: list[pydicom.Dataset] = []
    for path, sop in zip(task.files, task.sop_instance_uids, strict=True):
        try:
            datasets.append(pydicom.dcmread(path))
        except Exception as exc:  # a damaged file: skip it and report
            unreadable.append((sop, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]))
    try:
        if not datasets:
            raise CacheError("no readable image")
        volume = load_series(datasets)
        config = _preprocess_config_from_dict(task.preprocess)
        extra_sizes = () if task.train_size == config.input_size else (task.train_size,)
        series, extra = preprocess_with_sizes(volume, config, extra_sizes)
    except (PEModelError, CacheError, ValueError, RuntimeError) as exc:
        return _Result(task.key, None, f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                       tuple(unreadable), time.perf_counter() - started)
    label_by_sop = dict(zip(task.sop_instance_uids, task.image_labels, strict=True))
    volume_sops = tuple(str(uid) for uid in volume.sop_instance_uids)
    source_index = np.asarray(series.source_slice_index, dtype=np.int32)  # (Z,)
    slice_labels = np.array([label_by_sop.get(volume_sops[i], False) for i in source_index],
                            dtype=np.uint8)  # (Z,)
    chunks = series.chunks.numpy() if hasattr(series.chunks, "numpy") else np.asarray(series.chunks)
    num_chunks = int(chunks.shape[0])
    chunk_labels = np.zeros(num_chunks, dtype=np.uint8)
    slice_chunk = np.zeros(len(source_index), dtype=np.int32)
    for c in range(num_chunks):
        start, stop = series.chunk_slice_range(c)
        chunk_labels[c] = 1 if slice_labels[start:stop].any() else 0
        slice_chunk[start:stop] = c
    # Each volume slice -> chunk that covers it; slices outside the crop take the nearest chunk.
    sop_chunk = np.zeros(len(volume_sops), dtype=np.int32)
    covered = np.full(len(volume_sops), -1, dtype=np.int32)
    for z, src in enumerate(source_index):
        if covered[src] < 0:
            covered[src] = slice_chunk[z]
    known = np.flatnonzero(covered >= 0)
    for d in range(len(volume_sops)):
        nearest = known[np.argmin(np.abs(known - d))] if len(known) else 0
        sop_chunk[d] = covered[d] if covered[d] >= 0 else (covered[nearest] if len(known) else 0)

    relative = Path(task.study_instance_uid) / task.series_instance_uid
    final = Path(task.root) / relative
    tmp = Path(task.root) / ".tmp" / f"{task.key}.{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    np.save(tmp / "chunks.npy", np.ascontiguousarray(chunks, dtype=np.uint8))
    for train_chunks in extra.values():
        np.save(tmp / "train_chunks.npy", np.ascontiguousarray(train_chunks.numpy(), dtype=np.uint8))
    np.savez(tmp / "labels.npz", slice_labels=slice_labels, chunk_labels=chunk_labels,
             source_slice_index=source_index, sop_chunk_index=sop_chunk)
    meta = {
        "key": task.key,
        "sop_instance_uids": list(volume_sops),
        "num_slices": int(series.num_slices),
        "num_chunks": num_chunks,
        "skipped": [list(s) for s in getattr(volume, "skipped", ())],
        "unreadable": [list(u) for u in unreadable],
    }
    (tmp / "meta.json").write_text(json.dumps(meta))
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    entry = CacheEntry(
        key=task.key,
        study_instance_uid=task.study_instance_uid,
        series_instance_uid=task.series_instance_uid,
        directory=str(relative),
        num_chunks=num_chunks,
        num_slices=int(series.num_slices),
        chunk_labels=tuple(int(v) for v in chunk_labels),
        exam_labels=dict(task.exam_labels),
    )
    return _Result(task.key, entry.to_json_dict(), None, tuple(unreadable), time.perf_counter() - started)


@dataclass(frozen=True)
class CacheSummary:
    """What one ``build_cache`` call did."""

    built: int
    skipped_existing: int
    failed: int
    unreadable_files: int
    seconds: float


class SeriesCache:
    """Read side of the cache: manifest entries and memory-mapped chunk arrays."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        manifest_path = self.root / MANIFEST_NAME
        if not manifest_path.is_file():
            raise CacheError(f"{self.root} is not a preprocessing cache (no {MANIFEST_NAME})")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CacheError(f"cannot read {manifest_path}: {exc}") from exc
        if manifest.get("format") != CACHE_FORMAT:
            raise CacheError(f"{manifest_path} has format {manifest.get('format')}, expected {CACHE_FORMAT}")
        self.preprocess: dict[str, Any] = dict(manifest["preprocess"])
        self.input_size = int(self.preprocess.get("input_size", 192))
        self.train_size = int(manifest.get("train_size", self.input_size))
        self.entries: dict[str, CacheEntry] = {
            key: CacheEntry.from_json_dict(key, data) for key, data in manifest["entries"].items()
        }
        self.failures: dict[str, str] = dict(manifest.get("failures", {}))
        self._maps: dict[str, np.ndarray] = {}

    def chunks(self, key: str) -> np.ndarray:
        """(N, 3, D, S, S) uint8 at the network input size (the Predictor's stage-1 input),
        memory-mapped read-only (opened once per process)."""
        return self._open(key, "chunks.npy")

    def train_chunks(self, key: str) -> np.ndarray:
        """(N, 3, D, T, T) uint8 at the training size T that random crops are cut from."""
        if self.train_size == self.input_size:
            return self.chunks(key)
        return self._open(key, "train_chunks.npy")

    def _open(self, key: str, name: str) -> np.ndarray:
        array = self._maps.get(f"{key}/{name}")
        if array is None:
            array = np.load(self.root / self.entries[key].directory / name, mmap_mode="r")
            self._maps[f"{key}/{name}"] = array
        return array

    def labels(self, key: str) -> dict[str, np.ndarray]:
        with np.load(self.root / self.entries[key].directory / "labels.npz") as data:
            return {name: data[name] for name in data.files}

    def meta(self, key: str) -> dict[str, Any]:
        return json.loads((self.root / self.entries[key].directory / "meta.json").read_text())

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = {}  # memory maps are reopened in each DataLoader worker
        return state


def _write_manifest(root: Path, preprocess_config: Mapping[str, Any], train_size: int, entries: Mapping[str, Any],
                    failures: Mapping[str, str], problems: Sequence[Mapping[str, Any]]) -> None:
    data = {
        "format": CACHE_FORMAT,
        "preprocess": dict(preprocess_config),
        "train_size": train_size,
        "entries": dict(sorted(entries.items())),
        "failures": dict(sorted(failures.items())),
        "problems": list(problems),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = root / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, root / MANIFEST_NAME)


def build_cache(
    records: Iterable[SeriesRecord],
    cache_dir: str | Path,
    preprocess_config: Any,
    *,
    train_size: int | None = None,
    workers: int = 1,
    progress: bool = True,
    retry_failed: bool = False,
) -> CacheSummary:
    """Preprocess every series not yet in the cache, ``workers`` processes at a time.

    ``preprocess_config`` is the ``pe_model.preprocessing.PreprocessConfig`` the packaged
    checkpoint will record (its ``input_size`` is the network input); ``train_size`` (default: the
    input size) is the slice size training crops are cut from. A cache built with another
    configuration is refused (CacheError) rather than silently mixed. Series that fail
    (unreadable pixels, too few slices...) are recorded under "failures" and skipped next time
    unless ``retry_failed``.
    """
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    config_dict = preprocess_config.to_dict()
    size = int(preprocess_config.input_size if train_size is None else train_size)
    if size < preprocess_config.input_size:
        raise CacheError(f"training size {size} is smaller than the network input {preprocess_config.input_size}")
    entries: dict[str, Any] = {}
    failures: dict[str, str] = {}
    problems: list[dict[str, Any]] = []
    manifest_path = root / MANIFEST_NAME
    if manifest_path.is_file():
        existing = json.loads(manifest_path.read_text())
        if existing.get("format") != CACHE_FORMAT:
            raise CacheError(f"{root} is a cache of format {existing.get('format')}, not {CACHE_FORMAT}; "
                             "use a new cache directory")
        if (json.loads(json.dumps(existing.get("preprocess"))) != json.loads(json.dumps(config_dict))
                or existing.get("train_size") != size):
            raise CacheError(
                f"{root} was built with another preprocessing configuration; use a new cache directory"
            )
        entries = dict(existing.get("entries", {}))
        failures = dict(existing.get("failures", {}))
        problems = list(existing.get("problems", []))
    records = list(records)
    todo: list[_Task] = []
    skipped = 0
    for record in records:
        done = record.key in entries and (root / entries[record.key]["directory"] / "chunks.npy").is_file()
        if done or (record.key in failures and not retry_failed):
            skipped += 1
            continue
        failures.pop(record.key, None)
        todo.append(
            _Task(
                key=record.key,
                study_instance_uid=record.study_instance_uid,
                series_instance_uid=record.series_instance_uid,
                files=tuple(str(p) for p in record.files),
                sop_instance_uids=record.sop_instance_uids,
                image_labels=record.image_labels,
                exam_labels=dict(record.exam_labels),
                root=str(root),
                preprocess=config_dict,
                train_size=size,
            )
        )
    started = time.perf_counter()
    built = failed = unreadable_files = 0
    _write_manifest(root, config_dict, size, entries, failures, problems)

    def absorb(result: _Result) -> None:
        nonlocal built, failed, unreadable_files
        for sop, reason in result.unreadable:
            unreadable_files += 1
            problems.append({"kind": "unreadable-file", "key": result.key, "sop_instance_uid": sop,
                             "message": reason})
            log.warning("cache.unreadable_file", key=result.key, sop_instance_uid=sop, reason=reason)
        if result.entry is not None:
            entries[result.key] = result.entry
            built += 1
            log.debug("cache.series_done", key=result.key, seconds=round(result.seconds, 2))
        else:
            failures[result.key] = result.error or "unknown error"
            failed += 1
            log.warning("cache.series_failed", key=result.key, reason=result.error)
        _write_manifest(root, config_dict, size, entries, failures, problems)

    bar = tqdm(total=len(todo), desc="preprocess", unit="series", disable=not progress)
    try:
        if workers <= 1 or len(todo) <= 1:
            for task in todo:
                absorb(_prepare_series(task))
                bar.update(1)
        else:
            context = multiprocessing.get_context("forkserver")
            with futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                pending = [pool.submit(_prepare_series, task) for task in todo]
                for future in futures.as_completed(pending):
                    absorb(future.result())
                    bar.update(1)
    finally:
        bar.close()
        shutil.rmtree(root / ".tmp", ignore_errors=True)
    summary = CacheSummary(built=built, skipped_existing=skipped, failed=failed,
                           unreadable_files=unreadable_files, seconds=time.perf_counter() - started)
    log.info("cache.built", root=str(root), built=built, skipped_existing=skipped, failed=failed,
             unreadable_files=unreadable_files, seconds=round(summary.seconds, 1))
    return summary
