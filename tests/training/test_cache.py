"""The preprocessing cache: round trip against pe_model's preprocessing, labels through resampling, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pe_model.preprocessing import PreprocessConfig, preprocess
from pe_model.volume import load_series
from training.cache import SeriesCache, build_cache
from training.dataset import read_rsna_dataset
from training.errors import CacheError
from training.synthetic import PhantomRecord

CONFIG = PreprocessConfig(input_size=40)


def test_round_trip_matches_the_inference_preprocessing(small_dataset: tuple[Path, list[PhantomRecord]],
                                                        tmp_path: Path) -> None:
    root, records = small_dataset
    dataset = read_rsna_dataset(root)
    summary = build_cache(dataset.series[:3], tmp_path / "cache", CONFIG, workers=1, progress=False)
    assert (summary.built, summary.failed, summary.skipped_existing) == (3, 0, 0)

    cache = SeriesCache(tmp_path / "cache")
    assert cache.preprocess == CONFIG.to_dict()
    for series in dataset.series[:3]:
        chunks = cache.chunks(series.key)
        assert isinstance(chunks, np.memmap) and chunks.dtype == np.uint8
        # One code path: exactly what pe_model's preprocessing gives the Predictor.
        expected = preprocess(load_series(series.files), CONFIG)
        assert chunks.shape == tuple(expected.chunks.shape)
        assert np.array_equal(np.asarray(chunks), expected.chunks.numpy())
        labels = cache.labels(series.key)
        entry = cache.entries[series.key]
        assert entry.num_chunks == chunks.shape[0] == len(labels["chunk_labels"])
        assert len(labels["slice_labels"]) == entry.num_slices == expected.num_slices
        # Slice labels follow the slices: each resampled slice carries its nearest source image's label.
        meta = cache.meta(series.key)
        label_of = dict(zip(series.sop_instance_uids, series.image_labels, strict=True))
        sops = meta["sop_instance_uids"]
        assert [bool(v) for v in labels["slice_labels"]] == [label_of[sops[i]] for i in labels["source_slice_index"]]
        assert bool(labels["chunk_labels"].any()) == series.pe_present
        assert len(labels["sop_chunk_index"]) == len(sops)
        assert labels["sop_chunk_index"].max() < entry.num_chunks
        # A positive source image maps to a positive chunk.
        for sop, chunk in zip(sops, labels["sop_chunk_index"], strict=True):
            if label_of[sop]:
                assert labels["chunk_labels"][chunk] == 1


def test_training_size_chunks_come_from_the_same_crop(small_dataset: tuple[Path, list[PhantomRecord]],
                                                     tmp_path: Path) -> None:
    root, _ = small_dataset
    series = read_rsna_dataset(root).series[0]
    config = PreprocessConfig(input_size=32)
    build_cache([series], tmp_path / "cache", config, train_size=40, workers=1, progress=False)
    cache = SeriesCache(tmp_path / "cache")
    assert (cache.input_size, cache.train_size) == (32, 40)
    volume = load_series(series.files)
    # Evaluation reads the Predictor's exact input; training crops come from the 40 px rendering.
    assert np.array_equal(np.asarray(cache.chunks(series.key)), preprocess(volume, config).chunks.numpy())
    assert np.array_equal(np.asarray(cache.train_chunks(series.key)),
                          preprocess(volume, PreprocessConfig(input_size=40)).chunks.numpy())
    with pytest.raises(CacheError, match="another preprocessing"):
        build_cache([series], tmp_path / "cache", config, train_size=48, workers=1, progress=False)


def test_resume_rebuilds_only_what_is_missing(small_dataset: tuple[Path, list[PhantomRecord]], tmp_path: Path) -> None:
    root, _ = small_dataset
    dataset = read_rsna_dataset(root)
    cache_dir = tmp_path / "cache"
    build_cache(dataset.series[:2], cache_dir, CONFIG, progress=False)
    before = (cache_dir / dataset.series[0].study_instance_uid / dataset.series[0].series_instance_uid
              / "chunks.npy").stat().st_mtime_ns
    # An interrupted run: the second series' folder vanished, a third was never started.
    shutil.rmtree(cache_dir / dataset.series[1].study_instance_uid)
    summary = build_cache(dataset.series[:3], cache_dir, CONFIG, progress=False)
    assert (summary.built, summary.skipped_existing) == (2, 1)
    after = (cache_dir / dataset.series[0].study_instance_uid / dataset.series[0].series_instance_uid
             / "chunks.npy").stat().st_mtime_ns
    assert before == after
    assert len(SeriesCache(cache_dir).entries) == 3
    with pytest.raises(CacheError, match="another preprocessing configuration"):
        build_cache(dataset.series[:3], cache_dir, PreprocessConfig(input_size=48), progress=False)


def test_unreadable_files_are_reported_and_broken_series_recorded(
        small_dataset: tuple[Path, list[PhantomRecord]], tmp_path: Path) -> None:
    root, _ = small_dataset
    copy = tmp_path / "rsna"
    shutil.copytree(root, copy)
    dataset = read_rsna_dataset(copy)
    damaged, broken = dataset.series[0], dataset.series[1]
    damaged.files[7].write_bytes(b"garbage")
    for path in broken.files:
        path.write_bytes(b"garbage")
    summary = build_cache(dataset.series[:3], tmp_path / "cache", CONFIG, progress=False)
    assert (summary.built, summary.failed) == (2, 1)
    assert summary.unreadable_files == 1 + len(broken.files)
    cache = SeriesCache(tmp_path / "cache")
    assert damaged.key in cache.entries and broken.key in cache.failures
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert {p["sop_instance_uid"] for p in manifest["problems"] if p["key"] == damaged.key} == {
        damaged.sop_instance_uids[7]}
    # Failed series are not retried unless asked.
    again = build_cache(dataset.series[:3], tmp_path / "cache", CONFIG, progress=False)
    assert (again.built, again.skipped_existing) == (0, 3)


def test_parallel_build(small_dataset: tuple[Path, list[PhantomRecord]], tmp_path: Path) -> None:
    root, _ = small_dataset
    dataset = read_rsna_dataset(root)
    summary = build_cache(dataset.series[:4], tmp_path / "cache", CONFIG, workers=2, progress=False)
    assert summary.built == 4
    serial = tmp_path / "serial"
    build_cache(dataset.series[:1], serial, CONFIG, progress=False)
    key = dataset.series[0].key
    assert np.array_equal(np.asarray(SeriesCache(tmp_path / "cache").chunks(key)),
                          np.asarray(SeriesCache(serial).chunks(key)))


def test_not_a_cache(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="not a preprocessing cache"):
        SeriesCache(tmp_path)
