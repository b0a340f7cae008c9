"""Fixtures of the training tests: small phantom datasets in the exact RSNA-STR layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.synthetic import PhantomRecord, demo_specs, write_synthetic_dataset

#: Small but real phantoms: 64 x 64 pixels at 5.2 mm, 48 slices at 6 mm (about 290 mm of chest).
SMALL_PHANTOM = {"rows": 64, "columns": 64, "pixel_spacing_mm": 5.2, "n_slices": 48, "slice_spacing_mm": 6.0}


def write_small_dataset(root: Path, count: int, seed: int) -> list[PhantomRecord]:
    return write_synthetic_dataset(root, demo_specs(count, seed=seed, **SMALL_PHANTOM), workers=1, progress=False)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[PhantomRecord]]:
    """8 phantom series in the RSNA layout (shared, read-only: copy before changing it)."""
    root = tmp_path_factory.mktemp("rsna-small")
    return root, write_small_dataset(root, 8, seed=11)
