"""The RSNA competition metric as a differentiable stage-2 loss (training.metrics).

total = (sum_ij w_j * BCE_ij + sum_ik w * q_i * BCE_ik) / (sum_ij w_j + sum_ik w * q_i)

over a batch of exams i, the nine exam labels j and the chunks k of each exam (our image-level
unit). q_i is the fraction of positive chunks of exam i, so the chunks of a negative exam carry no
weight. When a long exam was resized to ``seq_len`` steps, each step stands for ``L / seq_len``
original chunks and is weighted by that factor, so the sum over steps equals the sum over chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pe_model.labels import EXAM_LABEL_WEIGHTS, EXAM_LABELS, IMAGE_WEIGHT


def exam_label_weights(device: torch.device | None = None) -> Tensor:
    """(9,) float32 RSNA weights in EXAM_LABELS order."""
    return torch.tensor([EXAM_LABEL_WEIGHTS[name] for name in EXAM_LABELS], dtype=torch.float32,
                        device=device)


def rsna_weighted_loss(
    exam_logits: Tensor,
    exam_targets: Tensor,
    chunk_logits: Tensor,
    chunk_targets: Tensor,
    step_weights: Tensor,
    q: Tensor,
) -> Tensor:
    """Weighted BCE of a batch, normalised exactly like the competition metric.

    Shapes: exam_logits/exam_targets (B, 9); chunk_logits/chunk_targets (B, L);
    step_weights (B, L): 0 on padding, 1 per real chunk, ``L_orig / seq_len`` on resized steps;
    q (B,): fraction of positive chunks of each exam (before resizing). Returns a scalar.
    """
    w_exam = exam_label_weights(exam_logits.device)
    exam_bce = F.binary_cross_entropy_with_logits(exam_logits.float(), exam_targets.float(),
                                                  reduction="none")  # (B, 9)
    chunk_bce = F.binary_cross_entropy_with_logits(chunk_logits.float(), chunk_targets.float(),
                                                   reduction="none")  # (B, L)
    chunk_w = IMAGE_WEIGHT * q.float().unsqueeze(1) * step_weights.float()  # (B, L)
    numerator = (exam_bce * w_exam).sum() + (chunk_bce * chunk_w).sum()
    denominator = w_exam.sum() * exam_logits.shape[0] + chunk_w.sum()
    return numerator / denominator
