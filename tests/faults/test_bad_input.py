"""The bad-input corpus (tests/faults/corpus.py) against ONE running node: `pe-agent serve` as a subprocess.

For each case: every instance gets a defined DICOM status, and each series it creates ends with a
recorded reason (IGNORED with ignore_reason, FAILED with the job's error) or is analysed; refused
instances leave an event with the reason. After the whole corpus the node is still up, nothing was
written outside its spool, and a good series sent last is still analysed and reported.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from phantoms import PhantomSpec, write_phantom_series
from tests.faults.corpus import ABSENT, ANALYSED, CASES, FAILED, IGNORED, TRAVERSAL_TARGET, Case, Sent
from tests.faults.node import Node, c_echo, node_config, send, wait_until
from pacs_agent.demo.pacs import free_port
from tests.support.pacs_scp import PacsSCP

pytestmark = pytest.mark.slow

FINAL = (ANALYSED, IGNORED, FAILED)
UID_DIR = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
OUTCOME_TIMEOUT_S = 150.0


@dataclass
class CorpusRun:
    node: Node
    pacs: PacsSCP
    sandbox: Path
    sent: dict[str, Sent]
    statuses: dict[str, tuple[int | None, ...]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[CorpusRun]:
    """Start one node, send every case (each over its own association), hand the results to the tests."""
    sandbox = tmp_path_factory.mktemp("corpus") / "sandbox"
    generated = tmp_path_factory.mktemp("corpus_input")
    pacs = PacsSCP(ae_title="PACS").start()
    workdir = sandbox / "node"
    node = Node(workdir, node_config(workdir, port=free_port(), checkpoint=tiny_checkpoint,
                                     destinations=[("pacs", "PACS", pacs.port)], workers={"count": 2}))
    node.start()
    run = CorpusRun(node, pacs, sandbox, {}, {})
    try:
        for index, case in enumerate(CASES):
            sent = case.build(generated, 4000 + index)
            statuses: list[int | None] = []
            for k, items in enumerate(sent.associations):
                abort = sent.abort_last and k == len(sent.associations) - 1
                statuses += send(node.port, items, release=not abort).statuses
            run.sent[case.name] = sent
            run.statuses[case.name] = tuple(statuses)
        yield run
    finally:
        node.stop()
        pacs.stop()


def _final_state(node: Node, series_instance_uid: str) -> str | None:
    """The series' final state, ABSENT when the node has no such series, None while still undecided."""
    series = node.series(series_instance_uid)
    if series is None:
        return ABSENT
    return series.state.value if series.state.value in FINAL else None


def _outcome_param(case: Case) -> object:
    return pytest.param(case, id=case.name)


@pytest.mark.parametrize("case", [_outcome_param(c) for c in CASES])
def test_case_gets_a_defined_status_and_a_recorded_outcome(corpus: CorpusRun, case: Case) -> None:
    node, sent = corpus.node, corpus.sent[case.name]
    statuses = corpus.statuses[case.name]
    assert statuses, f"{case.name}: nothing was sent"
    assert None not in statuses, f"{case.name}: an instance got no status (association aborted?): {statuses}"
    assert set(statuses) <= case.statuses, f"{case.name} ({case.why}): statuses {sorted({hex(s) for s in statuses if s is not None})}"

    def decided() -> dict[str, str] | None:
        states = {uid: _final_state(node, uid) for uid in sent.series_instance_uids}
        return None if any(s is None for s in states.values()) else {k: v for k, v in states.items() if v is not None}

    states = wait_until(decided, timeout=OUTCOME_TIMEOUT_S + case.extra_timeout, what=f"{case.name} to be decided") if sent.series_instance_uids else {}
    for uid, state in states.items():
        assert state in case.outcomes, f"{case.name} ({case.why}): series ended {state}, expected one of {sorted(case.outcomes)}"
        if state == IGNORED:
            series = node.series(uid)
            assert series is not None and series.ignore_reason.strip(), f"{case.name}: IGNORED without a reason"
        if state == FAILED:
            jobs = node.jobs(uid)
            assert jobs and jobs[-1].error.strip(), f"{case.name}: FAILED without a recorded error"
    if set(statuses) != {0} or ABSENT in states.values():
        # Refused or not-analysed instances leave an event that says why.
        kinds = {e.kind for e in node.events() if e.kind in ("instance_rejected", "instance_ignored")}
        assert kinds, f"{case.name}: no instance_rejected/instance_ignored event recorded"
        reasons = [e.detail.get("reason", "") for e in node.events(kind="instance_rejected") + node.events(kind="instance_ignored")]
        assert all(reasons), "an instance event has no reason"


def test_node_stays_up_through_the_corpus(corpus: CorpusRun) -> None:
    assert corpus.node.alive(), corpus.node.log_tail()
    assert c_echo(corpus.node.port)
    log = corpus.node.log_text()
    for event in ("worker_died", "serve_stopping_on_worker_failure", "job_crashed", "receiver_store_failed"):
        assert f'"event": "{event}"' not in log, f"{event} in the node's log"


def test_nothing_is_written_outside_the_spool(corpus: CorpusRun) -> None:
    node = corpus.node
    allowed = {"spool", "agent.sqlite", "agent.sqlite-wal", "agent.sqlite-shm", "agent.log", "agent.toml"}
    assert sorted(p.name for p in corpus.sandbox.iterdir()) == ["node"]
    assert {p.name for p in node.workdir.iterdir()} <= allowed
    for probe in (Path("/tmp") / TRAVERSAL_TARGET, corpus.sandbox.parent / TRAVERSAL_TARGET, node.workdir / TRAVERSAL_TARGET):
        assert not probe.exists(), f"{probe} was created"
    assert not list(corpus.sandbox.parent.parent.rglob(f"*{TRAVERSAL_TARGET}*"))
    incoming = node.spool / "incoming"
    for study in incoming.iterdir():
        assert UID_DIR.match(study.name), f"study folder {study.name!r} is not a UID"
        for series in study.iterdir():
            assert UID_DIR.match(series.name), f"series folder {series.name!r} is not a UID"
            for file in series.iterdir():
                assert file.suffix == ".dcm" and UID_DIR.match(file.stem), f"instance file {file.name!r}"
    assert not list((node.spool / "tmp").iterdir()), "temporary files left in spool/tmp"


def test_a_good_series_after_the_corpus_is_analysed_and_reported(corpus: CorpusRun, tmp_path: Path) -> None:
    node, pacs = corpus.node, corpus.pacs
    truth = write_phantom_series(tmp_path / "good", PhantomSpec(rows=64, columns=64, n_slices=48, seed=4999, patient_id="CORPUS-GOOD"))
    result = send(node.port, list(truth.files))
    assert set(result.statuses) == {0}
    state = wait_until(lambda: _final_state(node, truth.series_instance_uid), timeout=OUTCOME_TIMEOUT_S, what="the good series")
    assert state == ANALYSED, node.log_tail()

    def reported() -> bool:
        return any(str(ds.Modality) == "SR" and str(ds.StudyInstanceUID) == truth.study_instance_uid for ds in pacs.received)

    wait_until(reported, timeout=60, what="the good series' SR at the PACS")
