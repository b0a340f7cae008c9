"""The spool: where received instances and produced objects live on disk.

Layout under the root::

    incoming/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   received, acknowledged instances
    tmp/                                                                    files being written (never acknowledged)
    outbox/<job id>/<SOPInstanceUID>.dcm                                    objects this node produced

A UID becomes a path component only after `validate_uid` accepted it, and every path is checked to
resolve inside the root, so nothing a peer sends can land outside the spool. Files are written to
``tmp/`` and moved into place with ``os.replace`` (atomic on one file system): a reader never sees a
half-written instance.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from pacs_agent.errors import InvalidUIDError, StorageError

#: A UID: dot-separated numeric components, none empty, no leading zero unless the component is "0".
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
UID_MAX_LENGTH = 64
INSTANCE_SUFFIX = ".dcm"


def validate_uid(value: str) -> str:
    """Return ``value`` if it is a valid DICOM UID (PS3.5 9.1), else raise InvalidUIDError.

    Trailing NUL padding (allowed on the wire for UI values) is removed first.
    """
    if not isinstance(value, str):
        raise InvalidUIDError(f"UID must be text, got {type(value).__name__}")
    uid = value.rstrip("\x00")
    if not uid:
        raise InvalidUIDError("UID is empty")
    if len(uid) > UID_MAX_LENGTH:
        raise InvalidUIDError(f"UID is {len(uid)} characters long; at most {UID_MAX_LENGTH} are allowed")
    if not _UID_RE.match(uid):
        shown = uid if len(uid) <= 80 else uid[:77] + "..."
        raise InvalidUIDError(f"{shown!r} is not a valid UID (digits and dots only, no empty or zero-led components)")
    return uid


class Spool:
    """The spool folder of one node (``settings.storage.root``)."""

    def __init__(self, root: Path, min_free_disk_mb: int, *, fsync: bool = False) -> None:
        self._root = Path(root).resolve()
        self._min_free_bytes = max(0, int(min_free_disk_mb)) * 1024 * 1024
        self._fsync = fsync
        for folder in (self.incoming_dir, self.tmp_dir, self.outbox_dir):
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def root(self) -> Path:
        return self._root

    @property
    def incoming_dir(self) -> Path:
        return self._root / "incoming"

    @property
    def tmp_dir(self) -> Path:
        return self._root / "tmp"

    @property
    def outbox_dir(self) -> Path:
        return self._root / "outbox"

    @property
    def fsync_enabled(self) -> bool:
        return self._fsync

    def _inside(self, path: Path) -> Path:
        """Return ``path`` if it resolves below the root; defence in depth after UID validation."""
        resolved = path.resolve()
        if resolved != self._root and self._root not in resolved.parents:
            raise InvalidUIDError(f"path {path} would be outside the spool")
        return path

    def instance_path(self, study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str) -> Path:
        """Absolute path of a received instance; raises InvalidUIDError for any invalid UID."""
        study = validate_uid(study_instance_uid)
        series = validate_uid(series_instance_uid)
        sop = validate_uid(sop_instance_uid)
        return self._inside(self.incoming_dir / study / series / f"{sop}{INSTANCE_SUFFIX}")

    def series_dir(self, study_instance_uid: str, series_instance_uid: str) -> Path:
        study = validate_uid(study_instance_uid)
        series = validate_uid(series_instance_uid)
        return self._inside(self.incoming_dir / study / series)

    def job_outbox_dir(self, job_id: int) -> Path:
        """Absolute path of the folder holding the objects produced by job ``job_id``."""
        if isinstance(job_id, bool) or not isinstance(job_id, int) or job_id < 0:
            raise StorageError(f"job id must be a non-negative integer, got {job_id!r}")
        return self._inside(self.outbox_dir / str(job_id))

    def outbox_path(self, job_id: int, sop_instance_uid: str) -> Path:
        """Absolute path of an object produced by job ``job_id``."""
        sop = validate_uid(sop_instance_uid)
        return self._inside(self.job_outbox_dir(job_id) / f"{sop}{INSTANCE_SUFFIX}")

    def relative(self, path: Path) -> str:
        """``path`` relative to the root, as stored in the database (POSIX separators)."""
        return self._inside(path).resolve().relative_to(self._root).as_posix()

    def absolute(self, relative_path: str) -> Path:
        """Inverse of `relative`; refuses paths that leave the spool."""
        return self._inside(self._root / relative_path)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self._root).free

    def has_space(self) -> bool:
        """True while free space on the spool's file system is above node.min_free_disk_mb."""
        return self.free_bytes() >= self._min_free_bytes

    def same_file_system(self, other: Path) -> bool:
        """Whether ``other`` is on the spool's file system (so ``os.replace`` from it is a rename)."""
        return os.stat(other).st_dev == os.stat(self.tmp_dir).st_dev

    def _sync(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _sync_dir(self, folder: Path) -> None:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def move_into_place(self, source: Path, destination: Path) -> int:
        """Move a finished file to ``destination`` (inside the spool) atomically; return its size.

        A rename when ``source`` is on the spool's file system; otherwise one copy into ``tmp/``
        followed by a rename, so ``destination`` never exists half-written.
        """
        self._inside(destination)
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            if self._fsync:
                self._sync(source)
            os.replace(source, destination)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise StorageError(f"cannot move the received file into the spool: {exc.strerror}") from exc
            staged = self._copy_to_tmp(source)
            os.replace(staged, destination)
            source.unlink(missing_ok=True)
        if self._fsync:
            self._sync_dir(destination.parent)
        return destination.stat().st_size

    def _copy_to_tmp(self, source: Path) -> Path:
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, suffix=".part")
        staged = Path(name)
        try:
            with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                shutil.copyfileobj(src, out, 1024 * 1024)
                out.flush()
                if self._fsync:
                    os.fsync(out.fileno())
        except OSError as exc:
            staged.unlink(missing_ok=True)
            raise StorageError(f"cannot copy the received file into the spool: {exc.strerror}") from exc
        return staged

    def write_bytes(self, destination: Path, data: bytes) -> int:
        """Write ``data`` to ``destination`` via a temp file in ``tmp/`` and a rename; return the size."""
        self._inside(destination)
        destination.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, suffix=".part")
        staged = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                if self._fsync:
                    os.fsync(out.fileno())
            os.replace(staged, destination)
        except OSError as exc:
            staged.unlink(missing_ok=True)
            raise StorageError(f"cannot write {destination.name} into the spool: {exc.strerror}") from exc
        if self._fsync:
            self._sync_dir(destination.parent)
        return len(data)

    def clear_tmp(self) -> int:
        """Delete leftovers in ``tmp/`` (never acknowledged, e.g. after a crash); return how many."""
        removed = 0
        for entry in self.tmp_dir.iterdir():
            if entry.is_file() or entry.is_symlink():
                entry.unlink(missing_ok=True)
                removed += 1
        return removed

    def iter_incoming(self) -> list[tuple[str, str, Path]]:
        """(study UID, series UID, folder) of every series folder in ``incoming/`` with valid UIDs."""
        found: list[tuple[str, str, Path]] = []
        for study_dir in sorted(p for p in self.incoming_dir.iterdir() if p.is_dir()):
            for series_dir in sorted(p for p in study_dir.iterdir() if p.is_dir()):
                try:
                    validate_uid(study_dir.name)
                    validate_uid(series_dir.name)
                except InvalidUIDError:
                    continue
                found.append((study_dir.name, series_dir.name, series_dir))
        return found
