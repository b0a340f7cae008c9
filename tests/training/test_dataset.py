"""The RSNA-layout reader: validation, missing/unreadable files, inconsistent rows, split and k-fold."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from pe_model.labels import EXAM_LABELS
from training.dataset import (
    CSV_COLUMNS,
    exam_label_violations,
    patient_group,
    patient_kfold,
    read_patient_groups,
    read_rsna_dataset,
    seed_split,
    split_sizes,
)
from training.errors import DatasetError
from training.synthetic import PhantomRecord


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _write_rows(path: Path, rows: list[dict[str, str]], columns: tuple[str, ...] = CSV_COLUMNS) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture()
def mini(small_dataset: tuple[Path, list[PhantomRecord]], tmp_path: Path) -> tuple[Path, list[PhantomRecord]]:
    root, records = small_dataset
    copy = tmp_path / "rsna"
    shutil.copytree(root, copy)
    return copy, records


def test_reads_every_exam_of_a_clean_dataset(mini: tuple[Path, list[PhantomRecord]]) -> None:
    root, records = mini
    dataset = read_rsna_dataset(root, check_readable=True)
    assert dataset.problems == ()
    assert len(dataset.series) == len(records)
    by_key = dataset.by_key()
    for record in records:
        series = by_key[f"{record.study_instance_uid}_{record.series_instance_uid}"]
        assert series.pe_present == record.pe
        assert {k: bool(v) for k, v in series.exam_labels.items()} == dict(record.exam_labels)
        assert all(path.is_file() for path in series.files)
        assert exam_label_violations(series.pe_present, series.exam_labels) == []


def test_missing_file_and_inconsistent_rows_are_reported_and_skipped(mini: tuple[Path, list[PhantomRecord]]) -> None:
    root, records = mini
    csv_path = root / "train.csv"
    rows = _rows(csv_path)
    keys = list(dict.fromkeys((r["StudyInstanceUID"], r["SeriesInstanceUID"]) for r in rows))
    missing_exam, conflicting_exam, inconsistent_exam = keys[0], keys[1], keys[2]
    # 1. A missing file: the image is dropped, its exam kept.
    missing_row = next(r for r in rows if (r["StudyInstanceUID"], r["SeriesInstanceUID"]) == missing_exam)
    missing_sop = missing_row["SOPInstanceUID"]
    (root / "train" / missing_exam[0] / missing_exam[1] / f"{missing_sop}.dcm").unlink()
    # 2. One row whose exam labels differ from the rest of its exam: the exam is dropped.
    conflicting_rows = [r for r in rows if (r["StudyInstanceUID"], r["SeriesInstanceUID"]) == conflicting_exam]
    conflicting_rows[3]["rv_lv_ratio_gte_1"] = str(1 - int(conflicting_rows[3]["rv_lv_ratio_gte_1"]))
    # 3. An exam whose labels break the consistency rules on every row: dropped.
    for r in rows:
        if (r["StudyInstanceUID"], r["SeriesInstanceUID"]) == inconsistent_exam:
            r["negative_exam_for_pe"] = "1"
            r["indeterminate"] = "1"
    _write_rows(csv_path, rows)

    dataset = read_rsna_dataset(root)

    kinds = {(p.kind, p.study_instance_uid) for p in dataset.problems}
    assert ("missing-file", missing_exam[0]) in kinds
    assert ("conflicting-exam-labels", conflicting_exam[0]) in kinds
    assert ("inconsistent-labels", inconsistent_exam[0]) in kinds
    assert len(dataset.problems) == 3
    by_key = dataset.by_key()
    assert len(dataset.series) == len(records) - 2
    kept = by_key[f"{missing_exam[0]}_{missing_exam[1]}"]
    assert missing_sop not in kept.sop_instance_uids
    assert len(kept.sop_instance_uids) == len(kept.files) == len(kept.image_labels)
    assert f"{conflicting_exam[0]}_{conflicting_exam[1]}" not in by_key
    assert f"{inconsistent_exam[0]}_{inconsistent_exam[1]}" not in by_key


def test_unreadable_file_is_reported_with_check_readable(mini: tuple[Path, list[PhantomRecord]]) -> None:
    root, _ = mini
    victim = sorted((root / "train").rglob("*.dcm"))[5]
    victim.write_bytes(b"not a dicom file at all")
    dataset = read_rsna_dataset(root, check_readable=True)
    assert [(p.kind, p.sop_instance_uid) for p in dataset.problems] == [("unreadable-file", victim.stem)]
    assert all(victim.stem not in s.sop_instance_uids for s in dataset.series)


def test_bad_values_and_missing_columns(mini: tuple[Path, list[PhantomRecord]]) -> None:
    root, records = mini
    csv_path = root / "train.csv"
    rows = _rows(csv_path)
    rows[0]["central_pe"] = "yes"
    _write_rows(csv_path, rows)
    dataset = read_rsna_dataset(root)
    assert [p.kind for p in dataset.problems] == ["bad-value"]
    assert len(dataset.series) == len(records) - 1

    _write_rows(csv_path, rows, columns=tuple(c for c in CSV_COLUMNS if c != "qa_motion"))
    with pytest.raises(DatasetError, match="qa_motion"):
        read_rsna_dataset(root)
    with pytest.raises(DatasetError, match="no train.csv"):
        read_rsna_dataset(root / "train")


def test_label_rules() -> None:
    negative = {name: 0 for name in EXAM_LABELS} | {"negative_exam_for_pe": 1}
    assert exam_label_violations(False, negative) == []
    assert exam_label_violations(True, negative)  # a positive exam cannot be negative_exam_for_pe
    positive = {name: 0 for name in EXAM_LABELS} | {"rv_lv_ratio_lt_1": 1, "leftsided_pe": 1}
    assert exam_label_violations(True, positive) == []
    both_chronic = positive | {"chronic_pe": 1, "acute_and_chronic_pe": 1}
    assert len(exam_label_violations(True, both_chronic)) == 1
    no_side = positive | {"leftsided_pe": 0}
    assert len(exam_label_violations(True, no_side)) == 1
    assert len(exam_label_violations(False, negative | {"central_pe": 1})) == 1


def test_seed_split_sizes_and_determinism() -> None:
    keys = [f"1.2.{i}_1.3.{i}" for i in range(7279)]
    split = seed_split(reversed(keys))
    assert (len(split.test), len(split.validation), len(split.train)) == (1000, 1000, 5279)
    assert set(split.test) | set(split.validation) | set(split.train) == set(keys)
    assert not set(split.test) & set(split.validation)
    # The seed notebook: sorted unique keys, np.random.seed(100), np.random.shuffle.
    order = sorted(keys)
    np.random.seed(100)
    np.random.shuffle(order)
    assert list(split.test) == order[:1000] and list(split.validation) == order[1000:2000]
    assert seed_split(keys) == split
    assert seed_split(keys, seed=7).test != split.test


def test_split_is_proportional_on_small_data() -> None:
    assert split_sizes(7279) == (1000, 1000)
    assert split_sizes(728) == (100, 100)
    assert split_sizes(8) == (1, 1)
    assert split_sizes(2) == (0, 0)
    split = seed_split([f"k{i}" for i in range(150)])
    assert (len(split.test), len(split.validation), len(split.train)) == (21, 21, 108)


def test_patient_grouped_kfold(mini: tuple[Path, list[PhantomRecord]]) -> None:
    root, _ = mini
    dataset = read_rsna_dataset(root)
    groups = read_patient_groups(dataset)
    assert set(groups) == {s.key for s in dataset.series}
    assert all(len(g) == 16 and "PHANTOM" not in g and "SYN" not in g for g in groups.values())
    # Two exams of one patient must land in the same fold.
    keys = sorted(groups)
    groups[keys[1]] = groups[keys[0]]
    folds = patient_kfold(groups, 3)
    assert len(folds) == 3
    assert sorted(k for f in folds for k in f.validation) == keys
    for fold in folds:
        assert not set(fold.train) & set(fold.validation)
        assert (keys[0] in fold.validation) == (keys[1] in fold.validation)
    assert patient_kfold(groups, 3) == folds
    assert patient_group("A") == patient_group("A") != patient_group("B")
    with pytest.raises(DatasetError):
        patient_kfold(groups, 20)
