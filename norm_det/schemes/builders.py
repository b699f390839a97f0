"""What model code calls: a scheme's convolution and norm, lone convolution, linear and
transposed layers, and where a scheme's layers go (the image convolution, the predictors).

Every builder takes a scheme as :func:`norm_det.schemes.get_scheme` does (a name, a
``NAME(option=value)`` string, a dict or a :class:`~norm_det.schemes.Scheme`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from norm_det.schemes.registry import Scheme, get_scheme

# ---------------------------------------------------------------------------------------------
# Where a scheme's layers go: the rule every route follows.


def image_conv_scheme(scheme: str | Mapping[str, Any] | Scheme | None) -> Scheme:
    """The scheme of the convolution on the image.

    Plain (``none``: a convolution with bias and no norm) for schemes that declare
    ``keep_first_conv_plain`` (CZM: the image has no mean shift to reject), else the scheme.
    """
    resolved = get_scheme(scheme)
    return get_scheme("none") if resolved.keep_first_conv_plain else resolved


def predictor_scheme(scheme: str | Mapping[str, Any] | Scheme | None) -> Scheme:
    """The scheme of a predictor (class scores, box deltas, objectness, mask / seg logits).

    The scheme itself where it ``replaces_predictors`` (ND, ND++: "all layers"), else ``none``:
    a plain ``nn.Conv2d`` / ``nn.Linear`` with bias, which the detector initialises near zero.
    """
    resolved = get_scheme(scheme)
    return resolved if resolved.replaces_predictors else get_scheme("none")


# ---------------------------------------------------------------------------------------------
# Builders: what model code calls.


def build_conv_norm(
    scheme: str | Mapping[str, Any] | Scheme | None,
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    activation: bool = False,
) -> tuple[nn.Module, nn.Module]:
    """One convolution and the norm that follows it (``nn.Identity`` when the scheme has none).

    Args:
        activation: a ReLU follows the norm (see :func:`build_norm`).

    Returns:
        ``(conv, norm)``; ``conv`` maps ``(N, in_channels, H, W)`` to
        ``(N, out_channels, H', W')`` and ``norm`` keeps the shape.
    """
    resolved = get_scheme(scheme)
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    conv = resolved.conv(
        in_channels, out_channels, kernel_size, bias=resolved.conv_bias, **geometry
    )
    norm = build_norm(resolved, out_channels, activation=activation)
    pair_norm(norm, conv)
    return conv, norm


def build_norm(
    scheme: str | Mapping[str, Any] | Scheme | None, num_channels: int, activation: bool = False
) -> nn.Module:
    """The norm a scheme puts after a convolution with ``num_channels`` outputs, or Identity.

    Args:
        activation: the network applies a ReLU after the norm here. For a scheme with a
            ``norm_act`` the result is that layer, which carries the activation (see
            :func:`carries_activation`); otherwise the scheme's norm.
    """
    resolved = get_scheme(scheme)
    factory = resolved.norm_act if activation and resolved.norm_act is not None else resolved.norm
    return factory(num_channels) if factory is not None else nn.Identity()


def carries_activation(norm: nn.Module) -> bool:
    """Whether layer ``norm`` applies the activation after it (a ``norm_act`` layer).

    Such a layer says so by its attribute ``carries_activation`` (see :mod:`norm_det.layers`).
    """
    return bool(getattr(norm, "carries_activation", False))


def pair_norm(norm: nn.Module, conv: nn.Module) -> None:
    """Tell a norm whose statistics depend on the weights before it (CBN) its convolution.

    Such a norm has ``pair_with(conv)`` (see :mod:`norm_det.layers`); others are left alone.
    """
    if hasattr(norm, "pair_with"):
        norm.pair_with(conv)


def build_conv(
    scheme: str | Mapping[str, Any] | Scheme | None,
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    bias: bool = True,
) -> nn.Module:
    """A convolution with no norm after it (an FPN output, a predictor).

    It is the scheme's convolution when the scheme replaces lone convolutions (PWS, ND/ND++),
    otherwise a plain ``nn.Conv2d``.
    """
    resolved = get_scheme(scheme)
    factory = resolved.conv if resolved.replaces_lone_convs else nn.Conv2d
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return factory(in_channels, out_channels, kernel_size, bias=bias, **geometry)


def build_linear(
    scheme: str | Mapping[str, Any] | Scheme | None,
    in_features: int,
    out_features: int,
    bias: bool = True,
) -> nn.Module:
    """The scheme's fully connected layer: ``(N, in_features) -> (N, out_features)``."""
    return get_scheme(scheme).linear(in_features, out_features, bias=bias)


def build_conv_transpose(
    scheme: str | Mapping[str, Any] | Scheme | None,
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    output_padding: int | tuple[int, int] = 0,
    groups: int = 1,
    bias: bool = True,
    dilation: int | tuple[int, int] = 1,
) -> nn.Module:
    """The scheme's transposed convolution (mask-head upsampling), arguments as torch's."""
    return get_scheme(scheme).conv_transpose(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        groups=groups,
        bias=bias,
        dilation=dilation,
    )
