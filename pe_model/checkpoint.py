"""The checkpoint file: both stages' weights, their configuration, the preprocessing parameters,
the label list and a model card, in one file.

Format: ``torch.save`` of a dict holding only tensors and JSON-able primitives, so
``torch.load(weights_only=True)`` reads it without unpickling arbitrary objects. The dict embeds a
content digest (sha256 over the canonical metadata JSON and every tensor's name, dtype, shape and
bytes in key order) that is checked on load, so a corrupted or edited file is refused. The sha256
of the file's bytes is the model identity written into every output.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import torch
from torch import Tensor

from pe_model.errors import CheckpointError
from pe_model.labels import EXAM_LABELS
from pe_model.networks.r3d18 import R3D18
from pe_model.networks.sequence import SequenceConfig, SequenceModel
from pe_model.prediction import ModelInfo

if TYPE_CHECKING:
    from pe_model.preprocessing import PreprocessConfig

FORMAT_NAME: Final[str] = "pe-triage-checkpoint"
FORMAT_VERSION: Final[int] = 1
#: Reference to the packaged demo checkpoint.
BUILTIN_DEMO: Final[str] = "builtin:demo"
_SECTIONS: Final[tuple[str, ...]] = ("encoder", "sequence")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of both stages; ``sequence.feature_dim`` must equal ``8 * encoder_width``."""

    encoder_width: int
    sequence: SequenceConfig

    def __post_init__(self) -> None:
        if self.encoder_width < 1:
            raise ValueError("encoder_width must be positive")
        if self.sequence.feature_dim != 8 * self.encoder_width:
            raise ValueError(
                f"sequence feature_dim {self.sequence.feature_dim} does not match encoder width "
                f"{self.encoder_width} (needs {8 * self.encoder_width})"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"encoder_width": self.encoder_width, "sequence": self.sequence.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        return cls(
            encoder_width=int(data["encoder_width"]),
            sequence=SequenceConfig.from_dict(data["sequence"]),
        )


@dataclass(frozen=True)
class ModelCard:
    """What a reader of any output must know about the model that made it."""

    name: str
    version: str
    training_data: str
    intended_use: str
    metrics: dict[str, float] = field(default_factory=dict)
    not_for_clinical_use: bool = True
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["metrics"] = {str(k): float(v) for k, v in self.metrics.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        return cls(
            name=str(data["name"]),
            version=str(data["version"]),
            training_data=str(data["training_data"]),
            intended_use=str(data["intended_use"]),
            metrics={str(k): float(v) for k, v in dict(data.get("metrics", {})).items()},
            not_for_clinical_use=bool(data["not_for_clinical_use"]),
            created=str(data.get("created", "")),
        )


def untrained_card(created: str | None = None) -> ModelCard:
    """Card of a randomly initialised checkpoint."""
    return ModelCard(
        name="pe-triage-untrained",
        version="0.0.0",
        training_data="none (untrained, random initialisation)",
        intended_use=(
            "untrained random weights for software tests and as a training starting point; "
            "its outputs mean nothing"
        ),
        metrics={},
        not_for_clinical_use=True,
        created=created or _now(),
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A loaded, verified checkpoint. ``sha256`` is the digest of the file's bytes."""

    sha256: str
    model_config: ModelConfig
    preprocess_config_dict: dict[str, Any]
    labels: tuple[str, ...]
    card: ModelCard
    encoder_state: dict[str, Tensor]
    sequence_state: dict[str, Tensor]
    path: Path | None = None

    @property
    def model_info(self) -> ModelInfo:
        return ModelInfo(
            name=self.card.name,
            version=self.card.version,
            sha256=self.sha256,
            intended_use=self.card.intended_use,
            training_data=self.card.training_data,
            not_for_clinical_use=self.card.not_for_clinical_use,
        )

    @property
    def preprocess_config(self) -> PreprocessConfig:
        from pe_model.preprocessing import PreprocessConfig

        return PreprocessConfig.from_dict(self.preprocess_config_dict)

    def build_encoder(self) -> R3D18:
        """The stage-1 network with this checkpoint's weights, in eval mode."""
        encoder = R3D18(width=self.model_config.encoder_width, num_classes=1)
        _load_state(encoder, self.encoder_state, "encoder", self._name)
        return encoder.eval()

    def build_sequence_model(self) -> SequenceModel:
        """The stage-2 network with this checkpoint's weights, in eval mode."""
        model = SequenceModel(self.model_config.sequence)
        _load_state(model, self.sequence_state, "sequence model", self._name)
        return model.eval()

    @property
    def _name(self) -> str:
        return str(self.path) if self.path is not None else f"sha256 {self.sha256[:12]}"


def _load_state(module: torch.nn.Module, state: Mapping[str, Tensor], what: str, name: str) -> None:
    try:
        module.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {name}: {what} weights do not fit its configuration ({first})"
        ) from exc


def _canonical_json(metadata: Mapping[str, Any]) -> bytes:
    return json.dumps(
        metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _tensor_bytes(tensor: Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def content_digest(metadata: Mapping[str, Any], sections: Mapping[str, Mapping[str, Tensor]]) -> str:
    """sha256 over the canonical metadata JSON and each tensor (section, key, dtype, shape,
    bytes) in sorted key order."""
    digest = hashlib.sha256()
    digest.update(_canonical_json(metadata))
    for section in _SECTIONS:
        state = sections[section]
        for key in sorted(state):
            tensor = state[key]
            header = f"\n{section}/{key}|{tensor.dtype}|{tuple(tensor.shape)}\n"
            digest.update(header.encode("utf-8"))
            digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _as_preprocess_dict(preprocess_config: PreprocessConfig | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(preprocess_config, Mapping):
        data = dict(preprocess_config)
    else:
        data = dict(preprocess_config.to_dict())
    # Round-trip through JSON so that tuples become lists, exactly as they will load.
    return dict(json.loads(json.dumps(data, allow_nan=False)))


def save_checkpoint(
    path: str | Path,
    *,
    encoder_state: Mapping[str, Tensor],
    sequence_state: Mapping[str, Tensor],
    model_config: ModelConfig,
    preprocess_config: PreprocessConfig | Mapping[str, Any],
    card: ModelCard,
) -> str:
    """Write a checkpoint file atomically; returns the sha256 of its bytes."""
    metadata: dict[str, Any] = {
        "model_config": model_config.to_dict(),
        "preprocess_config": _as_preprocess_dict(preprocess_config),
        "labels": list(EXAM_LABELS),
        "card": card.to_dict(),
    }
    for value in metadata["card"]["metrics"].values():
        if not math.isfinite(value):
            raise CheckpointError("model card metrics must be finite numbers")
    sections = {
        "encoder": {k: v.detach().to("cpu").clone() for k, v in encoder_state.items()},
        "sequence": {k: v.detach().to("cpu").clone() for k, v in sequence_state.items()},
    }
    payload: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "metadata": metadata,
        **sections,
        "content_sha256": content_digest(metadata, sections),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_bytes(data)
    temporary.replace(target)
    return hashlib.sha256(data).hexdigest()


def builtin_demo_path() -> Path:
    """Where the packaged demo checkpoint lives (it may not be installed)."""
    return Path(str(resources.files("pe_model") / "data" / "demo.pt"))


def resolve_checkpoint_ref(ref: str | Path) -> Path:
    """``builtin:demo`` -> the packaged file; anything else is a path."""
    if isinstance(ref, str) and ref == BUILTIN_DEMO:
        path = builtin_demo_path()
        if not path.is_file():
            raise CheckpointError(
                "the built-in demo checkpoint is not installed (pe_model/data/demo.pt missing)"
            )
        return path
    if isinstance(ref, str) and ref.startswith("builtin:"):
        raise CheckpointError(f"unknown built-in checkpoint {ref!r} (only {BUILTIN_DEMO!r} exists)")
    return Path(ref)


def load_checkpoint(ref: str | Path, *, expected_sha256: str | None = None) -> Checkpoint:
    """Read and verify a checkpoint (a path or ``builtin:demo``).

    Raises CheckpointError when the file is missing or unreadable, is not a checkpoint of this
    project, its content digest does not match (corrupted or modified), or its file sha256 differs
    from ``expected_sha256``.
    """
    path = resolve_checkpoint_ref(ref)
    name = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {name} does not exist") from exc
    except OSError as exc:
        raise CheckpointError(f"checkpoint {name} cannot be read: {exc.strerror or exc}") from exc
    sha256 = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and sha256 != expected_sha256.strip().lower():
        raise CheckpointError(
            f"checkpoint {name} has sha256 {sha256}, expected {expected_sha256.strip().lower()}"
        )
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {name} is corrupted or not a PE model checkpoint (cannot be read: {reason[:160]})"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{name} is not a PE model checkpoint (no {FORMAT_NAME!r} marker)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {name} has format version {payload.get('format_version')!r}; "
            f"this software reads version {FORMAT_VERSION}"
        )
    metadata = payload.get("metadata")
    sections = {section: payload.get(section) for section in _SECTIONS}
    if not isinstance(metadata, dict) or not all(
        isinstance(state, dict) and all(isinstance(v, Tensor) for v in state.values())
        for state in sections.values()
    ):
        raise CheckpointError(f"checkpoint {name} is corrupted: its sections are malformed")
    try:
        actual = content_digest(metadata, sections)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {name} is corrupted: its metadata is malformed") from exc
    if actual != payload.get("content_sha256"):
        raise CheckpointError(
            f"checkpoint {name} is corrupted or was modified: content digest mismatch"
        )
    try:
        model_config = ModelConfig.from_dict(metadata["model_config"])
        card = ModelCard.from_dict(metadata["card"])
        labels = tuple(str(label) for label in metadata["labels"])
        preprocess = dict(metadata["preprocess_config"])
        from pe_model.preprocessing import PreprocessConfig

        PreprocessConfig.from_dict(preprocess)  # refuse parameters the Predictor could not run with
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {name} has invalid metadata: {exc}") from exc
    if labels != EXAM_LABELS:
        raise CheckpointError(f"checkpoint {name} predicts labels {list(labels)}, not the RSNA set")
    return Checkpoint(
        sha256=sha256,
        model_config=model_config,
        preprocess_config_dict=preprocess,
        labels=labels,
        card=card,
        encoder_state=dict(sections["encoder"]),  # type: ignore[arg-type]
        sequence_state=dict(sections["sequence"]),  # type: ignore[arg-type]
        path=path,
    )


def small_sequence_config(encoder_width: int, *, kind: str = "tcn", hidden: int = 16) -> SequenceConfig:
    """A sequence config sized for a small encoder (tests, demo, training start)."""
    return SequenceConfig(kind=kind, feature_dim=8 * encoder_width, hidden=hidden)


def build_initial_checkpoint(
    path: str | Path,
    *,
    encoder_width: int = 8,
    sequence: SequenceConfig | None = None,
    preprocess_config: PreprocessConfig | Mapping[str, Any] | None = None,
    seed: int = 0,
    card: ModelCard | None = None,
) -> str:
    """Write a randomly initialised (untrained) checkpoint; returns its file sha256.

    Used by the tests of every package and as training's starting point.
    """
    if sequence is None:
        sequence = small_sequence_config(encoder_width)
    if preprocess_config is None:
        from pe_model.preprocessing import PreprocessConfig

        preprocess_config = PreprocessConfig(input_size=32)
    model_config = ModelConfig(encoder_width=encoder_width, sequence=sequence)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        encoder = R3D18(width=encoder_width, num_classes=1)
        sequence_model = SequenceModel(sequence)
    finally:
        torch.random.set_rng_state(generator_state)
    return save_checkpoint(
        path,
        encoder_state=encoder.state_dict(),
        sequence_state=sequence_model.state_dict(),
        model_config=model_config,
        preprocess_config=preprocess_config,
        card=card if card is not None else untrained_card(),
    )
