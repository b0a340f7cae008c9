"""Fixtures for security tests: the fault tests' node harness, a tiny checkpoint, a PKI made with openssl."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.node import Node, node_config
from pacs_agent.demo.pacs import free_port


@pytest.fixture
def make_node(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[Callable[..., Node]]:
    """``make_node(destinations=[...], **sections) -> Node`` (not started); every node is stopped at the end."""
    nodes: list[Node] = []

    def make(*, name: str = "node", destinations: Any = (), checkpoint: Path | None = None, **sections: Any) -> Node:
        workdir = tmp_path / name
        config = node_config(workdir, port=free_port(), checkpoint=checkpoint or tiny_checkpoint, destinations=destinations, **sections)
        node = Node(workdir, config)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two CAs; a server certificate for 127.0.0.1, a client certificate from the trusted CA and one
    from a foreign CA (PEM files, made with the openssl command line)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "foreign_ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=Test {ca}",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.pem", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ca in (("server", "ca"), ("client", "ca"), ("stranger", "foreign_ca")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        ext = ["-extfile", "server.ext"] if name == "server" else []
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
                 "-days", "2", "-out", f"{name}.pem", *ext, cwd=d)
    return {p.name: p for p in d.iterdir()}
