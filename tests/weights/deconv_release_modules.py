"""Minimal stand-ins for the network-deconvolution releases' ImageNet ResNets, in eval mode.

Written from the facts of the public code, not copied from it (norm_det's layers are not used,
so the comparison is independent):

- amazon-science/network-deconvolution-pp, ``Classification/models/deconv.py`` (``Deconv``,
  ``Delinear``, ``LayerNorm``) and ``models/resnet_imagenet.py``: matrix buffer
  ``running_cov_isqrt``; ``norm_type`` ``None`` / ``"layernorm"`` / ``"l1norm"`` standardizes
  each sample first.
- yechengxi/deconvolution, ``models/deconv.py`` (``FastDeconv``, ``Delinear``,
  ``ChannelDeconv``) and ``models/resnet_imagenet.py``: matrix buffer ``running_deconv``, and a
  BatchNorm after each shortcut's deconvolution.

Only what a state dict and an eval forward show is reproduced: parameter and buffer names and
shapes, module paths, and the eval arithmetic ``conv(S x, W D) + b - sum(W D mu)`` with the
releases' interleaved column groups. The checkpoint container is main_imagenet.py's.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def release_block(block: int, channels: int) -> int:
    """The releases' block size: at most ``channels``, else ``gcd`` when it does not divide."""
    if block > channels:
        return channels
    return block if channels % block == 0 else math.gcd(block, channels)


def standardize_samples(x: torch.Tensor, norm_type: str | None, eps: float) -> torch.Tensor:
    """ND++'s scale invariance: each sample (a row for a linear layer) standardized.

    ``layernorm``: ``x / s - m / s`` with ``s`` the unbiased std plus ``eps``; ``l1norm``:
    ``x / (mean |x| + eps)``; anything else: ``x``.
    """
    flat = x.reshape(x.shape[0], -1) if x.dim() == 4 else x.reshape(-1, x.shape[-1])
    if norm_type == "layernorm":
        mean = flat.mean(-1, keepdim=True)
        std = flat.std(-1, keepdim=True) + eps
        flat = flat / std - mean / std
    elif norm_type == "l1norm":
        flat = flat / (flat.abs().mean(-1, keepdim=True) + eps)
    return flat.view(x.shape)


class ReleaseDeconv(nn.Conv2d):
    """The releases' deconvolution layer (ND++ ``Deconv``, ND ``FastDeconv``), eval only.

    Buffers ``running_mean`` ``(F,)`` and ``<matrix>`` ``(F, F)``, ``F = k*k*B``; always a bias.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        *,
        block: int,
        matrix: str,
        norm_type: str | None,
        eps: float = 1e-5,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias=True)
        self.block = release_block(block, in_channels)
        self.features = kernel_size**2 * self.block
        self.matrix, self.norm_type, self.eps = matrix, norm_type, eps
        self.register_buffer("running_mean", torch.zeros(self.features))
        self.register_buffer(matrix, torch.eye(self.features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = standardize_samples(x, self.norm_type, self.eps)
        out, groups = self.out_channels, self.in_channels // self.block
        # Column j of the (O, C*k*k) weight is feature j // groups of group j % groups.
        rows = self.weight.reshape(out, self.features, groups).transpose(1, 2)
        whitened = rows.reshape(-1, self.features) @ getattr(self, self.matrix)
        bias = self.bias - (whitened @ self.running_mean).view(out, -1).sum(1)
        weight = whitened.view(out, groups, self.features).transpose(1, 2).reshape_as(self.weight)
        return F.conv2d(x, weight, bias, self.stride, self.padding)


class ReleaseDelinear(nn.Linear):
    """The releases' ``Delinear``: contiguous chunks of ``B`` inputs share one matrix; eval only."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        block: int,
        matrix: str,
        norm_type: str | None,
        eps: float = 1e-5,
    ) -> None:
        super().__init__(in_features, out_features)
        self.block = release_block(block, in_features)
        self.matrix, self.norm_type, self.eps = matrix, norm_type, eps
        self.register_buffer("running_mean", torch.zeros(self.block))
        self.register_buffer(matrix, torch.eye(self.block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = standardize_samples(x, self.norm_type, self.eps)
        whitened = self.weight.reshape(-1, self.block) @ getattr(self, self.matrix)
        bias = self.bias - (whitened @ self.running_mean).view(self.out_features, -1).sum(1)
        return F.linear(x, whitened.view_as(self.weight), bias)


class ChannelDeconvBuffers(nn.Module):
    """ND's ``ChannelDeconv`` (``deconv1``, before the pooling): only its state, which is all a
    backbone conversion sees of it."""

    def __init__(self, block: int) -> None:
        super().__init__()
        self.register_buffer("running_mean1", torch.zeros(block, 1))
        self.register_buffer("running_deconv", torch.eye(block))
        self.register_buffer("running_mean2", torch.zeros(1, 1))
        self.register_buffer("running_var", torch.ones(1, 1))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("only the state of ChannelDeconv is reproduced")


class ReleaseBlock(nn.Module):
    """torchvision's BasicBlock / Bottleneck names with deconvolution layers and no BN."""

    def __init__(self, convs: list[nn.Module], downsample: nn.Module | None) -> None:
        super().__init__()
        for index, conv in enumerate(convs, 1):
            self.add_module(f"conv{index}", conv)
        self.count = len(convs)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for index in range(1, self.count + 1):
            out = getattr(self, f"conv{index}")(out)
            if index < self.count:
                out = torch.relu(out)
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + identity)


class ReleaseResNet(nn.Module):
    """The releases' ``resnet{18,50}d`` with ``deconv`` and ``delinear`` given.

    Args:
        depth: 18 (BasicBlock) or 50 (Bottleneck).
        matrix: ``"running_cov_isqrt"`` (ND++) or ``"running_deconv"`` (ND).
        norm_type: ND++'s ``--norm-type`` (``None`` for ND).
        block, block_fc: ``--block`` and ``--block-fc`` (0: a plain ``nn.Linear``).
        width_per_group: the bottleneck width at ``layer1`` (64 in ResNet-50).
        shortcut_bn: a BatchNorm after each shortcut's deconvolution (ND; ND++'s ``--keep-bn``).
        channel_deconv: ND's ``deconv1`` before the pooling (``--delinear False``).
    """

    def __init__(
        self,
        depth: int,
        *,
        matrix: str,
        norm_type: str | None,
        block: int = 64,
        block_fc: int = 64,
        width_per_group: int = 64,
        num_classes: int = 10,
        shortcut_bn: bool = False,
        channel_deconv: bool = False,
    ) -> None:
        super().__init__()
        layers, bottleneck = {18: ((2, 2, 2, 2), False), 50: ((3, 4, 6, 3), True)}[depth]
        options = dict(matrix=matrix, norm_type=norm_type)

        def deconv(c_in: int, c_out: int, k: int, stride: int = 1) -> ReleaseDeconv:
            return ReleaseDeconv(c_in, c_out, k, stride, k // 2, block=block, **options)

        self.conv1 = deconv(3, 64, 7, 2)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        expansion = 4 if bottleneck else 1
        inplanes = 64
        for index, (planes, count) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for b in range(count):
                stride = 2 if index > 0 and b == 0 else 1
                out = planes * expansion
                if bottleneck:
                    width = planes * width_per_group // 64
                    convs = [
                        deconv(inplanes, width, 1),
                        deconv(width, width, 3, stride),
                        deconv(width, out, 1),
                    ]
                else:
                    convs = [deconv(inplanes, out, 3, stride), deconv(out, out, 3)]
                downsample = None
                if stride != 1 or inplanes != out:
                    parts = [deconv(inplanes, out, 1, stride)]
                    if shortcut_bn:
                        parts.append(nn.BatchNorm2d(out))
                    downsample = nn.Sequential(*parts)
                blocks.append(ReleaseBlock(convs, downsample))
                inplanes = out
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
        if channel_deconv:
            self.deconv1 = ChannelDeconvBuffers(block_fc)
        if block_fc > 0:
            self.fc = ReleaseDelinear(inplanes, num_classes, block=block_fc, **options)
        else:
            self.fc = nn.Linear(inplanes, num_classes)

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The ``layer1`` .. ``layer4`` maps, under norm_det's names ``res2`` .. ``res5``."""
        x = self.maxpool(torch.relu(self.conv1(x)))
        outputs = {}
        for index in range(1, 5):
            x = getattr(self, f"layer{index}")(x)
            outputs[f"res{index + 1}"] = x
        return outputs

    def classify(self, res5: torch.Tensor) -> torch.Tensor:
        """The classifier on ``layer4``'s output (without ``deconv1``)."""
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(res5, 1), 1))


@torch.no_grad()
def randomize_release(model: nn.Module, seed: int) -> nn.Module:
    """Random weights, biases and running statistics: means ~ N(0, 0.1^2), whitening matrices
    symmetric positive definite with eigenvalues in [0.5, 1.5], shortcut BNs non-trivial."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, dtype=torch.float64)

    for module in model.modules():
        if isinstance(module, (ReleaseDeconv, ReleaseDelinear)):
            fan_out = module.weight.shape[0] * module.weight[0, 0].numel()
            module.weight.copy_(normal(*module.weight.shape) * math.sqrt(2 / fan_out))
            module.bias.copy_(normal(*module.bias.shape) * 0.1)
            size = module.running_mean.numel()
            module.running_mean.copy_(normal(size) * 0.1)
            basis, _ = torch.linalg.qr(normal(size, size))
            eigenvalues = uniform(size) + 0.5
            getattr(module, module.matrix).copy_((basis * eigenvalues) @ basis.T)
        elif isinstance(module, nn.BatchNorm2d):
            channels = module.num_features
            module.weight.copy_(uniform(channels) + 0.5)
            module.bias.copy_(normal(channels) * 0.1)
            module.running_mean.copy_(normal(channels) * 0.1)
            module.running_var.copy_(uniform(channels) + 0.5)
            module.num_batches_tracked.fill_(5000)
    return model.eval()


def save_release_checkpoint(model: nn.Module, path: Path, arch: str) -> Path:
    """Save as main_imagenet.py does: a DistributedDataParallel model's state dict (``module.``
    keys) beside the epoch, the architecture, the best accuracy and the SGD state."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()  # creates the momentum buffers; a zero step leaves the weights
    state = {f"module.{key}": value for key, value in model.state_dict().items()}
    checkpoint = {
        "epoch": 90,
        "arch": arch,
        "state_dict": state,
        "best_acc1": torch.tensor(71.5),
        "optimizer": optimizer.state_dict(),
    }
    torch.save(checkpoint, path)
    return path
