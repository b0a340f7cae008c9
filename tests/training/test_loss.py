"""The differentiable RSNA loss of stage 2 against hand-computed values and the numpy metric."""

from __future__ import annotations

import math

import numpy as np
import torch

from pe_model.labels import EXAM_LABEL_WEIGHTS, EXAM_LABELS, IMAGE_WEIGHT
from training.loss import rsna_weighted_loss
from training.metrics import rsna_weighted_log_loss


def test_hand_computed_value_with_padding_and_a_negative_exam() -> None:
    # Two exams; every exam logit is 0 (p = 0.5), so each exam term is ln 2 whatever the label.
    exam_logits = torch.zeros(2, 9)
    exam_targets = torch.tensor([[0, 0, 0, 0, 1, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.float32)
    # Exam 0: two real chunks (one positive) + one padded step; chunk p = 0.75. Exam 1: negative, q = 0.
    chunk_logits = torch.tensor([[math.log(3.0), math.log(3.0), 5.0], [1.0, -2.0, 0.3]])
    chunk_targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    step_weights = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    q = torch.tensor([0.5, 0.0])

    loss = rsna_weighted_loss(exam_logits, exam_targets, chunk_logits, chunk_targets, step_weights, q)

    w_sum = sum(EXAM_LABEL_WEIGHTS.values())
    w = IMAGE_WEIGHT
    numerator = 2 * math.log(2) * w_sum + w * 0.5 * (-math.log(0.75)) + w * 0.5 * (-math.log(0.25))
    denominator = 2 * w_sum + w * 0.5 * 2
    assert abs(float(loss) - numerator / denominator) < 1e-6

    # The padded step and the negative exam's chunks carry no weight.
    chunk_logits[0, 2] = -7.0
    chunk_logits[1] = torch.tensor([9.0, 9.0, 9.0])
    again = rsna_weighted_loss(exam_logits, exam_targets, chunk_logits, chunk_targets, step_weights, q)
    assert abs(float(again) - float(loss)) < 1e-6


def test_resized_steps_count_as_the_chunks_they_stand_for() -> None:
    exam_logits = torch.zeros(1, 9)
    exam_targets = torch.zeros(1, 9)
    exam_targets[0, 0] = 1
    chunk_logits = torch.tensor([[0.0, 0.0]])
    chunk_targets = torch.tensor([[1.0, 1.0]])
    q = torch.tensor([1.0])
    # Two steps standing for four chunks == four chunks with the same values.
    resized = rsna_weighted_loss(exam_logits, exam_targets, chunk_logits, chunk_targets, torch.full((1, 2), 2.0), q)
    full = rsna_weighted_loss(exam_logits, exam_targets, torch.zeros(1, 4), torch.ones(1, 4), torch.ones(1, 4), q)
    assert abs(float(resized) - float(full)) < 1e-6


def test_matches_the_numpy_competition_metric() -> None:
    rng = np.random.default_rng(0)
    n_exams, length = 5, 7
    exam_logits = torch.from_numpy(rng.normal(size=(n_exams, 9)).astype(np.float32))
    exam_targets = torch.from_numpy((rng.random((n_exams, 9)) < 0.4).astype(np.float32))
    chunk_logits = torch.from_numpy(rng.normal(size=(n_exams, length)).astype(np.float32))
    chunk_targets = torch.from_numpy((rng.random((n_exams, length)) < 0.3).astype(np.float32))
    chunk_targets[1] = 0.0  # an exam with no positive image
    q = chunk_targets.mean(dim=1)
    loss = rsna_weighted_loss(exam_logits, exam_targets, chunk_logits, chunk_targets, torch.ones(n_exams, length), q)

    exam_true = {name: exam_targets[:, j].numpy() for j, name in enumerate(EXAM_LABELS)}
    exam_pred = {name: torch.sigmoid(exam_logits[:, j]).numpy().astype(np.float64) for j, name in enumerate(EXAM_LABELS)}
    image_true = [chunk_targets[i].numpy() for i in range(n_exams)]
    image_pred = [torch.sigmoid(chunk_logits[i]).numpy().astype(np.float64) for i in range(n_exams)]
    expected = rsna_weighted_log_loss(exam_true, exam_pred, image_true, image_pred)
    assert abs(float(loss) - expected) < 1e-5


def test_gradients_flow_to_both_heads() -> None:
    exam_logits = torch.zeros(1, 9, requires_grad=True)
    chunk_logits = torch.zeros(1, 3, requires_grad=True)
    loss = rsna_weighted_loss(exam_logits, torch.ones(1, 9), chunk_logits, torch.ones(1, 3), torch.ones(1, 3),
                              torch.tensor([1.0]))
    loss.backward()
    assert exam_logits.grad is not None and float(exam_logits.grad.abs().sum()) > 0
    assert chunk_logits.grad is not None and float(chunk_logits.grad.abs().sum()) > 0
