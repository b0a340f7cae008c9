"""Exceptions of pacs_agent."""

from __future__ import annotations


class AgentError(Exception):
    """Root of every error raised by pacs_agent."""


class ConfigError(AgentError):
    """The configuration file or an override is invalid."""


class StorageError(AgentError):
    """The spool cannot take an instance (disk floor, invalid UID, I/O)."""


class InvalidUIDError(StorageError):
    """A UID that is not a valid DICOM UID and must never become a path."""


class QueueError(AgentError):
    """A queue operation failed (unknown job, illegal transition)."""


class ReportError(AgentError):
    """A report object could not be built."""


class DeliveryError(AgentError):
    """A C-STORE to a destination failed."""


class ReceiverError(AgentError):
    """The receiver cannot start (port in use, TLS files unreadable)."""


class NotificationError(AgentError):
    """A notification cannot be raised, sent or acknowledged (unknown study, bad link, bad target)."""
