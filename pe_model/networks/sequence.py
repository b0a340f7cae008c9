"""Stage 2: a sequence model over the chunk features of one exam.

As in the seed (Ma et al. 2022): each step sees ``[x, x - x_prev, x - x_next]``; a temporal
convolutional network (causal, dilated, residual, as the seed's locuslab TCN) or a bidirectional
GRU encodes the sequence; a per-step head gives each chunk's PE logit; each of the nine exam
labels has its own attention pooling, concatenated with max pooling, then a linear logit.
Padding (``SequenceConfig.padding``): ``"seed"`` computes exactly what the seed's
``PEFeatureSequentialNet`` computes (padded steps enter the difference features, the sequence
model and max pooling; attention weights are ``exp(tanh(.)) * mask`` normalised, plus 1e-10), so
the authors' weights and the ``seed`` preset give the published outputs. ``"masked"`` (the
project's variant) gives padded steps exactly zero attention, leaves them out of max pooling, the
difference features and the GRU's backward pass (docs/METHOD.md, "Stage 2").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

SEQUENCE_KINDS: tuple[str, ...] = ("tcn", "gru")
#: How padded steps are treated: the seed's arithmetic, or masked out (the project's variant).
PADDINGS: tuple[str, ...] = ("masked", "seed")


@dataclass(frozen=True)
class SequenceConfig:
    """Hyper-parameters of the stage-2 model (seed run script: TCN, 2 levels, hidden 128).

    ``levels`` is the number of TCN blocks or GRU layers (the seed's GRU has one layer);
    ``bidirectional`` applies to the GRU only. A checkpoint that records no ``padding`` or
    ``bidirectional`` was made by the project's variant: masked, bidirectional.
    """

    kind: str = "tcn"
    feature_dim: int = 512
    hidden: int = 128
    levels: int = 2
    kernel_size: int = 3
    dropout: float = 0.2
    seq_len: int = 40
    num_labels: int = 9
    padding: str = "masked"
    bidirectional: bool = True

    def __post_init__(self) -> None:
        if self.kind not in SEQUENCE_KINDS:
            raise ValueError(f"sequence kind must be one of {SEQUENCE_KINDS}, got {self.kind!r}")
        if self.padding not in PADDINGS:
            raise ValueError(f"sequence padding must be one of {PADDINGS}, got {self.padding!r}")
        if not isinstance(self.bidirectional, bool):
            raise ValueError("bidirectional must be true or false")
        for name in ("feature_dim", "hidden", "levels", "kernel_size", "seq_len", "num_labels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SequenceConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown sequence config keys: {unknown}")
        return cls(**dict(data))


@dataclass(frozen=True, eq=False)
class SequenceOutput:
    """Stage-2 outputs: ``exam_logits (B, num_labels)``, ``chunk_logits (B, L)``,
    ``attention (B, num_labels, L)`` (rows sum to 1 over unmasked steps, 0 on masked ones; with
    ``padding="seed"`` the seed's weights, 1e-10 on masked steps)."""

    exam_logits: Tensor
    chunk_logits: Tensor
    attention: Tensor


class FittedSequence(NamedTuple):
    """A chunk sequence brought to the model's fixed length.

    ``features (seq_len, F)``; ``mask (seq_len,)`` bool, True for real steps; ``positions
    (seq_len,)`` float64, the (fractional) original chunk index each step stands for, -1 on
    padding; ``length`` the original number of chunks.
    """

    features: Tensor
    mask: Tensor
    positions: np.ndarray
    length: int


def _linear_resize(values: Tensor, size: int) -> Tensor:
    """Linear resize of ``(L, C)`` along L to ``(size, C)``, half-pixel centres like cv2's
    INTER_LINEAR, which the seed uses."""
    resized = F.interpolate(
        values.T.unsqueeze(0).float(), size=size, mode="linear", align_corners=False
    )
    return resized.squeeze(0).T.contiguous()


def fit_sequence(features: Tensor | np.ndarray, seq_len: int) -> FittedSequence:
    """Pad (and mask) a ``(L, F)`` sequence to ``seq_len`` when ``L <= seq_len``, else resize it
    linearly to ``seq_len`` as the seed does (every step then real)."""
    values = torch.as_tensor(np.asarray(features) if isinstance(features, np.ndarray) else features)
    if values.ndim == 1:
        values = values.unsqueeze(1)
    if values.ndim != 2 or values.shape[0] < 1:
        raise ValueError(f"expected a non-empty (L, F) sequence, got shape {tuple(values.shape)}")
    length = int(values.shape[0])
    values = values.float()
    if length <= seq_len:
        out = values.new_zeros((seq_len, values.shape[1]))
        out[:length] = values
        mask = torch.zeros(seq_len, dtype=torch.bool)
        mask[:length] = True
        positions = np.full(seq_len, -1.0)
        positions[:length] = np.arange(length, dtype=np.float64)
        return FittedSequence(out, mask, positions, length)
    out = _linear_resize(values, seq_len)
    scale = length / seq_len
    positions = np.clip((np.arange(seq_len) + 0.5) * scale - 0.5, 0.0, length - 1.0)
    return FittedSequence(out, torch.ones(seq_len, dtype=torch.bool), positions, length)


def restore_sequence(values: Tensor | np.ndarray, length: int) -> Tensor:
    """Map per-step values ``(seq_len,)`` or ``(seq_len, C)`` back to the ``length`` original
    chunks: the first ``length`` steps when the sequence was padded, a linear resize back when it
    was shrunk by :func:`fit_sequence`."""
    tensor = torch.as_tensor(np.asarray(values) if isinstance(values, np.ndarray) else values)
    squeeze = tensor.ndim == 1
    if squeeze:
        tensor = tensor.unsqueeze(1)
    seq_len = int(tensor.shape[0])
    restored = tensor[:length].float() if length <= seq_len else _linear_resize(tensor, length)
    return restored.squeeze(1) if squeeze else restored


def seed_difference_features(features: Tensor) -> Tensor:
    """``(B, L, F)`` -> ``(B, L, 3F)`` exactly as the seed's dataset builds them: differences with
    the zero-padded neighbours too, zero only at the two ends of the fixed-length sequence."""
    prev_diff = torch.zeros_like(features)
    next_diff = torch.zeros_like(features)
    prev_diff[:, 1:] = features[:, 1:] - features[:, :-1]
    next_diff[:, :-1] = features[:, :-1] - features[:, 1:]
    return torch.cat([features, prev_diff, next_diff], dim=-1)


def difference_features(features: Tensor, mask: Tensor) -> Tensor:
    """``(B, L, F)`` -> ``(B, L, 3F)`` = ``[x, x - x_prev, x - x_next]``; a difference is zero
    where the neighbour is missing or masked."""
    valid = mask.to(features.dtype).unsqueeze(-1)
    x = features * valid
    prev_diff = torch.zeros_like(x)
    next_diff = torch.zeros_like(x)
    both_prev = valid[:, 1:] * valid[:, :-1]
    prev_diff[:, 1:] = (x[:, 1:] - x[:, :-1]) * both_prev
    next_diff[:, :-1] = (x[:, :-1] - x[:, 1:]) * both_prev
    return torch.cat([x, prev_diff, next_diff], dim=-1)


class _TemporalBlock(nn.Module):
    """Two causal dilated convolutions (weight-normed, batch-normed) with a residual path."""

    def __init__(self, n_in: int, n_out: int, kernel_size: int, dilation: int, dropout: float):
        super().__init__()
        self.chomp = (kernel_size - 1) * dilation
        self.conv1 = weight_norm(
            nn.Conv1d(n_in, n_out, kernel_size, padding=self.chomp, dilation=dilation)
        )
        self.bn1 = nn.BatchNorm1d(n_out)
        self.conv2 = weight_norm(
            nn.Conv1d(n_out, n_out, kernel_size, padding=self.chomp, dilation=dilation)
        )
        self.bn2 = nn.BatchNorm1d(n_out)
        self.dropout = nn.Dropout(dropout)
        self.downsample = nn.Conv1d(n_in, n_out, 1) if n_in != n_out else None

    def _causal(self, x: Tensor) -> Tensor:
        return x[:, :, : -self.chomp].contiguous() if self.chomp else x

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, L)`` -> ``(B, C_out, L)``."""
        out = self.dropout(F.relu(self.bn1(self._causal(self.conv1(x)))))
        out = self.dropout(F.relu(self.bn2(self._causal(self.conv2(out)))))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class SequenceModel(nn.Module):
    """Multitask stage-2 model. ``forward(features (B, L, F), mask (B, L) bool)`` with
    ``L <= config.seq_len``; the mask must be a prefix of True steps (as :func:`fit_sequence`
    makes), each row with at least one."""

    def __init__(self, config: SequenceConfig) -> None:
        super().__init__()
        self.config = config
        in_dim = 3 * config.feature_dim
        self.tcn: nn.Sequential | None = None
        self.gru: nn.GRU | None = None
        if config.kind == "tcn":
            blocks = [
                _TemporalBlock(
                    in_dim if level == 0 else config.hidden,
                    config.hidden,
                    config.kernel_size,
                    2**level,
                    config.dropout,
                )
                for level in range(config.levels)
            ]
            self.tcn = nn.Sequential(*blocks)
            hidden_out = config.hidden
        else:
            self.gru = nn.GRU(
                input_size=in_dim,
                hidden_size=config.hidden,
                num_layers=config.levels,
                batch_first=True,
                dropout=config.dropout if config.levels > 1 else 0.0,
                bidirectional=config.bidirectional,
            )
            hidden_out = (2 if config.bidirectional else 1) * config.hidden
        self.hidden_out = hidden_out
        self.dropout = nn.Dropout(config.dropout)
        self.chunk_head = nn.Linear(hidden_out, 1)
        # One attention vector and one per-position bias per exam label (seed: Attention module).
        self.attention_weight = nn.Parameter(torch.empty(config.num_labels, hidden_out))
        nn.init.xavier_uniform_(self.attention_weight)
        self.attention_bias = nn.Parameter(torch.zeros(config.num_labels, config.seq_len))
        # One linear logit per label over [max pool, attention pool].
        self.label_weight = nn.Parameter(torch.empty(config.num_labels, 2 * hidden_out))
        nn.init.uniform_(self.label_weight, -(1 / (2 * hidden_out)) ** 0.5, (1 / (2 * hidden_out)) ** 0.5)
        self.label_bias = nn.Parameter(torch.zeros(config.num_labels))

    def encode(self, features: Tensor, mask: Tensor) -> Tensor:
        """Hidden states ``(B, L, hidden_out)``; masked steps are zeroed (``padding="masked"``) or
        computed over the zero-padded input as the seed does (``padding="seed"``)."""
        if self.config.padding == "seed":
            x = seed_difference_features(features * mask.to(features.dtype).unsqueeze(-1))
            if self.tcn is not None:
                return self.tcn(x.transpose(1, 2)).transpose(1, 2)
            assert self.gru is not None
            out, _ = self.gru(x)
            return out
        x = difference_features(features, mask)
        if self.tcn is not None:
            hidden = self.tcn(x.transpose(1, 2)).transpose(1, 2)
        else:
            assert self.gru is not None
            lengths = mask.sum(dim=1)
            packed = nn.utils.rnn.pack_padded_sequence(
                x, lengths.cpu(), batch_first=True, enforce_sorted=False
            )
            out, _ = self.gru(packed)
            hidden, _ = nn.utils.rnn.pad_packed_sequence(
                out, batch_first=True, total_length=x.shape[1]
            )
        return hidden * mask.to(hidden.dtype).unsqueeze(-1)

    def forward(self, features: Tensor, mask: Tensor) -> SequenceOutput:
        batch, length, feature_dim = features.shape
        if feature_dim != self.config.feature_dim:
            raise ValueError(f"expected {self.config.feature_dim}-d features, got {feature_dim}")
        if length > self.config.seq_len:
            raise ValueError(
                f"sequence of {length} steps is longer than seq_len {self.config.seq_len}; "
                "use fit_sequence"
            )
        mask = mask.bool()
        lengths = mask.sum(dim=1)
        if bool((lengths < 1).any()):
            raise ValueError("every sequence needs at least one unmasked step")
        steps = torch.arange(length, device=mask.device)
        if not bool((mask == (steps.unsqueeze(0) < lengths.unsqueeze(1))).all()):
            raise ValueError("the mask must mark a prefix of real steps (pad at the end)")

        hidden = self.encode(features, mask)  # (B, L, H)
        chunk_logits = self.chunk_head(self.dropout(hidden)).squeeze(-1)  # (B, L)

        scores = torch.einsum("blh,kh->bkl", hidden, self.attention_weight)
        scores = torch.tanh(scores + self.attention_bias[:, :length].unsqueeze(0))  # (B, K, L)
        if self.config.padding == "seed":
            # The seed's Attention: exp(tanh(e)) * mask, normalised, then + 1e-10 on every step.
            weights = torch.exp(scores) * mask.to(scores.dtype).unsqueeze(1)
            attention = weights / weights.sum(dim=-1, keepdim=True) + 1e-10
            max_pool = hidden.amax(dim=1)  # (B, H), padded steps included
        else:
            scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
            attention = torch.softmax(scores, dim=-1)  # (B, K, L), zero on masked steps
            max_pool = hidden.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)  # (B, H)
        attention_pool = torch.einsum("bkl,blh->bkh", attention, hidden)  # (B, K, H)
        embedding = torch.cat(
            [max_pool.unsqueeze(1).expand_as(attention_pool), attention_pool], dim=-1
        )  # (B, K, 2H)
        exam_logits = (self.dropout(embedding) * self.label_weight).sum(-1) + self.label_bias
        return SequenceOutput(exam_logits=exam_logits, chunk_logits=chunk_logits, attention=attention)
