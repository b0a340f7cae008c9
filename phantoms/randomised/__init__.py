"""Second-generation CTPA phantoms built for domain randomisation (training data for the demo model).

``draw_spec`` samples an acquisition and a patient; ``write_randomised_series`` renders it
(branching arterial tree, every clot kind, heart with a given RV/LV ratio, partial volume,
kernels, noise, streaks, motion, arms, table) and writes DICOM files with per-slice truth and
clot centres. ``phantoms.ctpa`` (the first generation) stays for the tests that use it.
"""

from phantoms.randomised.render import CLOT_FRACTION_ON_SLICE, Geometry, Renderer
from phantoms.randomised.series import (
    RandomisedClot,
    RandomisedTruth,
    exam_labels,
    render_volume,
    write_randomised_series,
)
from phantoms.randomised.spec import (
    ACQUISITION_RANGES,
    CLOT_FORMS,
    CLOT_HU,
    CLOT_KINDS,
    KERNELS,
    AcquisitionRanges,
    ClotSpec,
    RandomisedPhantomError,
    RandomisedSpec,
    draw_clots,
    draw_spec,
)

__all__ = [
    "ACQUISITION_RANGES",
    "CLOT_FORMS",
    "CLOT_FRACTION_ON_SLICE",
    "CLOT_HU",
    "CLOT_KINDS",
    "KERNELS",
    "AcquisitionRanges",
    "ClotSpec",
    "Geometry",
    "RandomisedClot",
    "RandomisedPhantomError",
    "RandomisedSpec",
    "RandomisedTruth",
    "Renderer",
    "draw_clots",
    "draw_spec",
    "exam_labels",
    "render_volume",
    "write_randomised_series",
]
