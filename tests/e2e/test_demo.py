"""`pe-agent demo` as a newcomer runs it: a subprocess, with the fallback storage SCP and with Orthanc.

The tiny random checkpoint and small phantoms keep it quick; flags of an untrained model cannot be
predicted, so the tests assert the loop (three rows, head CT ignored with its reason, objects at the
PACS, PNG files read back from the PACS) and a clean stop on Ctrl-C.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pacs_agent.demo.run import AGENT_AE_TITLE, EXIT_FAILURE, EXIT_USAGE, demo_cases, run_demo, write_agent_config
from pacs_agent.demo.pacs import StorageSCP
from pacs_agent.demo.processes import process_group_alive
from pacs_agent.settings import load_settings
from tests.support.agent import clean_environment
from tests.support.orthanc import orthanc_binary

pytestmark = pytest.mark.slow

DESCRIPTIONS = ("CTPA demo - PE with RV strain", "CTPA demo - no PE", "CT HEAD without contrast")
ANALYSED_FLAGS = {"CRITICAL", "HIGH", "REVIEW", "ROUTINE"}


def test_demo_config_is_a_valid_agent_config(tmp_path: Path) -> None:
    pacs = StorageSCP(tmp_path / "pacs", tmp_path / "pacs.log")
    pacs.port = 40404
    write_agent_config(tmp_path / "agent.toml", workdir=tmp_path, agent_port=40405, pacs=pacs, checkpoint="builtin:demo", quiet_seconds=None)
    settings = load_settings(tmp_path / "agent.toml", environ={})
    assert settings.node.ae_title == AGENT_AE_TITLE and settings.node.port == 40405
    assert settings.node.allowed_calling_ae_titles == (pacs.ae_title,), "the PACS may send to the agent, nobody else"
    assert [(d.ae_title, d.host, d.port) for d in settings.destinations] == [(pacs.ae_title, "127.0.0.1", 40404)]
    assert settings.series.quiet_seconds == 5.0, "the demo keeps the default quiet period"
    assert settings.model.checkpoint == "builtin:demo"
    assert settings.storage.root == str(tmp_path / "spool") and str(tmp_path) in settings.database.url


def test_demo_cases_are_a_pe_with_rv_strain_a_negative_and_a_head_ct() -> None:
    pe, negative, head = (case.spec for case in demo_cases(128, 120))
    assert pe.has_pe and pe.rv_lv_ratio >= 1.2 and set(pe.locations) >= {"central"}
    assert not negative.has_pe and negative.kind == "ctpa"
    assert head.kind == "head" and not head.contrast
    assert (pe.rows, pe.columns, pe.n_slices) == (128, 128, 120)
    assert len({s.patient_id for s in (pe, negative, head)}) == 3


def test_demo_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_demo(["--pacs", "cloud"]) == EXIT_USAGE
    assert "--pacs" in capsys.readouterr().err


def test_demo_whose_agent_cannot_analyse_exits_1_naming_the_logs(tmp_path: Path) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"this is not a checkpoint")
    workdir = tmp_path / "demo"
    done = subprocess.run(_demo_command(workdir, broken, "scp"), capture_output=True, text=True, timeout=300,
                          env=clean_environment(), check=False)
    assert done.returncode == EXIT_FAILURE, done.stdout + done.stderr
    failure = [line for line in done.stdout.splitlines() if line.startswith("demo failed:")]
    assert len(failure) == 1, done.stdout
    assert str(workdir / "logs") in failure[0]
    assert (workdir / "logs" / "agent.log").is_file(), "logs stay after a failure"


def _demo_command(workdir: Path, checkpoint: Path, pacs: str) -> list[str]:
    return [
        sys.executable, "-m", "pacs_agent.node.cli", "demo", "--pacs", pacs, "--checkpoint", str(checkpoint), "--workdir", str(workdir),
        "--rows", "64", "--slices", "48", "--quiet-seconds", "1", "--timeout", "150",
    ]


def _run_demo(workdir: Path, checkpoint: Path, pacs: str) -> tuple[str, dict[str, Any]]:
    done = subprocess.run(_demo_command(workdir, checkpoint, pacs), capture_output=True, text=True, timeout=300,
                          env=clean_environment(), check=False)
    output = done.stdout + done.stderr
    log = workdir / "logs" / "agent.log"
    assert done.returncode == 0, output + "\n--- agent log ---\n" + (log.read_text()[-4000:] if log.exists() else "")
    summary = json.loads((workdir / "output" / "summary.json").read_text())
    return output, summary


def _check_demo(output: str, summary: dict[str, Any], workdir: Path) -> None:
    assert "NOT FOR CLINICAL USE" in output
    rows = {s["series_description"]: s for s in summary["series"]}
    assert tuple(rows) == DESCRIPTIONS

    head = rows["CT HEAD without contrast"]
    assert head["flag"] == "IGNORED"
    assert "HEAD" in head["note"], "the ignored series shows the agent's reason"
    assert head["objects_at_pacs"] == {}

    for description in DESCRIPTIONS[:2]:
        row = rows[description]
        assert row["flag"] in ANALYSED_FLAGS, row
        assert 0.0 <= row["pe_probability"] <= 1.0
        assert row["objects_at_pacs"]["SR"] == 1 and row["objects_at_pacs"]["SC"] >= 1, row
        assert row["seconds_last_image_to_pacs"] > 1.0, "the report cannot reach PACS before the quiet period ends"

    table_lines = {d: [line for line in output.splitlines() if line.startswith("│ " + d)] for d in DESCRIPTIONS}
    for description, lines in table_lines.items():
        assert len(lines) == 1, f"one table row for {description!r}: {lines}"
        assert f" {rows[description]['flag']} " in lines[0]

    pngs = [Path(p) for p in summary["png"]]
    assert len(pngs) == sum(rows[d]["objects_at_pacs"]["SC"] for d in DESCRIPTIONS[:2])
    for path in pngs:
        assert str(path) in output, "every PNG path is printed"
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB" and min(image.size) >= 64
    assert (workdir / "logs" / "agent.log").is_file()
    assert not (workdir / "spool").exists() and not (workdir / "phantoms").exists(), "bulky folders are removed after success"


def test_demo_with_the_fallback_storage_scp(tmp_path: Path, tiny_checkpoint: Path) -> None:
    output, summary = _run_demo(tmp_path / "demo", tiny_checkpoint, "scp")
    assert summary["pacs"] == "pynetdicom storage SCP"
    _check_demo(output, summary, tmp_path / "demo")


@pytest.mark.orthanc
def test_demo_with_orthanc(tmp_path: Path, tiny_checkpoint: Path) -> None:
    if orthanc_binary() is None:
        pytest.skip("Orthanc is not installed (Debian package orthanc)")
    output, summary = _run_demo(tmp_path / "demo", tiny_checkpoint, "orthanc")
    assert summary["pacs"] == "Orthanc"
    _check_demo(output, summary, tmp_path / "demo")


def _pids_with_argument(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                arguments = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(text.encode() in a for a in arguments):
                pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find left-over processes")
def test_ctrl_c_stops_the_agent_and_the_pacs(tmp_path: Path, tiny_checkpoint: Path) -> None:
    workdir = tmp_path / "demo"
    pacs = "orthanc" if orthanc_binary() is not None else "scp"
    process = subprocess.Popen(_demo_command(workdir, tiny_checkpoint, pacs), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=clean_environment())
    lines: list[str] = []
    agent_up = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Agent:"):
                agent_up.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert agent_up.wait(120), "".join(lines)
        config = str(workdir / "agent.toml")
        agent_pids = [pid for pid in _pids_with_argument(config) if pid != process.pid]
        assert agent_pids, "the agent runs as its own process"
        pacs_pids = _pids_with_argument(str(workdir / "pacs" / "orthanc.json")) if pacs == "orthanc" else []
        assert pacs == "scp" or pacs_pids, "Orthanc runs as its own process"
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130, "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(timeout=10)
    assert "Interrupted" in "".join(lines)
    for pid in agent_pids + pacs_pids:
        assert not process_group_alive(pid), f"process group {pid} (agent or PACS and their children) is still running"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find left-over processes")
def test_keep_leaves_the_pacs_and_the_dashboard_running_until_stopped(tmp_path: Path, tiny_checkpoint: Path) -> None:
    workdir = tmp_path / "demo"
    pacs = "orthanc" if orthanc_binary() is not None else "scp"
    process = subprocess.Popen([*_demo_command(workdir, tiny_checkpoint, pacs), "--keep"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=clean_environment())
    lines: list[str] = []
    kept = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Node: DICOM AE"):
                kept.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert kept.wait(280), "".join(lines)
        urls = {line.split(": ", 1)[0]: line.split(": ", 1)[1].strip() for line in lines if line.startswith(("Dashboard:", "Orthanc Explorer:"))}
        dashboard = urls["Dashboard"]
        with urllib.request.urlopen(dashboard + "healthz", timeout=10) as response:
            assert response.status == 200
        worklist = subprocess.run([sys.executable, "-m", "pacs_agent.node.cli", "worklist", "--json", "-c", str(workdir / "agent.toml")],
                                  capture_output=True, text=True, timeout=60, env=clean_environment(), check=False)
        assert worklist.returncode == 0 and len(json.loads(worklist.stdout)) == 2, "the node answers: two CTPAs on its worklist"
        if pacs == "orthanc":
            with urllib.request.urlopen(urls["Orthanc Explorer"], timeout=10) as response:
                assert response.status == 200 and b"Orthanc" in response.read()
        config = str(workdir / "agent.toml")
        agent_pids = [pid for pid in _pids_with_argument(config) if pid != process.pid]
        assert agent_pids, "the node still runs after the results were printed"
        time.sleep(2.0)
        assert process.poll() is None, "the demo waits while --keep"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(timeout=10)
    for pid in agent_pids:
        assert not process_group_alive(pid), f"process group {pid} is still running after the stop"
    assert (workdir / "spool").is_dir(), "--keep keeps the spool"
