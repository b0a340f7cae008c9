"""Shared pieces of the benchmarks: the machine, phantom series cached on disk, peers, the node, RSS.

Results are medians of repeated runs, always with the peers measured in the same run on the same
machine, so ratios mean something. Phantom series are written once into the cache folder
(``$PE_BENCH_CACHE`` or ``~/.cache/pe-bench``) and reused.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pydicom

from pacs_agent.demo.processes import process_stats
from phantoms import PhantomSpec, write_phantom_series

ROOT = Path(__file__).resolve().parents[1]
AGENT_AE_TITLE = "PE_AGENT"


class BenchmarkError(RuntimeError):
    """A benchmark cannot run here (a tool is missing, a peer did not start)."""


@dataclass(frozen=True)
class Machine:
    cpu_model: str
    cores: int
    memory_gb: float
    python: str
    date: str
    #: 1-minute load average when the benchmark started (other processes inflate wall times).
    load_average: float

    def line(self) -> str:
        return (f"{self.cpu_model}, {self.cores} cores, {self.memory_gb:.0f} GB RAM, Python {self.python}, {self.date}, "
                f"load average {self.load_average:.1f} at start")


def machine() -> Machine:
    model = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    memory = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return Machine(model, os.cpu_count() or 1, memory, platform.python_version(),
                   datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), round(os.getloadavg()[0], 2))


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def cache_dir() -> Path:
    path = Path(os.environ.get("PE_BENCH_CACHE", Path.home() / ".cache" / "pe-bench"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def phantom_series(name: str, spec: PhantomSpec) -> list[Path]:
    """The files of a phantom series, written once into the cache (``name`` keys the cache entry)."""
    folder = cache_dir() / name
    marker = folder / "files.json"
    if marker.exists():
        files = [folder / f for f in json.loads(marker.read_text())]
        if all(f.exists() for f in files):
            return files
    shutil.rmtree(folder, ignore_errors=True)
    truth = write_phantom_series(folder, spec)
    files = list(dict.fromkeys(truth.files))
    marker.write_text(json.dumps([f.name for f in files]))
    return files


def relabel_series(source: Sequence[Path], target: Path, tag: str) -> list[Path]:
    """A copy of a series under new Study/Series/SOP Instance UIDs (another patient's series of the same size)."""
    marker = target / "files.json"
    if marker.exists():
        files = [target / f for f in json.loads(marker.read_text())]
        if all(f.exists() for f in files):
            return files
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    from pydicom.uid import generate_uid

    study, series = generate_uid(), generate_uid()
    names = []
    for path in source:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID = f"BENCH-{tag}"
        name = f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(target / name, enforce_file_format=True)
        names.append(name)
    marker.write_text(json.dumps(names))
    return [target / n for n in names]


def require(tool: str) -> str:
    path = shutil.which(tool) or (tool == "Orthanc" and os.path.exists("/usr/sbin/Orthanc") and "/usr/sbin/Orthanc") or None
    if not path:
        raise BenchmarkError(f"{tool} is not installed")
    return str(path)


def wait_port(port: int, timeout: float = 60.0, alive: Callable[[], bool] = lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise BenchmarkError(f"the process meant to listen on port {port} exited")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise BenchmarkError(f"nothing listens on port {port} after {timeout:.0f} s")


def storescu_command(port: int, files: Sequence[Path], *, called: str, calling: str = "BENCH_SCU") -> list[str]:
    """dcmtk storescu over one association, with a 128 KiB maximum PDU."""
    return [require("storescu"), "-aet", calling, "-aec", called, "-pdu", "131072", "127.0.0.1", str(port), *map(str, files)]


def nodelay_env() -> dict[str, str]:
    """dcmtk and Orthanc read TCP_NODELAY from the environment; without it Nagle stalls every response."""
    return dict(os.environ, TCP_NODELAY="1")


def run_senders(port: int, files: Sequence[Path], senders: int, *, called: str) -> float:
    """Send ``files`` split over ``senders`` concurrent storescu processes; seconds until all exited OK."""
    parts = [list(files[i::senders]) for i in range(senders)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(storescu_command(port, part, called=called), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=nodelay_env())
        for part in parts
    ]
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            errors.append(f"exit {proc.returncode}: " + err.decode(errors="replace")[-500:])
    seconds = time.perf_counter() - start
    if errors:
        raise BenchmarkError("storescu failed: " + " | ".join(errors))
    return seconds


# ---------------------------------------------------------------- RSS of a process tree


def process_tree(root_pid: int) -> list[int]:
    """``root_pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for pid, fields in process_stats():
        children.setdefault(int(fields[1]), []).append(pid)
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def tree_rss(root_pid: int) -> int:
    return sum(rss_bytes(pid) for pid in process_tree(root_pid))


def python() -> str:
    return sys.executable


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
