"""Exceptions of the training package. Every message is one line a person understands."""

from __future__ import annotations


class TrainingError(Exception):
    """Root of every error raised by the training package."""


class EvaluationInputError(TrainingError):
    """Labels or predictions handed to the evaluation code that do not fit together or are not probabilities."""


class DatasetError(TrainingError):
    """An RSNA-layout dataset that cannot be used at all (no train.csv, missing columns, no usable series)."""


class CacheError(TrainingError):
    """A preprocessing cache that is missing, incomplete or was built with another configuration."""


class CheckpointStateError(TrainingError):
    """A training-state file (stage 1 / stage 2 resume point) that does not fit the run being resumed."""


class DemoQualityError(TrainingError):
    """The demo model missed a quality threshold, so it is not written as the built-in checkpoint."""
