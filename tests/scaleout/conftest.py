"""Fixtures for scale-out tests: a PostgreSQL server, a database URL per backend, phantoms, a stand-in PACS."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from phantoms import PhantomSpec, PhantomTruth, write_phantom_series
from tests.scaleout.cluster import PHANTOM_SIZE, PHANTOM_SLICES, SERIES_COUNT, Cluster
from tests.support.pacs_scp import PacsSCP
from tests.support.postgres import fresh_database



@pytest.fixture(scope="session")
def phantom_series(tmp_path_factory: pytest.TempPathFactory) -> list[PhantomTruth]:
    """SERIES_COUNT CTPA phantoms, each in its own study (seeds differ: UIDs differ), PE and no PE mixed."""
    root = tmp_path_factory.mktemp("scaleout_phantoms")
    return [
        write_phantom_series(
            root / f"series-{i:02d}",
            PhantomSpec(pe=i % 2 == 0, n_slices=PHANTOM_SLICES, rows=PHANTOM_SIZE, columns=PHANTOM_SIZE, seed=100 + i,
                        patient_id=f"SCALEOUT-{i:04d}", patient_name=f"PHANTOM^SCALEOUT{i}"),
        )
        for i in range(SERIES_COUNT)
    ]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each backend: a SQLite file (one machine) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'agent.sqlite'}"
    return fresh_database(request.getfixturevalue("postgres_server"), request.node.name, prefix="s_")


@pytest.fixture
def pacs() -> Iterator[PacsSCP]:
    """A pynetdicom storage SCP standing in for PACS."""
    scp = PacsSCP(ae_title="PACS")
    scp.start()
    try:
        yield scp
    finally:
        scp.stop()


@pytest.fixture
def make_cluster(tmp_path: Path, tiny_checkpoint: Path, pacs: PacsSCP) -> Iterator[Callable[..., Cluster]]:
    """``make_cluster(database_url, workers=3, **fields) -> Cluster`` (not started); stopped at the end."""
    clusters: list[Cluster] = []

    def make(database_url: str, **fields: Any) -> Cluster:
        cluster = Cluster(root=tmp_path / f"cluster-{len(clusters)}", database_url=database_url, checkpoint=tiny_checkpoint,
                          destination_port=pacs.port, **fields)
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        cluster.stop()
