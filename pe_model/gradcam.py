"""3-D Grad-CAM on the stage-1 encoder's last conv block (layer4).

For chunks ``(K, 3, D, H, W)`` it weights layer4's maps by the spatially averaged gradient of
the chunk PE logit, keeps the positive part, upsamples trilinearly to ``(D, H, W)`` and scales
each chunk's map to [0, 1]. Gradients are needed, so it runs outside inference mode; the
encoder's own weights get no gradient.
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

    ``chunks`` must already be on the encoder's device (float, or uint8 scaled here to [0, 1]
    the same way the predictor scales them). A chunk whose map is zero everywhere (no positive
    evidence) stays all zero.
    """
    if chunks.ndim != 5:
        raise ValueError(f"expected chunks (K, 3, D, H, W), got shape {tuple(chunks.shape)}")
    was_training = encoder.training
    encoder.eval()
    outputs: list[Tensor] = []
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for start in range(0, chunks.shape[0], max(1, batch_size)):
                batch = chunks[start : start + batch_size].clone()
                outputs.append(_grad_cam_batch(encoder, batch, autocast_dtype))
    finally:
        encoder.train(was_training)
    return torch.cat(outputs, dim=0)


def _grad_cam_batch(encoder: R3D18, batch: Tensor, autocast_dtype: torch.dtype | None) -> Tensor:
    batch = to_network_input(batch)
    depth, height, width = batch.shape[2:]
    with _autocast(batch.device, autocast_dtype):
        maps = encoder.feature_maps(batch.requires_grad_(True))  # (K, C, d, h, w)
        logits = encoder.fc(encoder.pool(maps))[:, 0]  # (K,)
    (gradients,) = torch.autograd.grad(logits.float().sum(), maps)
    weights = gradients.float().mean(dim=(2, 3, 4), keepdim=True)  # (K, C, 1, 1, 1)
    cam = F.relu((weights * maps.float()).sum(dim=1, keepdim=True)).detach()  # (K, 1, d, h, w)
    cam = F.interpolate(cam, size=(depth, height, width), mode="trilinear", align_corners=False)
    cam = cam[:, 0]
    peak = cam.amax(dim=(1, 2, 3), keepdim=True)
    return torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam)).clamp_(0.0, 1.0)
