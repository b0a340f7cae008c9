"""Critical-result notifications through a running node: a CTPA sent with C-STORE is analysed, and the
result reaches a webhook receiver, an SMTP server (STARTTLS + AUTH) and an HL7 MLLP listener on
loopback; `pe-agent ack` then acknowledges it.

The tiny random checkpoint's flag cannot be predicted, so the targets listen for every flag.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from pacs_agent.demo.pacs import free_port
from pacs_agent.demo.run import AgentProcess
from tests.support.agent import AGENT_AE_TITLE, clean_environment, small_ctpa, wait_for, write_agent_config, write_phantom
from tests.support.notify_servers import http_receiver, mllp_listener, smtp_receiver
from tests.support.tls import make_test_pki, openssl_available

pytestmark = pytest.mark.slow
ALL_FLAGS = '["CRITICAL", "HIGH", "REVIEW", "ROUTINE", "ERROR"]'


def test_an_analysed_study_alerts_webhook_mail_and_ris_and_is_acknowledged(tmp_path: Path, tiny_checkpoint: Path) -> None:
    if not openssl_available():
        pytest.skip("openssl is needed for the SMTP server's certificate")
    pki = make_test_pki(tmp_path / "pki")
    password = tmp_path / "smtp.password"
    password.write_text("s3cret\n")
    key = tmp_path / "ack.key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    with http_receiver() as hook, mllp_listener() as ris, smtp_receiver(
        pki.server_context(require_client_certificate=False), user="pe-agent", password="s3cret", port=free_port()
    ) as smtp:
        workdir = tmp_path / "node"
        workdir.mkdir()
        port = free_port()
        config = workdir / "agent.toml"
        write_agent_config(config, workdir=workdir, port=port, checkpoint=tiny_checkpoint, destinations=[],
                           allowed_calling_ae_titles=["E2E_SCU"])
        with config.open("a") as fh:
            fh.write(
                f'[http]\npublic_url = "https://pe-agent.hospital.example"\n'
                f'[alerts]\nsigning_key_file = "{key}"\npoll_seconds = 0.5\n'
                f'[[notifications]]\nname = "pe-team"\nkind = "webhook"\nurl = "{hook.url}"\ntemplate = "teams"\nflags = {ALL_FLAGS}\n'
                f'[[notifications]]\nname = "mail"\nkind = "email"\nflags = {ALL_FLAGS}\nsmtp_host = "127.0.0.1"\nsmtp_port = {smtp.port}\n'
                f'smtp_username = "pe-agent"\nsmtp_password_file = "{password}"\nca_file = "{pki.ca_certificate}"\n'
                f'from_address = "pe-agent@hospital.example"\nto = ["pe-team@hospital.example"]\n'
                f'[[notifications]]\nname = "ris"\nkind = "hl7"\nhost = "127.0.0.1"\nport = {ris.port}\n'
            )
        agent = AgentProcess(config, workdir / "agent.log")
        agent.start()
        try:
            agent.wait_ready(port, calling_ae_title="E2E_SCU", timeout_s=90)
            truth = write_phantom(tmp_path / "ctpa", small_ctpa(7))
            scu = AE(ae_title="E2E_SCU")
            scu.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
            assoc = scu.associate("127.0.0.1", port, ae_title=AGENT_AE_TITLE)
            assert assoc.is_established
            for path in truth.files:
                assert assoc.send_c_store(path).Status == 0
            assoc.release()

            wait_for(lambda: hook.requests and smtp.messages and ris.messages, timeout=240, what="a webhook request, a mail and an ORU")
            study = _study_uid(truth.files[0])
            card = hook.requests[0]["json"]["attachments"][0]["content"]
            assert [action["title"] for action in card["actions"]] == ["Open study", "Acknowledge"]
            assert card["actions"][0]["url"] == f"https://pe-agent.hospital.example/studies/{study}"
            mail_body = bytes(smtp.messages[0].get_payload(decode=True)).decode()
            assert study in mail_body and "Unverified AI output" in mail_body
            oru = ris.messages[0]
            assert str(oru.segment("PID")[3]).startswith(truth.spec.patient_id)
            assert "E2E-7" not in json.dumps(hook.requests[0]["json"]), "no patient ID in the webhook message"

            ack = _cli(config, "ack", study, "--user", "Dr Who", "--json")
            assert ack.returncode == 0, ack.stderr
            assert json.loads(ack.stdout)["acknowledged_by"] == "Dr Who"
            listed = json.loads(_cli(config, "notifications", "--json").stdout)
            alerts = [n for n in listed if n["kind"] != "hl7"]
            assert {n["target"] for n in alerts} == {"pe-team", "mail"}
            assert all(n["acknowledged"]["by"] == "Dr Who" and n["status"] == "SENT" for n in alerts)
            assert [n["status"] for n in listed if n["kind"] == "hl7"] == ["SENT"]
        finally:
            agent.stop()


def _study_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID)


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`pe-agent ARGS -c CONFIG` as the administrator runs it."""
    return subprocess.run([sys.executable, "-m", "pacs_agent.node.cli", *args, "-c", str(config)], capture_output=True, text=True,
                          timeout=60, env=clean_environment(), check=False)
