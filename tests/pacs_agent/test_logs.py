"""Logging: JSON lines, ids from context, library records routed through, no patient identifiers."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pydicom
import pytest

from pacs_agent.logs import PATIENT_VALUES, configure_logging, get_logger, log_context, protect_patient_values
from pacs_agent.settings import LogSettings


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    configure_logging(LogSettings(format="json", level="INFO"), stream=out)
    yield out
    PATIENT_VALUES.clear()
    configure_logging(LogSettings(format="json", level="WARNING"), stream=io.StringIO())


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_lines_carry_context_ids(stream: io.StringIO) -> None:
    log = get_logger("pacs_agent.test")
    with log_context(job_id=7, series_instance_uid="1.2.3"):
        log.info("job_started", attempt=1)
    log.info("outside")
    first, second = lines(stream)
    assert first["event"] == "job_started" and first["job_id"] == 7 and first["series_instance_uid"] == "1.2.3"
    assert first["level"] == "info" and first["attempt"] == 1 and "timestamp" in first
    assert "job_id" not in second


def test_patient_keys_are_dropped_and_known_values_masked(stream: io.StringIO) -> None:
    ds = pydicom.Dataset()
    ds.PatientName = "PHANTOM^PE"
    ds.PatientID = "PHANTOM-0001"
    ds.PatientBirthDate = "19700101"
    protect_patient_values(ds)
    log = get_logger("pacs_agent.test")
    log.info("received", PatientName="PHANTOM^PE", patient_id="X", patient_birth_date="19700101", sop_instance_uid="1.2")
    log.info("oops %s", "PHANTOM^PE", note="name is PHANTOM PE, id PHANTOM-0001 born 19700101", nested={"PatientID": "Y", "k": ["phantom^pe"]})
    logging.getLogger("pynetdicom.test").warning("peer sent PatientName=PHANTOM^PE")
    text = stream.getvalue()
    for secret in ("PHANTOM^PE", "PHANTOM PE", "PHANTOM-0001", "19700101", "phantom^pe"):
        assert secret not in text
    first, second, third = lines(stream)
    assert "PatientName" not in first and "patient_id" not in first and "patient_birth_date" not in first
    assert first["sop_instance_uid"] == "1.2"
    assert second["nested"] == {"k": ["***"]}
    assert "***" in str(third["event"])


def test_library_records_below_warning_are_dropped(stream: io.StringIO) -> None:
    logging.getLogger("pynetdicom.assoc").info("chatty")
    logging.getLogger("apscheduler.scheduler").warning("job missed")
    events = [line["event"] for line in lines(stream)]
    assert events == ["job missed"]


def test_console_format_is_readable() -> None:
    out = io.StringIO()
    configure_logging(LogSettings(format="console", level="INFO"), stream=out)
    get_logger("x").info("hello", job_id=3)
    configure_logging(LogSettings(format="json", level="WARNING"), stream=io.StringIO())
    text = out.getvalue()
    assert "hello" in text and "job_id=3" in text and not text.lstrip().startswith("{")
