"""Which series holds each SOP Instance UID the node has stored: decided before a C-STORE is acknowledged.

A SOP Instance UID names one instance forever. A sender that re-sends it with other content, or puts it
into another series, has made an error the node must not paper over: the first copy wins silently, or
the second is acknowledged and then dropped by the database's unique constraint (acknowledged and lost).
The C-STORE handler asks this index first, so it can answer with a failure status and record why.

The index is a folder of small files in the spool, ``sop/<last two digits>/<SOP Instance UID>``, each
holding ``<study UID>/<series UID>`` of the stored copy. A claim creates the file with ``O_EXCL``: atomic
across the threads and receiver processes of one node and across nodes sharing the spool, and it costs one
small file per instance on the hot path, no database round trip. An entry whose instance file has gone
(retention) no longer counts; `rebuild` adds the entries of instances stored before the index existed.
"""

from __future__ import annotations

import contextlib
import enum
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pacs_agent.ingest.spool import INSTANCE_SUFFIX, Spool

#: An entry younger than this whose instance file is not there yet belongs to a store still in flight.
IN_FLIGHT_SECONDS = 120.0
_CHUNK = 1024 * 1024


class ClaimResult(enum.Enum):
    NEW = "new"  # first time this SOP Instance UID is stored: the caller stores it (or releases the claim)
    SAME_SERIES = "same-series"  # already stored in this series: compare the content
    OTHER_SERIES = "other-series"  # already stored in another series (or study)
    IN_FLIGHT = "in-flight"  # another association is storing it right now


@dataclass(frozen=True)
class Claim:
    result: ClaimResult
    #: Study and series UID of the copy already stored (empty for NEW).
    stored_study_instance_uid: str = ""
    stored_series_instance_uid: str = ""


class SopIndex:
    """The spool's SOP Instance UID index (see the module docstring)."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self._root = spool.root / "sop"
        self._root.mkdir(parents=True, exist_ok=True)

    def _entry(self, sop_instance_uid: str) -> Path:
        return self._root / sop_instance_uid[-2:] / sop_instance_uid

    def claim(self, study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str) -> Claim:
        """Claim ``sop_instance_uid`` for this study and series (UIDs already validated)."""
        entry = self._entry(sop_instance_uid)
        entry.parent.mkdir(exist_ok=True)
        content = f"{study_instance_uid}/{series_instance_uid}".encode()
        for _ in range(3):
            try:
                fd = os.open(entry, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "wb") as out:
                    out.write(content)
                return Claim(ClaimResult.NEW)
            try:
                stored = entry.read_text()
                age = time.time() - entry.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile: try to claim again
            study, _, series = stored.partition("/")
            if not self._spool.instance_path(study, series, sop_instance_uid).exists():
                if age < IN_FLIGHT_SECONDS:
                    return Claim(ClaimResult.IN_FLIGHT, study, series)
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()  # its instance is gone (retention, a failed store): a fresh start
                continue
            same = (study, series) == (study_instance_uid, series_instance_uid)
            return Claim(ClaimResult.SAME_SERIES if same else ClaimResult.OTHER_SERIES, study, series)
        return Claim(ClaimResult.IN_FLIGHT)

    def release(self, sop_instance_uid: str) -> None:
        """Drop a NEW claim whose instance was not stored after all."""
        with contextlib.suppress(FileNotFoundError):
            self._entry(sop_instance_uid).unlink()

    def rebuild(self) -> int:
        """Add the entries of stored instances that have none (spools older than the index); return how many."""
        added = 0
        for study, series, folder in self._spool.iter_incoming():
            for file in folder.iterdir():
                if file.suffix != INSTANCE_SUFFIX:
                    continue
                entry = self._entry(file.stem)
                if entry.exists():
                    continue
                entry.parent.mkdir(exist_ok=True)
                with contextlib.suppress(FileExistsError):
                    fd = os.open(entry, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
                    with os.fdopen(fd, "wb") as out:
                        out.write(f"{study}/{series}".encode())
                    added += 1
        return added


def same_dataset(a: Path, b: Path) -> bool:
    """True when two Part 10 files hold the same dataset bytes (file meta ignored: it names the sender)."""
    from pynetdicom.dsutils import split_dataset

    meta_a, offset_a = split_dataset(a)
    meta_b, offset_b = split_dataset(b)
    if meta_a.get("TransferSyntaxUID") != meta_b.get("TransferSyntaxUID"):
        return False
    if a.stat().st_size - offset_a != b.stat().st_size - offset_b:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        fa.seek(offset_a)
        fb.seek(offset_b)
        while True:
            x, y = fa.read(_CHUNK), fb.read(_CHUNK)
            if x != y:
                return False
            if not x:
                return True
