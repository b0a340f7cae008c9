"""R3D-18 parity with torchvision, the sequence model's masking and resizing, Grad-CAM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pe_model.errors import CheckpointError
from pe_model.gradcam import grad_cam, upsample_to_input
from pe_model.networks.r3d18 import R3D18, to_network_input
from pe_model.networks.sequence import (
    SequenceConfig,
    SequenceModel,
    difference_features,
    fit_sequence,
    restore_sequence,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# State-dict keys and shapes of torchvision.models.video.r3d_18() (num_classes=400), written from
# torchvision/models/video/resnet.py: BasicStem, BasicBlock(conv1=(Conv3DSimple, BN, ReLU),
# conv2=(Conv3DSimple, BN), downsample=(1x1x1 conv, BN) on the first block of layer2..4), fc.
TORCHVISION_R3D18_STATE: list[tuple[str, tuple[int, ...]]] = [
    ('stem.0.weight', (64, 3, 3, 7, 7)),
    ('stem.1.weight', (64,)),
    ('stem.1.bias', (64,)),
    ('stem.1.running_mean', (64,)),
    ('stem.1.running_var', (64,)),
    ('stem.1.num_batches_tracked', ()),
    ('layer1.0.conv1.0.weight', (64, 64, 3, 3, 3)),
    ('layer1.0.conv1.1.weight', (64,)),
    ('layer1.0.conv1.1.bias', (64,)),
    ('layer1.0.conv1.1.running_mean', (64,)),
    ('layer1.0.conv1.1.running_var', (64,)),
    ('layer1.0.conv1.1.num_batches_tracked', ()),
    ('layer1.0.conv2.0.weight', (64, 64, 3, 3, 3)),
    ('layer1.0.conv2.1.weight', (64,)),
    ('layer1.0.conv2.1.bias', (64,)),
    ('layer1.0.conv2.1.running_mean', (64,)),
    ('layer1.0.conv2.1.running_var', (64,)),
    ('layer1.0.conv2.1.num_batches_tracked', ()),
    ('layer1.1.conv1.0.weight', (64, 64, 3, 3, 3)),
    ('layer1.1.conv1.1.weight', (64,)),
    ('layer1.1.conv1.1.bias', (64,)),
    ('layer1.1.conv1.1.running_mean', (64,)),
    ('layer1.1.conv1.1.running_var', (64,)),
    ('layer1.1.conv1.1.num_batches_tracked', ()),
    ('layer1.1.conv2.0.weight', (64, 64, 3, 3, 3)),
    ('layer1.1.conv2.1.weight', (64,)),
    ('layer1.1.conv2.1.bias', (64,)),
    ('layer1.1.conv2.1.running_mean', (64,)),
    ('layer1.1.conv2.1.running_var', (64,)),
    ('layer1.1.conv2.1.num_batches_tracked', ()),
    ('layer2.0.conv1.0.weight', (128, 64, 3, 3, 3)),
    ('layer2.0.conv1.1.weight', (128,)),
    ('layer2.0.conv1.1.bias', (128,)),
    ('layer2.0.conv1.1.running_mean', (128,)),
    ('layer2.0.conv1.1.running_var', (128,)),
    ('layer2.0.conv1.1.num_batches_tracked', ()),
    ('layer2.0.conv2.0.weight', (128, 128, 3, 3, 3)),
    ('layer2.0.conv2.1.weight', (128,)),
    ('layer2.0.conv2.1.bias', (128,)),
    ('layer2.0.conv2.1.running_mean', (128,)),
    ('layer2.0.conv2.1.running_var', (128,)),
    ('layer2.0.conv2.1.num_batches_tracked', ()),
    ('layer2.0.downsample.0.weight', (128, 64, 1, 1, 1)),
    ('layer2.0.downsample.1.weight', (128,)),
    ('layer2.0.downsample.1.bias', (128,)),
    ('layer2.0.downsample.1.running_mean', (128,)),
    ('layer2.0.downsample.1.running_var', (128,)),
    ('layer2.0.downsample.1.num_batches_tracked', ()),
    ('layer2.1.conv1.0.weight', (128, 128, 3, 3, 3)),
    ('layer2.1.conv1.1.weight', (128,)),
    ('layer2.1.conv1.1.bias', (128,)),
    ('layer2.1.conv1.1.running_mean', (128,)),
    ('layer2.1.conv1.1.running_var', (128,)),
    ('layer2.1.conv1.1.num_batches_tracked', ()),
    ('layer2.1.conv2.0.weight', (128, 128, 3, 3, 3)),
    ('layer2.1.conv2.1.weight', (128,)),
    ('layer2.1.conv2.1.bias', (128,)),
    ('layer2.1.conv2.1.running_mean', (128,)),
    ('layer2.1.conv2.1.running_var', (128,)),
    ('layer2.1.conv2.1.num_batches_tracked', ()),
    ('layer3.0.conv1.0.weight', (256, 128, 3, 3, 3)),
    ('layer3.0.conv1.1.weight', (256,)),
    ('layer3.0.conv1.1.bias', (256,)),
    ('layer3.0.conv1.1.running_mean', (256,)),
    ('layer3.0.conv1.1.running_var', (256,)),
    ('layer3.0.conv1.1.num_batches_tracked', ()),
    ('layer3.0.conv2.0.weight', (256, 256, 3, 3, 3)),
    ('layer3.0.conv2.1.weight', (256,)),
    ('layer3.0.conv2.1.bias', (256,)),
    ('layer3.0.conv2.1.running_mean', (256,)),
    ('layer3.0.conv2.1.running_var', (256,)),
    ('layer3.0.conv2.1.num_batches_tracked', ()),
    ('layer3.0.downsample.0.weight', (256, 128, 1, 1, 1)),
    ('layer3.0.downsample.1.weight', (256,)),
    ('layer3.0.downsample.1.bias', (256,)),
    ('layer3.0.downsample.1.running_mean', (256,)),
    ('layer3.0.downsample.1.running_var', (256,)),
    ('layer3.0.downsample.1.num_batches_tracked', ()),
    ('layer3.1.conv1.0.weight', (256, 256, 3, 3, 3)),
    ('layer3.1.conv1.1.weight', (256,)),
    ('layer3.1.conv1.1.bias', (256,)),
    ('layer3.1.conv1.1.running_mean', (256,)),
    ('layer3.1.conv1.1.running_var', (256,)),
    ('layer3.1.conv1.1.num_batches_tracked', ()),
    ('layer3.1.conv2.0.weight', (256, 256, 3, 3, 3)),
    ('layer3.1.conv2.1.weight', (256,)),
    ('layer3.1.conv2.1.bias', (256,)),
    ('layer3.1.conv2.1.running_mean', (256,)),
    ('layer3.1.conv2.1.running_var', (256,)),
    ('layer3.1.conv2.1.num_batches_tracked', ()),
    ('layer4.0.conv1.0.weight', (512, 256, 3, 3, 3)),
    ('layer4.0.conv1.1.weight', (512,)),
    ('layer4.0.conv1.1.bias', (512,)),
    ('layer4.0.conv1.1.running_mean', (512,)),
    ('layer4.0.conv1.1.running_var', (512,)),
    ('layer4.0.conv1.1.num_batches_tracked', ()),
    ('layer4.0.conv2.0.weight', (512, 512, 3, 3, 3)),
    ('layer4.0.conv2.1.weight', (512,)),
    ('layer4.0.conv2.1.bias', (512,)),
    ('layer4.0.conv2.1.running_mean', (512,)),
    ('layer4.0.conv2.1.running_var', (512,)),
    ('layer4.0.conv2.1.num_batches_tracked', ()),
    ('layer4.0.downsample.0.weight', (512, 256, 1, 1, 1)),
    ('layer4.0.downsample.1.weight', (512,)),
    ('layer4.0.downsample.1.bias', (512,)),
    ('layer4.0.downsample.1.running_mean', (512,)),
    ('layer4.0.downsample.1.running_var', (512,)),
    ('layer4.0.downsample.1.num_batches_tracked', ()),
    ('layer4.1.conv1.0.weight', (512, 512, 3, 3, 3)),
    ('layer4.1.conv1.1.weight', (512,)),
    ('layer4.1.conv1.1.bias', (512,)),
    ('layer4.1.conv1.1.running_mean', (512,)),
    ('layer4.1.conv1.1.running_var', (512,)),
    ('layer4.1.conv1.1.num_batches_tracked', ()),
    ('layer4.1.conv2.0.weight', (512, 512, 3, 3, 3)),
    ('layer4.1.conv2.1.weight', (512,)),
    ('layer4.1.conv2.1.bias', (512,)),
    ('layer4.1.conv2.1.running_mean', (512,)),
    ('layer4.1.conv2.1.running_var', (512,)),
    ('layer4.1.conv2.1.num_batches_tracked', ()),
    ('fc.weight', (400, 512)),
    ('fc.bias', (400,)),
]


def test_r3d18_state_dict_matches_torchvision_keys_and_shapes() -> None:
    model = R3D18(width=64, num_classes=400)
    ours = [(key, tuple(value.shape)) for key, value in model.state_dict().items()]
    assert ours == TORCHVISION_R3D18_STATE


def test_r3d18_shapes_and_width_scaling() -> None:
    torch.manual_seed(0)
    model = R3D18(width=8).eval()
    chunks = torch.rand(2, 3, 10, 32, 32)
    with torch.inference_mode():
        logits = model(chunks)
        features = model.features(chunks)
        maps = model.feature_maps(chunks)
        from_features = model.fc(features)
    assert logits.shape == (2, 1)
    assert features.shape == (2, 64) == (2, model.feature_dim)
    # D 10 -> 5 -> 3 -> 2 and H 32 -> 16 -> 8 -> 4 -> 2 as in torchvision's strides.
    assert maps.shape == (2, 64, 2, 2, 2)
    assert torch.allclose(from_features, logits, atol=1e-6)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["stem.0.weight"] == (8, 3, 3, 7, 7)
    assert shapes["layer4.0.downsample.0.weight"] == (64, 32, 1, 1, 1)


def test_to_network_input_scales_uint8_like_to_tensor() -> None:
    chunks = torch.tensor([0, 51, 255], dtype=torch.uint8).reshape(1, 3, 1, 1, 1)
    scaled = to_network_input(chunks)
    assert scaled.dtype == torch.float32
    assert torch.allclose(scaled.flatten(), torch.tensor([0.0, 0.2, 1.0]))


@pytest.fixture(scope="module")
def torchvision_like_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file shaped exactly like torchvision's r3d_18 Kinetics-400 weights."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tv") / "r3d_18.pth"
    torch.save(R3D18(width=64, num_classes=400).state_dict(), path)
    return path


def test_load_torchvision_state_dict_replaces_the_classifier(torchvision_like_state: Path) -> None:
    source = torch.load(torchvision_like_state, weights_only=True)
    model = R3D18(width=64, num_classes=1)
    model.load_torchvision_state_dict(torchvision_like_state)
    loaded = model.state_dict()
    for key, value in source.items():
        if key.startswith("fc."):
            continue
        assert torch.equal(loaded[key], value), key
    assert loaded["fc.weight"].shape == (1, 512)
    assert model.eval()(torch.rand(1, 3, 4, 16, 16)).shape == (1, 1)


def test_load_torchvision_state_dict_refuses_other_keys(torchvision_like_state: Path, tmp_path: Path) -> None:
    state = torch.load(torchvision_like_state, weights_only=True)
    state["stem.0.kernel"] = state.pop("stem.0.weight")
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(CheckpointError, match="missing keys.*stem.0.weight"):
        R3D18(width=64).load_torchvision_state_dict(broken)
    with pytest.raises(CheckpointError, match="width 64"):
        R3D18(width=8).load_torchvision_state_dict(torchvision_like_state)


def test_sequence_config_round_trip_and_validation() -> None:
    config = SequenceConfig(kind="gru", feature_dim=64, hidden=16, levels=1, seq_len=12)
    assert SequenceConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="kind"):
        SequenceConfig(kind="lstm")
    with pytest.raises(ValueError, match="unknown"):
        SequenceConfig.from_dict({**config.to_dict(), "extra": 1})


def test_difference_features_zero_at_edges_and_padding() -> None:
    x = torch.tensor([[[1.0], [3.0], [6.0], [100.0]]])
    mask = torch.tensor([[True, True, True, False]])
    out = difference_features(x, mask)[0]
    assert out[:, 0].tolist() == [1.0, 3.0, 6.0, 0.0]
    assert out[:, 1].tolist() == [0.0, 2.0, 3.0, 0.0]  # x - x_prev
    assert out[:, 2].tolist() == [-2.0, -3.0, 0.0, 0.0]  # x - x_next


def test_fit_sequence_pads_short_and_resizes_long() -> None:
    short = fit_sequence(np.arange(14, dtype=np.float32).reshape(7, 2), 10)
    assert short.features.shape == (10, 2)
    assert short.mask.tolist() == [True] * 7 + [False] * 3
    assert short.positions.tolist() == [0, 1, 2, 3, 4, 5, 6, -1, -1, -1]
    assert torch.equal(restore_sequence(short.features[:, 0], 7), torch.arange(0, 14, 2).float())

    ramp = torch.arange(100, dtype=torch.float32).unsqueeze(1)
    long = fit_sequence(ramp, 40)
    assert long.features.shape == (40, 1) and bool(long.mask.all()) and long.length == 100
    # A linear ramp resized linearly stays on the ramp: each step equals its source position.
    assert np.allclose(long.features[:, 0].numpy(), long.positions, atol=1e-4)
    assert np.all(np.diff(long.positions) > 0) and 0 <= long.positions[0] and long.positions[-1] <= 99
    back = restore_sequence(long.features[:, 0], 100)
    assert back.shape == (100,)
    assert torch.allclose(back[5:95], ramp[5:95, 0], atol=1e-3)
    constant = restore_sequence(torch.full((40,), 0.25), 100)
    assert torch.allclose(constant, torch.full((100,), 0.25))


@pytest.mark.parametrize("kind", ["tcn", "gru"])
def test_sequence_model_masks_padding(kind: str) -> None:
    torch.manual_seed(0)
    config = SequenceConfig(kind=kind, feature_dim=16, hidden=8, seq_len=12)
    model = SequenceModel(config).eval()
    fitted = fit_sequence(torch.randn(5, 16), 12)
    features = fitted.features.unsqueeze(0).repeat(2, 1, 1)
    features[1, 5:] = torch.randn(7, 16) * 50  # garbage in the padded steps
    mask = fitted.mask.unsqueeze(0).repeat(2, 1)
    with torch.inference_mode():
        out = model(features, mask)
    assert out.exam_logits.shape == (2, 9)
    assert out.chunk_logits.shape == (2, 12)
    assert out.attention.shape == (2, 9, 12)
    assert torch.all(out.attention[:, :, 5:] == 0)
    assert torch.allclose(out.attention.sum(-1), torch.ones(2, 9), atol=1e-5)
    assert torch.allclose(out.exam_logits[0], out.exam_logits[1], atol=1e-5)
    assert torch.allclose(out.chunk_logits[0, :5], out.chunk_logits[1, :5], atol=1e-5)


@pytest.mark.parametrize("kind", ["tcn", "gru"])
def test_sequence_model_trains(kind: str) -> None:
    torch.manual_seed(0)
    model = SequenceModel(SequenceConfig(kind=kind, feature_dim=8, hidden=8, seq_len=6, dropout=0.0))
    features = torch.randn(4, 6, 8)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3, [True] * 6, [True] + [False] * 5])
    target = torch.tensor([[1.0] * 9, [0.0] * 9, [1.0] * 9, [0.0] * 9])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        out = model(features, mask)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out.exam_logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_sequence_model_rejects_bad_masks() -> None:
    model = SequenceModel(SequenceConfig(feature_dim=4, hidden=4, seq_len=4)).eval()
    with pytest.raises(ValueError, match="prefix"):
        model(torch.randn(1, 4, 4), torch.tensor([[True, False, True, False]]))
    with pytest.raises(ValueError, match="at least one"):
        model(torch.randn(1, 4, 4), torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="fit_sequence"):
        model(torch.randn(1, 5, 4), torch.ones(1, 5, dtype=torch.bool))


def test_grad_cam_shapes_range_and_batch_independence() -> None:
    torch.manual_seed(0)
    encoder = R3D18(width=4).eval()
    # A bias that makes the PE logit rise with layer4 activity, so the CAM is not empty.
    with torch.no_grad():
        encoder.fc.weight.fill_(1.0)
    chunks = torch.randint(0, 256, (3, 3, 10, 32, 32), dtype=torch.uint8)
    chunks[1, :, 2:5, 8:16, 8:16] = 255  # a bright blob
    cams = grad_cam(encoder, chunks, batch_size=8)
    assert cams.shape == (3, 10, 32, 32) and cams.dtype == torch.float32
    assert float(cams.min()) >= 0.0 and float(cams.max()) <= 1.0
    assert torch.allclose(cams.amax(dim=(1, 2, 3)), torch.ones(3))
    one_by_one = grad_cam(encoder, chunks, batch_size=1)
    assert torch.allclose(cams, one_by_one, atol=1e-4)
    assert not any(p.grad is not None for p in encoder.parameters())
    with torch.inference_mode():  # callers inside inference mode still get gradients
        again = grad_cam(encoder, chunks[:1])
    assert torch.allclose(again, cams[:1], atol=1e-4)


def test_grad_cam_under_bf16_autocast_on_cpu() -> None:
    torch.manual_seed(0)
    encoder = R3D18(width=4).eval()
    with torch.no_grad():
        encoder.fc.weight.fill_(1.0)
    chunks = torch.rand(2, 3, 10, 32, 32)
    exact = grad_cam(encoder, chunks)
    mixed = grad_cam(encoder, chunks, autocast_dtype=torch.bfloat16)
    assert mixed.shape == exact.shape and mixed.dtype == torch.float32
    correlation = torch.corrcoef(torch.stack([exact.flatten(), mixed.flatten()]))[0, 1]
    assert float(correlation) > 0.9


def test_grad_cam_from_kept_maps_equals_full_backward_grad_cam() -> None:
    """The shortcut (autograd through pool + fc on kept layer4 maps) is Grad-CAM exactly."""
    torch.manual_seed(2)
    encoder = R3D18(width=4).eval()
    with torch.no_grad():
        encoder.fc.weight.normal_(0.0, 1.0)
    chunks = torch.rand(2, 3, 10, 32, 32, requires_grad=True)
    captured: list[torch.Tensor] = []

    def keep(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
        output.retain_grad()
        captured.append(output)

    # Classic Grad-CAM: hook layer4 in a full forward pass, backpropagate the logit to it.
    handle = encoder.layer4.register_forward_hook(keep)
    encoder(chunks)[:, 0].sum().backward()
    handle.remove()
    (maps,) = captured
    assert maps.grad is not None
    weights = maps.grad.mean(dim=(2, 3, 4), keepdim=True)
    reference = torch.relu((weights * maps).sum(1)).detach()
    reference = upsample_to_input(reference, (10, 32, 32), R3D18.MAP_STRIDE)
    peak = reference.amax(dim=(1, 2, 3), keepdim=True)
    assert float(peak.max()) > 0.0
    reference = torch.where(peak > 0, reference / peak.clamp_min(1e-12), torch.zeros_like(reference))
    ours = grad_cam(encoder, chunks.detach())
    assert torch.allclose(ours, reference, atol=1e-5)


def test_fused_for_inference_matches_the_unfused_network() -> None:
    torch.manual_seed(4)
    model = R3D18(width=4).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
    fused = model.fused_for_inference()
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())  # original kept
    chunks = torch.rand(2, 3, 10, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(fused(chunks), model(chunks), atol=1e-4)
        assert torch.allclose(fused.features(chunks), model.features(chunks), atol=1e-4)


def test_layer4_cells_are_centred_where_the_map_stride_says() -> None:
    """With spatially uniform kernels the input gradient of a layer4 cell is symmetric about the
    voxel the cell is centred on; on an input of 17 x 97 x 97 the middle cell (1, 3, 3) must sit
    on the middle voxel (8, 48, 48) = ``MAP_STRIDE * index``, not half a stride further on as
    ``align_corners=False`` interpolation assumes."""
    encoder = R3D18(width=2).eval()
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, torch.nn.Conv3d):
                module.weight.fill_(1.0 / module.weight[0].numel())
    x = torch.ones(1, 3, 17, 97, 97, requires_grad=True)
    maps = encoder.feature_maps(x)
    assert tuple(maps.shape[2:]) == (3, 7, 7)
    cell = (1, 3, 3)
    maps[0, :, cell[0], cell[1], cell[2]].sum().backward()
    assert x.grad is not None
    weight = x.grad.abs().sum(dim=(0, 1)).double()
    grids = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in weight.shape), indexing="ij")
    centroid = [float((g * weight).sum() / weight.sum()) for g in grids]
    expected = [s * j for s, j in zip(R3D18.MAP_STRIDE, cell, strict=True)]
    assert expected == [8, 48, 48]
    assert centroid == pytest.approx(expected, abs=0.25)


def test_upsampling_puts_each_cell_on_its_centre_voxel() -> None:
    cam = torch.zeros(1, 2, 10, 10)
    cam[0, 0, 3, 5] = 1.0
    up = upsample_to_input(cam, (10, 160, 160), R3D18.MAP_STRIDE)
    assert up.shape == (1, 10, 160, 160)
    assert tuple(int(i) for i in torch.nonzero(up[0] == up.max())[0]) == (0, 48, 80)
    assert float(up[0, 0, 56, 80]) == pytest.approx(0.5)  # half-way to the next cell centre
    assert float(up[0, 4, 48, 80]) == pytest.approx(0.5)  # 4 of 8 slices to the next cell
    # Beyond the last cell centre the map holds its value instead of fading.
    edge = torch.zeros(1, 2, 10, 10)
    edge[0, 1, 9, 9] = 1.0
    assert float(upsample_to_input(edge, (10, 160, 160), R3D18.MAP_STRIDE)[0, 9, 159, 159]) == 1.0
