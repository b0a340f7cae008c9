"""Structured logging for the node: structlog, JSON lines or console, no patient identifiers.

Every event goes through one pipeline: structlog events and standard-library records (pynetdicom,
apscheduler, alembic, at WARNING and above) alike. `redact_patient_identifiers` removes keys that name
patient attributes and masks the values of patient attributes this process has seen
(`protect_patient_values`): the whole value and each part of a person name on its own (a name copied into a
free-text attribute such as SeriesDescription or ImageComments is written "Jane Doe", not "DOE^JANE").
Messages of pydicom and of Python warnings quote the offending value ("Invalid value for VR PN:
'...'"), often before the dataset's patient attributes could be registered: every quoted part of those
is masked. Bind ids with `log_context(job_id=..., series_instance_uid=...)`: every event
logged inside carries them.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
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

    def __init__(self, capacity: int = 10_000, min_length: int = 3, min_word_length: int = 2) -> None:
        self._values: OrderedDict[str, None] = OrderedDict()
        self._words: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity
        self._min_length = min_length
        self._min_word_length = min_word_length
        self._lock = threading.Lock()
        self._pattern: re.Pattern[str] | None = None

    def _remember(self, store: OrderedDict[str, None], value: str) -> None:
        store[value] = None
        store.move_to_end(value)
        while len(store) > self._capacity:
            store.popitem(last=False)

    def add(self, values: Iterable[object], *, person_names: Iterable[object] = ()) -> None:
        """Mask ``values`` wherever they appear; for ``person_names`` also each name part, as a whole word."""
        with self._lock:
            for value in [*values, *person_names]:
                text = str(value).strip() if value is not None else ""
                for variant in {text, text.replace("^", " ").strip()}:
                    if len(variant) >= self._min_length:
                        self._remember(self._values, variant)
            for value in person_names:
                for part in _NAME_PARTS.split(str(value) if value is not None else ""):
                    if len(part) >= self._min_word_length and not part.isdigit():
                        self._remember(self._words, part)
            self._pattern = None

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self._words.clear()
            self._pattern = None

    def mask(self, text: str) -> str:
        with self._lock:
            if not self._values and not self._words:
                return text
            if self._pattern is None:
                alternatives = [re.escape(v) for v in sorted(self._values, key=len, reverse=True)]
                alternatives += [rf"\b{re.escape(w)}\b" for w in sorted(self._words, key=len, reverse=True)]
                self._pattern = re.compile("|".join(alternatives), re.IGNORECASE)
            pattern = self._pattern
        return pattern.sub(MASK, text)


#: What separates the parts of a person name as written (PN components, spaces, commas, dots).
_NAME_PARTS = re.compile(r"[\^=,.\s]+")


#: The process-wide registry: the receiver and worker add what they read; the log pipeline masks it.
PATIENT_VALUES = PatientValueRegistry()


def protect_patient_values(dataset: Any) -> None:
    """Remember the patient name, ID and birth date of a pydicom dataset so they are masked in logs."""
    values: list[str] = []
    names: list[str] = []
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames",
                    "PatientBirthName", "PatientMotherBirthName"):
        try:
            value = getattr(dataset, keyword, None)
        except Exception:  # noqa: BLE001 - a malformed value: nothing readable to register
            continue
        if value is None or value == "":
            continue
        target = names if keyword.endswith(("Name", "Names")) else values
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            target.extend(str(v) for v in value)
        else:
            target.append(str(value))
    PATIENT_VALUES.add(values, person_names=names)


#: Loggers whose messages quote DICOM values (pydicom's own, and Python warnings routed to logging).
_QUOTING_LOGGERS = frozenset({"py.warnings", "pydicom"})
_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")


def mask_quoted_values(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: in messages of pydicom and of Python warnings, mask every quoted value."""
    name = str(event_dict.get("logger", ""))
    if name in _QUOTING_LOGGERS or name.startswith("pydicom."):
        event = event_dict.get("event")
        if isinstance(event, str):
            event_dict["event"] = _QUOTED.sub(f"'{MASK}'", event)
    return event_dict


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
        mask_quoted_values,
        redact_patient_identifiers,
    ]


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so configuring twice replaces it."""


class _ThreadQuiet(threading.local):
    library_lines_until: float = 0.0


_THREAD_QUIET = _ThreadQuiet()
#: How long after a refusal pynetdicom's lines in that thread are dropped (its follow-ups come at once).
QUIET_SECONDS = 2.0


def quiet_library_lines_in_this_thread() -> None:
    """The node has refused this thread's peer and logged why in one line: what pynetdicom logs next in
    this thread about the connection it is closing ("PDU shorter than expected", ...) is dropped."""
    _THREAD_QUIET.library_lines_until = time.monotonic() + QUIET_SECONDS


class LibraryRecordFilter(logging.Filter):
    """One line per library record, never a traceback: pynetdicom logs one for every malformed PDU a peer
    sends (garbage is the peer's problem, not a crash of the node); the message already names the error.
    At DEBUG the tracebacks are kept."""

    def __init__(self, keep_tracebacks: bool) -> None:
        super().__init__()
        self._keep_tracebacks = keep_tracebacks

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("pynetdicom"):
            return True
        if time.monotonic() < _THREAD_QUIET.library_lines_until:
            return False
        if record.exc_info and not self._keep_tracebacks:
            record.exc_info = None
            record.exc_text = None
        return True


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
    handler.addFilter(LibraryRecordFilter(keep_tracebacks=level <= logging.DEBUG))
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
