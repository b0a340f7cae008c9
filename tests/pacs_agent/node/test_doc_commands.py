"""Every command the documentation shows works as written (issue 15: documented options that did not exist).

The `pe-agent`, `echoscu` and `storescu` commands of README.md, deploy/*.md, docs/NOTIFICATIONS.md and
docs/CLI.md are collected
from code blocks and inline code. Placeholders (JOB_ID, SERIES_UID, NAME, ...) become real ids of a
seeded node; `[optional]` parts are used; `a / b` alternatives are each run. Each `pe-agent` command
runs in-process against a fresh copy of that node's database and must exit 0; the long-running ones
(serve, worker, demo, analyze) are parsed here with every option checked, and run by
tests/pacs_agent/test_end_to_end.py, tests/e2e/test_demo.py and tests/pacs_agent/node/test_cli.py (analyze).
The dcmtk commands run against the node's receiver (plain and TLS) with the venv's bin first on the
PATH, as in an activated venv, where pynetdicom's apps of the same names must not shadow dcmtk's.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer

from pacs_agent.node.cli import app, main
from pacs_agent.db.migrate import upgrade_database
from pacs_agent.db.models import Delivery, DeliveryStatus, Flag, Output, OutputKind, Series
from pacs_agent.db.session import make_engine, make_session_factory, transaction
from pacs_agent.notify import Notifier
from pacs_agent.jobs.queue import enqueue_job
from pacs_agent.dicom.scp import Receiver
from pacs_agent.settings import Settings
from tests.support.flagged_studies import STUDY, flag_study, write_instance
from tests.support.notify_servers import http_receiver
from tests.support.pacs_scp import PacsSCP
from tests.support.tls import make_test_pki, openssl_available

ROOT = Path(__file__).resolve().parents[3]
#: The documents an administrator follows (docs/BENCHMARKS.md and METHOD.md quote commands as records, not as instructions).
DOCS = [ROOT / "README.md", *sorted((ROOT / "deploy").glob("*.md")), ROOT / "docs" / "NOTIFICATIONS.md", ROOT / "docs" / "CLI.md"]
PROGRAMS = ("pe-agent", "echoscu", "storescu")
#: Subcommands that run until stopped or need a model and images: parsed here, run by the tests named above.
PARSED_ONLY = {"serve", "worker", "demo", "analyze"}


def documented_commands() -> list[tuple[str, str]]:
    """(document, command) for every command line shown in the documentation, alternatives expanded."""
    found: list[tuple[str, str]] = []
    for doc in DOCS:
        text = doc.read_text()
        spans = [line for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S) for line in block.splitlines()]
        spans += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
        for span in spans:
            command = span.split("  #")[0].split(" # ")[0].strip()
            words = command.split()
            if len(words) < 2 or words[0] not in PROGRAMS:
                continue  # a tool's name in a sentence, not a command
            head, *alternatives = [part.strip() for part in command.split(" / ")]
            found.append((doc.name, head))
            prefix = " ".join(head.split()[:2])
            found += [(doc.name, f"{prefix} {alternative}") for alternative in alternatives]
    first_seen: dict[str, str] = {}
    for name, cmd in found:  # the same command in several places is run once
        first_seen.setdefault(" ".join(re.sub(r"[\[\]]|\.\.\.", "", cmd).split()), name)
    return [(name, cmd) for cmd, name in first_seen.items()]


@dataclass
class SeededNode:
    settings: Settings
    config: Path
    database: Path
    values: dict[str, str]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    if not openssl_available():
        pytest.skip("openssl is needed for the TLS example")
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def seeded(settings_factory: Callable[..., Settings], tmp_path: Path, free_port: Callable[[], int]) -> Iterator[SeededNode]:
    """A node with an analysed CRITICAL study (alerted), a queued job, a FAILED delivery and a PACS that answers."""
    pacs_port = free_port()
    with http_receiver() as hook:
        settings = settings_factory(
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
            notifications=[{"name": "pe-team", "kind": "webhook", "url": hook.url}],
        )
        database = Path(settings.database.url.removeprefix("sqlite:///"))
        engine = make_engine(settings.database.url)
        upgrade_database(settings.database.url, engine)
        factory = make_session_factory(engine)
        analysed_job = flag_study(factory, settings, STUDY, Flag.CRITICAL)
        with transaction(factory) as session:
            waiting = Series(study_instance_uid="1.2.3", series_instance_uid="1.2.3.1", modality="CT")
            session.add(waiting)
            session.flush()
            queued_job = enqueue_job(session, waiting, priority=0, reason="received", max_attempts=1).id
            output = Output(job_id=analysed_job, kind=OutputKind.SR, sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33",
                            sop_instance_uid="1.2.3.9", series_instance_uid="1.2.3.8", path="outbox/1/sr.dcm")
            session.add(output)
            session.flush()
            failed = Delivery(output_id=output.id, destination="pacs", status=DeliveryStatus.FAILED, attempts=10)
            session.add(failed)
            session.flush()
            failed_id = failed.id
        Notifier(settings, factory, owner="t/notify").run_once()
        engine.dispose()
        config = tmp_path / "agent.toml"
        config.write_text(
            f'[database]\nurl = "{settings.database.url}"\n[storage]\nroot = "{settings.storage.root}"\n'
            f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs_port}\n'
            f'[[notifications]]\nname = "pe-team"\nkind = "webhook"\nurl = "{hook.url}"\n'
        )
        values = {
            "ID_OR_UID": STUDY, "JOB_ID_OR_UID": str(analysed_job), "SERIES_UID": f"{STUDY}.1", "UID": f"{STUDY}.1",
            "ID": str(failed_id), "N": "1", "DIR": str(tmp_path), "OUT": str(tmp_path / "out"), "FILE": str(config),
            "/etc/pe-agent/agent.toml": str(config), "analysed JOB_ID": str(analysed_job), "queued JOB_ID": str(queued_job),
        }
        with PacsSCP(ae_title="PACS", port=pacs_port):
            yield SeededNode(settings, config, database, values)


def _argv(command: str, values: dict[str, str]) -> list[str]:
    words = shlex.split(command)[1:]
    out: list[str] = []
    for index, word in enumerate(words):
        previous = words[index - 1] if index else ""
        if word == "JOB_ID":
            word = values["queued JOB_ID" if words[0] == "cancel" else "analysed JOB_ID"]
        elif word == "NAME":
            word = {"echo": "pacs", "notify-test": "pe-team"}.get(words[0], "Dr Who") if previous != "--user" else "Dr Who"
        elif word == "UID" and previous == "--study":
            word = STUDY
        else:
            word = values.get(word, word)
        out.append(word)
    return out


def _pe_agent_commands() -> list[tuple[str, str]]:
    return [(doc, cmd) for doc, cmd in documented_commands() if cmd.startswith("pe-agent ")]


def test_the_documentation_shows_commands() -> None:
    commands = [cmd for _, cmd in documented_commands()]
    assert "pe-agent jobs --status failed" in commands and "pe-agent retry --failed" in commands
    assert any(cmd.startswith("echoscu ") for cmd in commands) and any(cmd.startswith("storescu +tls") for cmd in commands)


@pytest.mark.parametrize(("doc", "command"), _pe_agent_commands(), ids=lambda value: value)
def test_documented_pe_agent_command_works(doc: str, command: str, seeded: SeededNode, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    argv = _argv(command, seeded.values)
    subcommand = argv[0]
    if subcommand in PARSED_ONLY:
        if subcommand == "demo":
            from pacs_agent.demo.run import _command as demo_command

            typer.main.get_command(demo_command).make_context("pe-agent demo", argv[1:])
        else:
            group = typer.main.get_command(app)
            group.get_command(typer.Context(group), subcommand).make_context(f"pe-agent {subcommand}", argv[1:])  # type: ignore[attr-defined]
        return
    # a fresh copy of the seeded database for each command; PE_AGENT_CONFIG for those shown without --config
    database = tmp_path / "copy.sqlite"
    shutil.copy(seeded.database, database)
    config = tmp_path / "agent.toml"
    config.write_text(seeded.config.read_text().replace(str(seeded.database), str(database)))
    argv = [str(config) if a == str(seeded.config) else a for a in argv]
    monkeypatch.setenv("PE_AGENT_CONFIG", str(config))
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, f"{doc}: `{command}` -> pe-agent {' '.join(argv)} exited {code}: {err or out}"


def _venv_path() -> dict[str, str]:
    """The environment of an activated venv: its bin folder first on the PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.mark.dcmtk
@pytest.mark.parametrize(("doc", "command"), [(d, c) for d, c in documented_commands() if not c.startswith("pe-agent ")], ids=lambda v: v)
def test_documented_dcmtk_command_works(doc: str, command: str, settings_factory: Callable[..., Settings], pki: Any,
                                        tmp_path: Path) -> None:
    program = shutil.which(command.split()[0], path=_venv_path()["PATH"])
    if program is None:
        pytest.skip(f"dcmtk {command.split()[0]} is not installed")
    assert "dcmtk" in subprocess.run([program, "--version"], capture_output=True, text=True, check=False).stdout.lower(), (
        f"{program} is not dcmtk's: pynetdicom's app of the same name shadows it (make install removes those)"
    )
    tls = "+tls" in command
    node: dict[str, Any] = {}
    if tls:
        node = {"tls": {"enabled": True, "certificate": str(pki.server_certificate), "private_key": str(pki.server_key),
                        "ca_certificate": str(pki.ca_certificate), "require_client_certificate": True}}
    settings = settings_factory(node=node)
    engine = make_engine(settings.database.url)
    upgrade_database(settings.database.url, engine)
    receiver = Receiver(settings, make_session_factory(engine))
    receiver.start()
    try:
        _, image = write_instance(tmp_path, "1.2.3", "1.2.3.4")
        values = {"node-host": "127.0.0.1", "11112": str(receiver.port), "2762": str(receiver.port), "image.dcm": str(tmp_path / image),
                  "client.key": str(pki.client_key), "client.crt": str(pki.client_certificate), "ca.crt": str(pki.ca_certificate)}
        argv = [program, *(values.get(word, word) for word in shlex.split(command)[1:])]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=_venv_path(), check=False)
    finally:
        receiver.stop()
        engine.dispose()
    assert done.returncode == 0, f"{doc}: `{command}` failed: {done.stdout}{done.stderr}"
