"""`pe-agent` admin commands in-process against a real SQLite database: output, exit codes, effects."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from pacs_agent.db.migrate import head_revision
from pacs_agent.node.cli import main
from pacs_agent.db.models import Flag, Job, JobStatus, Result, Series, SeriesState
from pacs_agent.db.session import make_engine, make_session_factory, transaction
from pacs_agent.jobs.queue import claim_next_job, complete_job, enqueue_job, fail_job
from pacs_agent.jobs.leases import Backoff

CallCLI = Callable[..., tuple[int, str, str]]


@pytest.fixture
def config(tmp_path: Path, free_port: Callable[[], int]) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f"""
[storage]
root = "{tmp_path / 'spool'}"
[database]
url = "sqlite:///{tmp_path / 'db.sqlite'}"
[log]
format = "json"
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = {free_port()}
"""
    )
    return path


@pytest.fixture
def cli(config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> CallCLI:
    monkeypatch.delenv("PE_AGENT_CONFIG", raising=False)

    def run(*args: str, with_config: bool = True) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([*args, *(["--config", str(config)] if with_config else [])])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def factory(cli: CallCLI, tmp_path: Path):  # type: ignore[no-untyped-def]
    code, out, _ = cli("db", "upgrade")
    assert code == 0 and head_revision() in out
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    yield make_session_factory(engine)
    engine.dispose()


def seed(factory, n: int, *, study: str = "1.2.840.1", outcome: str = "succeeded", flag: Flag = Flag.HIGH) -> int:  # type: ignore[no-untyped-def]
    """A series with one job that SUCCEEDED (with a Result), FAILED, or is still QUEUED."""
    with transaction(factory) as session:
        series = Series(study_instance_uid=study, series_instance_uid=f"{study}.{n}", instance_count=60, modality="CT")
        session.add(series)
        session.flush()
        job_id = enqueue_job(session, series, priority=0, reason="received", max_attempts=1).id
    if outcome == "queued":
        return job_id
    assert claim_next_job(factory, owner="w", lease_seconds=30) is not None
    if outcome == "failed":
        fail_job(factory, job_id, owner="w", error="too few slices", retryable=False, backoff=Backoff(1, 2))
        return job_id
    with transaction(factory) as session:
        session.add(Result(job_id=job_id, pe_present=True, pe_probability=0.9, labels={"leftsided_pe": True}, flag=flag))
        session.flush()
        complete_job(session, job_id, owner="w")
    return job_id


def test_missing_database_says_how_to_fix_and_creates_nothing(cli: CallCLI, tmp_path: Path) -> None:
    code, out, err = cli("status")
    assert code == 2 and out == ""
    assert err.startswith(f"pe-agent: there is no database at {tmp_path / 'db.sqlite'}: run `pe-agent db upgrade`")
    assert not (tmp_path / "db.sqlite").exists()


def test_unmigrated_database_says_how_to_fix(cli: CallCLI, tmp_path: Path) -> None:
    make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}").dispose()
    (tmp_path / "db.sqlite").touch()
    code, out, err = cli("status")
    assert code == 2 and out == ""
    assert err.strip() == (
        f"pe-agent: database schema is out of date (at no revision, this build needs {head_revision()}); run `pe-agent db upgrade`"
    )


def test_bad_config_is_one_line_exit_2(cli: CallCLI, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nport = 'x'\n")
    code = main(["status", "--config", str(bad)])
    assert code == 2
    code, _, err = cli("jobs", "--limit", "0")
    assert code == 2 and "Usage" in err


def test_config_from_environment_variable(config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PE_AGENT_CONFIG", str(config))
    assert main(["db", "current", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"current": None, "head": head_revision(), "up_to_date": False}
    assert not (config.parent / "db.sqlite").exists(), "looking at the revision creates no database"


def test_status_jobs_worklist_json(cli: CallCLI, factory) -> None:  # type: ignore[no-untyped-def]
    ok = seed(factory, 1, study="1.2.1", flag=Flag.HIGH)
    bad = seed(factory, 2, study="1.2.2", outcome="failed")
    waiting = seed(factory, 3, study="1.2.3", outcome="queued")
    code, out, _ = cli("status", "--json")
    status = json.loads(out)
    assert code == 0
    assert status["jobs"] == {"QUEUED": 1, "RUNNING": 0, "SUCCEEDED": 1, "FAILED": 1, "CANCELLED": 0}
    assert status["series"]["ANALYSED"] == 1 and status["series"]["FAILED"] == 1 and status["series"]["QUEUED"] == 1
    assert status["worklist"]["HIGH"] == 1 and status["worklist"]["ERROR"] == 1
    code, out, _ = cli("jobs", "--json")
    assert [j["id"] for j in json.loads(out)] == [waiting, bad, ok]
    code, out, _ = cli("jobs", "--json", "--status", "FAILED")
    (failed,) = json.loads(out)
    assert failed["id"] == bad and failed["error"] == "too few slices"
    code, out, _ = cli("worklist", "--json")
    assert [(e["study_instance_uid"], e["flag"]) for e in json.loads(out)] == [("1.2.1", "HIGH"), ("1.2.2", "ERROR")]
    code, out, _ = cli("worklist")
    assert code == 0 and "1.2.1" in out and "HIGH" in out and out.index("HIGH") < out.index("ERROR")
    code, out, _ = cli("status")
    assert code == 0 and "SUCCEEDED" in out


def test_show_job_series_study(cli: CallCLI, factory) -> None:  # type: ignore[no-untyped-def]
    job_id = seed(factory, 1, study="1.2.7")
    code, out, _ = cli("show", str(job_id), "--json")
    data = json.loads(out)
    (series,) = data["series"]  # one shape whatever names it: the series of the job
    (job,) = series["jobs"]
    assert code == 0 and job["id"] == job_id and job["status"] == "SUCCEEDED" and job["result"]["flag"] == "HIGH"
    assert [e["kind"] for e in series["events"] if e["entity"] == "job"] == ["job_queued", "job_claimed", "job_succeeded"]
    assert "series_state" in {e["kind"] for e in series["events"] if e["entity"] == "series"}
    code, out, _ = cli("show", "1.2.7.1", "--json")
    assert json.loads(out) == data
    assert series["state"] == "ANALYSED"
    code, out, _ = cli("show", "1.2.7")
    assert code == 0 and "1.2.7.1" in out and "job_succeeded" in out
    code, _, err = cli("show", "9.9.9")
    assert code == 2 and "no job, series or study 9.9.9" in err
    code, _, err = cli("show", "12345")
    assert code == 2 and "job 12345 does not exist" in err


def test_reprocess_cancel(cli: CallCLI, factory) -> None:  # type: ignore[no-untyped-def]
    first = seed(factory, 1, study="1.3.1")
    failed = seed(factory, 2, study="1.3.2", outcome="failed")
    code, _, err = cli("reprocess")
    assert code == 2 and "name series UIDs" in err
    code, _, err = cli("reprocess", "7.7.7")
    assert code == 2 and "series 7.7.7 is not known" in err
    code, out, _ = cli("reprocess", "1.3.1.1", "--json")
    (created,) = json.loads(out)["created"]
    assert code == 0 and created["supersedes_job_id"] == first
    code, out, err = cli("reprocess", "1.3.1.1")
    assert code == 1 and "already has job" in err
    code, out, _ = cli("reprocess", "--failed", "--json")
    result = json.loads(out)
    assert [c["series_instance_uid"] for c in result["created"]] == ["1.3.2.2"]
    assert result["created"][0]["supersedes_job_id"] is None
    with factory() as session:
        new_jobs = session.scalars(select(Job).where(Job.reason == "reprocess").order_by(Job.id)).all()
        assert [j.status for j in new_jobs] == [JobStatus.QUEUED, JobStatus.QUEUED]
        new_id = new_jobs[0].id
    code, out, _ = cli("cancel", str(new_id))
    assert code == 0 and "CANCELLED" in out
    code, _, err = cli("cancel", str(new_id))
    assert code == 1 and "only QUEUED or RUNNING" in err
    code, _, err = cli("cancel", "999")
    assert code == 2 and "job 999 does not exist" in err
    with factory() as session:
        series = session.scalars(select(Series).where(Series.series_instance_uid == "1.3.1.1")).one()
        assert series.state == SeriesState.ANALYSED  # cancelling a re-analysis keeps the earlier result
    assert failed


def test_reprocess_since(cli: CallCLI, factory) -> None:  # type: ignore[no-untyped-def]
    seed(factory, 1, study="1.4.1")
    code, _, err = cli("reprocess", "--since", "yesterday-ish")
    assert code == 2 and "--since" in err
    code, out, _ = cli("reprocess", "--since", "1h", "--json")
    assert code == 0 and [c["series_instance_uid"] for c in json.loads(out)["created"]] == ["1.4.1.1"]
    code, out, err = cli("reprocess", "--since", "2999-01-01T00:00:00")
    assert code == 0 and out.strip() == "nothing to reprocess"  # a no-op is not a failure (cron)


def test_echo_unknown_destination_and_refused(cli: CallCLI, factory) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("pacs_agent.delivery.dispatcher")
    code, _, err = cli("echo", "nowhere")
    assert code == 2 and "no destination named 'nowhere' (pacs)" in err
    code, out, _ = cli("echo", "pacs", "--json", "--timeout", "2")  # nothing listens on the port
    assert code == 1 and json.loads(out)["ok"] is False


def test_echo_ok_against_a_real_scp(cli: CallCLI, factory, config: Path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("pacs_agent.delivery.dispatcher")
    from tests.support.pacs_scp import PacsSCP

    port = int(config.read_text().split("port = ")[1].split()[0])
    with PacsSCP(ae_title="PACS", port=port) as pacs:
        code, out, _ = cli("echo", "pacs")
    assert code == 0 and "ok" in out and pacs.echoes == 1


def test_retry_needs_ids_or_failed(cli: CallCLI, factory) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("pacs_agent.delivery.dispatcher")
    code, _, err = cli("retry")
    assert code == 2 and "--failed" in err
    code, _, err = cli("retry", "41")
    assert code == 2 and "no delivery with id 41" in err
    code, out, err = cli("retry", "--failed", "--json")
    assert code == 0 and json.loads(out) == {"requeued": [], "skipped": []}  # nothing failed: not an error (cron)
    code, out, err = cli("retry", "--failed")
    assert code == 0 and out.strip() == "nothing to retry"


def test_demo_missing_says_so(cli: CallCLI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pacs_agent.demo.run", None)
    code, _, err = cli("demo", with_config=False)
    assert code == 1 and err.strip() == "the demo is not available in this build"


def test_reprocess_study_skips_ignored_series(cli: CallCLI, factory) -> None:  # type: ignore[no-untyped-def]
    seed(factory, 1, study="1.5.1")
    with transaction(factory) as session:
        session.add(Series(study_instance_uid="1.5.1", series_instance_uid="1.5.1.9", state=SeriesState.IGNORED, ignore_reason="head CT"))
    code, out, _ = cli("reprocess", "--study", "1.5.1", "--json")
    assert code == 0 and [c["series_instance_uid"] for c in json.loads(out)["created"]] == ["1.5.1.1"]


def test_analyze_folder_writes_reports_without_database(cli: CallCLI, tmp_path: Path, tiny_checkpoint: Path) -> None:
    from phantoms import PhantomSpec, write_phantom_series

    truth = write_phantom_series(tmp_path / "series", PhantomSpec(n_slices=48, rows=64, columns=64))
    (tmp_path / "series" / "README.txt").write_text("not DICOM")  # a stray file is skipped
    out = tmp_path / "out"
    code, stdout, err = cli("analyze", str(tmp_path / "series"), "--out", str(out), "--checkpoint", str(tiny_checkpoint), "--json")
    assert code == 0, err
    data = json.loads(stdout)
    assert data["series_instance_uid"] == truth.series_instance_uid
    kinds = sorted(w["kind"] for w in data["written"])
    assert kinds[-1] == "SR" and kinds.count("SC") >= 1
    assert all(Path(w["path"]).parent == out and Path(w["path"]).is_file() for w in data["written"])
    assert not (tmp_path / "db.sqlite").exists()  # no database touched
    code, stdout, _ = cli("analyze", str(tmp_path / "series"), "--out", str(out), "--checkpoint", str(tiny_checkpoint))
    assert code == 0 and "flag:" in stdout and "wrote SR" in stdout


def test_analyze_bad_input_exits_2_with_one_line(cli: CallCLI, tmp_path: Path, tiny_checkpoint: Path) -> None:
    from phantoms import PhantomSpec, write_phantom_series

    write_phantom_series(tmp_path / "short", PhantomSpec(n_slices=4, rows=64, columns=64))
    code, _, err = cli("analyze", str(tmp_path / "short"), "--checkpoint", str(tiny_checkpoint))
    assert code == 2 and err.count("\n") == 1 and "cannot analyse" in err
    (tmp_path / "empty").mkdir()
    code, _, err = cli("analyze", str(tmp_path / "empty"), "--checkpoint", str(tiny_checkpoint))
    assert code == 2 and "holds no DICOM files" in err
    code, _, err = cli("analyze", str(tmp_path / "nope"))
    assert code == 2 and "is not a folder" in err
    code, _, err = cli("analyze", str(tmp_path / "short"), "--checkpoint", str(tmp_path / "missing.pt"))
    assert code == 2 and "cannot analyse" in err
