"""Errors of the held-out phantom family: one root, a subclass per cause."""

from __future__ import annotations


class HeldoutError(ValueError):
    """A held-out phantom cannot be drawn or written as asked."""


class HeldoutSpecError(HeldoutError):
    """A HeldoutSpec or ClotSpec parameter is out of range."""


class HeldoutPlacementError(HeldoutError):
    """A clot cannot be placed: its artery lies outside the scanned range."""
