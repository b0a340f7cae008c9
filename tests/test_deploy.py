"""deploy/: the example configuration documents every key; compose, Dockerfiles and the unit are sound."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import pytest
import yaml

from pacs_agent.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _keys(cls: type, prefix: str = "") -> set[str]:
    out: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = f"{prefix}{f.name}"
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            out |= _keys(tp, name + ".")
        elif typing.get_origin(tp) is tuple and args and dataclasses.is_dataclass(args[0]):
            out |= _keys(args[0], name + ".")
        else:
            out.add(name)
    return out


def _toml_keys(data: object, prefix: str = "") -> set[str]:
    out: set[str] = set()
    if isinstance(data, dict):
        for k, v in data.items():
            name = f"{prefix}{k}"
            if isinstance(v, dict) or (isinstance(v, list) and v and all(isinstance(i, dict) for i in v)):
                out |= _toml_keys(v, name + ".")
            else:
                out.add(name)
    elif isinstance(data, list):
        for item in data:
            out |= _toml_keys(item, prefix)
    return out


#: A commented-out line of a list-table example: "# [[destinations]]" or "# name = ...".
_EXAMPLE_LINE = re.compile(r"^# (\[\[?[a-z_.]+\]\]?|[a-z_]+ = .+)$")
#: What a hospital must set (marked "CHANGE" in the example): the defaults keep the node on loopback,
#: under ./var, sending nowhere.
MUST_CHANGE = {"node.host", "node.allowed_calling_ae_titles", "storage.root", "database.url", "destinations", "http.public_url"}


def _plain(value: object) -> object:
    """asdict() output as TOML reads it: tuples -> lists, recursively."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _without_empty_lists_of_tables(data: dict[str, object], cls: type) -> dict[str, object]:
    """The defaults less the list-of-table keys (destinations, notifications, ...) that are empty by default:
    TOML has no way to write an empty array of tables, so the example shows them commented out."""
    out: dict[str, object] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, value = hints[f.name], data[f.name]
        args = typing.get_args(tp)
        if typing.get_origin(tp) is tuple and args and dataclasses.is_dataclass(args[0]) and value == []:
            continue
        out[f.name] = _without_empty_lists_of_tables(value, tp) if dataclasses.is_dataclass(tp) else value  # type: ignore[arg-type]
    return out


def _uncommented(text: str) -> str:
    return "\n".join(line[2:] if _EXAMPLE_LINE.match(line) else line for line in text.splitlines()) + "\n"


def test_example_config_is_exactly_the_code_defaults() -> None:
    example = tomllib.loads((DEPLOY / "agent.example.toml").read_text())
    defaults = _without_empty_lists_of_tables(_plain(dataclasses.asdict(Settings())), Settings)  # type: ignore[arg-type]
    assert example == defaults
    assert load_settings(DEPLOY / "agent.example.toml", environ={}) == Settings()


def test_example_config_documents_every_key_and_its_examples_load(tmp_path: Path) -> None:
    text = _uncommented((DEPLOY / "agent.example.toml").read_text())
    documented = _toml_keys(tomllib.loads(text))
    assert _keys(Settings) - documented == set(), "keys missing from deploy/agent.example.toml"
    path = tmp_path / "uncommented.toml"
    path.write_text(text)
    settings = load_settings(path, environ={})
    assert [d.name for d in settings.destinations] == ["pacs"]
    assert [n.name for n in settings.notifications] == ["pe-team", "pe-response", "ris"]


def test_example_config_marks_what_a_hospital_must_change() -> None:
    lines = (DEPLOY / "agent.example.toml").read_text().splitlines()
    marked: set[str] = set()
    section = ""
    for index, line in enumerate(lines):
        if re.match(r"^\[[a-z_.]+\]$", line):
            section = line.strip("[]")
        if not line.startswith("# CHANGE:"):
            continue
        for following in lines[index + 1:]:  # the key (or commented list table) the marker is about
            if following.startswith("# [["):
                marked.add(following[2:].strip("[] "))
                break
            key = re.match(r"^([a-z_]+) = ", following)
            if key:
                marked.add(f"{section}.{key.group(1)}")
                break
    assert marked == MUST_CHANGE


def test_container_config_loads() -> None:
    settings = load_settings(DEPLOY / "agent.container.toml", environ={})
    assert settings.http.enabled and settings.storage.root.startswith("/var/lib/pe-agent")


def test_compose_file_parses_and_names_existing_paths() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"orthanc", "pe-agent"} <= set(services)
    build = services["pe-agent"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert (context / build["dockerfile"]).is_file()
    for service in services.values():
        assert "healthcheck" in service
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{source} named in compose.yaml does not exist"
            else:
                assert source in compose["volumes"], f"named volume {source} is not declared"
    assert services["pe-agent"]["depends_on"]["orthanc"]["condition"] == "service_healthy"


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, "--config", str(DEPLOY / ".hadolint.yaml"), str(DEPLOY / dockerfile)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = (DEPLOY / dockerfile).read_text()
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"{dockerfile} copies {source}, which does not exist"


def test_systemd_unit_runs_serve_hardened() -> None:
    unit = (DEPLOY / "systemd" / "pe-agent.service").read_text()
    assert "ExecStart=/opt/pe-agent/.venv/bin/pe-agent serve --config" in unit
    for option in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "User=pe-agent"):
        assert option in unit
