"""One running node for the hostile corpus, its receivers' memory, and the tally the corpus reports.

The node is `pe-agent serve` as a subprocess on loopback (tests.faults.node), two receiver processes, with
short limits so that each case runs in seconds: 4 associations at most (2 per calling AE title), idle
associations dropped after 2 s, PDUs up to 64 KiB, instances above 4 MiB refused. Its system temporary folder (TMPDIR) is a
folder of its own, so a test can list it before and after: the node must never write there.

At the end of the session the tally (cases tried, refused with a reason, crashes, data lost, peak memory
per receiver process) is printed, and written as JSON to ``$PE_HOSTILE_REPORT`` when that is set.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

from pacs_agent.demo.pacs import free_port
from tests.faults.node import Node, c_echo, node_config

MAX_ASSOCIATIONS = 4
MAX_PER_CALLING_AE = 2
IDLE_SECONDS = 2.0
MAX_INSTANCE_BYTES = 4 * 1024 * 1024
MAXIMUM_PDU_SIZE = 65536
MIN_SLICES = 16


@dataclass
class CaseRecord:
    name: str
    refused_with_reason: bool = False
    crashed: bool = False
    data_lost: bool = False
    detail: str = ""


@dataclass
class Tally:
    cases: list[CaseRecord] = field(default_factory=list)
    peak_memory_mb: dict[str, float] = field(default_factory=dict)

    def record(self, name: str, *, refused_with_reason: bool = False, crashed: bool = False,
               data_lost: bool = False, detail: str = "") -> None:
        self.cases.append(CaseRecord(name, refused_with_reason, crashed, data_lost, detail))

    def summary(self) -> dict[str, object]:
        return {
            "cases_tried": len(self.cases),
            "refused_with_a_reason": sum(c.refused_with_reason for c in self.cases),
            "crashes": sum(c.crashed for c in self.cases),
            "data_lost": sum(c.data_lost for c in self.cases),
            "peak_memory_mb_per_receiver": self.peak_memory_mb,
        }


TALLY = Tally()


@dataclass
class HostileNode:
    node: Node
    system_temp: Path
    tally: Tally

    @property
    def port(self) -> int:
        return self.node.port

    def receiver_pids(self) -> list[int]:
        """PIDs of the current receiver processes (from their ``receiver_process_ready`` log lines)."""
        pids = [
            int(match.group(1))
            for line in self.node.log_text().splitlines()
            if '"event": "receiver_process_ready"' in line and (match := re.search(r'"pid": (\d+)', line))
        ]
        return [pid for pid in pids if Path(f"/proc/{pid}").exists()]

    def peak_rss_mb(self) -> dict[int, float]:
        """VmHWM (peak resident memory) of each receiver process, MB."""
        out: dict[int, float] = {}
        for pid in self.receiver_pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            match = re.search(r"VmHWM:\s+(\d+) kB", status)
            if match:
                out[pid] = int(match.group(1)) / 1024.0
        return out

    def tracebacks(self) -> int:
        return self.node.log_text().count("Traceback (most recent call last)")


@pytest.fixture(scope="session")
def hostile(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[HostileNode]:
    root = tmp_path_factory.mktemp("hostile")
    system_temp = root / "system-tmp"
    system_temp.mkdir()
    workdir = root / "node"
    config = node_config(
        workdir, port=free_port(), checkpoint=tiny_checkpoint,
        node={
            "max_associations": MAX_ASSOCIATIONS, "max_associations_per_calling_ae": MAX_PER_CALLING_AE,
            "idle_association_seconds": IDLE_SECONDS, "max_instance_bytes": MAX_INSTANCE_BYTES,
            "receiver_processes": 2, "maximum_pdu_size": MAXIMUM_PDU_SIZE,
        },
        series={"quiet_seconds": 1.0, "selection": {"min_slices": MIN_SLICES}},
    )
    node = Node(workdir, config)
    previous = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(system_temp)  # inherited by the node's processes only: set around start
    try:
        node.start()
    finally:
        if previous is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = previous
    try:
        yield HostileNode(node, system_temp, TALLY)
    finally:
        hostile_node = HostileNode(node, system_temp, TALLY)
        TALLY.peak_memory_mb = {f"pid {pid}": round(mb, 1) for pid, mb in hostile_node.peak_rss_mb().items()}
        if not (node.alive() and c_echo(node.port)):
            TALLY.record("node_alive_after_corpus", crashed=True, detail=node.log_tail())
        node.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TALLY.cases:
        return
    summary = TALLY.summary()
    terminalreporter.write_sep("-", "hostile corpus")
    terminalreporter.write_line(json.dumps(summary))
    target = os.environ.get("PE_HOSTILE_REPORT")
    if target:
        Path(target).write_text(json.dumps({**summary, "cases": [asdict(c) for c in TALLY.cases]}, indent=2) + "\n")
