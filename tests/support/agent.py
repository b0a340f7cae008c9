"""`pe-agent serve` as a real subprocess for end-to-end tests: its config, phantoms to send, waits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pacs_agent.demo.run import AgentProcess
from phantoms import PhantomSpec, PhantomTruth, write_phantom_series

AGENT_AE_TITLE = "PE_AGENT"
T = TypeVar("T")


def clean_environment() -> dict[str, str]:
    """The caller's environment without PE_AGENT_* overrides (a developer's must not leak into a test)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PE_AGENT_")}


def wait_for(predicate: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.3) -> T:
    """Poll until ``predicate`` returns something truthy; fail the test with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def small_ctpa(seed: int, *, pe: bool = True, **kwargs: Any) -> PhantomSpec:
    """A 64 x 64 x 48 CTPA phantom: enough slices for the CTPA rule, small enough for CPU tests."""
    extra: dict[str, Any] = {"locations": ("central", "left"), "rv_lv_ratio": 1.3} if pe else {"rv_lv_ratio": 0.8}
    extra.update(kwargs)
    return PhantomSpec(pe=pe, seed=seed, rows=64, columns=64, n_slices=48, patient_id=f"E2E-{seed}", **extra)


def small_head(seed: int) -> PhantomSpec:
    return PhantomSpec(kind="head", pe=False, contrast=False, seed=seed, rows=64, columns=64, n_slices=48,
                       series_description="CT HEAD", patient_id=f"E2E-{seed}")


def write_phantom(directory: Path, spec: PhantomSpec) -> PhantomTruth:
    return write_phantom_series(directory, spec)


@dataclass
class AgentServer:
    """A running `pe-agent serve` and the config it was started with."""

    workdir: Path
    port: int
    config_path: Path
    process: AgentProcess

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``pe-agent ARGS --config CONFIG`` as a user would."""
        return subprocess.run(
            [sys.executable, "-m", "pacs_agent.node.cli", *args, "--config", str(self.config_path)],
            capture_output=True, text=True, timeout=timeout, env=clean_environment(), check=False,
        )

    def show(self, uid: str) -> dict[str, Any] | None:
        """`pe-agent show UID --json`, or None while the node does not know the UID yet."""
        done = self.cli("show", uid, "--json")
        if done.returncode != 0:
            return None
        return dict(json.loads(done.stdout))

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def write_agent_config(
    path: Path,
    *,
    workdir: Path,
    port: int,
    checkpoint: Path,
    destinations: Sequence[tuple[str, str, int]],
    allowed_calling_ae_titles: Sequence[str],
    quiet_seconds: float = 1.0,
) -> None:
    """A TOML config as an administrator writes it: spool and database in ``workdir``."""
    lines = [
        "[node]",
        f'ae_title = "{AGENT_AE_TITLE}"',
        'host = "127.0.0.1"',
        f"port = {port}",
        f"allowed_calling_ae_titles = {json.dumps(list(allowed_calling_ae_titles))}",
        "min_free_disk_mb = 1",
        "[storage]",
        f"root = {json.dumps(str(workdir / 'spool'))}",
        "[database]",
        f"url = {json.dumps('sqlite:///' + str(workdir / 'agent.sqlite'))}",
        "[series]",
        f"quiet_seconds = {quiet_seconds}",
        "[model]",
        f"checkpoint = {json.dumps(str(checkpoint))}",
        "[workers]",
        "count = 1",
        "poll_seconds = 0.2",
        "heartbeat_seconds = 2.0",
        "[dispatch]",
        "poll_seconds = 0.3",
        "backoff_initial_seconds = 0.5",
        "backoff_max_seconds = 2.0",
        "[log]",
        'format = "json"',
    ]
    for name, ae_title, dest_port in destinations:
        lines += ["[[destinations]]", f'name = "{name}"', f'ae_title = "{ae_title}"', 'host = "127.0.0.1"', f"port = {dest_port}"]
    path.write_text("\n".join(lines) + "\n")
