"""Series analysed per minute with 1, 2 and 3 worker hosts on PostgreSQL (issue 6).

    python benchmarks/workers_throughput.py                     # 12 series, 1 2 3 workers, 3 repeats
    python benchmarks/workers_throughput.py --workers 1 2 --repeats 1 --series 6 --json out.json

Each measurement is a fresh scaled-out node as in tests/scaleout: a throw-away PostgreSQL server
(tests.support.postgres), one receiver (`pe-agent serve`, ``workers.count = 0``), K worker hosts
(`pe-agent worker --config FILE`, each its own process group and config), a shared spool folder and
a stand-in PACS. The same phantom series are sent by C-STORE before the clock starts; their jobs are
held back (``not_before`` set far ahead) until every worker has loaded the model, then released all
at once. Timed: release -> every job SUCCEEDED ("analysis") and -> every report delivered to PACS
("delivered"). Series per minute = series / analysis seconds. Medians over ``--repeats``.

Threads: ``--threads auto`` gives each worker ``max(1, cores // K)`` torch threads (what an
administrator sets when K workers share one machine); on separate machines each worker would have
all of its cores. With more workers than cores the workers compete for the CPU: the numbers then
show the cost of coordination, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/workers_throughput.py`: the harness lives in tests/
    sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select, update  # noqa: E402

from pacs_agent.db.models import Delivery, DeliveryStatus, Event, Job, JobStatus  # noqa: E402
from benchmarks.model import cpu_model_name  # noqa: E402
from phantoms import PhantomSpec, PhantomTruth, write_phantom_series  # noqa: E402
from tests.faults.node import wait_until  # noqa: E402
from tests.scaleout.cluster import Cluster, send_series  # noqa: E402
from tests.support.pacs_scp import PacsSCP  # noqa: E402
from tests.support.postgres import PostgresServer, create_database, postgres_bindir  # noqa: E402


@dataclass(frozen=True)
class Measurement:
    """One run with ``workers`` hosts: seconds from release to all analysed / all delivered."""

    workers: int
    threads_per_worker: int
    repeat: int
    series: int
    analysis_s: float
    delivered_s: float
    receive_s: float
    jobs_per_host: tuple[int, ...]
    load_average: float

    @property
    def series_per_minute(self) -> float:
        return 60.0 * self.series / self.analysis_s


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def write_series(folder: Path, count: int, *, slices: int, size: int) -> list[PhantomTruth]:
    return [
        write_phantom_series(
            folder / f"series-{i:02d}",
            PhantomSpec(pe=i % 2 == 0, n_slices=slices, rows=size, columns=size, seed=500 + i),
        )
        for i in range(count)
    ]


def random_init_checkpoint(path: Path, width: int, input_size: int) -> Path:
    from pe_model.checkpoint import build_initial_checkpoint, small_sequence_config
    from pe_model.preprocessing import PreprocessConfig

    build_initial_checkpoint(path, encoder_width=width, sequence=small_sequence_config(width),
                             preprocess_config=PreprocessConfig(input_size=input_size), seed=0)
    return path


def _count(cluster: Cluster, status: JobStatus) -> int:
    with cluster.sessions()() as session:
        return int(session.scalar(select(func.count()).select_from(Job).where(Job.status == status)) or 0)


def _all_delivered(cluster: Cluster) -> bool:
    with cluster.sessions()() as session:
        statuses = list(session.scalars(select(Delivery.status)))
    return bool(statuses) and all(s == DeliveryStatus.DELIVERED for s in statuses)


def measure(
    *, server: PostgresServer, pacs: PacsSCP, series: Sequence[PhantomTruth], workers: int, threads: int,
    checkpoint: str, repeat: int, workdir: Path, timeout: float,
) -> Measurement:
    """One scaled-out node with ``workers`` hosts analysing ``series`` (see the module docstring)."""
    url = create_database(server, f"bench_w{workers}_r{repeat}")
    cluster = Cluster(
        root=workdir / f"w{workers}-r{repeat}", database_url=url, checkpoint=checkpoint, destination_port=pacs.port,
        workers=workers, model={"torch_threads": threads},
        worker_settings={"count": 1, "poll_seconds": 0.2, "heartbeat_seconds": 2.0, "lease_seconds": 60.0},
    )
    try:
        cluster.upgrade()
        receiver = cluster.start_receiver()
        started = time.monotonic()
        send_series(receiver.port, [truth.files for truth in series])
        wait_until(lambda: _count(cluster, JobStatus.QUEUED) == len(series), timeout=timeout, what="every series queued")
        receive_s = time.monotonic() - started
        with cluster.sessions().begin() as session:  # hold the jobs back while the workers load the model
            session.execute(update(Job).values(not_before=datetime(2100, 1, 1, tzinfo=UTC)))
        cluster.start_workers(timeout=timeout)
        with cluster.sessions().begin() as session:
            session.execute(update(Job).values(not_before=datetime(2000, 1, 1, tzinfo=UTC)))
        released = time.monotonic()
        wait_until(lambda: _count(cluster, JobStatus.SUCCEEDED) == len(series), timeout=timeout,
                   what=f"every series analysed:\n{cluster.logs()}", interval=0.05)
        analysis_s = time.monotonic() - released
        wait_until(lambda: _all_delivered(cluster), timeout=timeout, what="every report delivered", interval=0.05)
        delivered_s = time.monotonic() - released
        with cluster.sessions()() as session:
            owners = [e.detail.get("owner") for e in session.scalars(select(Event).where(Event.kind == "job_succeeded"))]
        per_host = [owners.count(host.owner) for host in cluster.hosts]
        if any(j.status == JobStatus.FAILED for j in cluster.jobs()):
            raise RuntimeError(f"a job failed:\n{cluster.logs()}")
        return Measurement(
            workers=workers, threads_per_worker=threads, repeat=repeat, series=len(series), analysis_s=analysis_s,
            delivered_s=delivered_s, receive_s=receive_s, jobs_per_host=tuple(per_host), load_average=os.getloadavg()[0],
        )
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="workers_throughput.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3], help="Worker host counts to measure.")
    parser.add_argument("--series", type=int, default=12, help="Series sent in each run (the same set every run).")
    parser.add_argument("--slices", type=int, default=80, help="Slices per phantom series.")
    parser.add_argument("--size", type=int, default=128, help="Rows and columns of the phantoms.")
    parser.add_argument("--checkpoint", help="Model of every worker (default: a random-init model of --width/--input-size).")
    parser.add_argument("--width", type=int, default=8, help="Encoder width of the random-init model (8: the demo size).")
    parser.add_argument("--input-size", type=int, default=128, help="Input size of the random-init model (128: the demo size).")
    parser.add_argument("--threads", default="auto", help='Torch threads per worker: "auto" (cores // K, at least 1) or a number.')
    parser.add_argument("--repeats", type=int, default=3, help="Runs per worker count (the table shows medians).")
    parser.add_argument("--timeout", type=float, default=600.0, help="Seconds any one phase may take.")
    parser.add_argument("--json", type=Path, help="Also write every measurement to this JSON file.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if postgres_bindir() is None:
        print("workers_throughput: PostgreSQL server binaries are not installed (Debian package postgresql)", file=sys.stderr)
        return 2
    cores = available_cores()
    load_start = os.getloadavg()[0]
    date = datetime.now(UTC).isoformat(timespec="seconds")
    workdir = Path(tempfile.mkdtemp(prefix="pe-bench-workers-"))
    pg_dir = Path(tempfile.mkdtemp(prefix="pe-bench-pg-"))
    measurements: list[Measurement] = []
    try:
        series = write_series(workdir / "phantoms", args.series, slices=args.slices, size=args.size)
        checkpoint = args.checkpoint or str(random_init_checkpoint(workdir / "model.pt", args.width, args.input_size))
        model = args.checkpoint or f"random init, width {args.width}, input {args.input_size} (timings do not depend on the weights)"
        with PostgresServer(pg_dir) as server, PacsSCP(ae_title="PACS") as pacs:
            for repeat in range(args.repeats):
                for workers in args.workers:
                    threads = max(1, cores // workers) if args.threads == "auto" else int(args.threads)
                    m = measure(server=server, pacs=pacs, series=series, workers=workers, threads=threads,
                                checkpoint=checkpoint, repeat=repeat, workdir=workdir, timeout=args.timeout)
                    measurements.append(m)
                    print(f"workers {m.workers} (threads {m.threads_per_worker}) repeat {repeat + 1}: "
                          f"{m.series_per_minute:.1f} series/min, analysis {m.analysis_s:.1f} s, delivered {m.delivered_s:.1f} s, "
                          f"jobs per host {list(m.jobs_per_host)}, load {m.load_average:.1f}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(pg_dir, ignore_errors=True)

    print(f"\nMachine: {cpu_model_name()}, {cores} cores; date {date}; load average {load_start:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end")
    print(f"Series: {args.series} phantoms of {args.slices} x {args.size} x {args.size}; model {model}; "
          f"PostgreSQL; medians of {args.repeats} run(s)\n")
    print("| workers | torch threads each | series/min (median) | analysis s (median) | delivered s (median) | runs (series/min) |")
    print("|---|---|---|---|---|---|")
    for workers in args.workers:
        ms = [m for m in measurements if m.workers == workers]
        print(f"| {workers} | {ms[0].threads_per_worker} | {statistics.median(m.series_per_minute for m in ms):.1f} | "
              f"{statistics.median(m.analysis_s for m in ms):.1f} | {statistics.median(m.delivered_s for m in ms):.1f} | "
              f"{', '.join(f'{m.series_per_minute:.1f}' for m in ms)} |")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "machine": {"cpu": cpu_model_name(), "cores": cores, "load_average_start": load_start}, "date": date,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "measurements": [{**asdict(m), "series_per_minute": m.series_per_minute} for m in measurements],
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
