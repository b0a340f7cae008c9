"""Structured logging for the node: structlog, JSON lines or console, no patient identifiers.

Every event goes through one pipeline: structlog events and standard-library records (pynetdicom,
apscheduler, alembic, at WARNING and above) alike. `redact_patient_identifiers` removes keys that name
patient attributes and masks the values of patient attributes this process has seen
(`protect_patient_values`). Bind ids with `log_context(job_id=..., series_instance_uid=...)`: every event
logged inside carries them.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from pacs_agent.settings import LogSettings

#: Standard-library loggers that are chatty below WARNING (and may dump datasets at DEBUG).
QUIET_LIBRARIES: tuple[str, ...] = ("pynetdicom", "apscheduler", "alembic", "sqlalchemy", "PIL", "matplotlib", "highdicom")

#: Normalised key names (lower case, letters and digits only) of patient attributes.
_PATIENT_KEYS = frozenset(
    {
        "patientname", "patientsname", "patientid", "patientsid", "patientbirthdate", "patientsbirthdate",
        "birthdate", "dateofbirth", "dob", "otherpatientids", "otherpatientnames", "patientbirthname",
        "patientmothersbirthname", "patientaddress",
    }
)
_NON_ALNUM = re.compile(r"[^a-z0-9]")
MASK = "***"


def _is_patient_key(key: str) -> bool:
    return _NON_ALNUM.sub("", key.lower()) in _PATIENT_KEYS


class PatientValueRegistry:
    """Values of patient attributes this process has read, so that no log line can carry them.

    Bounded (least recently seen dropped first); values shorter than ``min_length`` are not kept,
    since masking "M" or "1" everywhere would destroy logs without protecting anyone.
    """

    def __init__(self, capacity: int = 10_000, min_length: int = 3) -> None:
        self._values: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity
        self._min_length = min_length
        self._lock = threading.Lock()
        self._pattern: re.Pattern[str] | None = None

    def add(self, values: Iterable[object]) -> None:
        with self._lock:
            for value in values:
                text = str(value).strip() if value is not None else ""
                for variant in {text, text.replace("^", " ").strip()}:
                    if len(variant) < self._min_length:
                        continue
                    self._values[variant] = None
                    self._values.move_to_end(variant)
            while len(self._values) > self._capacity:
                self._values.popitem(last=False)
            self._pattern = None

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self._pattern = None

    def mask(self, text: str) -> str:
        with self._lock:
            if not self._values:
                return text
            if self._pattern is None:
                alternatives = sorted(self._values, key=len, reverse=True)
                self._pattern = re.compile("|".join(re.escape(v) for v in alternatives), re.IGNORECASE)
            pattern = self._pattern
        return pattern.sub(MASK, text)


#: The process-wide registry: the receiver and worker add what they read; the log pipeline masks it.
PATIENT_VALUES = PatientValueRegistry()


def protect_patient_values(dataset: Any) -> None:
    """Remember the patient name, ID and birth date of a pydicom dataset so they are masked in logs."""
    values: list[str] = []
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames"):
        value = getattr(dataset, keyword, None)
        if value is None or value == "":
            continue
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            values.extend(str(v) for v in value)
        else:
            values.append(str(value))
    PATIENT_VALUES.add(values)


def _scrub(value: Any, registry: PatientValueRegistry, depth: int = 0) -> Any:
    if depth > 6:
        return value
    if isinstance(value, str):
        return registry.mask(value)
    if isinstance(value, Mapping):
        return {k: _scrub(v, registry, depth + 1) for k, v in value.items() if not _is_patient_key(str(k))}
    if isinstance(value, (list, tuple)):
        return type(value)(_scrub(v, registry, depth + 1) for v in value)
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return registry.mask(str(value))


def redact_patient_identifiers(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: drop patient-attribute keys, mask known patient values everywhere."""
    for key in [k for k in event_dict if _is_patient_key(str(k))]:
        del event_dict[key]
    for key, value in list(event_dict.items()):
        if key.startswith("_"):
            continue  # ProcessorFormatter's own record objects
        event_dict[key] = _scrub(value, PATIENT_VALUES)
    return event_dict


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact_patient_identifiers,
    ]


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so configuring twice replaces it."""


def configure_logging(settings: LogSettings, *, stream: TextIO | None = None) -> None:
    """Route structlog and standard-library logging to one stream (stderr by default).

    ``settings.format``: "json" (one JSON object per line), "console", or "auto" (console on a TTY).
    Safe to call again (tests, spawned worker processes): the previous handler is replaced.
    """
    out = stream if stream is not None else sys.stderr
    fmt = settings.format
    if fmt == "auto":
        fmt = "console" if getattr(out, "isatty", lambda: False)() else "json"
    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=False, default=str)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    level = logging.getLevelName(settings.level.upper())
    if not isinstance(level, int):
        level = logging.INFO

    shared = _shared_processors()
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = _Handler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Python warnings (pydicom warns about invalid values, quoting them) would otherwise be printed to
    # stderr as they are, past the patient-value mask: send them through this handler instead.
    logging.captureWarnings(True)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))

    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger named after its module."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger


@contextmanager
def log_context(**ids: Any) -> Iterator[None]:
    """Bind ids (job_id, series_instance_uid, ...) to every event logged inside, in this thread/task."""
    clean = {k: v for k, v in ids.items() if v is not None and not _is_patient_key(k)}
    with structlog.contextvars.bound_contextvars(**clean):
        yield


def redact_mapping(data: MutableMapping[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with patient keys removed and known patient values masked (for JSON output)."""
    return {k: _scrub(v, PATIENT_VALUES) for k, v in data.items() if not _is_patient_key(k)}
