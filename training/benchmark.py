"""Throughput of the stage-1 training loader reading from the preprocessing cache.

The H200 trains the full-width stage-1 network at ~500 chunks/s, so the data path must deliver
>= 400 chunks/s with 8 workers. This measures what ``workers`` DataLoader processes deliver here
(memory-mapped read, random 192 crop, rare rotation, collate) and extrapolates linearly per worker.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from training.cache import SeriesCache
from training.errors import CacheError
from training.stage1 import ChunkDataset, EpochSampler


@dataclass(frozen=True)
class LoaderBenchmark:
    workers: int
    batch_size: int
    input_size: int
    cached_size: int
    chunks: int
    seconds: float
    chunks_per_second: float
    chunks_per_second_per_worker: float
    extrapolated_8_workers: float
    machine: str
    date: str

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def benchmark_chunk_loader(cache_dir: str | Path, *, workers: int = 1, batch_size: int = 16,
                           input_size: int = 192, seconds: float = 20.0,
                           rotation_probability: float = 0.1) -> LoaderBenchmark:
    """Iterate the training loader for ``seconds`` (after one warm-up batch) and count chunks."""
    cache = SeriesCache(cache_dir)
    keys = sorted(cache.entries)
    if not keys:
        raise CacheError(f"{cache_dir} holds no series to read")
    cached_size = int(cache.preprocess["input_size"])
    size = min(input_size, cached_size)
    dataset = ChunkDataset(cache, keys, input_size=size, train=True, rotation_probability=rotation_probability)
    sampler = EpochSampler(dataset.labels, seed=0, positive_fraction=None,
                           samples_per_epoch=None)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
    count = 0
    started: float | None = None
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for chunks, _, _ in loader:
            if started is None:
                started = time.perf_counter()  # the first batch pays worker start-up
                continue
            count += int(chunks.shape[0])
            if time.perf_counter() - started >= seconds:
                break
        else:
            epoch += 1
            continue
        break
    elapsed = time.perf_counter() - (started or time.perf_counter())
    rate = count / max(elapsed, 1e-9)
    per_worker = rate / max(workers, 1)
    return LoaderBenchmark(
        workers=workers, batch_size=batch_size, input_size=size, cached_size=cached_size, chunks=count,
        seconds=round(elapsed, 2), chunks_per_second=round(rate, 1),
        chunks_per_second_per_worker=round(per_worker, 1), extrapolated_8_workers=round(per_worker * 8, 1),
        machine=f"{_cpu_name()}, {os.cpu_count()} CPUs",
        date=datetime.now(UTC).strftime("%Y-%m-%d"),
    )
