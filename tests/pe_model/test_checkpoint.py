"""Checkpoint file: round trip, identity hash, tamper and corruption refusal."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from pe_model.checkpoint import (
    BUILTIN_DEMO,
    ModelCard,
    ModelConfig,
    builtin_demo_path,
    load_checkpoint,
    save_checkpoint,
)
from pe_model.errors import CheckpointError
from pe_model.labels import EXAM_LABELS
from pe_model.networks.r3d18 import R3D18
from pe_model.networks.sequence import SequenceConfig, SequenceModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PREPROCESS = {"spacing_mm": 1.0, "input_size": 32, "chunk_depth": 10, "crop_margin_mm": 10.0}


def _card() -> ModelCard:
    return ModelCard(
        name="pe-test",
        version="1.2.3",
        training_data="synthetic phantoms",
        intended_use="tests",
        metrics={"auroc_chunk": 0.75},
        not_for_clinical_use=True,
        created="2026-01-01T00:00:00+00:00",
    )


def _write(path: Path, kind: str = "tcn") -> tuple[str, R3D18, SequenceModel]:
    torch.manual_seed(3)
    encoder = R3D18(width=4)
    sequence = SequenceModel(SequenceConfig(kind=kind, feature_dim=32, hidden=8))
    sha = save_checkpoint(
        path,
        encoder_state=encoder.state_dict(),
        sequence_state=sequence.state_dict(),
        model_config=ModelConfig(encoder_width=4, sequence=sequence.config),
        preprocess_config=PREPROCESS,
        card=_card(),
    )
    return sha, encoder, sequence


@pytest.mark.parametrize("kind", ["tcn", "gru"])
def test_round_trip_restores_everything(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "model.pt"
    sha, encoder, sequence = _write(path, kind)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_checkpoint(path, expected_sha256=sha.upper())
    assert loaded.sha256 == sha
    assert loaded.card == _card()
    assert loaded.labels == EXAM_LABELS
    assert loaded.preprocess_config_dict == PREPROCESS
    assert loaded.model_config == ModelConfig(encoder_width=4, sequence=sequence.config)
    info = loaded.model_info
    assert (info.name, info.version, info.sha256, info.not_for_clinical_use) == (
        "pe-test",
        "1.2.3",
        sha,
        True,
    )
    rebuilt_encoder = loaded.build_encoder()
    rebuilt_sequence = loaded.build_sequence_model()
    assert not rebuilt_encoder.training and not rebuilt_sequence.training
    chunks = torch.rand(2, 3, 10, 16, 16)
    with torch.inference_mode():
        assert torch.equal(encoder.eval()(chunks), rebuilt_encoder(chunks))
        features = torch.randn(1, 40, 32)
        mask = torch.ones(1, 40, dtype=torch.bool)
        assert torch.equal(
            sequence.eval()(features, mask).exam_logits,
            rebuilt_sequence(features, mask).exam_logits,
        )


def test_file_loads_without_unpickling_objects(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    _write(path)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "pe-triage-checkpoint"
    assert set(payload) == {
        "format",
        "format_version",
        "metadata",
        "encoder",
        "sequence",
        "content_sha256",
    }


def test_modified_weights_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    _write(path)
    payload = torch.load(path, weights_only=True)
    payload["encoder"]["fc.bias"] = payload["encoder"]["fc.bias"] + 1.0
    torch.save(payload, path)
    with pytest.raises(
        CheckpointError, match="corrupted or was modified: content digest mismatch"
    ):
        load_checkpoint(path)


def test_modified_model_card_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    _write(path)
    payload = torch.load(path, weights_only=True)
    payload["metadata"]["card"]["not_for_clinical_use"] = False
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="content digest mismatch"):
        load_checkpoint(path)


def test_flipped_bytes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    _write(path)
    data = bytearray(path.read_bytes())
    for offset in range(len(data) // 3, len(data) // 3 + 64):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupted") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_unreadable_and_foreign_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a PE model checkpoint"):
        load_checkpoint(text)
    state_dict_only = tmp_path / "state.pt"
    torch.save(R3D18(width=4).state_dict(), state_dict_only)
    with pytest.raises(CheckpointError, match="not a PE model checkpoint"):
        load_checkpoint(state_dict_only)


def test_expected_sha256_mismatch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    _write(path)
    with pytest.raises(CheckpointError, match="expected 0000"):
        load_checkpoint(path, expected_sha256="0" * 64)


def test_builtin_demo_reference() -> None:
    if builtin_demo_path().is_file():
        assert load_checkpoint(BUILTIN_DEMO).card.not_for_clinical_use
    else:
        with pytest.raises(CheckpointError, match=r"pe_model/data/demo.pt missing"):
            load_checkpoint(BUILTIN_DEMO)
    with pytest.raises(CheckpointError, match="unknown built-in"):
        load_checkpoint("builtin:other")


def test_mismatched_config_is_refused_on_build(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.manual_seed(0)
    save_checkpoint(
        path,
        encoder_state=R3D18(width=4).state_dict(),
        sequence_state=SequenceModel(SequenceConfig(feature_dim=32, hidden=8)).state_dict(),
        model_config=ModelConfig(
            encoder_width=4, sequence=SequenceConfig(feature_dim=32, hidden=12)
        ),
        preprocess_config=PREPROCESS,
        card=_card(),
    )
    loaded = load_checkpoint(path)
    with pytest.raises(CheckpointError, match="sequence model weights do not fit"):
        loaded.build_sequence_model()
    with pytest.raises(ValueError, match="feature_dim"):
        ModelConfig(encoder_width=8, sequence=SequenceConfig(feature_dim=32))
