"""End-to-end fixtures: `pe-agent serve` as a real subprocess, a tiny random checkpoint, phantoms, waits.

The agent runs exactly as an administrator would start it (``python -m pacs_agent.node.cli serve --config``)
in its own process group, so stopping it also stops its worker processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pacs_agent.demo.pacs import free_port
from pacs_agent.demo.run import AgentProcess
from tests.support.agent import AgentServer, write_agent_config


@pytest.fixture(scope="module")
def start_agent() -> Iterator[Callable[..., AgentServer]]:
    """``start_agent(workdir, port=..., checkpoint=..., destinations=[...], allowed_calling_ae_titles=[...])``;
    every agent started is stopped (with its workers) when the module ends."""
    started: list[AgentServer] = []

    def start(workdir: Path, *, port: int | None = None, **config: Any) -> AgentServer:
        workdir.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        config_path = workdir / "agent.toml"
        write_agent_config(config_path, workdir=workdir, port=port, **config)
        process = AgentProcess(config_path, workdir / "agent.log")
        server = AgentServer(workdir=workdir, port=port, config_path=config_path, process=process)
        process.start()
        started.append(server)
        calling = list(config.get("allowed_calling_ae_titles") or ["E2E_TEST"])[0]
        try:
            process.wait_ready(port, calling_ae_title=calling, timeout_s=90)
        except Exception as exc:
            pytest.fail(f"the agent did not start: {exc}\n{server.log_tail()}")
        return server

    yield start
    for server in started:
        server.process.stop()
