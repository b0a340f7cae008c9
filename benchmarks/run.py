"""`make bench`: ingest, latency and memory in one run; JSON per benchmark and one Markdown summary.

`python -m benchmarks.run [--quick] [--skip ingest latency memory] [--out benchmarks/results]`.
``--quick``: one repetition each (a smoke run; the documented numbers are medians of 5 / 3).
Phantom series are cached in ``$PE_BENCH_CACHE`` (default ``~/.cache/pe-bench``; about 2 GB).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks import ingest, latency, memory
from benchmarks.common import machine, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one repetition of everything")
    parser.add_argument("--skip", nargs="*", default=[], choices=["ingest", "latency", "memory"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    sections = [f"Machine: {machine().line()}", ""]
    if "ingest" not in args.skip:
        data = ingest.run(1 if args.quick else 5, (1, 2, 4))
        write_json(args.out / "ingest.json", data)
        sections += [f"### Ingest ({data['series']['instances']} instances, {data['series']['megabytes']} MB; "
                     f"median of {data['repetitions']})", "", ingest.table(data), ""]
    if "latency" not in args.skip:
        data = latency.run(1 if args.quick else 3, ["full", "demo"])
        write_json(args.out / "latency.json", data)
        sections += [f"### Latency (quiet_seconds {data['quiet_seconds']:g}; median of {data['repetitions']})", "", latency.table(data), ""]
    if "memory" not in args.skip:
        data = memory.run()
        write_json(args.out / "memory.json", data)
        sections += ["### Memory", "", memory.table(data), ""]
    summary = "\n".join(sections)
    (args.out / "summary.md").write_text(summary + "\n")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
