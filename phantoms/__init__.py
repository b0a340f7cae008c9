"""Synthetic CT series written as real DICOM files with their ground truth, for tests, the demo and training.

``phantoms.ctpa`` is the first-generation CTPA generator; its public names are re-exported here.
"""

from phantoms.ctpa import *  # noqa: F401,F403
from phantoms.ctpa import __all__ as __all__  # noqa: F401
