"""Memory: peak resident memory of the whole node while it receives 4 series and analyses a 600-slice one.

`pe-agent serve` (one worker, the full-width random model) gets a 600-slice 512 x 512 series; once its
job runs, four 400-slice series arrive at once from four storescu processes. The node's process tree
(serve, worker, multiprocessing helpers) is sampled every 50 ms from /proc until the job finished and
the four series are stored: the peak of the summed RSS (shared pages counted in every process, so an
upper bound) and of the summed PSS (shared pages split, the honest total). Target (issue 7): <= 2 GB.
`python -m benchmarks.memory`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.common import (
    AGENT_AE_TITLE,
    BenchmarkError,
    cache_dir,
    machine,
    nodelay_env,
    phantom_series,
    process_tree,
    relabel_series,
    rss_bytes,
    storescu_command,
    write_json,
)
from pacs_agent.demo.pacs import free_port
from benchmarks.ingest import SERIES_SPEC
from benchmarks.latency import full_width_checkpoint
from pacs_agent.settings import NodeSettings
from phantoms import PhantomSpec

BIG_SPEC = PhantomSpec(rows=512, columns=512, n_slices=600, pixel_spacing_mm=0.7, slice_spacing_mm=0.6, seed=2,
                       series_description="CTPA benchmark 600", patient_id="BENCH-MEMORY")
TARGET_BYTES = 2 * 1024**3


def pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


class Sampler(threading.Thread):
    """Sum RSS and PSS over a process tree every ``interval`` seconds; keep the peaks."""

    def __init__(self, root_pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.interval = interval
        self.stop = threading.Event()
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_by_process: dict[int, int] = {}
        self.samples = 0

    def run(self) -> None:
        while not self.stop.is_set():
            pids = process_tree(self.root_pid)
            rss = {pid: rss_bytes(pid) for pid in pids}
            total = sum(rss.values())
            if total > self.peak_rss:
                self.peak_rss = total
                self.peak_by_process = rss
            self.peak_pss = max(self.peak_pss, sum(pss_bytes(pid) for pid in pids))
            self.samples += 1
            self.stop.wait(self.interval)


def run(receiver_processes: int = NodeSettings().receiver_processes) -> dict[str, Any]:
    from tests.faults.node import Node, node_config

    big = phantom_series("memory-600x512", BIG_SPEC)
    base = phantom_series("ingest-400x512", SERIES_SPEC)
    others = [relabel_series(base, cache_dir() / f"memory-copy-{i}", f"MEM{i}") for i in range(4)]
    work = Path(tempfile.mkdtemp(prefix="pe-bench-memory-"))
    node = Node(work / "node", node_config(
        work / "node", port=free_port(), checkpoint=str(full_width_checkpoint()),
        workers={"count": 1, "lease_seconds": 900.0, "heartbeat_seconds": 5.0, "poll_seconds": 0.2},
        series={"quiet_seconds": 2.0}, node={"max_associations": 16, "receiver_processes": receiver_processes},
    ))
    node.start(timeout=300)
    assert node.process is not None
    sampler = Sampler(node.process.pid)
    sampler.start()
    started = time.monotonic()
    try:
        done = subprocess.run(storescu_command(node.port, big, called=AGENT_AE_TITLE), capture_output=True, env=nodelay_env(), check=False)
        if done.returncode != 0:
            raise BenchmarkError(f"storescu failed: {done.stderr.decode(errors='replace')[-400:]}")
        import pydicom

        big_uid = str(pydicom.dcmread(big[0], stop_before_pixels=True).SeriesInstanceUID)
        while not any(j.status.value in ("RUNNING", "SUCCEEDED", "FAILED") for j in node.jobs(big_uid)):
            if time.monotonic() - started > 600:
                raise BenchmarkError("the 600-slice job did not start")
            time.sleep(0.1)
        senders = [subprocess.Popen(storescu_command(node.port, files, called=AGENT_AE_TITLE), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, env=nodelay_env()) for files in others]
        for proc in senders:
            proc.wait(timeout=900)
        while (s := node.series(big_uid)) is None or s.state.value not in ("ANALYSED", "FAILED"):
            if time.monotonic() - started > 1800:
                raise BenchmarkError("the 600-slice job did not finish")
            time.sleep(0.2)
        state = s.state.value
        stored = sum(1 for _ in (node.spool / "incoming").rglob("*.dcm"))
    finally:
        sampler.stop.set()
        sampler.join()
        node.stop()
    names = {}
    for pid in sampler.peak_by_process:
        try:
            names[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
        except OSError:
            names[pid] = "(exited)"
    return {
        "benchmark": "memory",
        "machine": asdict(machine()),
        "receiver_processes": receiver_processes,
        "analysed_series": {"slices": len(big), "state": state},
        "received_series": {"count": len(others), "slices_each": len(base)},
        "instances_stored": stored,
        "seconds": round(time.monotonic() - started, 1),
        "samples": sampler.samples,
        "peak_rss_sum_mb": round(sampler.peak_rss / 2**20),
        "peak_pss_sum_mb": round(sampler.peak_pss / 2**20),
        "peak_rss_by_process_mb": {str(pid): round(v / 2**20) for pid, v in sampler.peak_by_process.items()},
        "target_mb": TARGET_BYTES // 2**20,
    }


def table(data: dict[str, Any]) -> str:
    return "\n".join([
        "| scenario | peak RSS sum (MB) | peak PSS sum (MB) | target (MB) | analysed series | instances stored |",
        "| --- | ---: | ---: | ---: | --- | ---: |",
        f"| receive 4 x 400 slices while analysing 600 slices (full-width model, receiver_processes "
        f"{data.get('receiver_processes', 1)}) | {data['peak_rss_sum_mb']} | "
        f"{data['peak_pss_sum_mb']} | {data['target_mb']} | {data['analysed_series']['state']} | {data['instances_stored']} |",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/memory.json"))
    parser.add_argument("--receiver-processes", type=int, default=NodeSettings().receiver_processes,
                        help="node.receiver_processes of the node (default: the setting's default)")
    args = parser.parse_args(argv)
    data = run(args.receiver_processes)
    write_json(args.out, data)
    print(table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
