"""A layer that is no conv+norm pair as the scheme's: a linear, a transposed convolution, a
norm with no convolution before it, or a convolution with the norm it applies itself."""

from __future__ import annotations

import torch
from torch import nn

from norm_det.surgery.framework_convs import _same_layer
from norm_det.surgery.kept_norms import is_kept_norm
from norm_det.surgery.pairs import _own_relu
from norm_det.surgery.placement import _place_like
from norm_det.surgery.queries import (
    attached_norm,
    effective_weights,
    is_conv,
    is_norm,
    load_plain_weights,
    norm_channels,
)
from norm_det.surgery.units import _built_norm, _convert_unit, _Options, _transfer_norm


def _convert_lone(
    options: _Options, module: nn.Module, path: str, activated: bool = False
) -> nn.Module:
    """The replacement of a layer that is no conv+norm pair (``module`` itself: kept).

    ``activated``: the parent's forward follows the layer (a convolution with the norm it
    applies itself, or a norm) by a ReLU: a scheme's ``norm_act`` goes there.
    """
    if is_conv(module):
        norm = attached_norm(module)
        activated = norm is not None and (activated or _own_relu(module))
        return _convert_unit(options, module, norm, path, activated)[0]
    if isinstance(module, nn.Linear) and (type(module) is nn.Linear or hasattr(module, "fuse")):
        return _lone_linear(options, module)
    if isinstance(module, nn.ConvTranspose2d):
        return _lone_conv_transpose(options, module)
    if is_norm(module) and not is_kept_norm(module):
        return _lone_norm(options, module, path, activated)
    return module


def _lone_linear(options: _Options, module: nn.Linear) -> nn.Module:
    if options.scheme.linear is nn.Linear and type(module) is nn.Linear:
        return module
    weight, bias = effective_weights(module)
    new = options.scheme.linear(module.in_features, module.out_features, bias=bias is not None)
    return module if _same_layer(module, new) else _placed(options, new, module, weight, bias)


def _lone_conv_transpose(options: _Options, module: nn.ConvTranspose2d) -> nn.Module:
    if options.scheme.conv_transpose is nn.ConvTranspose2d and type(module) is nn.ConvTranspose2d:
        return module
    weight, bias = effective_weights(module)
    new = options.scheme.conv_transpose(
        module.in_channels,
        module.out_channels,
        module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        output_padding=module.output_padding,
        groups=module.groups,
        bias=bias is not None,
        dilation=module.dilation,
    )
    return module if _same_layer(module, new) else _placed(options, new, module, weight, bias)


def _lone_norm(options: _Options, module: nn.Module, path: str, activated: bool) -> nn.Module:
    carried = activated and options.scheme.norm_act is not None
    factory = options.scheme.norm_act if carried else options.scheme.norm
    if factory is None:
        # A pre-activation unit's norm (no convolution before it, a ReLU after it): a
        # norm-free scheme's own networks have none there, and nothing can hold it.
        return nn.Identity() if activated else module
    channels = norm_channels(module)
    if channels is None:
        return module
    new = _built_norm(factory, channels, f"norm '{path}'")
    if _same_layer(module, new):
        return module
    new = _place_like(new, module)
    if options.keep_weights:
        _transfer_norm(module, new)
    return new


def _placed(
    options: _Options,
    new: nn.Module,
    old: nn.Module,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> nn.Module:
    new = _place_like(new, old)
    if options.keep_weights:
        load_plain_weights(new, weight, bias)
    return new
