"""Stage-2 losses: the seed's, and the RSNA competition metric's normalisation (docs/METHOD.md).

Over a batch of B exams i, the nine exam labels j (weights w_j) and the chunks k of each exam
(our image-level unit, weight w = 0.0736 scaled by q_i, the fraction of positive chunks of exam
i, so the chunks of a negative exam carry no weight). When a long exam was resized to ``seq_len``
steps, each step stands for ``L / seq_len`` original chunks and is weighted by that factor.

``seed_loss`` (the seed's ``train_sequence_tcn_or_gru.py``)::

    sum_ik w * q_i * BCE_ik / (number of real steps) + sum_j w_j * mean_i BCE_ij

``rsna_weighted_loss`` (the competition metric, the project's variant)::

    (sum_ij w_j * BCE_ij + sum_ik w * q_i * BCE_ik) / (B * sum_j w_j + sum_ik w * q_i)
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


def seed_loss(
    exam_logits: Tensor,
    exam_targets: Tensor,
    chunk_logits: Tensor,
    chunk_targets: Tensor,
    step_weights: Tensor,
    q: Tensor,
    mask: Tensor,
) -> Tensor:
    """The seed's stage-2 loss of a batch (same shapes as :func:`rsna_weighted_loss`, plus
    ``mask (B, L)``: 1 on real steps). ``step_weights`` is the mask times the seed's length
    adjustment ``L_orig / seq_len`` of resized exams."""
    w_exam = exam_label_weights(exam_logits.device)
    exam_bce = F.binary_cross_entropy_with_logits(exam_logits.float(), exam_targets.float(),
                                                  reduction="none")  # (B, 9)
    chunk_bce = F.binary_cross_entropy_with_logits(chunk_logits.float(), chunk_targets.float(),
                                                   reduction="none")  # (B, L)
    chunk_w = IMAGE_WEIGHT * q.float().unsqueeze(1) * step_weights.float()  # (B, L)
    chunk_term = (chunk_bce * chunk_w).sum() / mask.float().sum().clamp_min(1.0)
    exam_term = (exam_bce.mean(dim=0) * w_exam).sum()
    return chunk_term + exam_term
