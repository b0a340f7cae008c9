"""Exceptions of the training package. Every message is one line a person understands."""

from __future__ import annotations


class TrainingError(Exception):
    """Root of every error raised by the training package."""


class EvaluationInputError(TrainingError):
    """Labels or predictions handed to the evaluation code that do not fit together or are not probabilities."""
