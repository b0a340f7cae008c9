"""What every output says about its origin: model identity, disclaimers and series descriptions.

ARCHITECTURE.md: every output names the model (name, version, checkpoint sha256) and says it is
unverified AI output; outputs of the synthetic demo model say NOT FOR CLINICAL USE.
"""

from __future__ import annotations

from typing import Final

from highdicom import ContributingEquipment
from highdicom.sr import AlgorithmIdentification
from pydicom.uid import generate_uid

from pacs_agent.reports import codes

from pe_model.labels import THRESHOLD
from pe_model.prediction import ModelInfo

NOT_FOR_CLINICAL_USE: Final[str] = "NOT FOR CLINICAL USE"
UNVERIFIED: Final[str] = "Unverified AI output"
HEATMAP_LEGEND: Final[str] = "AI heatmap - not for diagnosis"
#: LO values (Manufacturer's Model Name, Software Versions, Series Description) hold at most 64 characters.
_LO_MAX: Final[int] = 64


def long_string(text: str) -> str:
    """``text`` cut to the 64 characters a LO value may hold."""
    return text if len(text) <= _LO_MAX else text[: _LO_MAX - 1] + "~"


def series_description(what: str, model: ModelInfo) -> str:
    """SeriesDescription of an output series, led by NOT FOR CLINICAL USE for the demo model."""
    text = f"{what} ({UNVERIFIED.lower()})"
    if model.not_for_clinical_use:
        text = f"{NOT_FOR_CLINICAL_USE} - {what}"
    return long_string(text)


def disclaimer(model: ModelInfo) -> str:
    """The sentence every report carries."""
    text = (
        f"{UNVERIFIED} for triage (decision support), not a diagnosis; a radiologist must read the study. "
        f"Made by model {model.name} version {model.version}, checkpoint sha256 {model.sha256}."
    )
    if model.not_for_clinical_use:
        text = f"{NOT_FOR_CLINICAL_USE}: synthetic demo model. " + text
    return text


def device_observer_uid(model: ModelInfo) -> str:
    """The model's Device UID, derived from the checkpoint's sha256 alone.

    The same checkpoint always gets the same UID (on every node, in every run); a new checkpoint,
    even under an unchanged name and version, gets a new one (IHE AIR: the Device UID changes
    when the model changes).
    """
    return str(generate_uid(prefix=None, entropy_srcs=["pe-triage-device", model.sha256.lower()]))


def contributing_equipment(model: ModelInfo, manufacturer: str) -> ContributingEquipment:
    """The Contributing Equipment item of the algorithm (IHE AIR: one item per algorithm).

    Purpose of Reference (109102, DCM, "Processing Equipment") from CID 7005: the algorithm
    processed the source images; it neither acquired nor modified them.
    """
    item = ContributingEquipment(
        manufacturer=long_string(manufacturer or "unknown"),
        purpose_of_reference=codes.PROCESSING_EQUIPMENT,
        manufacturer_model_name=long_string(model.name),
        software_versions=long_string(model.version),
        contribution_description=f"AI analysis (unverified), checkpoint sha256 {model.sha256}",
    )
    item.DeviceUID = device_observer_uid(model)
    return item


def algorithm_identification(model: ModelInfo, manufacturer: str) -> AlgorithmIdentification:
    """TID 4019: model name, version and parameters that pin the exact checkpoint."""
    parameters = [
        f"checkpoint_sha256={model.sha256}",
        f"decision_threshold={THRESHOLD}",
        f"not_for_clinical_use={str(model.not_for_clinical_use).lower()}",
    ]
    if model.intended_use:
        parameters.append(f"intended_use={model.intended_use}")
    return AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=parameters,
        manufacturer=manufacturer or None,
    )
