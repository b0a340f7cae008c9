"""The node against a real PACS: Orthanc on loopback ports, dcmtk's storescu as an independent sender.

One Orthanc (with the hospital auto-routing rule of deploy/orthanc/autoroute.lua) and one
`pe-agent serve` (tiny random checkpoint) serve the whole module; each test uses its own phantom
studies. Objects are fetched back from Orthanc and validated with dciodvfy (dicom3tools).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from pacs_agent.demo.pacs import free_port
from phantoms import PhantomTruth
from tests.support.agent import AGENT_AE_TITLE, AgentServer, clean_environment, small_ctpa, small_head, wait_for, write_agent_config, write_phantom
from tests.support.dciodvfy import dciodvfy_available, run_dciodvfy
from tests.support.orthanc import Orthanc, orthanc_binary

pytestmark = [pytest.mark.orthanc, pytest.mark.dcmtk, pytest.mark.slow]

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
REPORT_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def pacs_and_agent(
    tmp_path_factory: pytest.TempPathFactory, start_agent: Callable[..., AgentServer], tiny_checkpoint: Path
) -> Iterator[tuple[Orthanc, AgentServer]]:
    if orthanc_binary() is None:
        pytest.skip("Orthanc is not installed (Debian package orthanc)")
    for tool in ("storescu", "dciodvfy"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian packages dcmtk, dicom3tools)")
    root = tmp_path_factory.mktemp("orthanc_e2e")
    agent_port = free_port()
    with Orthanc(root / "orthanc", modalities={"agent": (AGENT_AE_TITLE, "127.0.0.1", agent_port)}, autoroute=True) as orthanc:
        agent = start_agent(
            root / "agent", port=agent_port, checkpoint=tiny_checkpoint,
            destinations=[("orthanc", orthanc.aet, orthanc.dicom_port)], allowed_calling_ae_titles=[orthanc.aet],
        )
        yield orthanc, agent


def _delivered_outputs(agent: AgentServer, series_instance_uid: str) -> list[dict[str, Any]] | None:
    """The latest job's outputs once every delivery is DELIVERED; fails fast if analysis or delivery failed."""
    shown = agent.show(series_instance_uid)
    if not shown:
        return None
    series = shown["series"][0]
    if series["state"] in ("IGNORED", "FAILED"):
        pytest.fail(f"series {series_instance_uid} is {series['state']}: {series['ignore_reason']}\n{agent.log_tail()}")
    if not series["jobs"]:
        return None
    job = series["jobs"][-1]
    if job["status"] == "FAILED":
        pytest.fail(f"job {job['id']} failed: {job['error']}\n{agent.log_tail()}")
    deliveries = [d for o in job["outputs"] for d in o["deliveries"]]
    if any(d["status"] == "FAILED" for d in deliveries):
        pytest.fail(f"a delivery failed: {deliveries}\n{agent.log_tail()}")
    if job["status"] != "SUCCEEDED" or not deliveries or any(d["status"] != "DELIVERED" for d in deliveries):
        return None
    return list(job["outputs"])


def _orthanc_instance(orthanc: Orthanc, sop_instance_uid: str) -> str | None:
    found = orthanc.post("/tools/lookup", sop_instance_uid.encode())
    ids = [item["ID"] for item in found or [] if item.get("Type") == "Instance"]
    return str(ids[0]) if ids else None


def _check_reports_in_source_study(orthanc: Orthanc, truth: PhantomTruth, outputs: list[dict[str, Any]], tmp_path: Path) -> None:
    """Every output is in Orthanc, in the source study, in a new series, and passes dciodvfy."""
    kinds = sorted(o["kind"] for o in outputs)
    assert kinds.count("SR") == 1, kinds
    assert kinds.count("SC") >= 1, kinds
    for output in outputs:
        instance_id = _orthanc_instance(orthanc, output["sop_instance_uid"])
        assert instance_id is not None, f"{output['kind']} {output['sop_instance_uid']} is not in Orthanc"
        tags = orthanc.get(f"/instances/{instance_id}/simplified-tags")
        assert tags["StudyInstanceUID"] == truth.study_instance_uid
        assert tags["SeriesInstanceUID"] != truth.series_instance_uid
        assert tags["PatientID"] == truth.spec.patient_id
        path = tmp_path / f"{output['kind']}_{output['sop_instance_uid']}.dcm"
        path.write_bytes(orthanc.instance_file(instance_id))
        dataset = pydicom.dcmread(path)
        if output["kind"] == "SR":
            assert dataset.SOPClassUID == COMPREHENSIVE_SR
            assert dataset.Modality == "SR"
            assert dataset.CompletionFlag == "COMPLETE" and dataset.VerificationFlag == "UNVERIFIED"
        else:
            assert dataset.SOPClassUID == SECONDARY_CAPTURE
            assert dataset.Modality == tags["Modality"] != "CT"
            referenced = {str(item.ReferencedSOPInstanceUID) for item in dataset.SourceImageSequence}
            assert referenced <= set(truth.sop_instance_uids)
        result = run_dciodvfy(path)
        assert result.errors == [], f"dciodvfy on the {output['kind']} fetched from Orthanc:\n" + "\n".join(result.errors)


def test_storescu_series_reported_into_the_source_study_in_orthanc(pacs_and_agent: tuple[Orthanc, AgentServer], tmp_path: Path) -> None:
    orthanc, agent = pacs_and_agent
    assert dciodvfy_available()
    pe = write_phantom(tmp_path / "pe", small_ctpa(601))
    head = write_phantom(tmp_path / "head", small_head(602))
    for folder in (tmp_path / "pe", tmp_path / "head"):
        sent = subprocess.run(
            ["storescu", "-aet", orthanc.aet, "-aec", AGENT_AE_TITLE, "+sd", "+r", "127.0.0.1", str(agent.port), str(folder)],
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr

    outputs = wait_for(lambda: _delivered_outputs(agent, pe.series_instance_uid), timeout=REPORT_TIMEOUT_S,
                       what="the SR and SC of the CTPA to be delivered to Orthanc")
    _check_reports_in_source_study(orthanc, pe, outputs, tmp_path)
    source = orthanc.find_study(pe.study_instance_uid)
    assert source is not None
    assert {s["MainDicomTags"]["Modality"] for s in orthanc.study_series(source)} >= {"SR"}

    shown = wait_for(lambda: (s := agent.show(head.series_instance_uid)) and s["series"][0]["state"] == "IGNORED" and s,
                     timeout=30, what="the head CT to be ignored")
    head_series = shown["series"][0]
    assert head_series["ignore_reason"], "an ignored series keeps a human-readable reason"
    assert head_series["jobs"] == []
    assert orthanc.find_study(head.study_instance_uid) is None, "nothing is sent to PACS for an ignored series"


def test_echo_orthanc_ok_and_closed_port_fails(pacs_and_agent: tuple[Orthanc, AgentServer], tmp_path: Path) -> None:
    orthanc, agent = pacs_and_agent
    ok = agent.cli("echo", "orthanc")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok" in ok.stdout

    closed = tmp_path / "closed.toml"
    write_agent_config(closed, workdir=tmp_path, port=free_port(), checkpoint=tmp_path / "unused.pt",
                       destinations=[("nowhere", "NOWHERE", free_port())], allowed_calling_ae_titles=[])
    failed = subprocess.run([sys.executable, "-m", "pacs_agent.node.cli", "echo", "nowhere", "--config", str(closed), "--timeout", "3"],
                            capture_output=True, text=True, timeout=60, env=clean_environment(), check=False)
    assert failed.returncode != 0
    lines = [line for line in (failed.stdout + failed.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "nowhere" in lines[0] and "Traceback" not in failed.stderr


def test_orthanc_autoroutes_a_stable_ct_series_and_gets_the_report_back(
    pacs_and_agent: tuple[Orthanc, AgentServer], tmp_path: Path
) -> None:
    orthanc, agent = pacs_and_agent
    truth = write_phantom(tmp_path / "routed", small_ctpa(603, pe=False, series_description="CTPA routed"))
    for path in truth.files:
        orthanc.upload(path)

    def routed() -> list[dict[str, Any]] | None:
        if "Unable to send" in orthanc.log_tail(400):
            pytest.fail("Orthanc's auto-routing rule (deploy/orthanc/autoroute.lua) could not send the series:\n" + orthanc.log_tail(10))
        return _delivered_outputs(agent, truth.series_instance_uid)

    outputs = wait_for(routed, timeout=REPORT_TIMEOUT_S, what="Orthanc to route the series to the agent and the report to come back")
    shown = agent.show(truth.series_instance_uid)
    assert shown is not None
    series = shown["series"][0]
    assert series["calling_ae_title"] == orthanc.aet
    assert series["instance_count"] == len(truth.files)
    _check_reports_in_source_study(orthanc, truth, outputs, tmp_path)
    study = orthanc.find_study(truth.study_instance_uid)
    assert study is not None
    modalities = sorted(s["MainDicomTags"]["Modality"] for s in orthanc.study_series(study))
    assert modalities.count("CT") == 1 and "SR" in modalities
