"""What every output says about its origin: model identity, disclaimers and series descriptions.

Every output names the model (name, version, checkpoint sha256) and says it is
unverified AI output; outputs of the synthetic demo model say NOT FOR CLINICAL USE.
"""

from __future__ import annotations

import uuid
from typing import Final

from highdicom import ContributingEquipment
from highdicom.sr import AlgorithmIdentification
from pydicom.dataset import Dataset

from pacs_agent.reports import codes

from pe_model.labels import THRESHOLD
from pe_model.prediction import ModelInfo

NOT_FOR_CLINICAL_USE: Final[str] = "NOT FOR CLINICAL USE"
UNVERIFIED: Final[str] = "Unverified AI output"
HEATMAP_LEGEND: Final[str] = "AI heatmap - not for diagnosis"
#: Namespace of the model Device UIDs (a fixed random UUID; never change it, or every Device UID changes).
_DEVICE_NAMESPACE: Final = uuid.UUID("5b0e4a52-8d7e-4a5f-9a63-2f0e2d1c7b11")
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
    # A name-based UUID under the 2.25 arc (PS3.5 B.2); pydicom's generate_uid(prefix=None) would be random.
    return f"2.25.{uuid.uuid5(_DEVICE_NAMESPACE, model.sha256.strip().lower()).int}"


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


def keep_one_processing_item(ds: Dataset, model: ModelInfo) -> None:
    """Leave the algorithm as the only Processing Equipment in Contributing Equipment (IHE AIR).

    highdicom appends an item for itself with the same purpose; a consumer that looks for "the
    algorithm" would find two. Items of other purposes (the scanner as Acquisition Equipment) stay.
    """
    uid = device_observer_uid(model)
    items = list(ds.get("ContributingEquipmentSequence", []))
    kept = [
        item
        for item in items
        if item.get("DeviceUID") == uid
        or not any(code.CodeValue == codes.PROCESSING_EQUIPMENT.value for code in item.get("PurposeOfReferenceCodeSequence", []))
    ]
    ds.ContributingEquipmentSequence = kept
