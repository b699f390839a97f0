"""The residual units of :class:`~norm_det.modeling.backbone.resnet.ResNet`.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016: the basic unit (two 3x3
convolutions, ResNet-18/34) and the bottleneck (1x1 -> 3x3 -> 1x1, ResNet-50/101), each
``relu(branch(x) + shortcut(x))``; the pre-activation unit of ResNet-V2 (He et al., "Identity
Mappings in Deep Residual Networks", ECCV 2016) and the normalizer-free scalars of NF-ResNets.
Every convolution and norm comes from the scheme; the shortcut is the identity, a 1x1
projection, or (ResNet-D, ``avg_down``) an average pool and a stride-1 projection.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from norm_det.modeling.conv_norm import ConvNormAct, activation_slot, image_conv_scheme
from norm_det.schemes import Scheme, build_norm
from norm_det.surgery import keep_norm


class ResidualBlock(nn.Module):
    """A residual unit: ``relu(branch(x) + shortcut(x))``, with the scheme's residual input.

    Args:
        branch: the residual branch; its last layer has no activation.
        shortcut: projection of the input when the shape changes, else ``None`` (identity).
        residual_input: a module applied to the unit's input before both paths (CZM's
            multiplicative noise), or ``None``. Its slot holds ``nn.Identity`` then, so that
            :func:`norm_det.surgery.convert` to such a scheme replaces the module in place
            instead of adding a second application.
        shortcut_pool: applied before the projection (ResNet-D's average pool, which then
            strides in place of the 1x1 convolution), or ``None``.
    """

    def __init__(
        self,
        branch: OrderedDict[str, nn.Module],
        shortcut: nn.Module | None,
        residual_input: nn.Module | None,
        shortcut_pool: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.residual_input = residual_input if residual_input is not None else nn.Identity()
        for name, layer in branch.items():
            self.add_module(name, layer)
        self._branch_names = tuple(branch)
        self.shortcut = shortcut
        self.shortcut_pool = shortcut_pool

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut_pool is not None:
            x = self.shortcut_pool(x)
        return self.shortcut(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (N, C_in, H, W) -> (N, C_out, H / stride, W / stride)``."""
        x = self.residual_input(x)
        identity = x if self.shortcut is None else self._project(x)
        out = x
        for name in self._branch_names:
            out = getattr(self, name)(out)
        return torch.relu_(out + identity)


def basic_block(
    scheme: Scheme,
    in_channels: int,
    out_channels: int,
    *,
    stride: int,
    dilation: int,
    avg_down: bool = False,
) -> ResidualBlock:
    """Two 3x3 convolutions (ResNet-18/34); ``dilation`` applies to both."""
    branch = OrderedDict(
        conv1=ConvNormAct(scheme, in_channels, out_channels, 3, stride=stride, dilation=dilation),
        conv2=ConvNormAct(
            scheme, out_channels, out_channels, 3, dilation=dilation, activation=False
        ),
    )
    shortcut, pool = _projection(scheme, in_channels, out_channels, stride, avg_down)
    return ResidualBlock(branch, shortcut, _noise(scheme), shortcut_pool=pool)


def bottleneck_block(
    scheme: Scheme,
    in_channels: int,
    out_channels: int,
    *,
    bottleneck_channels: int,
    stride: int,
    dilation: int,
    stride_in_1x1: bool,
    avg_down: bool = False,
) -> ResidualBlock:
    """1x1 -> 3x3 -> 1x1 (ResNet-50/101); the stride sits in the first 1x1 when
    ``stride_in_1x1`` (MSRA / Detectron weights) or in the 3x3 (torchvision weights)."""
    stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
    branch = OrderedDict(
        conv1=ConvNormAct(scheme, in_channels, bottleneck_channels, 1, stride=stride_1x1),
        conv2=ConvNormAct(
            scheme,
            bottleneck_channels,
            bottleneck_channels,
            3,
            stride=stride_3x3,
            dilation=dilation,
        ),
        conv3=ConvNormAct(scheme, bottleneck_channels, out_channels, 1, activation=False),
    )
    shortcut, pool = _projection(scheme, in_channels, out_channels, stride, avg_down)
    return ResidualBlock(branch, shortcut, _noise(scheme), shortcut_pool=pool)


class PreActivationBlock(ResidualBlock):
    """A pre-activation residual unit: ``x + alpha * branch(preact(x / beta))``.

    He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016 (ResNet-V2): the norm
    and ReLU come before each convolution, and nothing follows the addition. The projection
    shortcut, where the shape changes, takes the pre-activated input. ``alpha`` and ``beta``
    are 1 except for normalizer-free networks (Brock et al., "Characterizing signal
    propagation to close the performance gap in unnormalized ResNets", ICLR 2021, section 4):
    ``beta`` is the expected standard deviation of the unit's input, so the branch sees unit
    variance, and ``alpha`` (0.2) the rate at which the variance grows.

    Args:
        preact: the norm and the activation applied to the unit's input.
        branch, residual_input: as :class:`ResidualBlock`; the branch's last layer is a
            convolution with nothing after it.
        shortcut: projection of the pre-activated input when the shape changes, else ``None``.
        alpha, beta: the normalizer-free scalars (1: the plain pre-activation unit).
        shortcut_pool: as :class:`ResidualBlock`.
    """

    def __init__(
        self,
        preact: nn.Module,
        branch: OrderedDict[str, nn.Module],
        shortcut: nn.Module | None,
        residual_input: nn.Module | None,
        alpha: float = 1.0,
        beta: float = 1.0,
        shortcut_pool: nn.Module | None = None,
    ) -> None:
        super().__init__(branch, shortcut, residual_input, shortcut_pool)
        self.preact = preact
        self.alpha, self.beta = alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (N, C_in, H, W) -> (N, C_out, H / stride, W / stride)``."""
        x = self.residual_input(x)
        out = self.preact(x / self.beta if self.beta != 1 else x)
        identity = x if self.shortcut is None else self._project(out)
        for name in self._branch_names:
            out = getattr(self, name)(out)
        return identity + self.alpha * out if self.alpha != 1 else identity + out

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta:.4g}" if self.alpha != 1 else ""


def preactivation(scheme: Scheme, channels: int) -> nn.Sequential:
    """The norm and ReLU in front of a convolution (one layer for a ``norm_act`` scheme).

    Where the scheme has no norm (PWS, ND, ``none``) the ReLU works out of place: its input is
    then the unit's input itself, which the identity path adds unrectified (and, for ``final``
    and a stage's first unit, a feature map already returned to the caller).
    """
    norm = build_norm(scheme, channels, activation=True)
    relu = nn.ReLU() if isinstance(norm, nn.Identity) else activation_slot(norm)
    return nn.Sequential(OrderedDict(norm=norm, relu=relu))


def _scheme_conv(
    scheme: Scheme,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    bias: bool | None = None,
) -> nn.Module:
    """The scheme's convolution where a pre-activation network has a conv with no norm of the
    scheme right after it (the stem, a branch's last conv, a shortcut): a norm follows it later
    (the next unit's), so it is the scheme's convolution as at every conv+norm,
    weight-standardized in BiT's GN+WS networks, scale-standardized in NF-ResNets. ``bias``:
    None gives it a bias where the scheme's convolutions have one."""
    return scheme.conv(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=dilation * (kernel_size // 2),
        dilation=dilation,
        bias=bool(scheme.conv_bias) if bias is None else bias,
    )


def preactivation_stem_conv(
    scheme: Scheme, stem_norm: Scheme | None, out_channels: int
) -> nn.Module:
    """The 7x7 stride-2 convolution on the image of a pre-activation ResNet: the scheme's
    image convolution alone, or with a ``stem_norm`` that convolution, ``stem_norm``'s norm and
    a ReLU (``conv``, ``norm``, ``relu``), as the PWS release's stem (a one-group GroupNorm).

    With ``stem_norm`` the convolution keeps a bias whatever the scheme says: the norm is not
    the scheme's, and a one-group GroupNorm, normalizing all channels together, does not absorb
    a per-channel shift as a BN does. The norm is marked with :func:`norm_det.surgery.keep_norm`:
    :func:`norm_det.surgery.convert` to another scheme converts the convolution and keeps it.

    Raises:
        ValueError: ``stem_norm`` builds no norm (a norm-free scheme).
    """
    image_scheme = image_conv_scheme(scheme)
    if stem_norm is None:
        return _scheme_conv(image_scheme, 3, out_channels, 7, stride=2)
    norm = build_norm(stem_norm, out_channels, activation=True)
    if isinstance(norm, nn.Identity):
        raise ValueError(
            f"ResNet stem_norm (MODEL.RESNETS.STEM_NORM) {str(stem_norm)!r} has no norm to put "
            "after the stem convolution; give a scheme with a norm (e.g. 'GN(groups=1)') or "
            "none ('')"
        )
    conv = _scheme_conv(image_scheme, 3, out_channels, 7, stride=2, bias=True)
    keep_norm(norm)  # not the scheme's: convert(model, scheme) leaves it as it is
    return nn.Sequential(OrderedDict(conv=conv, norm=norm, relu=activation_slot(norm)))


def preactivation_block(
    scheme: Scheme,
    in_channels: int,
    out_channels: int,
    *,
    bottleneck_channels: int | None,
    stride: int,
    dilation: int,
    alpha: float = 1.0,
    beta: float = 1.0,
    avg_down: bool = False,
) -> PreActivationBlock:
    """A pre-activation bottleneck (1x1 -> 3x3 with the stride -> 1x1), or two 3x3 convolutions
    when ``bottleneck_channels`` is None (ResNet-18/34)."""
    if bottleneck_channels is None:
        branch = OrderedDict(
            conv1=ConvNormAct(
                scheme, in_channels, out_channels, 3, stride=stride, dilation=dilation
            ),
            conv2=_scheme_conv(scheme, out_channels, out_channels, 3, dilation=dilation),
        )
    else:
        branch = OrderedDict(
            conv1=ConvNormAct(scheme, in_channels, bottleneck_channels, 1),
            conv2=ConvNormAct(
                scheme,
                bottleneck_channels,
                bottleneck_channels,
                3,
                stride=stride,
                dilation=dilation,
            ),
            conv3=_scheme_conv(scheme, bottleneck_channels, out_channels, 1),
        )
    shortcut, pool = _projection(scheme, in_channels, out_channels, stride, avg_down, lone=True)
    return PreActivationBlock(
        preactivation(scheme, in_channels),
        branch,
        shortcut,
        _noise(scheme),
        alpha,
        beta,
        shortcut_pool=pool,
    )


def _projection(
    scheme: Scheme,
    in_channels: int,
    out_channels: int,
    stride: int,
    avg_down: bool,
    *,
    lone: bool = False,
) -> tuple[nn.Module | None, nn.Module | None]:
    """``(shortcut, shortcut_pool)`` of a unit: none when the shape is kept; else a 1x1
    projection (a lone conv in a pre-activation unit, a conv+norm otherwise) with the stride, or
    with ``avg_down`` a 2x2 average pool with the stride before a stride-1 projection (ResNet-D;
    ``ceil_mode`` and no padding counted, as timm's, so that odd sizes give the 3x3's size)."""
    if stride == 1 and in_channels == out_channels:
        return None, None
    pool = None
    if avg_down and stride != 1:
        pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
        stride = 1
    if lone:
        return _scheme_conv(scheme, in_channels, out_channels, 1, stride=stride), pool
    conv = ConvNormAct(scheme, in_channels, out_channels, 1, stride=stride, activation=False)
    return conv, pool


def _noise(scheme: Scheme) -> nn.Module | None:
    return scheme.residual_input() if scheme.residual_input is not None else None
