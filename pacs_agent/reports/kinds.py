"""The kinds of DICOM object the report writers produce (the database records them as `OutputKind`)."""

from __future__ import annotations

import enum


class ObjectKind(enum.StrEnum):
    """One produced object's family; values are those of `pacs_agent.db.models.OutputKind`."""

    SR = "SR"
    SC = "SC"
    SEG = "SEG"


__all__ = ["ObjectKind"]
