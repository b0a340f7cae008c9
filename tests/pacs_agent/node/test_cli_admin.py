"""The administrator's first hour (issue 15): --version, -c on every command, case-insensitive enum
options, read commands on a machine without a database, one JSON shape per resource, retry --force,
no-ops that exit 0, and acknowledging alerts from the command line."""

from __future__ import annotations

import importlib.metadata
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import typer

from pacs_agent.db.models import Delivery, DeliveryStatus, Flag, Output, OutputKind
from pacs_agent.db.session import transaction
from pacs_agent.node.cli import app, main
from tests.support.flagged_studies import STUDY, flag_study
from tests.support.notify_node import Node
from tests.support.notify_servers import http_receiver


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what came before (log lines of the test's own set-up)
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def write_config(tmp_path: Path, node: Node) -> Path:
    """A TOML file with the node's database and spool, as an administrator would pass with -c."""
    path = tmp_path / "agent.toml"
    s = node.settings
    path.write_text(
        f'[database]\nurl = "{s.database.url}"\n[storage]\nroot = "{s.storage.root}"\n'
        + "".join(f'[[notifications]]\nname = "{t.name}"\nkind = "{t.kind}"\nurl = "{t.url}"\n' for t in s.notifications)
    )
    return path


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"pe-agent {importlib.metadata.version('pe-triage')}"


def _commands(group: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(name, command) of every leaf command under a (typer-vendored) click group."""
    out: list[tuple[str, Any]] = []
    for name, command in sorted(group.commands.items()):
        if hasattr(command, "commands"):
            out += _commands(command, f"{prefix}{name} ")
        else:
            out.append((prefix + name, command))
    return out


def test_every_command_takes_dash_c_for_config() -> None:
    commands = _commands(typer.main.get_command(app))
    assert {"serve", "status", "db upgrade", "ack", "notifications", "notify-test"} <= {name for name, _ in commands}
    for name, command in commands:
        if name == "demo":  # writes its own configuration into its work folder
            continue
        configs = [p for p in command.params if p.name == "config"]
        assert configs and "-c" in configs[0].opts, f"pe-agent {name} has no -c/--config"


def test_read_commands_without_a_database_say_what_to_do_and_create_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PE_AGENT_CONFIG", raising=False)
    for args in (["status"], ["jobs"], ["worklist"], ["show", "1"], ["retry", "--failed"], ["notifications"], ["ack", STUDY, "--user", "x"]):
        code, out, err = run(capsys, *args)
        assert code == 2, args
        assert "pe-agent db upgrade" in err and "var/pe_agent.sqlite" in err, (args, err)
        assert "Traceback" not in err
    code, out, _ = run(capsys, "db", "current", "--json")
    assert code == 0 and json.loads(out)["current"] is None
    assert list(tmp_path.iterdir()) == [], "nothing was created"


def test_enum_options_ignore_case(capsys: pytest.CaptureFixture[str], node_factory: Callable[..., Node], tmp_path: Path) -> None:
    node = node_factory([])
    config = write_config(tmp_path, node)
    flag_study(node.session_factory, node.settings, STUDY, Flag.CRITICAL)
    for args in (["jobs", "-s", "failed"], ["jobs", "--status", "Succeeded"], ["worklist", "-f", "critical"],
                 ["notifications", "--status", "pending"]):
        code, out, err = run(capsys, *args, "-c", str(config), "--json")
        assert code == 0, (args, err)
    code, out, _ = run(capsys, "worklist", "-f", "critical", "-c", str(config), "--json")
    assert [e["flag"] for e in json.loads(out)] == ["CRITICAL"]


def _delivered(node: Node, job_id: int) -> int:
    with transaction(node.session_factory) as session:
        output = Output(job_id=job_id, kind=OutputKind.SR, sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33",
                        sop_instance_uid="1.2.3.4.5", series_instance_uid="1.2.3.4", path="outbox/1/sr.dcm")
        session.add(output)
        session.flush()
        delivery = Delivery(output_id=output.id, destination="pacs", status=DeliveryStatus.DELIVERED, attempts=1)
        session.add(delivery)
        session.flush()
        return delivery.id


def test_retry_force_resends_a_delivered_object_and_no_ops_exit_zero(
    capsys: pytest.CaptureFixture[str], node_factory: Callable[..., Node], tmp_path: Path,
) -> None:
    node = node_factory([])
    config = write_config(tmp_path, node)
    job_id = flag_study(node.session_factory, node.settings, STUDY, Flag.CRITICAL)
    delivery_id = _delivered(node, job_id)
    code, out, err = run(capsys, "retry", "--failed", "-c", str(config))
    assert code == 0 and "nothing to retry" in out
    code, out, err = run(capsys, "retry", str(delivery_id), "-c", str(config))
    assert code == 1 and "--force" in err
    code, out, err = run(capsys, "retry", str(delivery_id), "--force", "-c", str(config), "--json")
    assert code == 0 and json.loads(out) == {"requeued": [delivery_id], "skipped": []}
    with node.session_factory() as session:
        assert session.get(Delivery, delivery_id).status == DeliveryStatus.PENDING  # type: ignore[union-attr]
    code, out, err = run(capsys, "reprocess", "--failed", "-c", str(config))
    assert code == 0 and "nothing to reprocess" in out


def _job_keys(job: dict[str, Any]) -> set[str]:
    return set(job) - {"result", "outputs"}


def test_one_json_shape_per_resource(capsys: pytest.CaptureFixture[str], node_factory: Callable[..., Node], tmp_path: Path) -> None:
    node = node_factory([])
    config = write_config(tmp_path, node)
    job_id = flag_study(node.session_factory, node.settings, STUDY, Flag.CRITICAL)
    _, out, _ = run(capsys, "jobs", "-c", str(config), "--json")
    (job,) = json.loads(out)
    shapes = []
    for target in (str(job_id), f"{STUDY}.1", STUDY):
        code, out, _ = run(capsys, "show", target, "-c", str(config), "--json")
        assert code == 0
        data = json.loads(out)
        assert set(data) == {"series"} and isinstance(data["series"], list)
        shapes.append(data)
    assert shapes[0] == shapes[1] == shapes[2]
    (series,) = shapes[0]["series"]
    assert _job_keys(series["jobs"][0]) == set(job) and series["jobs"][0]["result"]["flag"] == "CRITICAL"


def test_ack_and_notifications_from_the_command_line(
    capsys: pytest.CaptureFixture[str], node_factory: Callable[..., Node], tmp_path: Path,
) -> None:
    with http_receiver() as hook:
        node = node_factory([{"name": "pe-team", "kind": "webhook", "url": hook.url}])
        config = write_config(tmp_path, node)
        flag_study(node.session_factory, node.settings, STUDY, Flag.CRITICAL)
        node.notifier.run_once()
        code, out, err = run(capsys, "notify-test", "pe-team", "-c", str(config))
        assert code == 0 and "HTTP 200" in out
    code, out, _ = run(capsys, "notifications", "--unacknowledged", "-c", str(config), "--json")
    (listed,) = json.loads(out)
    assert listed["status"] == "SENT" and listed["acknowledged"] is None
    code, out, err = run(capsys, "ack", str(listed["id"]), "--user", "Dr Who", "-c", str(config), "--json")
    assert code == 0 and json.loads(out)["notification_ids"] == [listed["id"]]
    code, out, err = run(capsys, "ack", STUDY, "--user", "Dr Two", "-c", str(config))
    assert code == 0 and "already acknowledged by Dr Who" in out
    code, out, err = run(capsys, "notifications", "--unacknowledged", "-c", str(config), "--json")
    assert json.loads(out) == []
    code, out, err = run(capsys, "ack", "1.2.3.999", "--user", "x", "-c", str(config))
    assert code == 2 and "no result or alert" in err


def _documented_resources() -> dict[str, set[str]]:
    """docs/CLI.md's resource table: name -> field names (a "job, plus ..." row adds to job's)."""
    text = (Path(__file__).resolve().parents[3] / "docs" / "CLI.md").read_text()
    table = text.split("## Resources", 1)[1]
    resources: dict[str, set[str]] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or cells[0] in ("resource", "---"):
            continue
        name, fields = cells
        base = fields.split(",", 1)[0].strip()
        found = set(re.findall(r"`([a-z_]+)`", re.sub(r"\([^)]*\)", "", fields)))
        resources[name] = found | (resources[base] if base in resources else set())
    return resources


def test_documented_json_fields_are_what_the_commands_print(
    capsys: pytest.CaptureFixture[str], node_factory: Callable[..., Node], tmp_path: Path,
) -> None:
    with http_receiver() as hook:
        node = node_factory([{"name": "pe-team", "kind": "webhook", "url": hook.url}])
        config = write_config(tmp_path, node)
        job_id = flag_study(node.session_factory, node.settings, STUDY, Flag.CRITICAL)
        _delivered(node, job_id)
        node.notifier.run_once()
    doc = _documented_resources()
    c = ["-c", str(config), "--json"]
    (job,) = json.loads(run(capsys, "jobs", *c)[1])
    (series,) = json.loads(run(capsys, "show", STUDY, *c)[1])["series"]
    (entry,) = json.loads(run(capsys, "worklist", *c)[1])
    (notification,) = json.loads(run(capsys, "notifications", *c)[1])
    acknowledgement = json.loads(run(capsys, "ack", STUDY, "--user", "x", *c)[1])
    (detail,) = series["jobs"]
    (output,) = detail["outputs"]
    printed = {
        "job": set(job), "job detail": set(detail), "result": set(detail["result"]), "output": set(output),
        "delivery": set(output["deliveries"][0]), "series detail": set(series), "event": set(series["events"][0]),
        "worklist entry": set(entry), "notification": set(notification), "acknowledgement": set(acknowledgement),
    }
    printed["series"] = printed["series detail"] - {"jobs", "events"}
    assert {name: doc.get(name) for name in printed} == printed


def test_an_unreachable_database_is_one_line_without_the_password(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, free_port: Callable[[], int],
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'[database]\nurl = "postgresql+psycopg://pe_agent:s3cret@127.0.0.1:{free_port()}/pe_agent"\n')
    code, out, err = run(capsys, "status", "-c", str(config))
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("pe-agent: cannot open the database postgresql+psycopg://pe_agent:***@127.0.0.1:")
    assert "s3cret" not in err and "Traceback" not in err
