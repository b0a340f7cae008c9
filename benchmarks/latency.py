"""Latency: from the last instance acknowledged to the SR and every SC of that series stored at the PACS.

The node runs as `pe-agent serve` (one worker, default quiet_seconds 5) with a pynetdicom storage SCP
as the PACS in this process (it records when each object arrived). dcmtk storescu sends the 400-slice
512 x 512 series; its exit (after the last C-STORE response and the release) starts the clock. Models:
the demo checkpoint when pe_model/data/demo.pt is installed, and a randomly initialised full-width
model (R3D-18 width 64, input 192, TCN hidden 128). Each repetition sends the series under new UIDs.
Target (issue 7): <= quiet_seconds + 20 s on the 2-core machine with the full-width model.
`python -m benchmarks.latency [--reps 3] [--models full demo]`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from benchmarks.common import (
    AGENT_AE_TITLE,
    BenchmarkError,
    cache_dir,
    machine,
    median,
    nodelay_env,
    phantom_series,
    relabel_series,
    storescu_command,
    write_json,
)
from pacs_agent.demo.pacs import free_port
from benchmarks.ingest import SERIES_SPEC

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
QUIET_SECONDS = 5.0


def full_width_checkpoint() -> Path:
    """A randomly initialised checkpoint at the deployed size (cached)."""
    from pe_model.checkpoint import build_initial_checkpoint
    from pe_model.networks.sequence import SequenceConfig
    from pe_model.preprocessing import PreprocessConfig

    path = cache_dir() / "full-width-random.pt"
    if not path.exists():
        build_initial_checkpoint(path, encoder_width=64, sequence=SequenceConfig(), preprocess_config=PreprocessConfig(input_size=192), seed=0)
    return path


def demo_checkpoint() -> str | None:
    from pe_model.checkpoint import builtin_demo_path

    return "builtin:demo" if builtin_demo_path().is_file() else None


class TimedPACS:
    """Storage SCP that remembers when each SOP instance of each study arrived (monotonic seconds)."""

    def __init__(self) -> None:
        from tests.support.pacs_scp import PacsSCP

        outer = self

        class _SCP(PacsSCP):
            def _on_store(self, event: Any) -> int:
                status = super()._on_store(event)
                ds = event.dataset
                with outer.lock:
                    outer.arrivals.append((time.monotonic(), str(ds.StudyInstanceUID), str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
                return status

        self.lock = threading.Lock()
        self.arrivals: list[tuple[float, str, str, str]] = []
        self.scp = _SCP(ae_title="PACS")

    def report_time(self, study_uid: str, sc_expected: int) -> float | None:
        """Arrival time of the last of SR + ``sc_expected`` SCs for the study, None until all arrived."""
        with self.lock:
            mine = [a for a in self.arrivals if a[1] == study_uid]
        srs = [a[0] for a in mine if a[2] == SR_CLASS]
        scs = [a[0] for a in mine if a[2] == SC_CLASS]
        if not srs or len(scs) < sc_expected:
            return None
        return max(min(srs), *sorted(scs)[:sc_expected])


@dataclass(frozen=True)
class LatencyRun:
    model: str
    seconds: float
    job_timings_s: dict[str, float]


def _job_timings(node: Any, series_uid: str) -> dict[str, float]:
    from pacs_agent.db.models import Job, Result, Series

    with node.sessions()() as session:
        result = session.scalars(
            select(Result).join(Job).join(Series).where(Series.series_instance_uid == series_uid).order_by(Result.id.desc())
        ).first()
        return {k: float(v) for k, v in (result.timings_s if result else {}).items()}


def run_model(name: str, checkpoint: str, reps: int, work: Path) -> list[LatencyRun]:
    import pydicom

    from tests.faults.node import Node, node_config

    source = phantom_series("ingest-400x512", SERIES_SPEC)
    pacs = TimedPACS()
    pacs.scp.start()
    node = Node(work / f"node-{name}", node_config(
        work / f"node-{name}", port=free_port(), checkpoint=checkpoint, destinations=[("pacs", "PACS", pacs.scp.port)],
        series={"quiet_seconds": QUIET_SECONDS},
        workers={"count": 1, "lease_seconds": 600.0, "heartbeat_seconds": 5.0, "poll_seconds": 0.2},
        dispatch={"poll_seconds": 0.2},
    ))
    runs = []
    try:
        node.start(timeout=300)
        for rep in range(reps):
            files = relabel_series(source, cache_dir() / f"latency-copy-{rep}", f"LAT{rep}")
            header = pydicom.dcmread(files[0], stop_before_pixels=True)
            done = subprocess.run(storescu_command(node.port, files, called=AGENT_AE_TITLE), capture_output=True, env=nodelay_env(), check=False)
            acknowledged = time.monotonic()
            if done.returncode != 0:
                raise BenchmarkError(f"storescu failed: {done.stderr.decode(errors='replace')[-400:]}")
            deadline = acknowledged + 900
            arrived = None
            while arrived is None:
                if time.monotonic() > deadline:
                    raise BenchmarkError(f"{name}: no report within 900 s\n{node.log_tail()}")
                series = node.series(str(header.SeriesInstanceUID))
                if series is not None and series.state.value in ("FAILED", "IGNORED"):
                    raise BenchmarkError(f"{name}: series {series.state.value}\n{node.log_tail()}")
                arrived = pacs.report_time(str(header.StudyInstanceUID), sc_expected=3)
                time.sleep(0.05)
            seconds = arrived - acknowledged
            timings = _job_timings(node, str(header.SeriesInstanceUID))
            runs.append(LatencyRun(name, round(seconds, 2), timings))
            print(f"{name:12s} rep {rep + 1}: {seconds:6.1f} s  (job {timings.get('job', 0):.1f} s: {timings})", flush=True)
    finally:
        node.stop()
        pacs.scp.stop()
    return runs


def run(reps: int, models: list[str]) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="pe-bench-latency-"))
    results = []
    for name in models:
        checkpoint = str(full_width_checkpoint()) if name == "full" else demo_checkpoint()
        if checkpoint is None:
            print(f"{name}: pe_model/data/demo.pt is not installed; skipped", flush=True)
            continue
        runs = run_model(name, checkpoint, reps, work)
        results.append({
            "model": name, "checkpoint": checkpoint, "seconds": [r.seconds for r in runs],
            "median_s": round(median([r.seconds for r in runs]), 2), "target_s": QUIET_SECONDS + 20,
            "job_timings_s": [r.job_timings_s for r in runs],
        })
    return {"benchmark": "latency", "machine": asdict(machine()), "quiet_seconds": QUIET_SECONDS, "repetitions": reps, "results": results}


def table(data: dict[str, Any]) -> str:
    lines = [
        "| model | runs (s) | median s | target s | median job breakdown (s) |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for r in data["results"]:
        keys = ("load", "preprocess", "stage1", "stage2", "gradcam", "total", "job")
        parts = []
        for key in keys:
            values = [t[key] for t in r["job_timings_s"] if key in t]
            if values:
                parts.append(f"{key} {median(values):.1f}")
        lines.append(f"| {r['model']} | {', '.join(f'{s:.1f}' for s in r['seconds'])} | {r['median_s']:.1f} | {r['target_s']:.0f} | {'; '.join(parts)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["full", "demo"], choices=["full", "demo"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latency.json"))
    args = parser.parse_args(argv)
    data = run(args.reps, args.models)
    write_json(args.out, data)
    print(table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
