"""Importing the authors' weights: the imported model computes what the seed's own networks compute.

The seed's networks are rebuilt from their published definitions (tests/pe_model/seed_reference.py)
with random weights and randomised batch-norm statistics; the import must reproduce their stage-1
logits and stage-2 outputs to 1e-5, for TCN and GRU, on full and zero-padded sequences.
"""

from __future__ import annotations

import importlib
import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from pe_model.checkpoint import load_checkpoint
from pe_model.cli import main
from pe_model.labels import EXAM_LABELS
from pe_model.networks.r3d18 import R3D18, to_network_input
from pe_model.networks.sequence import SequenceModel
from pe_model.predictor import Predictor
from pe_model.preprocessing import preprocess, preprocess_preset
from pe_model.seed_import import SeedImportError, convert_stage1, convert_stage2, infer_stage2_config
from pe_model.volume import load_series
from phantoms import PhantomTruth
from tests.pe_model.seed_reference import PEFeatureSequentialNet, VideoResNet, seed_sequence_input

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = 2  # r3d_18 at 2 channels instead of 64: 16-d features, same structure
FEATURES = 8 * BASE


def _randomise_norms(module: nn.Module, seed: int) -> None:
    """Batch-norm statistics and affine terms away from their identity defaults."""
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)


def _seed_stage1(seed: int = 0) -> VideoResNet:
    torch.manual_seed(seed)
    net = VideoResNet(base=BASE, num_classes=1)
    nn.init.normal_(net.fc.weight, 0.0, 0.2)
    _randomise_norms(net, seed)
    return net.eval()


def _seed_stage2(kind: str, seq_len: int, seed: int = 0, bidirectional: bool = True) -> PEFeatureSequentialNet:
    torch.manual_seed(seed)
    net = PEFeatureSequentialNet(seq_model=kind, input_size=FEATURES, hidden_size=16, levels=2 if kind == "TCN" else 1,
                                 kernel_size=3, seq_len=seq_len, dropout=0.2, bidirectional=bidirectional)
    for name, parameter in net.named_parameters():
        if name.endswith(".b"):  # attention position biases start at zero in the seed; make them matter
            parameter.data.normal_(0.0, 0.5)
    _randomise_norms(net, seed + 1)
    return net.eval()


def _seed_features(net: VideoResNet, x: Tensor) -> Tensor:
    h = net.layer4(net.layer3(net.layer2(net.layer1(net.stem(x)))))
    return net.avgpool(h).flatten(1)


def test_torchvision_r3d_18_keys_and_shapes_are_ours_at_full_width() -> None:
    theirs = VideoResNet(base=64).state_dict()
    ours = R3D18(width=64, num_classes=1).state_dict()
    assert list(theirs) == list(ours)
    assert all(tuple(theirs[k].shape) == tuple(ours[k].shape) for k in theirs)


def test_stage1_logits_match_the_seed_network() -> None:
    seed_net = _seed_stage1()
    width, state = convert_stage1(seed_net.state_dict())
    assert width == BASE
    ours = R3D18(width=width, num_classes=1)
    ours.load_state_dict(state)
    ours.eval()
    x = torch.rand(3, 3, 10, 32, 32)
    with torch.no_grad():
        expected = seed_net(x)
        assert torch.allclose(ours(x), expected, atol=1e-5, rtol=0)
        # The Predictor's batch-norm-folded copy too.
        assert torch.allclose(ours.fused_for_inference()(x), expected, atol=1e-5, rtol=0)
    assert float(expected.std()) > 1e-3  # the comparison is not between constants


@pytest.mark.parametrize("kind", ["TCN", "GRU"])
@pytest.mark.parametrize("length", [12, 5, 1], ids=["full", "padded", "one-chunk"])
def test_stage2_outputs_match_the_seed_network(kind: str, length: int) -> None:
    seq_len = 12
    seed_net = _seed_stage2(kind, seq_len)
    state = seed_net.state_dict()
    config = infer_stage2_config(state, FEATURES, None)
    assert (config.kind, config.hidden, config.seq_len, config.padding) == (kind.lower(), 16, seq_len, "seed")
    ours = SequenceModel(config)
    ours.load_state_dict(convert_stage2(state, config))
    ours.eval()
    generator = torch.Generator().manual_seed(3)
    batch = [torch.randn(length, FEATURES, generator=generator) for _ in range(2)]
    seed_inputs = [seed_sequence_input(series, seq_len) for series in batch]
    x = torch.stack([x for x, _ in seed_inputs])
    mask = torch.stack([m for _, m in seed_inputs])
    padded = torch.zeros(2, seq_len, FEATURES)
    for i, series in enumerate(batch):
        padded[i, :length] = series
    with torch.no_grad():
        expected = seed_net(x, mask)
        out = ours(padded, mask.bool())
    assert torch.allclose(out.chunk_logits, expected["pe_present_on_image"].squeeze(-1), atol=1e-5, rtol=0)
    for j, label in enumerate(EXAM_LABELS):
        assert torch.allclose(out.exam_logits[:, j], expected[label][:, 0], atol=1e-5, rtol=0), label
        assert torch.allclose(out.attention[:, j], seed_net.alphas[label], atol=1e-6, rtol=0), label


def test_a_unidirectional_gru_is_read_from_its_shapes() -> None:
    seed_net = _seed_stage2("GRU", 8, bidirectional=False)
    config = infer_stage2_config(seed_net.state_dict(), FEATURES, "gru")
    assert not config.bidirectional
    ours = SequenceModel(config)
    ours.load_state_dict(convert_stage2(seed_net.state_dict(), config))
    x, mask = seed_sequence_input(torch.randn(8, FEATURES), 8)
    with torch.no_grad():
        expected = seed_net.eval()(x[None], mask[None])
        out = ours.eval()(x[None, :, :FEATURES], mask[None].bool())
    assert torch.allclose(out.exam_logits[0, 0], expected["negative_exam_for_pe"][0, 0], atol=1e-5)


def _save(state: dict[str, Tensor], path: Path) -> Path:
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def seed_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, VideoResNet, PEFeatureSequentialNet]:
    folder = tmp_path_factory.mktemp("seed")
    stage1 = _seed_stage1(5)
    stage2 = _seed_stage2("TCN", 40, seed=6)
    return (_save(stage1.state_dict(), folder / "epoch9.pth"), _save(stage2.state_dict(), folder / "epoch42.pth"),
            stage1, stage2)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_import_seed_round_trip_predicts_what_the_seed_networks_compute(
    seed_files: tuple[Path, Path, VideoResNet, PEFeatureSequentialNet],
    phantom_series: tuple[Path, PhantomTruth],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stage1_path, stage2_path, stage1, stage2 = seed_files
    out = tmp_path / "seed.pt"
    code, stdout, stderr = _run(["import-seed", "--stage1", str(stage1_path), "--stage2", str(stage2_path),
                                 "--out", str(out)], capsys)
    assert code == 0, stderr
    assert "sha256=" in stdout
    checkpoint = load_checkpoint(out)
    assert checkpoint.preprocess_config == preprocess_preset("seed")
    assert checkpoint.model_config.sequence.padding == "seed"
    assert "epoch9.pth" in checkpoint.card.training_data and checkpoint.card.not_for_clinical_use

    # predict from the command line works on the imported checkpoint.
    directory, _ = phantom_series
    code, stdout, stderr = _run(["predict", str(directory), "--checkpoint", str(out), "--json",
                                 "--gradcam-top-k", "1"], capsys)
    assert code == 0, stderr
    assert json.loads(stdout)["model"]["sha256"] == checkpoint.sha256

    # `pe-agent analyze` (the node's command, found through pyproject's entry point) writes its reports with it.
    agent = _console_script("pe-agent")
    code = agent(["analyze", str(directory), "--checkpoint", str(out), "--out", str(tmp_path / "reports"), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["model"]["sha256"] == checkpoint.sha256
    assert any((tmp_path / "reports").glob("*.dcm"))

    # Stage by stage, the Predictor computes what the seed's networks compute on the same input.
    predictor = Predictor.from_checkpoint(out, gradcam_top_k=0)
    prepared = preprocess(load_series(directory), predictor.preprocess_config)
    assert prepared.num_chunks < 40  # a padded sequence
    stage_one = predictor.run_stage_one(prepared.chunks)
    with torch.no_grad():
        x = to_network_input(prepared.chunks)
        seed_features = _seed_features(stage1, x)
        assert torch.allclose(stage_one.features, seed_features, atol=1e-5, rtol=0)
        seed_x, seed_mask = seed_sequence_input(seed_features, 40)
        expected = stage2(seed_x[None], seed_mask[None])
    stage_two = predictor.run_stage_two(stage_one.features)
    expected_exam = np.array([torch.sigmoid(expected[label][0, 0]).item() for label in EXAM_LABELS])
    expected_chunks = torch.sigmoid(expected["pe_present_on_image"][0, : prepared.num_chunks, 0]).numpy()
    np.testing.assert_allclose(stage_two.exam, expected_exam, atol=1e-5, rtol=0)
    np.testing.assert_allclose(stage_two.chunks, expected_chunks, atol=1e-5, rtol=0)


def _console_script(name: str) -> Callable[[list[str]], int]:
    """The ``main`` a console script of this repository names in pyproject.toml."""
    scripts = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts[name].partition(":")
    return cast(Callable[[list[str]], int], getattr(importlib.import_module(module), function))


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code, _, stderr = _run(argv, capsys)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_stage2_state_dict_that_does_not_fit_names_the_first_mismatching_key(
    seed_files: tuple[Path, Path, VideoResNet, PEFeatureSequentialNet], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stage1_path, _, _, stage2 = seed_files
    state = stage2.state_dict()
    missing = {k: v for k, v in state.items() if k != "tcn.network.1.batchnorm2.running_var"}
    line = _one_line_error(["import-seed", "--stage1", str(stage1_path), "--stage2",
                            str(_save(missing, tmp_path / "missing.pth")), "--out", str(tmp_path / "m.pt")], capsys)
    assert "'tcn.network.1.batchnorm2.running_var'" in line and "missing" in line
    reshaped = dict(state)
    reshaped["attentions.central_pe.b"] = torch.zeros(39)
    line = _one_line_error(["import-seed", "--stage1", str(stage1_path), "--stage2",
                            str(_save(reshaped, tmp_path / "shape.pth")), "--out", str(tmp_path / "s.pt")], capsys)
    assert "'attentions.central_pe.b'" in line and "(39,)" in line
    extra = dict(state)
    extra["head.weight"] = torch.zeros(1)
    line = _one_line_error(["import-seed", "--stage1", str(stage1_path), "--stage2",
                            str(_save(extra, tmp_path / "extra.pth")), "--out", str(tmp_path / "e.pt")], capsys)
    assert "unexpected key 'head.weight'" in line
    # A TCN state dict read as a GRU.
    line = _one_line_error(["import-seed", "--stage1", str(stage1_path), "--stage2",
                            str(tmp_path / "extra.pth"), "--seq-model", "gru", "--out", str(tmp_path / "g.pt")],
                           capsys)
    assert "'gru.weight_hh_l0'" in line
    assert not any(tmp_path.glob("*.pt"))


def test_a_stage1_state_dict_that_does_not_fit_names_the_first_mismatching_key(
    seed_files: tuple[Path, Path, VideoResNet, PEFeatureSequentialNet], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, stage2_path, stage1, _ = seed_files
    kinetics = dict(stage1.state_dict())
    kinetics["fc.weight"] = torch.zeros(400, FEATURES)
    kinetics["fc.bias"] = torch.zeros(400)
    line = _one_line_error(["import-seed", "--stage1", str(_save(kinetics, tmp_path / "k.pth")), "--stage2",
                            str(stage2_path), "--out", str(tmp_path / "k.pt")], capsys)
    assert "'fc.weight'" in line and f"(400, {FEATURES})" in line
    renamed = {k.replace("layer3.1.conv2.1.", "layer3.1.conv2.2."): v for k, v in stage1.state_dict().items()}
    line = _one_line_error(["import-seed", "--stage1", str(_save(renamed, tmp_path / "r.pth")), "--stage2",
                            str(stage2_path), "--out", str(tmp_path / "r.pt")], capsys)
    assert "'layer3.1.conv2.1.weight'" in line
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    line = _one_line_error(["import-seed", "--stage1", str(tmp_path / "junk.pth"), "--stage2", str(stage2_path),
                            "--out", str(tmp_path / "j.pt")], capsys)
    assert "junk.pth" in line


def test_stage2_needs_the_seeds_difference_features() -> None:
    seed_net = _seed_stage2("TCN", 8)
    with pytest.raises(SeedImportError, match=str(3 * FEATURES)):
        infer_stage2_config(seed_net.state_dict(), 2 * FEATURES, None)
