"""Settings: defaults < TOML < environment < overrides, one-line errors, redaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacs_agent.errors import ConfigError
from pacs_agent.settings import Settings, load_settings

TOML = """
[node]
ae_title = "PE_NODE"
port = 11200
allowed_calling_ae_titles = ["CT1", "CT2"]

[database]
url = "postgresql+psycopg://agent:s3cret@db/pe"

[series]
quiet_seconds = 2.5

[[series.priority_rules]]
priority = 10
calling_ae_title = "ER_CT"

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "10.0.0.5"
port = 104
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_defaults_without_file() -> None:
    settings = load_settings(None, environ={})
    assert settings == Settings()
    assert settings.model.checkpoint == "builtin:demo"


def test_toml_then_environment_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, TOML)
    env = {"PE_AGENT__NODE__PORT": "11300", "PE_AGENT__SERIES__QUIET_SECONDS": "4", "UNRELATED": "x"}
    settings = load_settings(path, environ=env, overrides={"series": {"quiet_seconds": 1.5}})
    assert settings.node.ae_title == "PE_NODE"
    assert settings.node.port == 11300
    assert settings.node.allowed_calling_ae_titles == ("CT1", "CT2")
    assert settings.series.quiet_seconds == 1.5
    assert settings.series.priority_rules[0].priority == 10
    assert settings.destinations[0].port == 104


def test_destinations_from_environment_json() -> None:
    env = {"PE_AGENT__DESTINATIONS": '[{"name": "p", "ae_title": "P", "host": "h", "port": 11112}]'}
    (dest,) = load_settings(None, environ=env).destinations
    assert (dest.name, dest.port) == ("p", 11112)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[node]\nport = 70000\n", "node.port: 70000 is not a TCP port"),
        ("[node]\nnot_a_key = 1\n", "unknown key(s) not_a_key"),
        ("[series]\nquiet_seconds = 'soon'\n", "series.quiet_seconds: expected a number"),
        ("[node\n", "is not valid TOML"),
        ("[log]\nformat = 'xml'\n", "log.format"),
        ("[model]\nprecision = 'fp16'\n", "model.precision: 'fp16' is not one of auto, fp32, bf16"),
    ],
)
def test_invalid_config_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), environ={})
    assert message in str(info.value)
    assert "\n" not in str(info.value).strip()


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_redacted_hides_database_password(tmp_path: Path) -> None:
    redacted = load_settings(write(tmp_path, TOML), environ={}).redacted()
    assert redacted["database"]["url"] == "postgresql+psycopg://agent:***@db/pe"
    assert "s3cret" not in str(redacted)


def test_model_precision_defaults_to_auto_and_reads_from_toml_and_environment(tmp_path: Path) -> None:
    assert load_settings(None, environ={}).model.precision == "auto"
    assert load_settings(write(tmp_path, "[model]\nprecision = 'bf16'\n"), environ={}).model.precision == "bf16"
    assert load_settings(None, environ={"PE_AGENT__MODEL__PRECISION": "fp32"}).model.precision == "fp32"


@pytest.mark.parametrize(("precision", "resolved"), [("auto", "fp32"), ("fp32", "fp32"), ("bf16", "bf16")])
def test_model_precision_reaches_the_predictor(tiny_checkpoint: Path, precision: str, resolved: str) -> None:
    """Worker and `pe-agent analyze` load the model through load_predictor; "auto" is fp32 on CPU."""
    from pacs_agent.analysis.pipeline import load_predictor

    settings = load_settings(None, environ={}, overrides={"model": {"precision": precision, "torch_threads": 1}})
    assert load_predictor(settings, checkpoint=str(tiny_checkpoint)).precision == resolved
