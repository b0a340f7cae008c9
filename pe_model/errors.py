"""Exceptions of pe_model. Every message is one line a person understands."""

from __future__ import annotations


class PEModelError(Exception):
    """Root of every error raised by pe_model."""


class SeriesError(PEModelError):
    """A series that cannot be analysed. Subclasses say why."""


class NoImagesError(SeriesError):
    """The input holds no readable DICOM image."""


class MixedSeriesError(SeriesError):
    """The input holds images of more than one series (or study)."""


class NotCTError(SeriesError):
    """The images are not CT."""


class TooFewSlicesError(SeriesError):
    """Fewer usable slices than the model needs."""


class InconsistentOrientationError(SeriesError):
    """No orientation is shared by enough slices to form a volume."""


class MissingGeometryError(SeriesError):
    """ImagePositionPatient, ImageOrientationPatient or PixelSpacing is missing or invalid."""


class UnreadablePixelsError(SeriesError):
    """Pixel data that cannot be decoded or does not match Rows x Columns."""


class CheckpointError(PEModelError):
    """A checkpoint that is missing, corrupted, tampered with or of an unknown format."""


class ImplausibleGeometryError(SeriesError):
    """PixelSpacing, slice spacing, field of view or extent outside what a CT scanner produces."""


class IncompleteSeriesError(SeriesError):
    """Slices are missing: a gap of several slice spacings inside the series."""


class ImplausiblePixelValuesError(SeriesError):
    """RescaleSlope, RescaleIntercept or PixelRepresentation give values no CT holds (not HU)."""


class InconsistentSeriesError(SeriesError):
    """Too many images disagree with the rest of the series (matrix size, spacing, encoding)."""


class VolumeTooLargeError(SeriesError):
    """The series would need more memory than the configured cap: refused before allocating it."""
