"""Selection rules: the default CTPA rule, a reason for every failing check, priority rules."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence

from pacs_agent.series.selection import select_series
from pacs_agent.settings import PriorityRule, SelectionSettings, SeriesSettings

AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
CORONAL = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
SAGITTAL = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]


def header(**overrides: Any) -> Dataset:
    """Header of one slice of a typical CTPA; keyword overrides, None deletes."""
    ds = Dataset()
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = AXIAL
    ds.SliceThickness = "1.25"
    ds.ContrastBolusAgent = "Omnipaque 350"
    ds.SeriesDescription = "CTA CHEST"
    ds.StudyDescription = "CT ANGIO CHEST"
    for keyword, value in overrides.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def series(n: int = 60, **overrides: Any) -> list[Dataset]:
    return [header(**overrides) for _ in range(n)]


DEFAULT = SeriesSettings()


def test_typical_ctpa_is_accepted_with_a_summary() -> None:
    decision = select_series(series(), DEFAULT, calling_ae_title="SCANNER")
    assert decision.accepted
    assert decision.reason == "CTPA: 60 axial CT slices, contrast agent 'Omnipaque 350'"
    assert decision.priority == 0


def test_description_alone_is_enough_without_contrast_agent() -> None:
    decision = select_series(
        series(ContrastBolusAgent=None, SeriesDescription="PE protocol", StudyDescription=None), DEFAULT,
        calling_ae_title="X",
    )
    assert decision.accepted, decision.reason
    assert "description 'PE protocol'" in decision.reason


def test_contrast_route_or_coded_agent_counts_as_contrast() -> None:
    route = series(ContrastBolusAgent=None, ContrastBolusRoute="IV", SeriesDescription="CHEST", StudyDescription=None)
    assert select_series(route, DEFAULT, calling_ae_title="X").accepted
    coded_item = Dataset()
    coded_item.CodeMeaning = "Iohexol"
    coded = series(ContrastBolusAgent=None, SeriesDescription="CHEST", StudyDescription=None)
    coded[0].ContrastBolusAgentSequence = DicomSequence([coded_item])
    assert select_series(coded, DEFAULT, calling_ae_title="X").accepted


def test_head_ct_without_contrast_gives_both_reasons() -> None:
    decision = select_series(
        series(BodyPartExamined="HEAD", ContrastBolusAgent=None, SeriesDescription="HEAD W/O", StudyDescription=None),
        DEFAULT,
        calling_ae_title="X",
    )
    assert not decision.accepted
    assert "head CT: body part HEAD is not chest" in decision.reason
    assert f"no contrast agent and description 'HEAD W/O' does not match {DEFAULT.selection.description_pattern}" in decision.reason


@pytest.mark.parametrize(
    ("overrides", "n", "reason"),
    [
        ({"Modality": "MR"}, 60, "modality MR is not CT"),
        ({}, 12, "12 slices; at least 40 needed"),
        ({"SliceThickness": "5.0"}, 60, "slice thickness 5 mm is over 3 mm"),
        ({"ImageOrientationPatient": CORONAL}, 60, "not axial: 60 coronal of 60 images"),
        ({"ImageOrientationPatient": SAGITTAL}, 60, "not axial: 60 sagittal of 60 images"),
        ({"ImageOrientationPatient": None}, 60, "60 of 60 images have no ImageOrientationPatient"),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, 60, "localizer series (ImageType LOCALIZER)"),
        ({"BodyPartExamined": "ABDOMEN"}, 60, "abdomen CT: body part ABDOMEN is not chest"),
        (
            {"ContrastBolusAgent": None, "SeriesDescription": None, "StudyDescription": None},
            60,
            "no contrast agent and description '' does not match",
        ),
    ],
)
def test_each_failing_check_has_its_reason(overrides: dict[str, Any], n: int, reason: str) -> None:
    decision = select_series(series(n, **overrides), DEFAULT, calling_ae_title="X")
    assert not decision.accepted
    assert reason in decision.reason


def test_unspecified_body_part_and_missing_thickness_pass() -> None:
    decision = select_series(series(BodyPartExamined=None, SliceThickness=None), DEFAULT, calling_ae_title="X")
    assert decision.accepted, decision.reason


def test_tilted_gantry_is_still_axial_but_oblique_is_not() -> None:
    import math

    def tilted(degrees: float) -> list[float]:
        a = math.radians(degrees)
        return [1.0, 0.0, 0.0, 0.0, math.cos(a), -math.sin(a)]

    assert select_series(series(ImageOrientationPatient=tilted(20)), DEFAULT, calling_ae_title="X").accepted
    decision = select_series(series(ImageOrientationPatient=tilted(45)), DEFAULT, calling_ae_title="X")
    assert not decision.accepted and "oblique" in decision.reason


def test_localizers_inside_a_series_are_not_counted_as_slices() -> None:
    headers = series(45) + series(3, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], ImageOrientationPatient=CORONAL)
    decision = select_series(headers, DEFAULT, calling_ae_title="X")
    assert decision.accepted, decision.reason
    assert "45 axial" in decision.reason
    short = series(38) + series(5, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    assert "38 slices; at least 40 needed" in select_series(short, DEFAULT, calling_ae_title="X").reason


def test_enhanced_ct_counts_frames_and_reads_functional_groups() -> None:
    ds = header(ImageOrientationPatient=None, SliceThickness=None)
    ds.NumberOfFrames = 120
    orientation = Dataset()
    orientation.ImageOrientationPatient = AXIAL
    measures = Dataset()
    measures.SliceThickness = "0.8"
    shared = Dataset()
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    decision = select_series([ds], DEFAULT, calling_ae_title="X")
    assert decision.accepted, decision.reason
    assert "120 axial" in decision.reason
    measures.SliceThickness = "5"
    assert "slice thickness 5 mm" in select_series([ds], DEFAULT, calling_ae_title="X").reason


def test_empty_series_is_refused() -> None:
    decision = select_series([], DEFAULT, calling_ae_title="X")
    assert not decision.accepted
    assert decision.reason == "no readable instances in the series"


def test_configured_thresholds_and_pattern() -> None:
    rule = SelectionSettings(min_slices=10, max_slice_thickness_mm=5.0, description_pattern=r"LUNGE", body_parts=("HEAD",))
    settings = SeriesSettings(selection=rule)
    ok = series(12, BodyPartExamined="HEAD", SliceThickness="4", ContrastBolusAgent=None, SeriesDescription="Lunge")
    assert select_series(ok, settings, calling_ae_title="X").accepted
    no_check = SeriesSettings(selection=SelectionSettings(require_contrast_or_description=False))
    assert select_series(series(ContrastBolusAgent=None, SeriesDescription=None, StudyDescription=None), no_check, calling_ae_title="X").accepted


def test_priority_rules_highest_match_else_default() -> None:
    settings = SeriesSettings(
        default_priority=1,
        priority_rules=(
            PriorityRule(priority=10, calling_ae_title="ER_CT"),
            PriorityRule(priority=5, description_pattern=r"trauma|stat"),
            PriorityRule(priority=20, calling_ae_title="ER_CT", description_pattern=r"stat"),
        ),
    )
    assert select_series(series(), settings, calling_ae_title="OTHER").priority == 1
    assert select_series(series(), settings, calling_ae_title="ER_CT").priority == 10
    assert select_series(series(SeriesDescription="CTA STAT"), settings, calling_ae_title="OTHER").priority == 5
    assert select_series(series(SeriesDescription="CTA STAT"), settings, calling_ae_title="ER_CT").priority == 20
    # Rejected series still get their priority (kept on the series row).
    rejected = select_series(series(5), settings, calling_ae_title="ER_CT")
    assert not rejected.accepted and rejected.priority == 10


def test_a_sample_of_headers_is_scaled_to_the_instance_count() -> None:
    sample = series(10)
    assert not select_series(sample, DEFAULT, calling_ae_title="X").accepted  # 10 < 40
    decision = select_series(sample, DEFAULT, calling_ae_title="X", instance_count=400)
    assert decision.accepted and "400 axial" in decision.reason
    with_localizer = series(9) + series(1, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    assert "360 axial" in select_series(with_localizer, DEFAULT, calling_ae_title="X", instance_count=400).reason
    assert "30 slices" in select_series(series(10), DEFAULT, calling_ae_title="X", instance_count=30).reason
