"""What a module is, and the weights it computes with: the questions :mod:`norm_det.surgery` asks.

Neither knows a concrete scheme: a norm_det layer answers through the protocol of
:mod:`norm_det.layers` (``folded_affine``, ``fuse``, ``load_plain_weights``); torch's and the
frameworks' layers are recognised by their classes and tensors.
"""

from __future__ import annotations

import torch
from torch import nn


def is_conv(module: nn.Module) -> bool:
    """A 2-d convolution: ``nn.Conv2d`` or any subclass (norm_det's reparametrized convs)."""
    return isinstance(module, nn.Conv2d)


def _is_frozen_bn_like(module: nn.Module) -> bool:
    # torchvision's and detectron2's FrozenBatchNorm2d hold the four tensors as buffers.
    return "BatchNorm" in type(module).__name__ and all(
        isinstance(getattr(module, name, None), torch.Tensor)
        for name in ("weight", "bias", "running_mean", "running_var")
    )


def is_norm(module: nn.Module) -> bool:
    """A 2-d norm layer that follows a convolution: BN, SyncBN, FrozenBN, GN, IterNorm, ..."""
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm3d)):
        return False
    return (
        isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))
        or hasattr(module, "folded_affine")
        or _is_frozen_bn_like(module)
    )


def norm_channels(module: nn.Module) -> int | None:
    """Channels a norm layer normalizes."""
    for attribute in ("num_features", "num_channels"):
        value = getattr(module, attribute, None)
        if isinstance(value, int):
            return value
    return None


def attached_norm(conv: nn.Module) -> nn.Module | None:
    """The norm that convolution ``conv`` holds as its child ``norm`` and applies itself.

    detectron2's ``Conv2d`` computes ``activation(norm(conv(x)))`` with ``conv.norm`` and
    ``conv.activation``; such a convolution is a conv+norm pair on its own. None when ``conv``
    holds no norm over its output channels.
    """
    norm = conv._modules.get("norm")
    if norm is not None and is_norm(norm) and norm_channels(norm) == conv.out_channels:
        return norm
    return None


def folded_affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(scale, shift)`` of a norm's eval transform, or None when it depends on the sample.

    ``scale`` is ``(C,)`` (per channel) or ``(C, C)`` (mixing channels, IterNorm).
    """
    if hasattr(norm, "folded_affine"):
        return norm.folded_affine()
    stats = getattr(norm, "running_var", None)
    if stats is None or not (
        isinstance(norm, nn.modules.batchnorm._BatchNorm) or _is_frozen_bn_like(norm)
    ):
        return None
    weight = norm.weight if norm.weight is not None else torch.ones_like(stats)
    bias = norm.bias if norm.bias is not None else torch.zeros_like(stats)
    scale = weight * torch.rsqrt(norm.running_var + norm.eps)
    return scale, bias - norm.running_mean * scale


def effective_weights(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias of the plain layer that ``layer`` computes in eval mode."""
    plain = layer.fuse() if hasattr(layer, "fuse") else layer
    return plain.weight.detach(), None if plain.bias is None else plain.bias.detach()


def fold_affine_into(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``affine(conv(x))`` for a conv ``(C_out, ...)`` and a norm's affine."""
    bias = torch.zeros_like(shift) if bias is None else bias
    if scale.dim() == 1:
        return weight * scale.view(-1, *([1] * (weight.dim() - 1))), bias * scale + shift
    return torch.einsum("oc,c...->o...", scale, weight), scale @ bias + shift


def load_plain_weights(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Make ``layer`` reproduce a plain layer with ``weight`` and ``bias`` (see layer protocol)."""
    if hasattr(layer, "load_plain_weights"):
        layer.load_plain_weights(weight, bias)
        return
    with torch.no_grad():
        layer.weight.copy_(weight)
        if layer.bias is not None:
            if bias is None:
                layer.bias.zero_()
            else:
                layer.bias.copy_(bias)
