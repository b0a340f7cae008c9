"""DICOM TLS with client certificates on the running node, tested with dcmtk's storescu.

A sender with a certificate from the configured CA stores; one without a certificate, with a
certificate from another CA, or without TLS at all is refused and nothing of it is stored.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from phantoms import PhantomSpec, write_phantom_series
from tests.faults.node import AGENT_AE_TITLE, Node

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]


def _storescu(node: Node, files: list[Path], *tls: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TCP_NODELAY="1")
    return subprocess.run(
        ["storescu", "-aet", "TLS_SCU", "-aec", AGENT_AE_TITLE, *tls, "127.0.0.1", str(node.port), *map(str, files)],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )


def _stored(node: Node) -> list[Path]:
    return list((node.spool / "incoming").rglob("*.dcm"))


def test_tls_with_client_certificates(make_node: Callable[..., Node], pki: dict[str, Path], tmp_path: Path) -> None:
    if shutil.which("storescu") is None:
        pytest.skip("dcmtk is not installed")
    node = make_node(
        workers={"count": 0},
        node={"tls": {
            "enabled": True, "certificate": str(pki["server.pem"]), "private_key": str(pki["server.key"]),
            "ca_certificate": str(pki["ca.pem"]), "require_client_certificate": True,
        }},
    )
    node.start(wait=False)
    # C-ECHO over plain TCP cannot tell when a TLS node is up: wait for its log line instead.
    deadline = time.monotonic() + 60
    while '"event": "serve_ready"' not in node.log_text():
        assert node.alive() and time.monotonic() < deadline, node.log_tail()
        time.sleep(0.2)
    truth = write_phantom_series(tmp_path / "series", PhantomSpec(rows=32, columns=32, n_slices=3, seed=31, patient_id="TLS-1"))
    files = list(truth.files)

    plain = _storescu(node, files)
    assert plain.returncode != 0, "a sender without TLS was accepted"
    anonymous = _storescu(node, files, "+tla", "+cf", str(pki["ca.pem"]))
    assert anonymous.returncode != 0, "a TLS sender without a client certificate was accepted"
    stranger = _storescu(node, files, "+tls", str(pki["stranger.key"]), str(pki["stranger.pem"]), "+cf", str(pki["ca.pem"]))
    assert stranger.returncode != 0, "a client certificate from a foreign CA was accepted"
    assert _stored(node) == []

    trusted = _storescu(node, files, "+tls", str(pki["client.key"]), str(pki["client.pem"]), "+cf", str(pki["ca.pem"]))
    assert trusted.returncode == 0, trusted.stderr + trusted.stdout
    assert {p.stem for p in _stored(node)} == set(truth.sop_instance_uids)
    assert node.alive()
