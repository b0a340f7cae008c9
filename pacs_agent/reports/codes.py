"""Coded concepts of the PE triage reports (SNOMED CT, DICOM, LOINC, RadLex, UCUM; local only where none exists).

Every concept a report writes lives here, so the SR, SC, SEG and KOS say the same thing the same way.
Meanings follow the DICOM Content Mapping Resource (PS3.16) where the concept is listed there.
The local scheme 99PETRIAGE holds only concepts no standard terminology has (the RSNA RV/LV label,
the worklist flags); docs/CONFORMANCE.md lists them.
"""

from __future__ import annotations

from typing import Final

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept

#: Our private coding scheme (PS3.16: local schemes start with "99").
LOCAL_SCHEME: Final[str] = "99PETRIAGE"
LOCAL_SCHEME_NAME: Final[str] = "PE Triage Project local codes"


def _sct(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator="SCT", meaning=meaning)


def _dcm(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator="DCM", meaning=meaning)


def _local(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=LOCAL_SCHEME, meaning=meaning)


# Finding and presence (CID 240 / 241 values).
PULMONARY_EMBOLISM: Final = _sct("59282003", "Pulmonary embolism")
PRESENT: Final = _sct("52101004", "Present")
ABSENT: Final = _sct("272519000", "Absent")
INDETERMINATE: Final = _sct("82334004", "Indeterminate")

# Finding sites: central PE is reported at the pulmonary trunk.
PULMONARY_TRUNK: Final = _sct("45341000", "Pulmonary trunk")
RIGHT_PULMONARY_ARTERY: Final = _sct("78480002", "Right pulmonary artery")
LEFT_PULMONARY_ARTERY: Final = _sct("50408007", "Left pulmonary artery")

# Clinical course (SNOMED attribute 263502005; values under 288524001 |Courses|).
CLINICAL_COURSE: Final = _sct("263502005", "Clinical course")
ACUTE: Final = _sct("424124008", "Acute")
CHRONIC: Final = _sct("90734009", "Chronic")

# Right-ventricular strain: no standard code for the RSNA label, so a local one.
RV_LV_RATIO_GTE_1: Final = _local("RVLV1", "RV/LV diameter ratio >= 1")

# Priority of the study on the reading worklist: SNOMED CT names the attribute; its values are this
# node's worklist flags (pacs_agent.worklist), which no terminology defines.
PRIORITY: Final = _sct("260870009", "Priority")
FLAG_CRITICAL: Final = _local("CRITICAL", "Critical: PE with RV/LV >= 1 or central PE suggested")
FLAG_HIGH: Final = _local("HIGH", "High: PE suggested")
FLAG_REVIEW: Final = _local("REVIEW", "Review: indeterminate or near the decision threshold")
FLAG_ROUTINE: Final = _local("ROUTINE", "Routine: no PE suggested")

# Input quality (DICOM "Image Quality" with the RadLex values of CID 7036).
IMAGE_QUALITY: Final = _dcm("111101", "Image Quality")
DIAGNOSTIC_QUALITY: Final = CodedConcept(value="RID12", scheme_designator="RADLEX", meaning="Diagnostic quality")
LIMITED_QUALITY: Final = CodedConcept(value="RID13", scheme_designator="RADLEX", meaning="Limited quality")
NON_DIAGNOSTIC_QUALITY: Final = CodedConcept(value="RID14", scheme_designator="RADLEX", meaning="Non-diagnostic quality")

# Numeric probabilities.
CERTAINTY_OF_FINDING: Final = _dcm("111012", "Certainty of Finding")
NO_UNITS: Final = CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")

# Document-level concepts.
IMAGING_MEASUREMENT_REPORT: Final = _dcm("126000", "Imaging Measurement Report")
QUALITATIVE_EVALUATIONS: Final = CodedConcept(
    value="C0034375", scheme_designator="UMLS", meaning="Qualitative Evaluations"
)
#: TEXT items of the report (disclaimer, provenance, supersession).
COMMENT: Final = _dcm("121106", "Comment")
#: The one-sentence summary that leads the report (PS3.16 CID 7001 "Impression").
IMPRESSION: Final = _dcm("121073", "Impression")

# Contributing Equipment: the algorithm as equipment that processed the images (CID 7005).
PROCESSING_EQUIPMENT: Final = _dcm("109102", "Processing Equipment")

# Key Object Selection document titles (CID 7010) and IHE IOCM rejection reasons (CID 7031).
OF_INTEREST: Final = _dcm("113000", "Of Interest")
KEY_OBJECT_DESCRIPTION: Final = _dcm("113012", "Key Object Description")
REJECTED_FOR_QUALITY_REASONS: Final = _dcm("113001", "Rejected for Quality Reasons")
REJECTED_FOR_PATIENT_SAFETY_REASONS: Final = _dcm("113037", "Rejected for Patient Safety Reasons")
#: Purpose of reference of the source slices in a derived image.
SOURCE_IMAGE_FOR_PROCESSING: Final = _dcm("121322", "Source image for image processing operation")
#: Procedure reported (CID 100 values): a CT of the chest vessels with contrast, i.e. CT angiography.
CT_UNSPECIFIED_BODY_REGION: Final = CodedConcept(
    value="25045-6", scheme_designator="LN", meaning="CT unspecified body region"
)
ANGIOGRAPHY: Final = _sct("77343006", "Angiography")

# Segmentation (SEG) categories: CID 7150 / 7151 style.
MORPHOLOGICALLY_ABNORMAL_STRUCTURE: Final = _sct("49755003", "Morphologically abnormal structure")


def coding_schemes() -> list[CodingSchemeIdentificationItem]:
    """Items of CodingSchemeIdentificationSequence declaring the local scheme."""
    return [
        CodingSchemeIdentificationItem(
            designator=LOCAL_SCHEME,
            name=LOCAL_SCHEME_NAME,
            responsible_organization="PE Triage Project",
        )
    ]
