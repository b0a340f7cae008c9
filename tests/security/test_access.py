"""Access control: unknown calling AE titles are rejected at association; the HTTP endpoints listen on
loopback unless an administrator says otherwise."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from pynetdicom import AE

from pacs_agent.settings import HTTPSettings, Settings, load_settings
from phantoms import PhantomSpec, write_phantom_series
from tests.faults.node import AGENT_AE_TITLE, Node, c_echo, send, wait_until
from pacs_agent.demo.pacs import free_port

pytestmark = pytest.mark.slow

ALLOWED = "KNOWN_PACS"


def test_unknown_calling_ae_is_rejected_at_association(make_node: Callable[..., Node], tmp_path: Path) -> None:
    node = make_node(node={"allowed_calling_ae_titles": [ALLOWED]}, workers={"count": 0})
    node.start(wait=False)
    wait_until(lambda: c_echo(node.port, calling_ae_title=ALLOWED), timeout=60, what="the node to answer a known caller")
    truth = write_phantom_series(tmp_path / "series", PhantomSpec(rows=32, columns=32, n_slices=3, seed=41, patient_id="ACL-1"))

    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AGENT_AE_TITLE)
    assert assoc.is_rejected
    primitive = assoc.acceptor.primitive
    assert primitive is not None
    # rejected-permanent (1), service user (1), calling AE title not recognised (3)
    assert (primitive.result, primitive.result_source, primitive.diagnostic) == (1, 1, 3)
    assert not send(node.port, list(truth.files), calling_ae_title="INTRUDER").established
    assert not c_echo(node.port, calling_ae_title="INTRUDER")
    if shutil.which("storescu"):
        done = subprocess.run(
            ["storescu", "-aet", "INTRUDER", "-aec", AGENT_AE_TITLE, "127.0.0.1", str(node.port), *map(str, truth.files)],
            capture_output=True, text=True, timeout=60, env=dict(os.environ, TCP_NODELAY="1"), check=False,
        )
        assert done.returncode != 0 and "Rejected" in done.stderr + done.stdout
    assert not list((node.spool / "incoming").rglob("*.dcm")), "an unknown caller's data was stored"
    # The receiver commits its records in batches gathered over 100 ms.
    wait_until(lambda: node.events(kind="association_rejected"), timeout=10, what="the rejections to be recorded")
    rejected = node.events(kind="association_rejected")
    assert rejected and {e.detail.get("calling_ae_title") for e in rejected} == {"INTRUDER"}

    accepted = send(node.port, list(truth.files), calling_ae_title=ALLOWED)
    assert accepted.established and set(accepted.statuses) == {0}


def test_http_binds_to_loopback_by_default() -> None:
    assert HTTPSettings().host == "127.0.0.1"
    defaults = load_settings(None, environ={})
    assert defaults.http.host == "127.0.0.1" and defaults.node.host == "127.0.0.1"
    assert Settings().http.enabled is False


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of sockets listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A = LISTEN
                found.add(address)
    return found


def test_running_node_serves_http_on_loopback_only(make_node: Callable[..., Node]) -> None:
    http_port = free_port()
    node = make_node(http={"enabled": True, "port": http_port}, workers={"count": 0}).start()
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=10) as response:
        assert response.status == 200
        json.loads(response.read())
    assert _listening_addresses(http_port) == {"0100007F"}, "the HTTP server listens beyond 127.0.0.1"
    other = _non_loopback_address()
    if other is not None:
        with pytest.raises(OSError):
            socket.create_connection((other, http_port), timeout=3).close()


def _non_loopback_address() -> str | None:
    """An IPv4 address of this machine other than 127.x (None without a network interface)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("10.255.255.255", 1))  # no packet is sent for UDP connect
            address = str(sock.getsockname()[0])
    except OSError:
        return None
    return None if address.startswith("127.") else address
