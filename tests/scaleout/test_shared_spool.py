"""Worker hosts that mount the shared spool at their own path, as NFS clients do.

The receiver writes received instances under its spool path and records paths relative to it;
each worker host reaches the same files through a bind mount at a different path (``storage.root``
in its own config), writes its reports there, and the receiver's dispatcher sends them from its own
path. Needs bind mounts (root with CAP_SYS_ADMIN); skipped where the kernel refuses them.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from sqlalchemy import select

from pacs_agent.db.models import Event, Instance, Output
from phantoms import PhantomTruth
from tests.faults.node import wait_until
from tests.scaleout.cluster import Cluster, send_series
from tests.support.pacs_scp import PacsSCP

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

SERIES = 4


@contextmanager
def bind_mount(source: Path, target: Path) -> Iterator[Path]:
    """``source`` also visible at ``target`` (a second path to the same files, not a symlink)."""
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"bind mounts are not allowed here: {result.stderr.strip() or result.returncode}")
    try:
        yield target
    finally:
        if subprocess.run(["umount", str(target)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


def test_worker_hosts_reach_the_spool_at_their_own_mount_points(
    postgres_url: str, make_cluster: Callable[..., Cluster], pacs: PacsSCP, phantom_series: list[PhantomTruth], tmp_path: Path
) -> None:
    cluster = make_cluster(postgres_url, workers=2)
    cluster.upgrade()
    receiver = cluster.start_receiver()
    assert cluster.spool.is_dir()
    with ExitStack() as mounts:
        spools = [mounts.enter_context(bind_mount(cluster.spool, tmp_path / "mnt" / f"host-{i}" / "pe-spool")) for i in (1, 2)]
        assert len({p.resolve() for p in [cluster.spool, *spools]}) == 3  # three different paths, one folder
        try:
            hosts = cluster.start_workers(spools=spools)
            send_series(receiver.port, [truth.files for truth in phantom_series[:SERIES]])
            wait_until(lambda: cluster.all_done(SERIES), timeout=90, what=f"all series analysed and delivered:\n{cluster.logs()}")
            finished_by = Counter(str(e.detail["owner"]) for e in _succeeded(cluster))
        finally:
            cluster.stop()  # the workers let go of the mounts before they are taken down

    assert sum(finished_by.values()) == SERIES and set(finished_by) <= {h.owner for h in hosts}
    with cluster.sessions()() as session:
        instance_paths = list(session.scalars(select(Instance.path)))
        outputs = list(session.scalars(select(Output)))
        session.expunge_all()
    # Stored paths are relative to the spool root, so they mean the same file on every host.
    for relative in [*instance_paths, *(o.path for o in outputs)]:
        assert not Path(relative).is_absolute() and ".." not in Path(relative).parts
        assert (cluster.spool / relative).is_file()
    assert len(instance_paths) == sum(len(t.files) for t in phantom_series[:SERIES])
    # The reports each worker wrote through its mount were sent by the receiver from its own path, once.
    assert sorted(pacs.received_uids) == sorted(o.sop_instance_uid for o in outputs)
    assert {o.path.split("/")[0] for o in outputs} == {"outbox"}


def _succeeded(cluster: Cluster) -> list[Event]:
    with cluster.sessions()() as session:
        rows = list(session.scalars(select(Event).where(Event.kind == "job_succeeded")))
        session.expunge_all()
        return rows
