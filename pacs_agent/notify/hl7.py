"""HL7 v2.5.1 ORU^R01 results to a RIS/EHR over MLLP (python-hl7 builds, frames and parses).

One message per analysed result: PID from a received image (the receiver files the result against
the patient), OBR with the accession number, and OBX rows for the flag (OBX-8 AA/A for
CRITICAL/HIGH), the PE probability, the finding, the Study Instance UID (DCM 110180), the model and
the disclaimer, all with result status P (preliminary: unverified AI output), C for a later result
of the same study. The answer must be an ACK whose MSA-2 names our control id: AA/CA is success,
AE/CE an error in the message (not retried), AR/CR a refusal (retried: HL7 uses it for "system
down"); no answer, a timeout or a closed connection is retried.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Final

import hl7
from hl7.mllp import open_hl7_connection
from hl7.exceptions import HL7Exception
from hl7.mllp.exceptions import InvalidBlockError

from pacs_agent.db.models import Flag
from pacs_agent.notify.channels import SendOutcome
from pacs_agent.notify.message import AlertMessage
from pacs_agent.settings import NotificationTarget

HL7_VERSION: Final[str] = "2.5.1"
#: Container that knows the separators, for hl7.util.escape.
_SEPARATORS = hl7.parse("MSH|^~\\&|X")
_ABNORMAL = {Flag.CRITICAL: "AA", Flag.HIGH: "A", Flag.ROUTINE: "N"}


def _esc(value: object) -> str:
    text = " ".join(str(value).split()) if value is not None else ""
    return str(hl7.util.escape(_SEPARATORS, text)) if text else ""


def _ts(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y%m%d%H%M%S+0000")


def _xpn(dicom_name: str) -> str:
    """DICOM PN (family^given^middle^prefix^suffix) as HL7 XPN (family^given^middle^suffix^prefix)."""
    parts = (dicom_name.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = parts
    return "^".join(_esc(p) for p in (family, given, middle, suffix, prefix)).rstrip("^")


def build_oru(message: AlertMessage, target: NotificationTarget, *, control_id: str, now: datetime) -> hl7.Message:
    """The ORU^R01 message for one result (raises hl7 parse errors only on a bug)."""
    status = "C" if message.correction else "P"
    when = _ts(message.result_at or message.raised_at)
    ids = message.identifiers
    accession = _esc(ids.accession_number) if ids is not None else ""
    segments = [
        "|".join([
            "MSH", "^~\\&", _esc(target.sending_application), _esc(target.sending_facility), _esc(target.receiving_application),
            _esc(target.receiving_facility), _ts(now), "", "ORU^R01^ORU_R01", _esc(control_id), target.processing_id, HL7_VERSION,
        ]),
        "|".join([
            "PID", "1", "", (_esc(ids.patient_id) + "^^^^MR") if ids is not None and ids.patient_id else "", "",
            _xpn(ids.patient_name_dicom) if ids is not None else "", "",
            _esc(ids.patient_birth_date) if ids is not None else "", _esc(ids.patient_sex) if ids is not None else "",
        ]),
        "|".join(["OBR", "1", "", accession, "PEAI^AI pulmonary embolism triage^L", "", "", when] + [""] * 10
                 + [accession, "", "", "", when, "", "CT", status]),
    ]
    observations: list[tuple[str, str, str, str]] = [
        ("ST", "PEAI-FLAG^AI triage flag^L", _esc(message.flag.value), _ABNORMAL.get(message.flag, "")),
    ]
    if message.pe_probability is not None:
        observations.append(("NM", "PEAI-PROB^AI PE probability^L", f"{message.pe_probability:.4f}", ""))
    observations += [
        ("TX", "PEAI-FINDING^AI finding^L", _esc(message.summary), ""),
        ("ST", "110180^Study Instance UID^DCM", _esc(message.study_instance_uid), ""),
        ("ST", "PEAI-MODEL^AI model^L", _esc(f"{message.model_name} {message.model_version} sha256 {message.model_sha256}".strip()), ""),
        ("TX", "PEAI-DISCLAIMER^Disclaimer^L", _esc(message.disclaimer), ""),
    ]
    for index, (value_type, code, value, abnormal) in enumerate(observations, start=1):
        segments.append("|".join(["OBX", str(index), value_type, code, "", value, "", "", abnormal, "", "", status, "", "", when]))
    return hl7.parse("\r".join(segments))


def check_ack(ack: hl7.Message, control_id: str) -> SendOutcome:
    """Success only for an AA/CA acknowledgement of our message."""
    try:
        msa = ack.segment("MSA")
    except KeyError:
        return SendOutcome(False, None, "the answer has no MSA segment (not an ACK)", retryable=True)
    code = str(msa[1]).strip().upper()
    acked_id = str(msa[2]).strip() if len(msa) > 2 else ""
    text = str(msa[3]).strip() if len(msa) > 3 else ""
    if acked_id != control_id:
        return SendOutcome(False, None, f"ACK {code} names message {acked_id!r}, not ours ({control_id})", retryable=True)
    detail = f"HL7 ACK {code}" + (f": {text}" if text else "")
    if code in ("AA", "CA"):
        return SendOutcome(True, None, detail, retryable=False)
    if code in ("AR", "CR"):
        return SendOutcome(False, None, detail, retryable=True)
    return SendOutcome(False, None, detail, retryable=False)


async def _exchange(host: str, port: int, message: hl7.Message, timeout: float) -> hl7.Message:
    reader, writer = await asyncio.wait_for(open_hl7_connection(host, port, encoding="utf-8"), timeout)
    try:
        writer.writemessage(message)
        await asyncio.wait_for(writer.drain(), timeout)
        return await asyncio.wait_for(reader.readmessage(), timeout)
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), timeout)
        except (OSError, asyncio.TimeoutError):
            pass  # the answer is in; a slow close changes nothing


class HL7Channel:
    def __init__(self, target: NotificationTarget) -> None:
        self.target = target

    def send(self, message: AlertMessage) -> SendOutcome:
        now = datetime.now(timezone.utc)
        control_id = f"PEAI{message.notification_id}T{int(now.timestamp() * 1000)}"[:20]
        if message.identifiers is None or not message.identifiers.patient_id:
            return SendOutcome(False, None, "no patient ID: the received images are gone or carry none; an HL7 result needs PID-3",
                               retryable=False)
        oru = build_oru(message, self.target, control_id=control_id, now=now)
        try:
            ack = asyncio.run(_exchange(self.target.host, self.target.port, oru, self.target.timeout_seconds))
        except asyncio.TimeoutError:
            return SendOutcome(False, None, f"no ACK from {self.target.host}:{self.target.port} within {self.target.timeout_seconds:g} s", retryable=True)
        except (OSError, EOFError, asyncio.IncompleteReadError, InvalidBlockError, HL7Exception, ValueError) as exc:
            return SendOutcome(False, None, f"MLLP to {self.target.host}:{self.target.port} failed: {type(exc).__name__}: {exc}", retryable=True)
        return check_ack(ack, control_id)
