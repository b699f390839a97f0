"""The conv + norm + activation unit every model builder is made of, taken from a scheme.

A norm_det model never names a convolution or norm class: it asks the scheme (see
:mod:`norm_det.schemes`) through :func:`norm_det.schemes.build_conv_norm`. :class:`ConvNormAct`
registers the convolution and its norm as consecutive children (``conv``, ``norm``), so that
:func:`norm_det.surgery.convert` and :func:`norm_det.surgery.fuse` recognise the pair; a scheme
with no norm leaves an ``nn.Identity`` in the ``norm`` slot, which keeps the state-dict keys the
same for every scheme.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from norm_det.layers.protocol import ActivationInNorm
from norm_det.schemes import (
    Scheme,
    build_conv_norm,
    carries_activation,
    get_scheme,
    image_conv_scheme,
    predictor_scheme,
)

# The role rules live in norm_det.schemes (one place for every route); model code imports them
# from here with the rest of its building blocks.
__all__ = [
    "ConvNormAct",
    "SchemeSpec",
    "activation_slot",
    "image_conv_scheme",
    "init_plain_layers",
    "init_predictor",
    "predictor_scheme",
    "resolve_scheme",
]

SchemeSpec = str | Mapping[str, Any] | Scheme | None


def resolve_scheme(spec: SchemeSpec, key: str) -> Scheme:
    """The scheme a config value names; a bad value is a ``ValueError`` naming the ``key``."""
    try:
        return get_scheme(spec or None)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{key}: {error}") from None


def activation_slot(norm: nn.Module) -> nn.Module:
    """What goes after ``norm`` where the network applies a ReLU: an in-place ReLU, or an
    :class:`~norm_det.layers.protocol.ActivationInNorm` when ``norm`` carries the activation."""
    return ActivationInNorm() if carries_activation(norm) else nn.ReLU(inplace=True)


class ConvNormAct(nn.Sequential):
    """``conv -> norm -> ReLU`` with the convolution and the norm of ``scheme``.

    Args:
        scheme: the scheme (or its name) that builds the pair.
        in_channels, out_channels, kernel_size, stride, dilation, groups: as in ``nn.Conv2d``.
        padding: defaults to ``dilation * (kernel_size // 2)`` ("same" for odd kernels).
        activation: append an in-place ReLU. For a scheme whose norm carries its activation
            (``Scheme.norm_act``: FRN + TLU, EvoNorm) the ``norm`` slot holds that layer and
            the ``relu`` slot an :class:`~norm_det.layers.protocol.ActivationInNorm`.

    Shapes:
        ``(N, in_channels, H, W) -> (N, out_channels, H', W')``.
    """

    def __init__(
        self,
        scheme: SchemeSpec,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        groups: int = 1,
        activation: bool = True,
    ) -> None:
        if padding is None:
            padding = dilation * (kernel_size // 2)
        conv, norm = build_conv_norm(
            scheme,
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            activation=activation,
        )
        layers: OrderedDict[str, nn.Module] = OrderedDict(conv=conv, norm=norm)
        if activation:
            layers["relu"] = activation_slot(norm)
        super().__init__(layers)
        self.out_channels = out_channels


# ---------------------------------------------------------------------------------------------
# Initialisation of plain layers.

_PLAIN_LAYER_TYPES = (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)


def init_plain_layers(module: nn.Module, method: str, std: float = 0.01) -> None:
    """Initialise every plain ``nn.Conv2d`` / ``nn.Linear`` / ``nn.ConvTranspose2d`` in ``module``.

    Only layers whose type is exactly torch's own are touched: a scheme's reparametrized layers
    (PWS, CZM, ND, ...) define their own initialisation, which is part of the method.

    Args:
        method: ``"msra"`` (He normal, fan-out, as Detectron's ``c2_msra_fill``), ``"xavier"``
            (Detectron's ``c2_xavier_fill``: He uniform with a=1, fan-in) or ``"normal"``
            (zero-mean normal with ``std``). Biases become zero.
    """
    for layer in module.modules():
        if type(layer) not in _PLAIN_LAYER_TYPES:
            continue
        if method == "msra":
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        elif method == "xavier":
            nn.init.kaiming_uniform_(layer.weight, a=1)
        elif method == "normal":
            nn.init.normal_(layer.weight, std=std)
        else:
            raise ValueError(f"init method must be 'msra', 'xavier' or 'normal'; got {method!r}")
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


@torch.no_grad()
def init_predictor(layer: nn.Module, std: float) -> None:
    """Start a predictor (class scores, box deltas, mask logits) at weights ~ N(0, std), bias 0.

    Unlike :func:`init_plain_layers` this applies to every scheme: a detector's predictors start
    near zero output (uniform class scores, zero deltas), a property of the detector rather than
    of the normalization. A scheme layer takes the weights through the layer protocol's
    ``load_plain_weights`` (it then computes, as far as its reparametrization allows, the plain
    layer with these weights), a plain layer directly.
    """
    weight = torch.randn_like(layer.weight) * std
    bias = None if layer.bias is None else torch.zeros_like(layer.bias)
    if hasattr(layer, "load_plain_weights"):
        layer.load_plain_weights(weight, bias)
        return
    layer.weight.copy_(weight)
    if bias is not None:
        layer.bias.copy_(bias)
