"""deploy/: the example configuration documents every key; compose, Dockerfiles and the unit are sound."""

from __future__ import annotations

import dataclasses
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


def test_example_config_documents_every_key_and_loads() -> None:
    path = DEPLOY / "agent.example.toml"
    with path.open("rb") as fh:
        documented = _toml_keys(tomllib.load(fh))
    assert _keys(Settings) - documented == set(), "keys missing from deploy/agent.example.toml"
    settings = load_settings(path, environ={})
    assert settings.node.allowed_calling_ae_titles
    assert settings.destinations[0].name == "pacs"


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
