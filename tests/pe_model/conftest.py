"""Shared fixtures of the pe_model tests: a tiny random checkpoint and a small phantom series."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from phantoms import PhantomSpec, PhantomTruth, write_phantom_series
from pe_model.preprocessing import PreprocessConfig

#: Tiny model: R3D-18 at width 4 (32-d features), TCN hidden 16, input 32 x 32.
TINY_WIDTH = 4
TINY_PREPROCESS = PreprocessConfig(input_size=32)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (thread hand-offs dominate, many times over on a
    busy 2-core machine); the previous count is restored after the module. Opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def phantom_series(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PhantomTruth]:
    """48 axial slices of 64 x 64 (2.6 mm pixels, 2.5 mm apart) with a central clot."""
    directory = tmp_path_factory.mktemp("phantom") / "series"
    truth = write_phantom_series(
        directory, PhantomSpec(n_slices=48, rows=64, columns=64, locations=("central", "left"))
    )
    return directory, truth
