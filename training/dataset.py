"""The RSNA-STR PE dataset as laid out on disk: ``train.csv`` + ``train/<Study>/<Series>/<SOP>.dcm``.

The reader validates the CSV (columns, 0/1 values, exam labels repeated identically on every image
row, label consistency per docs/METHOD.md), checks that every listed file exists, and carries on without
what it cannot use, reporting each problem. The same code reads the 7,279 real studies and the small
phantom datasets the tests and the demo write in the exact same layout.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import pydicom
import structlog

from pe_model.labels import EXAM_LABELS, IMAGE_LABEL
from training.errors import DatasetError

log = structlog.get_logger(__name__)

#: Exam columns that are informational only (not scored, not predicted).
INFORMATIONAL_COLUMNS: Final[tuple[str, ...]] = (
    "qa_motion",
    "qa_contrast",
    "flow_artifact",
    "true_filling_defect_not_pe",
)

#: The 17 columns of ``train.csv``, in the order Kaggle ships them.
CSV_COLUMNS: Final[tuple[str, ...]] = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "pe_present_on_image",
    "negative_exam_for_pe",
    "qa_motion",
    "qa_contrast",
    "flow_artifact",
    "rv_lv_ratio_gte_1",
    "rv_lv_ratio_lt_1",
    "leftsided_pe",
    "chronic_pe",
    "true_filling_defect_not_pe",
    "rightsided_pe",
    "acute_and_chronic_pe",
    "central_pe",
    "indeterminate",
)

_EXAM_COLUMNS: Final[tuple[str, ...]] = EXAM_LABELS + INFORMATIONAL_COLUMNS

#: Size of the seed's split on the full dataset (test, validation) and the dataset size it was made for.
SEED_SPLIT_TEST: Final[int] = 1000
SEED_SPLIT_VALIDATION: Final[int] = 1000
SEED_SPLIT_TOTAL: Final[int] = 7279
SEED_SPLIT_SEED: Final[int] = 100


@dataclass(frozen=True)
class DatasetProblem:
    """One thing the reader could not use, and what it did about it."""

    kind: str  # "missing-file" | "unreadable-file" | "bad-value" | "conflicting-exam-labels" | "inconsistent-labels" | "duplicate-image" | "no-images"
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str | None
    message: str

    def to_json_dict(self) -> dict[str, str | None]:
        return {
            "kind": self.kind,
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "sop_instance_uid": self.sop_instance_uid,
            "message": self.message,
        }


@dataclass(frozen=True)
class SeriesRecord:
    """One exam (one CTPA series) with its labels and the files that exist on disk."""

    study_instance_uid: str
    series_instance_uid: str
    #: SOP Instance UIDs in CSV order, only those whose file exists.
    sop_instance_uids: tuple[str, ...]
    #: pe_present_on_image of each of the above.
    image_labels: tuple[bool, ...]
    #: The nine scored exam labels (pe_model.labels.EXAM_LABELS) as 0/1.
    exam_labels: Mapping[str, int]
    #: qa_motion, qa_contrast, flow_artifact, true_filling_defect_not_pe as 0/1.
    informational: Mapping[str, int]
    files: tuple[Path, ...]

    @property
    def key(self) -> str:
        """The seed's identifier of an exam: ``<StudyInstanceUID>_<SeriesInstanceUID>``."""
        return f"{self.study_instance_uid}_{self.series_instance_uid}"

    @property
    def pe_present(self) -> bool:
        return any(self.image_labels)

    def exam_label_vector(self) -> np.ndarray:
        """(9,) float32 in EXAM_LABELS order."""
        return np.array([self.exam_labels[name] for name in EXAM_LABELS], dtype=np.float32)


@dataclass(frozen=True)
class RSNADataset:
    """The usable exams of a dataset directory, plus every problem found while reading it."""

    root: Path
    series: tuple[SeriesRecord, ...]
    problems: tuple[DatasetProblem, ...] = field(default=())
    #: Every ``<Study>_<Series>`` key the CSV lists, usable or not: the seed's split is computed
    #: on this list, so dropping an exam moves no other exam between parts.
    listed_keys: tuple[str, ...] = field(default=())

    def by_key(self) -> dict[str, SeriesRecord]:
        return {record.key: record for record in self.series}

    @property
    def num_images(self) -> int:
        return sum(len(record.sop_instance_uids) for record in self.series)


def exam_label_violations(pe_present: bool, exam_labels: Mapping[str, int]) -> list[str]:
    """Which consistency rules (docs/METHOD.md) the ground-truth labels of one exam break (empty when none)."""
    lab = {name: int(exam_labels[name]) for name in EXAM_LABELS}
    broken: list[str] = []
    if pe_present:
        if lab["rv_lv_ratio_gte_1"] + lab["rv_lv_ratio_lt_1"] != 1:
            broken.append("positive exam needs exactly one of rv_lv_ratio_gte_1 / rv_lv_ratio_lt_1")
        if lab["central_pe"] + lab["leftsided_pe"] + lab["rightsided_pe"] < 1:
            broken.append("positive exam needs at least one of central / left / right")
        if lab["chronic_pe"] and lab["acute_and_chronic_pe"]:
            broken.append("chronic_pe and acute_and_chronic_pe cannot both be set")
        if lab["negative_exam_for_pe"] or lab["indeterminate"]:
            broken.append("positive exam cannot be negative_exam_for_pe or indeterminate")
    else:
        if lab["negative_exam_for_pe"] + lab["indeterminate"] != 1:
            broken.append("negative exam needs exactly one of negative_exam_for_pe / indeterminate")
        positive_only = (
            "rv_lv_ratio_gte_1",
            "rv_lv_ratio_lt_1",
            "central_pe",
            "leftsided_pe",
            "rightsided_pe",
            "chronic_pe",
            "acute_and_chronic_pe",
        )
        if any(lab[name] for name in positive_only):
            broken.append("negative exam cannot carry PE findings (RV/LV, location, chronicity)")
    return broken


def _parse_flag(value: str) -> int | None:
    text = value.strip()
    if text in ("0", "1"):
        return int(text)
    if text in ("0.0", "1.0"):
        return int(float(text))
    return None


@dataclass
class _ExamRows:
    sop_instance_uids: list[str] = field(default_factory=list)
    image_labels: list[bool] = field(default_factory=list)
    exam_values: dict[str, int] | None = None
    rejected: bool = False


def read_rsna_dataset(
    data_dir: str | Path,
    *,
    csv_name: str = "train.csv",
    image_dir: str = "train",
    check_files: bool = True,
    check_readable: bool = False,
    drop_inconsistent: bool = True,
) -> RSNADataset:
    """Read and validate an RSNA-layout dataset.

    ``check_readable`` also parses every file header (slow on the real 1.79 M files; the cache
    step reports unreadable files anyway). Missing/unreadable images are dropped from their
    exam; exams whose labels conflict or break the consistency rules are dropped when
    ``drop_inconsistent``. Raises DatasetError only when nothing usable is left or the CSV
    itself is not the RSNA format.
    """
    root = Path(data_dir)
    csv_path = root / csv_name
    if not csv_path.is_file():
        raise DatasetError(f"no {csv_name} in {root}: not an RSNA-STR dataset directory")
    problems: list[DatasetProblem] = []
    exams: dict[tuple[str, str], _ExamRows] = {}
    seen_sops: set[str] = set()
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = tuple(reader.fieldnames or ())
        missing_columns = [name for name in CSV_COLUMNS if name not in header]
        if missing_columns:
            raise DatasetError(
                f"{csv_path} lacks the column(s) {', '.join(missing_columns)} of the RSNA train.csv"
            )
        for line_number, row in enumerate(reader, start=2):
            study = (row["StudyInstanceUID"] or "").strip()
            series = (row["SeriesInstanceUID"] or "").strip()
            sop = (row["SOPInstanceUID"] or "").strip()
            if not study or not series or not sop:
                problems.append(
                    DatasetProblem("bad-value", study, series, sop or None,
                                   f"line {line_number}: empty UID; row skipped")
                )
                continue
            exam = exams.setdefault((study, series), _ExamRows())
            if exam.rejected:
                continue
            values: dict[str, int] = {}
            bad = None
            for name in (IMAGE_LABEL, *_EXAM_COLUMNS):
                flag = _parse_flag(row[name] or "")
                if flag is None:
                    bad = name
                    break
                values[name] = flag
            if bad is not None:
                exam.rejected = True
                problems.append(
                    DatasetProblem("bad-value", study, series, sop,
                                   f"line {line_number}: {bad}={row[bad]!r} is not 0 or 1; exam dropped")
                )
                continue
            exam_values = {name: values[name] for name in _EXAM_COLUMNS}
            if exam.exam_values is None:
                exam.exam_values = exam_values
            elif exam.exam_values != exam_values:
                exam.rejected = True
                differing = sorted(n for n in _EXAM_COLUMNS if exam.exam_values[n] != exam_values[n])
                problems.append(
                    DatasetProblem(
                        "conflicting-exam-labels", study, series, sop,
                        f"line {line_number}: exam label(s) {', '.join(differing)} differ from the "
                        "exam's other rows; exam dropped",
                    )
                )
                continue
            if sop in seen_sops:
                problems.append(
                    DatasetProblem("duplicate-image", study, series, sop,
                                   f"line {line_number}: SOPInstanceUID listed twice; later row ignored")
                )
                continue
            seen_sops.add(sop)
            exam.sop_instance_uids.append(sop)
            exam.image_labels.append(bool(values[IMAGE_LABEL]))

    records: list[SeriesRecord] = []
    image_root = root / image_dir
    for (study, series), exam in exams.items():
        if exam.rejected or exam.exam_values is None:
            continue
        exam_labels = {name: exam.exam_values[name] for name in EXAM_LABELS}
        broken = exam_label_violations(any(exam.image_labels), exam_labels)
        if broken and drop_inconsistent:
            problems.append(
                DatasetProblem("inconsistent-labels", study, series, None,
                               f"labels break the consistency rules ({'; '.join(broken)}); exam dropped")
            )
            continue
        sops: list[str] = []
        labels: list[bool] = []
        files: list[Path] = []
        for sop, label in zip(exam.sop_instance_uids, exam.image_labels, strict=True):
            path = image_root / study / series / f"{sop}.dcm"
            if check_files and not path.is_file():
                problems.append(
                    DatasetProblem("missing-file", study, series, sop,
                                   f"{path.relative_to(root)} is missing; image skipped")
                )
                continue
            if check_readable:
                reason = _unreadable_reason(path)
                if reason is not None:
                    problems.append(
                        DatasetProblem("unreadable-file", study, series, sop,
                                       f"{path.relative_to(root)} cannot be read ({reason}); image skipped")
                    )
                    continue
            sops.append(sop)
            labels.append(label)
            files.append(path)
        if not sops:
            problems.append(
                DatasetProblem("no-images", study, series, None, "no usable image file; exam dropped")
            )
            continue
        records.append(
            SeriesRecord(
                study_instance_uid=study,
                series_instance_uid=series,
                sop_instance_uids=tuple(sops),
                image_labels=tuple(labels),
                exam_labels=exam_labels,
                informational={name: exam.exam_values[name] for name in INFORMATIONAL_COLUMNS},
                files=tuple(files),
            )
        )
    for problem in problems:
        log.warning("dataset.problem", kind=problem.kind, study_instance_uid=problem.study_instance_uid,
                    series_instance_uid=problem.series_instance_uid,
                    sop_instance_uid=problem.sop_instance_uid, detail=problem.message)
    if not records:
        raise DatasetError(f"{root} holds no usable exam ({len(problems)} problem(s) found)")
    log.info("dataset.read", root=str(root), exams=len(records),
             images=sum(len(r.sop_instance_uids) for r in records), problems=len(problems))
    listed = tuple(f"{study}_{series}" for study, series in exams)
    return RSNADataset(root=root, series=tuple(records), problems=tuple(problems), listed_keys=listed)


def _unreadable_reason(path: Path) -> str | None:
    try:
        pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types for a damaged file
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return None


@dataclass(frozen=True)
class Split:
    """Exam keys (``<Study>_<Series>``) of each part."""

    train: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]

    def to_json_dict(self) -> dict[str, list[str]]:
        return {"train": list(self.train), "validation": list(self.validation), "test": list(self.test)}

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Sequence[str]]) -> Split:
        return cls(tuple(data["train"]), tuple(data["validation"]), tuple(data["test"]))


def split_sizes(total: int, *, n_test: int = SEED_SPLIT_TEST, n_validation: int = SEED_SPLIT_VALIDATION,
                reference_total: int = SEED_SPLIT_TOTAL) -> tuple[int, int]:
    """(test, validation) sizes: the seed's 1,000 / 1,000, scaled down proportionally on smaller data.

    A smaller dataset keeps the seed's fractions (1000/7279 each), at least one exam in each
    part when there are three or more exams, and always at least one training exam.
    """
    if total >= reference_total:
        return n_test, n_validation
    test = round(total * n_test / reference_total)
    validation = round(total * n_validation / reference_total)
    if total >= 3:
        test, validation = max(test, 1), max(validation, 1)
    while test + validation >= total and (test or validation):
        if validation >= test and validation:
            validation -= 1
        else:
            test -= 1
    return test, validation


def seed_split(keys: Iterable[str], *, seed: int = SEED_SPLIT_SEED, n_test: int | None = None,
               n_validation: int | None = None) -> Split:
    """The seed's split: unique keys sorted, shuffled with ``np.random.seed(seed)``; test first, then validation.

    Bit-for-bit the seed's ``data_splits.ipynb`` (legacy RandomState shuffle of the sorted list of
    every ``<Study>_<Series>`` in train.csv), so the same 1,000 test exams come out on the real
    data. Give it the full CSV list (``RSNADataset.listed_keys``), not the usable exams, and drop
    unusable exams afterwards (:func:`usable_split`).
    """
    unique = sorted(set(keys))
    default_test, default_validation = split_sizes(len(unique))
    n_test = default_test if n_test is None else n_test
    n_validation = default_validation if n_validation is None else n_validation
    if n_test + n_validation >= len(unique):
        raise DatasetError(
            f"cannot split {len(unique)} exams into {n_test} test + {n_validation} validation + training"
        )
    order = list(unique)
    np.random.RandomState(seed).shuffle(order)
    return Split(
        train=tuple(order[n_test + n_validation:]),
        validation=tuple(order[n_test:n_test + n_validation]),
        test=tuple(order[:n_test]),
    )


def usable_split(split: Split, usable: Iterable[str]) -> Split:
    """``split`` without the exams that are not in ``usable``; every other exam keeps its part."""
    keep = set(usable)
    return Split(train=tuple(k for k in split.train if k in keep),
                 validation=tuple(k for k in split.validation if k in keep),
                 test=tuple(k for k in split.test if k in keep))


def patient_group(patient_id: str, *, salt: str = "pe-triage") -> str:
    """A one-way hash of a PatientID: groups exams of one patient without keeping the identifier."""
    return hashlib.sha256(f"{salt}:{patient_id}".encode()).hexdigest()[:16]


def read_patient_groups(dataset: RSNADataset) -> dict[str, str]:
    """Exam key -> hashed PatientID, read from the first readable file header of each exam.

    The PatientID never leaves this function; exams without a readable PatientID form their own group.
    """
    groups: dict[str, str] = {}
    for record in dataset.series:
        patient_id: str | None = None
        for path in record.files:
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
            except Exception:  # a damaged file: try the next one of the exam
                continue
            value = str(header.get("PatientID", "") or "")
            if value:
                patient_id = value
                break
        groups[record.key] = patient_group(patient_id) if patient_id else patient_group(f"exam:{record.key}")
    return groups


@dataclass(frozen=True)
class Fold:
    """One fold of a patient-grouped k-fold: no patient is in both parts."""

    index: int
    train: tuple[str, ...]
    validation: tuple[str, ...]


def patient_kfold(groups: Mapping[str, str], k: int = 5, *, seed: int = SEED_SPLIT_SEED) -> list[Fold]:
    """K folds over exam keys, grouped by (hashed) patient and balanced by exam count.

    Patients are shuffled with ``seed`` and assigned, largest first, to the currently smallest fold.
    """
    if k < 2:
        raise DatasetError(f"k-fold needs k >= 2, got {k}")
    by_patient: dict[str, list[str]] = {}
    for key in sorted(groups):
        by_patient.setdefault(groups[key], []).append(key)
    if len(by_patient) < k:
        raise DatasetError(f"cannot make {k} patient-grouped folds from {len(by_patient)} patients")
    patients = sorted(by_patient)
    np.random.RandomState(seed).shuffle(patients)
    patients.sort(key=lambda p: -len(by_patient[p]))  # stable: shuffled order breaks ties
    folds: list[list[str]] = [[] for _ in range(k)]
    for patient in patients:
        smallest = min(range(k), key=lambda i: (len(folds[i]), i))
        folds[smallest].extend(by_patient[patient])
    all_keys = sorted(groups)
    result = []
    for index, held_out in enumerate(folds):
        held = set(held_out)
        result.append(
            Fold(index=index, train=tuple(k_ for k_ in all_keys if k_ not in held),
                 validation=tuple(sorted(held_out)))
        )
    return result
