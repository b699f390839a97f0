"""Minimal re-definitions of the PWS and IterNorm releases' ImageNet ResNets, for the tests.

Written from the releases' public code (module and tensor names, shapes, eval arithmetic), not
copied; only what the checkpoint tests need: the eval forward and the state-dict layout.

- PWS (github.com/lyxzzz/PWSConv, ``modules/utils/pws_layer.py``, ``modules/backbone/resnet.py``,
  ``configs/imagenet/pws.py``): a ``Model`` with ``backbone`` (ResNet whose every convolution is
  a ``PWSConv``: ``weight``, ``bias``, ``alpha`` of shape ``(O, 1, 1, 1)``; a one-group
  ``GroupNorm`` ``norm1`` after the stem convolution; units ``x + f(relu(x))`` whose projection
  shortcut ``downsample.0`` takes ``relu(x)``), ``neck`` (a one-group ``GroupNorm`` ``norm`` and a
  ReLU) and ``head`` (``fc``).
- IterNorm (github.com/huangleiBuaa/IterNorm-pytorch, ``ImageNet/models/resnet.py``,
  ``extension/normailzation/iterative_normalization.py``): torchvision's ResNet whose stem norm
  ``bn1`` is an ``IterNorm`` (``running_mean`` ``(G, c, 1)``, ``running_wm`` ``(G, c, c)``,
  ``weight`` / ``bias`` ``(1, C, 1, 1)``), every other norm a BatchNorm2d, and, in the "DF"
  setting (``last=True``), an ``IterNorm`` ``last_bn`` on the pooled features before ``fc``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

# ---------------------------------------------------------------------------------------------
# PWS release.


class ReleasePWSConv(nn.Module):
    """The release's ``PWSConv`` in its ImageNet setting (``mode="fan_in"``, ``equiv=False``):
    ``W_hat = sqrt(2 / fan_in) * alpha * layer_norm(W, eps=gamma)``, a convolution with bias."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        gamma: float = 1e-4,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.randn(out_channels) * 0.1)
        self.alpha = nn.Parameter(torch.rand(out_channels, 1, 1, 1) + 0.5)
        self.stride, self.padding, self.gamma = stride, padding, gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fan_in = self.weight[0].numel()
        kernel = (
            math.sqrt(2.0 / fan_in)
            * self.alpha
            * F.layer_norm(self.weight, self.weight.shape[1:], eps=self.gamma)
        )
        return F.conv2d(x, kernel, self.bias, stride=self.stride, padding=self.padding)


class ReleasePWSUnit(nn.Module):
    """``x + f(relu(x))``; the projection shortcut ``downsample`` takes ``relu(x)``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, bottleneck: bool) -> None:
        super().__init__()
        if bottleneck:
            mid = out_channels // 4
            self.conv1 = ReleasePWSConv(in_channels, mid, 1)
            self.conv2 = ReleasePWSConv(mid, mid, 3, stride=stride, padding=1)
            self.conv3 = ReleasePWSConv(mid, out_channels, 1)
            self.convs = ("conv1", "conv2", "conv3")
        else:
            self.conv1 = ReleasePWSConv(in_channels, out_channels, 3, stride=stride, padding=1)
            self.conv2 = ReleasePWSConv(out_channels, out_channels, 3, padding=1)
            self.convs = ("conv1", "conv2")
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(ReleasePWSConv(in_channels, out_channels, 1, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        x = torch.relu(x)
        out = x
        for index, name in enumerate(self.convs):
            out = getattr(self, name)(out)
            if index < len(self.convs) - 1:
                out = torch.relu(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        return out + identity


class ReleasePWSResNet(nn.Module):
    """The release's backbone: ``stem_channels`` and ``base_channels`` as its ResNet's."""

    def __init__(self, depth: int, stem_channels: int = 64, base_channels: int = 64) -> None:
        super().__init__()
        blocks, bottleneck = {18: ((2, 2, 2, 2), False), 50: ((3, 4, 6, 3), True)}[depth]
        self.conv1 = ReleasePWSConv(3, stem_channels, 7, stride=2, padding=3)
        self.norm1 = nn.GroupNorm(1, stem_channels)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels, out_channels = stem_channels, base_channels * (4 if bottleneck else 1)
        for index, count in enumerate(blocks):
            units = [
                ReleasePWSUnit(
                    in_channels if b == 0 else out_channels,
                    out_channels,
                    stride=2 if index > 0 and b == 0 else 1,
                    bottleneck=bottleneck,
                )
                for b in range(count)
            ]
            self.add_module(f"layer{index + 1}", nn.Sequential(*units))
            in_channels, out_channels = out_channels, out_channels * 2
        self.out_channels = in_channels

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """The input of ``layer1``."""
        return self.maxpool(torch.relu(self.norm1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four stages' outputs (before any ReLU, as the release's backbone returns them)."""
        x, outputs = self.stem(x), []
        for index in range(1, 5):
            x = getattr(self, f"layer{index}")(x)
            outputs.append(x)
        return outputs


class ReleasePWSNeck(nn.Module):
    """The release's ``ReluNeck``: a one-group GroupNorm, then a ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(1, channels)


class ReleasePWSHead(nn.Module):
    """The release's ``LinearClsHead``: global average pooling and ``fc``."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)


class ReleasePWSModel(nn.Module):
    """The release's ``Model``: what its ``Saver`` writes as ``state_dict``."""

    def __init__(self, depth: int = 50, stem_channels: int = 64, base_channels: int = 64) -> None:
        super().__init__()
        self.backbone = ReleasePWSResNet(depth, stem_channels, base_channels)
        self.neck = ReleasePWSNeck(self.backbone.out_channels)
        self.head = ReleasePWSHead(self.backbone.out_channels, 10)


def make_pws_release(depth: int = 50, *, base_channels: int = 16, seed: int = 0) -> ReleasePWSModel:
    """A release model with random weights, biases, ``alpha`` and GroupNorm affines; eval."""
    torch.manual_seed(seed)
    model = ReleasePWSModel(depth, stem_channels=base_channels, base_channels=base_channels)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# IterNorm release.


class ReleaseIterNorm(nn.Module):
    """The release's ``IterNorm`` (eval only): ``running_wm @ (x - running_mean)`` per group of
    ``num_channels`` contiguous channels, then ``* weight + bias``.

    ``num_channels`` is halved until it divides ``num_features``, as the release does.
    """

    def __init__(self, num_features: int, num_channels: int = 64, dim: int = 4) -> None:
        super().__init__()
        while num_features % num_channels:
            num_channels //= 2
        self.num_channels = num_channels
        self.num_groups = num_features // num_channels
        shape = [1] * dim
        shape[1] = num_features
        self.weight = nn.Parameter(torch.ones(*shape))
        self.bias = nn.Parameter(torch.zeros(*shape))
        self.register_buffer("running_mean", torch.zeros(self.num_groups, num_channels, 1))
        eye = torch.eye(num_channels).expand(self.num_groups, num_channels, num_channels)
        self.register_buffer("running_wm", eye.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise NotImplementedError("the tests need the release's eval forward only")
        grouped = x.transpose(0, 1).reshape(self.num_groups, self.num_channels, -1)
        whitened = self.running_wm.matmul(grouped - self.running_mean)
        out = whitened.reshape(x.shape[1], x.shape[0], *x.shape[2:]).transpose(0, 1)
        return out * self.weight + self.bias


class ReleaseIterNormResNet(torchvision.models.ResNet):
    """The release's ResNet: torchvision's, ``bn1`` an IterNorm, and ``last_bn`` when ``last``.

    The release pools with ``AvgPool2d(7)`` (global at 224 pixels); here the pooling is global
    at any size.
    """

    def __init__(self, depth: int, num_channels: int = 64, last: bool = False) -> None:
        block, layers = {
            18: (torchvision.models.resnet.BasicBlock, [2, 2, 2, 2]),
            50: (torchvision.models.resnet.Bottleneck, [3, 4, 6, 3]),
        }[depth]
        super().__init__(block, layers, num_classes=10)
        self.bn1 = ReleaseIterNorm(64, num_channels)
        width = 512 * block.expansion
        self.last_bn = ReleaseIterNorm(width, num_channels, dim=2) if last else None

    def stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The res2..res5 maps, named as norm_det's ResNet names them."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outputs = {}
        for index in range(1, 5):
            x = getattr(self, f"layer{index}")(x)
            outputs[f"res{index + 1}"] = x
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The class scores."""
        features = self.stages(x)["res5"].mean(dim=(2, 3))
        if self.last_bn is not None:
            features = self.last_bn(features)
        return self.fc(features)


def _randomize_iternorm(module: ReleaseIterNorm, generator: torch.Generator) -> None:
    """Random affine, mean and a random symmetric positive-definite whitening per group."""
    groups, c, _ = module.running_wm.shape
    module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
    module.bias.copy_(torch.rand(module.bias.shape, generator=generator) - 0.5)
    module.running_mean.copy_(torch.rand(groups, c, 1, generator=generator) - 0.5)
    a = torch.randn(groups, c, c, generator=generator) / math.sqrt(c)
    module.running_wm.copy_(a @ a.transpose(1, 2) + torch.eye(c))


def make_iternorm_release(
    depth: int = 18, *, num_channels: int = 64, last: bool = False, seed: int = 0
) -> ReleaseIterNormResNet:
    """A release ResNet with random weights and random statistics of every norm; eval."""
    torch.manual_seed(seed)
    model = ReleaseIterNormResNet(depth, num_channels, last)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ReleaseIterNorm):
                _randomize_iternorm(module, generator)
            elif isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(c, generator=generator) - 0.5)
                module.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
                module.num_batches_tracked.fill_(1000)
    return model.eval()
