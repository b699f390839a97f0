"""ResNet-18/34/50/101 whose every convolution and norm comes from a scheme.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016. Strides replaced by
dilation for dense prediction as in Chen et al., "Rethinking Atrous Convolution for Semantic
Image Segmentation" (DeepLabv3), 2017; early stages frozen as Detectron's ``FREEZE_AT``.
Average-pooled projection shortcuts (``avg_down``) as ResNet-D in He et al., "Bag of Tricks for
Image Classification with Convolutional Neural Networks", CVPR 2019.

Module names (for checkpoint key maps): ``stem.conv1.{conv,norm}``, ``res2`` .. ``res5`` (one
``nn.Sequential`` of blocks each), and in every block ``conv1``, ``conv2`` (, ``conv3``) and
``shortcut``, each a :class:`~norm_det.modeling.conv_norm.ConvNormAct` with ``conv`` and
``norm``. torchvision's ``layer1.0.conv1`` / ``layer1.0.bn1`` / ``layer1.0.downsample.{0,1}`` are
``res2.0.conv1.conv`` / ``res2.0.conv1.norm`` / ``res2.0.shortcut.{conv,norm}`` here. The
pre-activation ResNet-V2 (``preact``) has lone convolutions where no norm follows: ``stem.conv1``,
a unit's last ``conv2`` / ``conv3`` and its ``shortcut``, with its norms in ``res2.0.preact.norm``
(before the unit), ``res2.0.conv1.norm`` (after ``conv1``) and ``final.norm``; with a
``stem_norm`` its stem is ``stem.conv1.{conv,norm}`` again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from fvcore.common.config import CfgNode
from torch import nn

from norm_det.modeling.conv_norm import (
    ConvNormAct,
    SchemeSpec,
    activation_slot,
    image_conv_scheme,
    init_plain_layers,
    resolve_scheme,
)
from norm_det.schemes import Scheme, build_norm

# depth -> (number of blocks in res2..res5, whether the blocks are bottlenecks)
RESNET_SPECS: dict[int, tuple[tuple[int, int, int, int], bool]] = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
}
STAGE_NAMES = ("stem", "res2", "res3", "res4", "res5")
# ResNet(stem_pool=...) -> the max pool's own padding (zero_pad pads the map before it).
STEM_POOLS = {"max": 1, "zero_pad": 0}


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


def _preactivation(scheme: Scheme, channels: int) -> nn.Sequential:
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
    a per-channel shift as a BN does.

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
        _preactivation(scheme, in_channels),
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


class ResNet(nn.Module):
    """A ResNet trunk returning the feature maps named in ``out_features``.

    Args:
        depth: 18, 34, 50 or 101.
        norm: the scheme of every convolution and norm (its first convolution on the image is
            plain when the scheme asks for it).
        stem_channels: output channels of the 7x7 stem convolution (64 in the paper).
        res2_channels: output channels of ``res2``, doubling at every stage; default 64 for
            ResNet-18/34, 256 for ResNet-50/101.
        bottleneck_channels: the 3x3 width of the ``res2`` bottlenecks (ResNet-50/101 only),
            doubling at every stage.
        stride_in_1x1: put the bottleneck stride in the first 1x1 convolution.
        replace_stride_with_dilation: for ``res3``, ``res4``, ``res5``: keep the stage's
            resolution and dilate its 3x3 convolutions instead (output stride 16: ``(False,
            False, True)``; 8: ``(False, True, True)``). As in torchvision, the first block of a
            dilated stage keeps the previous stage's dilation.
        out_features: names among ``stem``, ``res2`` .. ``res5``; stages after the last one
            named are not built.
        freeze_at: 0 trains everything; k >= 1 freezes the stem and ``res2`` .. ``res{k}``:
            their parameters get no gradient and they stay in eval mode (so statistics-keeping
            layers of any scheme stop updating too).
        preact: the pre-activation ResNet-V2 (He et al., ECCV 2016; BiT's and NF-ResNets'
            trunk): :class:`PreActivationBlock` units, a stem that is one convolution (and the
            pool) with no norm unless ``stem_norm``, and a final norm and ReLU (``final``) on
            the last stage's output. A scheme with a ``residual_alpha`` (NF) gets the
            normalizer-free unit ``x + alpha * f(x / beta)`` with ``beta`` the expected std of
            ``x``: 1 after the stem, growing by ``alpha^2`` in variance per unit, back to
            ``1 + alpha^2`` after each stage's first unit, whose shortcut sees the scaled input.
        stem_pool: the stem's 3x3 stride-2 max pool: ``"max"`` pads with -inf (torchvision,
            detectron2); ``"zero_pad"`` pads the map with zeros first and pools without
            padding, as Big Transfer's stem (its pre-activation stem's output can be negative,
            so the border differs).
        avg_down: projection shortcuts that change the resolution average-pool 2x2 with the
            stride before a stride-1 1x1 convolution (ResNet-D; timm's NF-ResNets).
        stem_norm: ``preact`` only: a scheme (name, ``NAME(option=value)``, dict) whose norm
            and a ReLU follow the stem convolution (``stem.conv1`` then holds ``conv``,
            ``norm``, ``relu``), as the PWS release's one-group GroupNorm (``"GN(groups=1)"``);
            None: the lone stem convolution. A post-activation stem has the scheme's norm.

    Shapes:
        ``forward(x: (N, 3, H, W)) -> {name: (N, out_feature_channels[name], H / s, W / s)}``
        with ``s = out_feature_strides[name]``.
    """

    def __init__(
        self,
        *,
        depth: int,
        norm: SchemeSpec,
        stem_channels: int = 64,
        res2_channels: int | None = None,
        bottleneck_channels: int = 64,
        stride_in_1x1: bool = False,
        replace_stride_with_dilation: Sequence[bool] = (False, False, False),
        out_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        freeze_at: int = 0,
        preact: bool = False,
        stem_pool: str = "max",
        avg_down: bool = False,
        stem_norm: SchemeSpec = None,
    ) -> None:
        super().__init__()
        if depth not in RESNET_SPECS:
            raise ValueError(
                f"ResNet depth (MODEL.RESNETS.DEPTH) must be one of {sorted(RESNET_SPECS)}; "
                f"got {depth!r}"
            )
        unknown = [name for name in out_features if name not in STAGE_NAMES]
        if unknown or not out_features:
            raise ValueError(
                "ResNet out_features (MODEL.RESNETS.OUT_FEATURES) must be a non-empty list of "
                f"{list(STAGE_NAMES)}; "
                f"got {list(out_features)}"
            )
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation (MODEL.RESNETS.REPLACE_STRIDE_WITH_DILATION) needs "
                "three booleans (res3, res4, res5); "
                f"got {list(replace_stride_with_dilation)}"
            )
        if not 0 <= freeze_at <= 5:
            raise ValueError(
                f"freeze_at (MODEL.BACKBONE.FREEZE_AT) must be between 0 and 5; got {freeze_at}"
            )
        if stem_pool not in STEM_POOLS:
            raise ValueError(
                f"ResNet stem_pool (MODEL.RESNETS.STEM_POOL) must be one of {list(STEM_POOLS)}; "
                f"got {stem_pool!r}"
            )
        if stem_norm and not preact:
            raise ValueError(
                "ResNet stem_norm (MODEL.RESNETS.STEM_NORM) is for the pre-activation ResNet "
                "(preact, MODEL.RESNETS.PREACT): the post-activation stem already has the "
                f"scheme's norm; got stem_norm={stem_norm!r} with preact=False"
            )
        scheme = resolve_scheme(norm, "MODEL.RESNETS.NORM")
        stem_scheme = resolve_scheme(stem_norm, "MODEL.RESNETS.STEM_NORM") if stem_norm else None
        blocks_per_stage, bottleneck = RESNET_SPECS[depth]
        if res2_channels is None:
            res2_channels = 256 if bottleneck else 64

        if preact:
            stem_conv = preactivation_stem_conv(scheme, stem_scheme, stem_channels)
        else:
            stem_conv = ConvNormAct(image_conv_scheme(scheme), 3, stem_channels, 7, stride=2)
        stem: OrderedDict[str, nn.Module] = OrderedDict(conv1=stem_conv)
        if stem_pool == "zero_pad":
            stem["pad"] = nn.ConstantPad2d(1, 0.0)
        stem["pool"] = nn.MaxPool2d(kernel_size=3, stride=2, padding=STEM_POOLS[stem_pool])
        self.stem = nn.Sequential(stem)
        self.preact = preact
        self.stem_pool = stem_pool
        self.avg_down = avg_down
        # The scheme string (None: no stem norm), for checkpoint code to compare backbones by.
        self.stem_norm = None if stem_scheme is None else str(stem_scheme)
        alpha = scheme.residual_alpha if preact and scheme.residual_alpha is not None else 1.0
        variance = 1.0  # of the stem's output, as normalizer-free networks assume
        self.out_features = tuple(out_features)
        self.out_feature_channels = {"stem": stem_channels}
        self.out_feature_strides = {"stem": 4}
        last_stage = max(STAGE_NAMES.index(name) for name in out_features)

        in_channels, stride_so_far, dilation = stem_channels, 4, 1
        for index in range(1, last_stage + 1):
            name = STAGE_NAMES[index]
            scale = 2 ** (index - 1)
            stride = 1 if index == 1 else 2
            first_dilation = dilation
            if index > 1 and replace_stride_with_dilation[index - 2]:
                dilation, stride = dilation * 2, 1
            out_channels = res2_channels * scale
            blocks = []
            for block_index in range(blocks_per_stage[index - 1]):
                kwargs = dict(
                    stride=stride if block_index == 0 else 1,
                    dilation=first_dilation if block_index == 0 else dilation,
                    avg_down=avg_down,
                )
                if preact:
                    block = preactivation_block(
                        scheme,
                        in_channels,
                        out_channels,
                        bottleneck_channels=bottleneck_channels * scale if bottleneck else None,
                        alpha=alpha,
                        beta=variance**0.5 if alpha != 1 else 1.0,
                        **kwargs,
                    )
                    # The first unit's shortcut takes the scaled input: the variance restarts.
                    variance = (1.0 if block.shortcut is not None else variance) + alpha**2
                elif bottleneck:
                    block = bottleneck_block(
                        scheme,
                        in_channels,
                        out_channels,
                        bottleneck_channels=bottleneck_channels * scale,
                        stride_in_1x1=stride_in_1x1,
                        **kwargs,
                    )
                else:
                    block = basic_block(scheme, in_channels, out_channels, **kwargs)
                blocks.append(block)
                in_channels = out_channels
            self.add_module(name, nn.Sequential(*blocks))
            stride_so_far *= stride
            self.out_feature_channels[name] = out_channels
            self.out_feature_strides[name] = stride_so_far
        self._stage_names = STAGE_NAMES[: last_stage + 1]
        # ResNet-V2's norm and ReLU after the last unit (nothing follows a unit's addition).
        self.final = _preactivation(scheme, in_channels) if preact else None

        init_plain_layers(self, "msra")
        self.freeze_at = freeze_at
        for stage in self._frozen_stages():
            stage.requires_grad_(False)
            stage.eval()

    def _frozen_stages(self) -> list[nn.Module]:
        frozen = [getattr(self, name) for name in self._stage_names[: self.freeze_at]]
        if self.final is not None and self.freeze_at >= len(self._stage_names):
            frozen.append(self.final)
        return frozen

    def train(self, mode: bool = True) -> ResNet:
        """Set train/eval mode; frozen stages always stay in eval mode."""
        super().train(mode)
        for stage in self._frozen_stages():
            stage.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x: (N, 3, H, W)`` normalized image batch -> the ``out_features`` maps."""
        outputs = {}
        for name in self._stage_names:
            x = getattr(self, name)(x)
            if self.final is not None and name == self._stage_names[-1]:
                x = self.final(x)
            if name in self.out_features:
                outputs[name] = x
        return outputs

    @classmethod
    def from_config(cls, cfg: CfgNode, out_features: Sequence[str] | None = None) -> ResNet:
        """Build from ``MODEL.RESNETS`` and ``MODEL.BACKBONE.FREEZE_AT``.

        Args:
            out_features: overrides ``MODEL.RESNETS.OUT_FEATURES`` (a head that needs other maps).
        """
        resnets = cfg.MODEL.RESNETS
        depth = resnets.DEPTH
        if (
            depth in RESNET_SPECS
            and not RESNET_SPECS[depth][1]
            and resnets.RES2_OUT_CHANNELS != resnets.WIDTH_PER_GROUP
        ):
            raise ValueError(
                f"ResNet-{depth} has no bottleneck, so MODEL.RESNETS.RES2_OUT_CHANNELS is its "
                "res2 width and must equal MODEL.RESNETS.WIDTH_PER_GROUP (64 for the standard "
                f"ResNet-{depth}); got RES2_OUT_CHANNELS={resnets.RES2_OUT_CHANNELS} and "
                f"WIDTH_PER_GROUP={resnets.WIDTH_PER_GROUP}"
            )
        return cls(
            depth=depth,
            norm=resnets.NORM,
            stem_channels=resnets.STEM_OUT_CHANNELS,
            res2_channels=resnets.RES2_OUT_CHANNELS,
            bottleneck_channels=resnets.WIDTH_PER_GROUP,
            stride_in_1x1=resnets.STRIDE_IN_1X1,
            replace_stride_with_dilation=tuple(resnets.REPLACE_STRIDE_WITH_DILATION),
            out_features=tuple(out_features or resnets.OUT_FEATURES),
            freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
            preact=resnets.PREACT,
            stem_pool=resnets.STEM_POOL,
            avg_down=resnets.AVG_DOWN,
            stem_norm=resnets.STEM_NORM or None,
        )
