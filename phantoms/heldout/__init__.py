"""A held-out CTPA phantom family, for evaluation only (never for training or model selection).

Written independently of ``phantoms.ctpa`` (different shapes, code and HU/noise models) so that a
model trained on one generator is judged on anatomy it has not learned: vessels are tubes along
splines with a branching pulmonary arterial tree, organs are superquadrics and implicit surfaces,
partial volume comes from supersampling, noise is spatially correlated, and clots take the forms
radiologists describe (saddle, occlusive, eccentric, central, chronic mural).
"""

from phantoms.heldout.errors import HeldoutError, HeldoutPlacementError, HeldoutSpecError
from phantoms.heldout.series import (
    ClotTruth,
    HeldoutTruth,
    exam_labels_for,
    generate_heldout_volume,
    write_heldout_series,
)
from phantoms.heldout.spec import CLOT_FORMS, CLOT_LEVELS, ClotSpec, FamilyDraw, HeldoutSpec, draw_spec

__all__ = [
    "CLOT_FORMS",
    "CLOT_LEVELS",
    "ClotSpec",
    "ClotTruth",
    "FamilyDraw",
    "HeldoutError",
    "HeldoutPlacementError",
    "HeldoutSpec",
    "HeldoutSpecError",
    "HeldoutTruth",
    "draw_spec",
    "exam_labels_for",
    "generate_heldout_volume",
    "write_heldout_series",
]
