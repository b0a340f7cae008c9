"""A checkpoint whose sha256 differs from model.checkpoint_sha256, or whose content was modified, is
refused: `pe-agent serve` and `pe-agent worker` exit non-zero with one clear line, and no job is run."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.node import Node, to_toml

pytestmark = pytest.mark.slow

WRONG = "0" * 64


def _wait_exit(node: Node, timeout: float = 120) -> int:
    assert node.process is not None
    return node.process.wait(timeout=timeout)


def _error_lines(node: Node) -> list[dict[str, object]]:
    lines = []
    for line in node.log_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("level") == "error":
                lines.append(record)
    return lines


def test_serve_refuses_a_checkpoint_whose_hash_does_not_match(make_node: Callable[..., Node], tiny_checkpoint: Path) -> None:
    actual = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    node = make_node(model={"checkpoint_sha256": WRONG})
    node.start(wait=False)
    code = _wait_exit(node)
    node.process = None
    assert code != 0
    errors = _error_lines(node)
    load = [e for e in errors if e.get("event") == "model_load_failed"]
    assert load, node.log_tail()
    message = str(load[0]["error"])
    assert actual in message and WRONG in message and "sha256" in message
    assert any(e.get("event") == "serve_stopping_on_worker_failure" for e in errors)


def test_serve_starts_with_the_right_hash(make_node: Callable[..., Node], tiny_checkpoint: Path) -> None:
    actual = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    node = make_node(model={"checkpoint_sha256": actual}).start()
    assert node.alive()


def test_a_modified_checkpoint_is_refused_even_without_an_expected_hash(make_node: Callable[..., Node], tiny_checkpoint: Path, tmp_path: Path) -> None:
    tampered = tmp_path / "tampered.pt"
    data = bytearray(tiny_checkpoint.read_bytes())
    # Flip bytes in the middle of the file (tensor data), leaving the zip structure readable.
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    tampered.write_bytes(bytes(data))
    node = make_node(checkpoint=tampered)
    node.start(wait=False)
    assert _wait_exit(node) != 0
    node.process = None
    load = [e for e in _error_lines(node) if e.get("event") == "model_load_failed"]
    assert load and ("corrupted" in str(load[0]["error"]) or "modified" in str(load[0]["error"])), node.log_tail()


def test_worker_command_refuses_a_wrong_hash(make_node: Callable[..., Node]) -> None:
    node = make_node(model={"checkpoint_sha256": WRONG})
    node.workdir.mkdir(parents=True, exist_ok=True)
    node.config_path.write_text(to_toml(node.config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PE_AGENT_")}
    done = subprocess.run(
        [sys.executable, "-m", "pacs_agent.node.cli", "worker", "--config", str(node.config_path)],
        capture_output=True, text=True, timeout=180, env=env, check=False,
    )
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "model_load_failed" in output and WRONG in output, output[-2000:]
