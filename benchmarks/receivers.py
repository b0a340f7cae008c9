"""Storage SCPs run as their own process for the ingest benchmark: `python -m benchmarks.receivers KIND PORT DIR`.

KIND ``bare``: a minimal pynetdicom SCP that writes ``event.encoded_dataset()`` per instance (the
floor for anything built on pynetdicom). KIND ``agent``: the node's own `pacs_agent.dicom.scp.Receiver`
with a fresh SQLite database (no workers, no scheduler: the receive path alone).
``--cap-sleep SECONDS`` caps the fixed polling sleeps of pynetdicom's DUL and association reactor
(1 ms each by default) to show how much of the time per instance they cost.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pacs_agent.dicom.pynetdicom_patches import cap_pynetdicom_sleeps


class HandlerTiming:
    """Where the time per instance goes on the SCP side: inside our C-STORE handler, or between the
    end of one handler and the start of the next (network, PDU assembly, pynetdicom's polling)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inside: list[float] = []
        self.between: list[float] = []
        self.last_exit: dict[int, float] = {}

    def wrap(self, handler: Any) -> Any:
        def timed(event: Any, *args: Any) -> Any:
            entered = time.perf_counter()
            try:
                return handler(event, *args)
            finally:
                left = time.perf_counter()
                key = id(event.assoc)
                with self.lock:
                    self.inside.append(left - entered)
                    if key in self.last_exit:
                        self.between.append(entered - self.last_exit[key])
                    self.last_exit[key] = left

        return timed

    def write(self, path: Path) -> None:
        import json
        import statistics

        def summary(values: list[float]) -> dict[str, float]:
            if not values:
                return {}
            return {"mean_ms": round(1000 * statistics.fmean(values), 3), "median_ms": round(1000 * statistics.median(values), 3),
                    "total_s": round(sum(values), 3), "count": len(values)}

        path.write_text(json.dumps({"handler": summary(self.inside), "between_handlers": summary(self.between)}))


TIMING = HandlerTiming()


def serve_bare(port: int, out_dir: Path, stop: threading.Event) -> None:
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

    out_dir.mkdir(parents=True, exist_ok=True)

    def on_store(event: Any) -> int:
        sop = event.request.AffectedSOPInstanceUID
        (out_dir / f"{sop}.dcm").write_bytes(event.encoded_dataset())
        return 0

    ae = AE(ae_title="BARE_SCP")
    ae.maximum_associations = 16
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, TIMING.wrap(on_store))])
    print("ready", flush=True)
    stop.wait()
    if server is not None:
        server.shutdown()


def serve_agent(port: int, out_dir: Path, stop: threading.Event) -> None:
    from pacs_agent.db.migrate import upgrade_database
    from pacs_agent.db.session import make_engine, make_session_factory
    from pacs_agent.dicom.scp import Receiver
    from pacs_agent.settings import load_settings

    out_dir.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{out_dir / 'agent.sqlite'}"
    settings = load_settings(None, environ={}, overrides={
        "node": {"port": port, "min_free_disk_mb": 1, "max_associations": 16},
        "storage": {"root": str(out_dir / "spool")},
        "database": {"url": url},
        "log": {"format": "json", "level": "WARNING"},
    })
    engine = make_engine(url)
    upgrade_database(url, engine)
    receiver = Receiver(settings, make_session_factory(engine))
    receiver._on_c_store = TIMING.wrap(receiver._on_c_store)  # type: ignore[method-assign]  # measurement only
    receiver.start()
    print("ready", flush=True)
    stop.wait()
    receiver.stop()
    engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=("bare", "agent"))
    parser.add_argument("port", type=int)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--cap-sleep", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.cap_sleep > 0:
        cap_pynetdicom_sleeps(args.cap_sleep)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    (serve_bare if args.kind == "bare" else serve_agent)(args.port, args.out_dir, stop)
    TIMING.write(args.out_dir.parent / f"timing-{args.kind}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
