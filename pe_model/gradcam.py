"""3-D Grad-CAM on the stage-1 encoder's last conv block (layer4).

For chunks ``(K, 3, D, H, W)`` it weights layer4's maps by the spatially averaged gradient of
the chunk's stage-1 PE logit, keeps the positive part, interpolates linearly back to ``(D, H, W)``
and scales each chunk's map to [0, 1].

The interpolation puts layer4 cell ``j`` where it is centred in the input: at voxel
``stride * j`` (``R3D18.MAP_STRIDE``: 8 slices, 16 pixels), because every strided convolution of
the network has padding ``kernel // 2``. The usual ``F.interpolate(..., align_corners=False)``
puts it at ``stride * j + (stride - 1) / 2`` instead: 7.5 pixels too far right and down, which
at input 160 over a ~250 mm lung crop moved every heatmap peak ~12 mm away from the clot. Layer4 is followed only by global average pooling and the
linear classifier, so the gradient needs just the layer4 maps: the predictor keeps them from its
stage-1 pass and Grad-CAM costs no second pass through the network. The encoder's own weights
never get a gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from pe_model.networks.r3d18 import R3D18, to_network_input


@contextlib.contextmanager
def _autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def grad_cam(
    encoder: R3D18,
    chunks: Tensor,
    *,
    autocast_dtype: torch.dtype | None = None,
    batch_size: int = 8,
) -> Tensor:
    """Grad-CAM maps ``(K, D, H, W)`` float32 in [0, 1] for chunks ``(K, 3, D, H, W)``.

    ``chunks`` must already be on the encoder's device (uint8 windows are scaled to [0, 1] as for
    the network). A chunk without positive evidence gets an all-zero map.
    """
    if chunks.ndim != 5:
        raise ValueError(f"expected chunks (K, 3, D, H, W), got shape {tuple(chunks.shape)}")
    was_training = encoder.training
    encoder.eval()
    outputs: list[Tensor] = []
    try:
        with torch.inference_mode(False), torch.no_grad():
            for start in range(0, chunks.shape[0], max(1, batch_size)):
                batch = to_network_input(chunks[start : start + batch_size].clone())
                with _autocast(batch.device, autocast_dtype):
                    maps = encoder.feature_maps(batch)
                outputs.append(grad_cam_from_maps(encoder, maps, tuple(batch.shape[2:])))
    finally:
        encoder.train(was_training)
    return torch.cat(outputs, dim=0)


def _axis_weights(target: int, cells: int, stride: int, device: torch.device) -> Tensor:
    """``(target, cells)`` linear-interpolation weights placing cell ``j`` at voxel ``stride * j``;
    voxels beyond the first or last cell centre take that cell's value."""
    position = (torch.arange(target, dtype=torch.float32, device=device) / float(stride)).clamp_(0.0, cells - 1.0)
    lower = position.floor().long().clamp_(max=max(cells - 2, 0))
    fraction = position - lower.float()
    weights = torch.zeros(target, cells, dtype=torch.float32, device=device)
    rows = torch.arange(target, device=device)
    if cells == 1:
        weights[:, 0] = 1.0
        return weights
    weights[rows, lower] = 1.0 - fraction
    weights[rows, lower + 1] = fraction
    return weights


def upsample_to_input(cam: Tensor, size: tuple[int, ...], stride: tuple[int, int, int]) -> Tensor:
    """Maps ``(K, d, h, w)`` on the layer4 grid -> ``(K, D, H, W)`` on the input grid, each cell
    at the input voxel it is centred on (``stride * index`` per axis), linear in between."""
    if cam.ndim != 4 or len(size) != 3 or len(stride) != 3:
        raise ValueError(f"expected cam (K, d, h, w), a (D, H, W) size and stride, got {tuple(cam.shape)}")
    wd, wh, ww = (
        _axis_weights(int(n), int(m), int(s), cam.device) for n, m, s in zip(size, cam.shape[1:], stride, strict=True)
    )
    return torch.einsum("kdhw,Dd,Hh,Ww->kDHW", cam.float(), wd, wh, ww)


def grad_cam_from_maps(encoder: R3D18, maps: Tensor, size: tuple[int, ...]) -> Tensor:
    """Grad-CAM from layer4 activations ``(K, C, d, h, w)`` already computed (e.g. kept from the
    stage-1 pass), upsampled to ``size = (D, H, W)``: ``(K, D, H, W)`` float32 in [0, 1].

    The gradient of the PE logit is taken through the encoder's pooling and classifier with
    autograd, so only the head is differentiated, not the whole network again.
    """
    if maps.ndim != 5 or len(size) != 3:
        raise ValueError(f"expected maps (K, C, d, h, w) and a (D, H, W) size, got {tuple(maps.shape)}, {size}")
    with torch.inference_mode(False), torch.enable_grad():
        leaf = maps.detach().clone().float().requires_grad_(True)
        logits = encoder.fc(encoder.pool(leaf))[:, 0]  # (K,)
        (gradients,) = torch.autograd.grad(logits.sum(), leaf)
    weights = gradients.mean(dim=(2, 3, 4), keepdim=True)  # (K, C, 1, 1, 1)
    cam = F.relu((weights * leaf.detach()).sum(dim=1))  # (K, d, h, w)
    cam = upsample_to_input(cam, size, encoder.MAP_STRIDE)
    peak = cam.amax(dim=(1, 2, 3), keepdim=True)
    return torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam)).clamp_(0.0, 1.0)
