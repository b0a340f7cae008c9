"""Import the authors' trained weights (the seed's two state dicts) as a project checkpoint.

The seed's training scripts save ``model.state_dict()``: stage 1 is torchvision's ``r3d_18`` with
``fc = Linear(512, 1)``; stage 2 is its ``PEFeatureSequentialNet`` (TCN or GRU, with difference
features and max pooling, as its run script trains it). Stage 1's keys are ours unchanged
(``pe_model.networks.r3d18``); stage 2's are renamed (per-label attention and linear modules ->
stacked rows in ``EXAM_LABELS`` order, ``weight_g/weight_v`` -> weight-norm parametrizations),
and the model runs with ``padding="seed"`` so its outputs are the seed network's. The checkpoint
records the seed's preprocessing and where its weights came from (docs/METHOD.md, "Importing the
authors' weights").
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import torch
from torch import Tensor

from pe_model.checkpoint import ModelCard, ModelConfig, save_checkpoint
from pe_model.errors import CheckpointError
from pe_model.labels import EXAM_LABELS, IMAGE_LABEL
from pe_model.networks.r3d18 import R3D18
from pe_model.networks.sequence import SequenceConfig, SequenceModel
from pe_model.preprocessing import preprocess_preset

#: The seed's label list (its model.py): the image label first, then the nine exam labels.
SEED_LABELS: Final[tuple[str, ...]] = (IMAGE_LABEL, *EXAM_LABELS)
#: Dropout of the seed's run script (no effect in eval mode; recorded for completeness).
SEED_DROPOUT: Final[float] = 0.2
SEQ_MODELS: Final[tuple[str, ...]] = ("tcn", "gru")


class SeedImportError(CheckpointError):
    """A state dict that is not one the seed's training scripts write."""


@dataclass(frozen=True)
class ImportedModel:
    """What :func:`import_seed` wrote."""

    path: Path
    sha256: str
    model_config: ModelConfig
    stage1_sha256: str
    stage2_sha256: str


def _file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_state_dict(path: str | Path, what: str) -> tuple[dict[str, Tensor], str]:
    """A ``torch.save``-d state dict (tensors only) and the sha256 of the file."""
    source = Path(path)
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise SeedImportError(f"{what} {source} cannot be read: {exc.strerror or exc}") from exc
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SeedImportError(f"{what} {source} is not a torch state dict ({reason[:160]})") from exc
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not loaded or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in loaded.items()
    ):
        raise SeedImportError(f"{what} {source} does not hold a state dict of tensors")
    state = dict(loaded)
    if all(key.startswith("module.") for key in state):  # saved from DataParallel
        state = {key[len("module."):]: value for key, value in state.items()}
    return state, _file_sha256(data)


def _check_fit(what: str, given: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Raise naming the first key (in the network's order) that is missing, unexpected or of another shape."""
    for key, shape in expected.items():
        if key not in given:
            raise SeedImportError(f"{what}: key {key!r} is missing")
        if tuple(given[key].shape) != shape:
            raise SeedImportError(
                f"{what}: key {key!r} has shape {tuple(given[key].shape)}, expected {shape}"
            )
    for key in given:
        if key not in expected:
            raise SeedImportError(f"{what}: unexpected key {key!r}")


def convert_stage1(state: Mapping[str, Tensor]) -> tuple[int, dict[str, Tensor]]:
    """torchvision ``r3d_18`` with a one-logit ``fc`` -> (encoder width, our encoder state dict)."""
    stem = state.get("stem.0.weight")
    if stem is None or stem.ndim != 5:
        raise SeedImportError("stage 1: key 'stem.0.weight' is missing (not a torchvision r3d_18 state dict)")
    width = int(stem.shape[0])
    reference = R3D18(width=width, num_classes=1).state_dict()
    _check_fit("stage 1", state, {k: tuple(v.shape) for k, v in reference.items()})
    return width, {key: state[key].detach().clone() for key in reference}


def _layer_indices(state: Mapping[str, Tensor], pattern: str) -> list[int]:
    found = {int(m.group(1)) for key in state if (m := re.fullmatch(pattern, key))}
    return sorted(found)


def _seed_tcn_shapes(config: SequenceConfig) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the seed's ``TemporalConvNet`` state dict (its block registers each conv
    and batch norm twice: by name and inside ``net``)."""
    shapes: dict[str, tuple[int, ...]] = {}
    k, h = config.kernel_size, config.hidden
    for level in range(config.levels):
        n_in = 3 * config.feature_dim if level == 0 else h
        prefix = f"tcn.network.{level}"
        convs = {"conv1": (h, n_in, k), "conv2": (h, h, k)}
        norms = ("batchnorm1", "batchnorm2")
        per_block: dict[str, tuple[int, ...]] = {}
        for conv, v_shape in convs.items():
            per_block[f"{conv}.bias"] = (h,)
            per_block[f"{conv}.weight_g"] = (h, 1, 1)
            per_block[f"{conv}.weight_v"] = v_shape
        for norm in norms:
            for name in ("weight", "bias", "running_mean", "running_var"):
                per_block[f"{norm}.{name}"] = (h,)
            per_block[f"{norm}.num_batches_tracked"] = ()
        aliases = {"conv1": "net.0", "batchnorm1": "net.2", "conv2": "net.5", "batchnorm2": "net.7"}
        for key, shape in per_block.items():
            shapes[f"{prefix}.{key}"] = shape
        for key, shape in per_block.items():
            module, _, name = key.partition(".")
            shapes[f"{prefix}.{aliases[module]}.{name}"] = shape
        if n_in != h:
            shapes[f"{prefix}.downsample.weight"] = (h, n_in, 1)
            shapes[f"{prefix}.downsample.bias"] = (h,)
    return shapes


def _seed_gru_shapes(config: SequenceConfig) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    h = config.hidden
    directions = ("", "_reverse") if config.bidirectional else ("",)
    for layer in range(config.levels):
        n_in = 3 * config.feature_dim if layer == 0 else h * len(directions)
        for suffix in directions:
            shapes[f"gru.weight_ih_l{layer}{suffix}"] = (3 * h, n_in)
            shapes[f"gru.weight_hh_l{layer}{suffix}"] = (3 * h, h)
            shapes[f"gru.bias_ih_l{layer}{suffix}"] = (3 * h,)
            shapes[f"gru.bias_hh_l{layer}{suffix}"] = (3 * h,)
    return shapes


def seed_stage2_shapes(config: SequenceConfig) -> dict[str, tuple[int, ...]]:
    """Keys and shapes, in registration order, of the seed's ``PEFeatureSequentialNet`` as its run
    script builds it (``--diff --maxpool --no-batchnorm``) for ``config``."""
    body = _seed_tcn_shapes(config) if config.kind == "tcn" else _seed_gru_shapes(config)
    out = (2 if config.kind == "gru" and config.bidirectional else 1) * config.hidden
    shapes = dict(body)
    shapes["linear_pe.weight"] = (1, out)
    shapes["linear_pe.bias"] = (1,)
    for label in SEED_LABELS:
        shapes[f"attentions.{label}.weight"] = (out, 1)
        shapes[f"attentions.{label}.b"] = (config.seq_len,)
    for label in SEED_LABELS:
        shapes[f"linears.{label}.weight"] = (1, 2 * out)
        shapes[f"linears.{label}.bias"] = (1,)
    return shapes


def infer_stage2_config(state: Mapping[str, Tensor], feature_dim: int, seq_model: str | None) -> SequenceConfig:
    """The seed network's sizes from its tensor shapes (``seq_model`` None: from the keys)."""
    has_tcn = any(key.startswith("tcn.") for key in state)
    has_gru = any(key.startswith("gru.") for key in state)
    if seq_model is None:
        if has_tcn == has_gru:
            raise SeedImportError(
                "stage 2: neither 'tcn.*' nor 'gru.*' keys (or both) found; not a PEFeatureSequentialNet state dict"
            )
        seq_model = "tcn" if has_tcn else "gru"
    if seq_model not in SEQ_MODELS:
        raise SeedImportError(f"stage 2: --seq-model must be one of {SEQ_MODELS}, not {seq_model!r}")
    if "bn.weight" in state:
        raise SeedImportError(
            "stage 2: key 'bn.weight' shows a model trained with --batchnorm, which the seed's run script "
            "does not use and this import does not support"
        )
    bias = state.get(f"attentions.{EXAM_LABELS[0]}.b")
    if bias is None or bias.ndim != 1:
        raise SeedImportError(f"stage 2: key 'attentions.{EXAM_LABELS[0]}.b' is missing")
    seq_len = int(bias.shape[0])
    if seq_model == "tcn":
        first = state.get("tcn.network.0.conv1.weight_v")
        if first is None or first.ndim != 3:
            raise SeedImportError("stage 2: key 'tcn.network.0.conv1.weight_v' is missing")
        hidden, in_channels, kernel = (int(d) for d in first.shape)
        levels = len(_layer_indices(state, r"tcn\.network\.(\d+)\.conv1\.weight_v"))
        bidirectional = True
    else:
        first = state.get("gru.weight_hh_l0")
        if first is None or first.ndim != 2:
            raise SeedImportError("stage 2: key 'gru.weight_hh_l0' is missing")
        hidden = int(first.shape[1])
        in_channels = int(state["gru.weight_ih_l0"].shape[1]) if "gru.weight_ih_l0" in state else -1
        levels = len(_layer_indices(state, r"gru\.weight_hh_l(\d+)"))
        kernel = 3
        bidirectional = "gru.weight_hh_l0_reverse" in state
    if in_channels != 3 * feature_dim:
        raise SeedImportError(
            f"stage 2: its input has {in_channels} channels; stage 1's {feature_dim}-d features with the "
            f"seed's difference features (--diff) need {3 * feature_dim}"
        )
    return SequenceConfig(
        kind=seq_model,
        feature_dim=feature_dim,
        hidden=hidden,
        levels=max(levels, 1),
        kernel_size=kernel,
        dropout=SEED_DROPOUT,
        seq_len=seq_len,
        num_labels=len(EXAM_LABELS),
        padding="seed",
        bidirectional=bidirectional,
    )


def convert_stage2(state: Mapping[str, Tensor], config: SequenceConfig) -> dict[str, Tensor]:
    """The seed's ``PEFeatureSequentialNet`` state dict -> our ``SequenceModel`` state dict."""
    _check_fit("stage 2", state, seed_stage2_shapes(config))
    out: dict[str, Tensor] = {}
    if config.kind == "tcn":
        for level in range(config.levels):
            seed, ours = f"tcn.network.{level}", f"tcn.{level}"
            for conv in ("conv1", "conv2"):
                out[f"{ours}.{conv}.bias"] = state[f"{seed}.{conv}.bias"]
                out[f"{ours}.{conv}.parametrizations.weight.original0"] = state[f"{seed}.{conv}.weight_g"]
                out[f"{ours}.{conv}.parametrizations.weight.original1"] = state[f"{seed}.{conv}.weight_v"]
            for seed_norm, our_norm in (("batchnorm1", "bn1"), ("batchnorm2", "bn2")):
                for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                    out[f"{ours}.{our_norm}.{name}"] = state[f"{seed}.{seed_norm}.{name}"]
            if f"{seed}.downsample.weight" in state:
                out[f"{ours}.downsample.weight"] = state[f"{seed}.downsample.weight"]
                out[f"{ours}.downsample.bias"] = state[f"{seed}.downsample.bias"]
    else:
        for key, value in state.items():
            if key.startswith("gru."):
                out[key] = value
    out["chunk_head.weight"] = state["linear_pe.weight"]
    out["chunk_head.bias"] = state["linear_pe.bias"]
    out["attention_weight"] = torch.stack([state[f"attentions.{label}.weight"][:, 0] for label in EXAM_LABELS])
    out["attention_bias"] = torch.stack([state[f"attentions.{label}.b"] for label in EXAM_LABELS])
    out["label_weight"] = torch.stack([state[f"linears.{label}.weight"][0] for label in EXAM_LABELS])
    out["label_bias"] = torch.cat([state[f"linears.{label}.bias"] for label in EXAM_LABELS])
    converted = {key: value.detach().clone().contiguous() for key, value in out.items()}
    SequenceModel(config).load_state_dict(converted, strict=True)  # our own shapes: a bug if it fails
    return converted


def import_seed(
    stage1: str | Path,
    stage2: str | Path,
    out: str | Path,
    *,
    seq_model: str | None = None,
    name: str = "pe-detection-seed",
) -> ImportedModel:
    """Read both state dicts, convert them and write a checkpoint with the seed's preprocessing."""
    stage1_state, stage1_sha = read_state_dict(stage1, "stage-1 state dict")
    stage2_state, stage2_sha = read_state_dict(stage2, "stage-2 state dict")
    width, encoder_state = convert_stage1(stage1_state)
    sequence_config = infer_stage2_config(stage2_state, 8 * width, seq_model)
    sequence_state = convert_stage2(stage2_state, sequence_config)
    model_config = ModelConfig(encoder_width=width, sequence=sequence_config)
    now = datetime.now(UTC)
    card = ModelCard(
        name=name,
        version=now.strftime("%Y.%m.%d"),
        training_data=(
            f"imported from the seed's state dicts: stage 1 {Path(stage1).name} (sha256 {stage1_sha}), "
            f"stage 2 {Path(stage2).name} (sha256 {stage2_sha}); trained by their authors (RSNA-STR PE data "
            "when these are the published weights)"
        ),
        intended_use="research reproduction of the published two-stage model; unverified AI output, not a medical device",
        metrics={},
        not_for_clinical_use=True,
        created=now.isoformat(timespec="seconds"),
    )
    target = Path(out)
    sha = save_checkpoint(
        target,
        encoder_state=encoder_state,
        sequence_state=sequence_state,
        model_config=model_config,
        preprocess_config=preprocess_preset("seed"),
        card=card,
    )
    return ImportedModel(path=target, sha256=sha, model_config=model_config, stage1_sha256=stage1_sha,
                         stage2_sha256=stage2_sha)
