"""Ingest: a 400-slice 512 x 512 CT series (~210 MB) sent by dcmtk storescu over loopback.

Receivers, measured in the same run: dcmtk storescp writing files, Orthanc, the node (`pe-agent
serve` with no workers, with its default 2 receiver processes and with 1), the node's Receiver class alone (its associations event-driven, see
pacs_agent.dicom.pynetdicom_patches), and a bare pynetdicom SCP, also with its 1 ms polling sleeps capped
at 100 us (``--cap-sleep``), which shows what the polling costs per instance. 1, 2 and 4 concurrent
senders split the same 400 files. Each repetition starts a fresh receiver (empty storage: nothing is a duplicate) and times from the first
storescu start to the last storescu exit; the stored instance count is checked every time.
`python -m benchmarks.ingest [--reps 5] [--senders 1 2 4]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    AGENT_AE_TITLE,
    BenchmarkError,
    free_port,
    machine,
    median,
    nodelay_env,
    phantom_series,
    require,
    run_senders,
    wait_port,
    write_json,
)
from phantoms import PhantomSpec

SERIES_SPEC = PhantomSpec(rows=512, columns=512, n_slices=400, pixel_spacing_mm=0.7, slice_spacing_mm=0.8, seed=1,
                          series_description="CTPA benchmark", patient_id="BENCH-INGEST")


@dataclass(frozen=True)
class Receiver:
    name: str
    called_ae: str
    #: (work folder) -> context manager yielding (port, stored-instance counter)
    start: Callable[[Path], Any]
    senders: tuple[int, ...]


@dataclass(frozen=True)
class IngestResult:
    receiver: str
    senders: int
    seconds: list[float]
    median_s: float
    mb_per_s: float
    instances_per_s: float
    load_average: float
    #: SCP-side split of the time per instance (pynetdicom-based receivers in a subprocess only).
    timing: dict[str, Any] | None = None


@contextmanager
def storescp(work: Path) -> Iterator[tuple[int, Callable[[], int]]]:
    port = free_port()
    out = work / "storescp"
    out.mkdir(parents=True)
    proc = subprocess.Popen([require("storescp"), "-aet", "STORESCP", "-od", str(out), "-pdu", "131072", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=nodelay_env())
    try:
        wait_port(port, alive=lambda: proc.poll() is None)
        yield port, lambda: sum(1 for _ in out.iterdir())
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextmanager
def orthanc(work: Path) -> Iterator[tuple[int, Callable[[], int]]]:
    require("Orthanc")
    from tests.support.orthanc import Orthanc  # TCP_NODELAY=1 is set in its environment

    server = Orthanc(work / "orthanc")
    server.start()
    try:
        yield server.dicom_port, lambda: int(server.get("/statistics")["CountInstances"])
    finally:
        server.stop()


def agent_serve(processes: int) -> Callable[[Path], Any]:
    """`pe-agent serve` with no workers and ``node.receiver_processes = processes``."""

    @contextmanager
    def start(work: Path) -> Iterator[tuple[int, Callable[[], int]]]:
        from tests.faults.node import Node, node_config

        node = Node(work / "agent", node_config(work / "agent", port=free_port(), checkpoint="builtin:demo",
                                               workers={"count": 0}, series={"quiet_seconds": 60.0},
                                               node={"max_associations": 16, "receiver_processes": processes}))
        node.start()
        try:
            yield node.port, lambda: sum(1 for _ in (node.spool / "incoming").rglob("*.dcm"))
        finally:
            node.stop()

    return start


def _subprocess_receiver(kind: str, cap_sleep: float) -> Callable[[Path], Any]:
    @contextmanager
    def start(work: Path) -> Iterator[tuple[int, Callable[[], int]]]:
        port = free_port()
        out = work / kind
        command = [sys.executable, "-m", "benchmarks.receivers", kind, str(port), str(out)]
        if cap_sleep:
            command += ["--cap-sleep", str(cap_sleep)]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:  # log lines may come first
                if line.strip() == "ready":
                    break
            else:
                raise BenchmarkError(f"{kind} receiver did not start")
            wait_port(port, alive=lambda: proc.poll() is None)
            folder = out / "spool" / "incoming" if kind == "agent" else out
            yield port, lambda: sum(1 for _ in folder.rglob("*.dcm"))
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    return start


def _median_timing(timings: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per-repetition handler timings reduced to medians of their means."""
    if not timings:
        return None
    out: dict[str, Any] = {}
    for part in ("handler", "between_handlers"):
        means = [t[part]["mean_ms"] for t in timings if t.get(part)]
        if means:
            out[f"{part}_mean_ms"] = round(median(means), 3)
    return out


def receivers(senders: tuple[int, ...]) -> list[Receiver]:
    one = (1,)
    return [
        Receiver("dcmtk storescp (-pdu 131072, TCP_NODELAY=1)", "STORESCP", storescp, senders),
        Receiver("Orthanc (TCP_NODELAY=1)", "ORTHANC", orthanc, senders),
        Receiver("pe-agent serve (workers 0, receiver_processes 2: default)", AGENT_AE_TITLE, agent_serve(2), senders),
        Receiver("pe-agent serve (workers 0, receiver_processes 1)", AGENT_AE_TITLE, agent_serve(1), senders),
        Receiver("agent Receiver class alone (event-driven)", AGENT_AE_TITLE, _subprocess_receiver("agent", 0.0), senders),
        Receiver("bare pynetdicom SCP (encoded_dataset -> file)", "BARE_SCP", _subprocess_receiver("bare", 0.0), one),
        Receiver("bare pynetdicom SCP, sleeps capped at 100 us", "BARE_SCP", _subprocess_receiver("bare", 1e-4), one),
    ]


def run(reps: int, senders: tuple[int, ...], only: str | None = None) -> dict[str, Any]:
    files = phantom_series("ingest-400x512", SERIES_SPEC)
    total_mb = sum(f.stat().st_size for f in files) / 1e6
    results: list[IngestResult] = []
    for receiver in receivers(senders):
        if only and only.lower() not in receiver.name.lower():
            continue
        for n in receiver.senders:
            load = round(os.getloadavg()[0], 2)
            times = []
            timings: list[dict[str, Any]] = []
            for _ in range(reps):
                work = Path(tempfile.mkdtemp(prefix="pe-bench-ingest-"))
                try:
                    with receiver.start(work) as (port, stored):
                        seconds = run_senders(port, files, n, called=receiver.called_ae)
                        count = stored()
                    if count != len(files):
                        raise BenchmarkError(f"{receiver.name}: {count} of {len(files)} instances stored")
                    times.append(seconds)
                    for timing_file in work.glob("timing-*.json"):
                        timings.append(json.loads(timing_file.read_text()))
                finally:
                    shutil.rmtree(work, ignore_errors=True)
            m = median(times)
            results.append(IngestResult(receiver.name, n, [round(t, 3) for t in times], round(m, 3),
                                        round(total_mb / m, 1), round(len(files) / m, 1), load,
                                        _median_timing(timings)))
            print(f"{receiver.name:55s} senders={n}  median {m:6.2f} s  {total_mb / m:6.1f} MB/s", flush=True)
    return {
        "benchmark": "ingest",
        "machine": asdict(machine()),
        "series": {"instances": len(files), "megabytes": round(total_mb, 1), "rows": 512, "columns": 512},
        "repetitions": reps,
        "results": [asdict(r) for r in results],
    }


def table(data: dict[str, Any]) -> str:
    """Markdown table with ratios against storescp and Orthanc at the same number of senders."""
    rows = data["results"]
    ref: dict[tuple[str, int], float] = {}
    for r in rows:
        if r["receiver"].startswith("dcmtk"):
            ref[("dcmtk", r["senders"])] = r["median_s"]
        if r["receiver"].startswith("Orthanc"):
            ref[("orthanc", r["senders"])] = r["median_s"]
    lines = [
        "| receiver | senders | median s | MB/s | instances/s | x storescp time | x Orthanc time | load avg |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ratios = []
        for key in ("dcmtk", "orthanc"):
            base = ref.get((key, r["senders"]))
            ratios.append(f"{r['median_s'] / base:.2f}" if base else "-")
        lines.append(
            f"| {r['receiver']} | {r['senders']} | {r['median_s']:.2f} | {r['mb_per_s']:.0f} | {r['instances_per_s']:.0f} | "
            f"{ratios[0]} | {ratios[1]} | {r['load_average']:.1f} |"
        )
    timed = [r for r in rows if r.get("timing")]
    if timed:
        lines += ["", "| pynetdicom-based receiver | senders | in our C-STORE handler (ms/instance) | between handlers (ms/instance) |",
                  "| --- | ---: | ---: | ---: |"]
        for r in timed:
            t = r["timing"]
            lines.append(f"| {r['receiver']} | {r['senders']} | {t.get('handler_mean_ms', 0):.2f} | {t.get('between_handlers_mean_ms', 0):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--senders", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--only", default=None, help="run only receivers whose name contains this text")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ingest.json"))
    args = parser.parse_args(argv)
    data = run(args.reps, tuple(args.senders), args.only)
    write_json(args.out, data)
    print(table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
