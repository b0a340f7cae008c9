"""The seed's two networks, rebuilt in the test tree from their published definitions.

Stage 1 is torchvision's ``models/video/resnet.py`` ``r3d_18`` (``VideoResNet`` with
``BasicBlock``, ``Conv3DSimple`` and ``BasicStem``; ``base`` scales its 64 channels so tests stay
small); stage 2 is the seed's ``model.py`` ``PEFeatureSequentialNet`` with its ``Attention``,
``TemporalBlock`` and ``TemporalConvNet``. torchvision is not installed here, and the seed
repository is not a package: these are the reference the import is checked against, never used
by the product.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import weight_norm as _weight_norm

def weight_norm(module: nn.Conv1d) -> nn.Conv1d:
    """The seed's ``torch.nn.utils.weight_norm`` (``weight_g``/``weight_v`` keys); torch now warns it is deprecated."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return _weight_norm(module)


SEED_LABELS = (
    "pe_present_on_image",
    "negative_exam_for_pe",
    "indeterminate",
    "chronic_pe",
    "acute_and_chronic_pe",
    "central_pe",
    "leftsided_pe",
    "rightsided_pe",
    "rv_lv_ratio_gte_1",
    "rv_lv_ratio_lt_1",
)


# -- torchvision r3d_18 -------------------------------------------------------------------------


class Conv3DSimple(nn.Conv3d):
    def __init__(self, in_planes: int, out_planes: int, midplanes: int | None = None, stride: int = 1,
                 padding: int = 1) -> None:
        super().__init__(in_channels=in_planes, out_channels=out_planes, kernel_size=(3, 3, 3),
                         stride=stride, padding=padding, bias=False)


class TorchvisionBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(Conv3DSimple(inplanes, planes, None, stride), nn.BatchNorm3d(planes),
                                   nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(Conv3DSimple(planes, planes, None), nn.BatchNorm3d(planes))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        residual = x
        out = self.conv1(x)
        out = self.conv2(out)
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return self.relu(out)


class VideoResNet(nn.Module):
    """torchvision's r3d_18 (``base=64``) with the seed's ``fc = nn.Linear(num_features, 1)``."""

    def __init__(self, base: int = 64, num_classes: int = 1) -> None:
        super().__init__()
        self.inplanes = base
        self.stem = nn.Sequential(
            nn.Conv3d(3, base, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
            nn.BatchNorm3d(base), nn.ReLU(inplace=True))
        self.layer1 = self._make_layer(base, 2, stride=1)
        self.layer2 = self._make_layer(base * 2, 2, stride=2)
        self.layer3 = self._make_layer(base * 4, 2, stride=2)
        self.layer4 = self._make_layer(base * 8, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.fc = nn.Linear(base * 8, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv3d(self.inplanes, planes, kernel_size=1, stride=(stride, stride, stride), bias=False),
                nn.BatchNorm3d(planes))
        layers = [TorchvisionBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        for _ in range(1, blocks):
            layers.append(TorchvisionBasicBlock(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = x.flatten(1)
        return self.fc(x)


# -- the seed's model.py ------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, feature_size: int, seq_len: int, bias: bool = True) -> None:
        super().__init__()
        self.feature_size = feature_size
        self.seq_len = seq_len
        self.bias = bias
        weight = torch.zeros(feature_size, 1)
        nn.init.xavier_uniform_(weight)
        self.weight = nn.Parameter(weight)
        if bias:
            self.b = nn.Parameter(torch.zeros(seq_len))

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        e_ij = torch.mm(x.contiguous().view(-1, self.feature_size), self.weight).view(-1, self.seq_len)
        if self.bias:
            e_ij = e_ij + self.b
        e_ij = torch.tanh(e_ij)
        alpha = torch.exp(e_ij)
        alpha = alpha * mask
        alpha = alpha / torch.sum(alpha, 1, keepdim=True) + 1e-10
        weighted_sequence = x * torch.unsqueeze(alpha, -1)
        return torch.sum(weighted_sequence, 1), alpha


class Chomp1d(nn.Module):
    def __init__(self, chomp_size: int) -> None:
        super().__init__()
        self.chomp_size = chomp_size

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, :-self.chomp_size].contiguous()


class TemporalBlock(nn.Module):
    def __init__(self, n_inputs: int, n_outputs: int, kernel_size: int, stride: int, dilation: int,
                 padding: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.conv1 = weight_norm(nn.Conv1d(n_inputs, n_outputs, kernel_size, stride=stride, padding=padding,
                                           dilation=dilation))
        self.chomp1 = Chomp1d(padding)
        self.batchnorm1 = nn.BatchNorm1d(n_outputs)
        self.relu1 = nn.ReLU()
        self.dropout1 = nn.Dropout(dropout)
        self.conv2 = weight_norm(nn.Conv1d(n_outputs, n_outputs, kernel_size, stride=stride, padding=padding,
                                           dilation=dilation))
        self.chomp2 = Chomp1d(padding)
        self.batchnorm2 = nn.BatchNorm1d(n_outputs)
        self.relu2 = nn.ReLU()
        self.dropout2 = nn.Dropout(dropout)
        self.net = nn.Sequential(self.conv1, self.chomp1, self.batchnorm1, self.relu1, self.dropout1,
                                 self.conv2, self.chomp2, self.batchnorm2, self.relu2, self.dropout2)
        self.downsample = nn.Conv1d(n_inputs, n_outputs, 1) if n_inputs != n_outputs else None
        self.relu = nn.ReLU()
        self.conv1.weight.data.normal_(0, 0.01)
        self.conv2.weight.data.normal_(0, 0.01)
        if self.downsample is not None:
            self.downsample.weight.data.normal_(0, 0.01)

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        res = x if self.downsample is None else self.downsample(x)
        return self.relu(out + res)


class TemporalConvNet(nn.Module):
    def __init__(self, num_inputs: int, num_channels: list[int], kernel_size: int = 2, dropout: float = 0.2) -> None:
        super().__init__()
        layers = []
        for i in range(len(num_channels)):
            dilation_size = 2**i
            in_channels = num_inputs if i == 0 else num_channels[i - 1]
            layers += [TemporalBlock(in_channels, num_channels[i], kernel_size, stride=1, dilation=dilation_size,
                                     padding=(kernel_size - 1) * dilation_size, dropout=dropout)]
        self.network = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)


class PEFeatureSequentialNet(nn.Module):
    """The seed's stage 2 as its run script builds it: ``--diff --maxpool --no-batchnorm``."""

    def __init__(self, seq_model: str = "TCN", input_size: int = 512, hidden_size: int = 64, levels: int = 2,
                 kernel_size: int = 3, seq_len: int = 40, dropout: float = 0.5, bidirectional: bool = True) -> None:
        super().__init__()
        self.label_list = list(SEED_LABELS)
        input_size = input_size * 3
        ratio = 1
        self.seq_model = seq_model
        if seq_model == "TCN":
            self.tcn = TemporalConvNet(num_inputs=input_size, num_channels=[hidden_size] * levels,
                                       kernel_size=kernel_size, dropout=dropout)
        else:
            with warnings.catch_warnings():  # dropout on a one-layer GRU: torch warns, as it did for the seed
                warnings.simplefilter("ignore")
                self.gru = nn.GRU(input_size=input_size, hidden_size=hidden_size, batch_first=True,
                                  dropout=dropout, bidirectional=bidirectional)
            if bidirectional:
                ratio = ratio * 2
        self.dropout = nn.Dropout(dropout)
        self.linear_pe = nn.Linear(hidden_size * ratio, 1)
        self.attentions = nn.ModuleDict({label: Attention(hidden_size * ratio, seq_len) for label in self.label_list})
        ratio = ratio * 2
        self.linears = nn.ModuleDict({label: nn.Linear(hidden_size * ratio, 1) for label in self.label_list})

    def forward(self, x: Tensor, mask: Tensor) -> dict[str, Tensor]:
        if self.seq_model == "TCN":
            h = self.tcn(x.transpose(1, 2)).transpose(1, 2)
        else:
            h, _ = self.gru(x)
        logits = {"pe_present_on_image": self.linear_pe(self.dropout(h))}
        self.alphas = {}
        for label in self.label_list[1:]:
            att_pool, self.alphas[label] = self.attentions[label](h, mask)
            max_pool, _ = torch.max(h, 1)
            embedding = torch.cat((max_pool, att_pool), 1)
            logits[label] = self.linears[label](self.dropout(embedding))
        return logits


def seed_sequence_input(series: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """The seed dataset's ``__getitem__`` for one exam's (N, F) features when N <= seq_len:
    zero-padded, difference features, mask. Returns x (seq_len, 3F) and mask (seq_len,)."""
    n, f = series.shape
    x = torch.zeros(seq_len, 3 * f)
    mask = torch.zeros(seq_len)
    x[:n, :f] = series
    mask[:n] = 1.0
    x[1:, f:2 * f] = x[1:, :f] - x[:-1, :f]
    x[:-1, 2 * f:] = x[:-1, :f] - x[1:, :f]
    return x, mask


# -- the seed's utils.py and data_process.ipynb --------------------------------------------------


def apply_window(image: np.ndarray, WL: int, WW: int) -> np.ndarray:  # noqa: N803 (the seed's names)
    """utils.py ``apply_window``: clip, then min-max scale the slice to uint8 (truncating)."""
    upper, lower = WL + WW // 2, WL - WW // 2
    X = np.clip(image.copy(), lower, upper)
    X = X - np.min(X)
    X = X / np.max(X)
    return (X * 255.0).astype("uint8")


def mask_to_bbox(mask: np.ndarray) -> tuple[int, int, int, int, int, int]:
    """data_process.ipynb ``mask_to_bbox``: inclusive bounds of the lung mask on each axis."""
    D, W, H = mask.shape
    D_min, D_max = 0, D - 1
    while D_min < D - 1 and 1 not in mask[D_min]:
        D_min += 1
    while D_max > 0 and 1 not in mask[D_max]:
        D_max -= 1
    W_min, W_max = 0, W - 1
    while W_min < W - 1 and 1 not in mask[:, W_min, :]:
        W_min += 1
    while W_max > 0 and 1 not in mask[:, W_max, :]:
        W_max -= 1
    H_min, H_max = 0, H - 1
    while H_min < H - 1 and 1 not in mask[:, :, H_min]:
        H_min += 1
    while H_max > 0 and 1 not in mask[:, :, H_max]:
        H_max -= 1
    return D_min, D_max, W_min, W_max, H_min, H_max
