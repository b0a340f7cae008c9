"""Resumable training: the ``state.pt`` of an interrupted stage-1 or stage-2 run, written each epoch, read at start."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import structlog
import torch

from training.errors import CheckpointStateError

log = structlog.get_logger(__name__)

STATE_FILE = "state.pt"


class Stateful(Protocol):
    """A network, optimizer or gradient scaler: anything torch saves as a state dict."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any, /) -> Any: ...


def load_state(out: Path, stage: int, config: Mapping[str, Any], parts: Mapping[str, Stateful]) -> dict[str, Any]:
    """Load the saved run of ``stage`` in ``out`` into ``parts`` (network, optimizer, scaler by name) and
    return the rest of its state (``epoch``, ``history``, best scores); ``{}`` when there is none.

    A state written with another configuration is refused: its epochs would not continue this run.
    """
    path = out / STATE_FILE
    if not path.is_file():
        return {}
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("config") != dict(config):
        raise CheckpointStateError(f"{path} was written by a stage-{stage} run with other settings; use a new work directory")
    for name, part in parts.items():
        part.load_state_dict(state[name])
    log.info(f"stage{stage}.resume", from_epoch=int(state["epoch"]) + 1)
    return {key: value for key, value in state.items() if key not in parts and key != "config"}


def save_state(out: Path, config: Mapping[str, Any], parts: Mapping[str, Stateful], **progress: Any) -> None:
    """Write ``state.pt`` atomically: the configuration, ``parts``' state dicts and ``progress`` (epoch, ...)."""
    tmp = out / f"{STATE_FILE}.tmp"
    torch.save({"config": dict(config), **{name: part.state_dict() for name, part in parts.items()}, **progress}, tmp)
    tmp.replace(out / STATE_FILE)
