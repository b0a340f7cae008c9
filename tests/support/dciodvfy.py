"""Run dicom3tools' `dciodvfy` on a file and split its output into errors and warnings.

dciodvfy checks a DICOM object against its IOD (modules, attributes, value representations).
A PACS may reject an object it flags as an error, so every object this project sends must pass
with zero error lines.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: Name of the executable (Debian package dicom3tools).
DCIODVFY = "dciodvfy"


@dataclass(frozen=True)
class DciodvfyResult:
    """Lines of one dciodvfy run: ``errors`` start with "Error", ``warnings`` with "Warning".

    ``iod``: the IOD dciodvfy recognised and checked against (its first line, e.g. "ComprehensiveSR").
    """

    errors: list[str]
    warnings: list[str]
    output: str
    iod: str


def dciodvfy_available() -> bool:
    return shutil.which(DCIODVFY) is not None


def run_dciodvfy(path: str | Path, *, timeout: float = 60.0) -> DciodvfyResult:
    """Validate ``path``; raises FileNotFoundError when dciodvfy is not installed."""
    executable = shutil.which(DCIODVFY)
    if executable is None:
        raise FileNotFoundError(f"{DCIODVFY} is not installed (Debian package dicom3tools)")
    completed = subprocess.run(
        [executable, str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )
    output = completed.stdout + completed.stderr
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    others = [line for line in lines if not line.startswith(("Error", "Warning"))]
    return DciodvfyResult(errors=errors, warnings=warnings, output=output, iod=others[0] if others else "")
