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

The residual units themselves are in :mod:`norm_det.modeling.backbone.resnet_blocks`; this
module assembles them into the network (arguments, stem, stages, frozen stages, config).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from fvcore.common.config import CfgNode
from torch import nn

from norm_det.modeling.backbone.resnet_blocks import (
    PreActivationBlock,
    ResidualBlock,
    basic_block,
    bottleneck_block,
    preactivation,
    preactivation_block,
    preactivation_stem_conv,
)
from norm_det.modeling.conv_norm import (
    ConvNormAct,
    SchemeSpec,
    image_conv_scheme,
    init_plain_layers,
    resolve_scheme,
)
from norm_det.schemes import Scheme

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


def _check_arguments(
    depth: int,
    out_features: Sequence[str],
    replace_stride_with_dilation: Sequence[bool],
    freeze_at: int,
) -> None:
    """Raise the ``ValueError`` that names the first of these :class:`ResNet` arguments at fault."""
    if depth not in RESNET_SPECS:
        raise ValueError(
            f"ResNet depth (MODEL.RESNETS.DEPTH) must be one of {sorted(RESNET_SPECS)}; "
            f"got {depth!r}"
        )
    unknown = [name for name in out_features if name not in STAGE_NAMES]
    if unknown or not out_features:
        raise ValueError(
            "ResNet out_features (MODEL.RESNETS.OUT_FEATURES) must be a non-empty list of "
            f"{list(STAGE_NAMES)}; got {list(out_features)}"
        )
    if len(replace_stride_with_dilation) != 3:
        raise ValueError(
            "replace_stride_with_dilation (MODEL.RESNETS.REPLACE_STRIDE_WITH_DILATION) needs "
            f"three booleans (res3, res4, res5); got {list(replace_stride_with_dilation)}"
        )
    if not 0 <= freeze_at <= 5:
        raise ValueError(
            f"freeze_at (MODEL.BACKBONE.FREEZE_AT) must be between 0 and 5; got {freeze_at}"
        )


def _check_stem(stem_pool: str, stem_norm: SchemeSpec, preact: bool) -> None:
    """Raise the ``ValueError`` that names :class:`ResNet`'s stem argument at fault."""
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


def _stem(
    scheme: Scheme, stem_norm: SchemeSpec, preact: bool, channels: int, pool: str
) -> tuple[nn.Sequential, Scheme | None]:
    """``(stem, stem_norm's scheme)``: ``conv1`` on the image (the scheme's image convolution
    and norm; a pre-activation stem's convolution, with ``stem_norm``'s norm where given), then
    the 3x3 stride-2 max pool (``pool``: a key of :data:`STEM_POOLS`)."""
    stem_scheme = resolve_scheme(stem_norm, "MODEL.RESNETS.STEM_NORM") if stem_norm else None
    if preact:
        conv = preactivation_stem_conv(scheme, stem_scheme, channels)
    else:
        conv = ConvNormAct(image_conv_scheme(scheme), 3, channels, 7, stride=2)
    stem: OrderedDict[str, nn.Module] = OrderedDict(conv1=conv)
    if pool == "zero_pad":
        stem["pad"] = nn.ConstantPad2d(1, 0.0)
    stem["pool"] = nn.MaxPool2d(kernel_size=3, stride=2, padding=STEM_POOLS[pool])
    return nn.Sequential(stem), stem_scheme


@dataclass(frozen=True)
class _Stages:
    """The stages ``res2`` .. ``res5`` that :class:`ResNet`'s arguments describe."""

    scheme: Scheme
    depth: int
    res2_channels: int | None
    bottleneck_channels: int
    stride_in_1x1: bool
    replace_stride_with_dilation: Sequence[bool]
    preact: bool
    avg_down: bool

    def built(
        self, stem_channels: int, out_features: Sequence[str]
    ) -> Iterator[tuple[str, nn.Sequential, int, int]]:
        """``(name, stage, output channels, stride so far)`` of ``res2`` .. the last stage in
        ``out_features``; a dilated stage's first block keeps the previous stage's dilation, as
        in torchvision."""
        blocks_per_stage, bottleneck = RESNET_SPECS[self.depth]
        res2_channels = self.res2_channels
        if res2_channels is None:
            res2_channels = 256 if bottleneck else 64
        last_stage = max(STAGE_NAMES.index(name) for name in out_features)
        variance = 1.0  # of the stem's output, as normalizer-free networks assume
        in_channels, stride_so_far, dilation = stem_channels, 4, 1
        for index in range(1, last_stage + 1):
            scale, stride, first_dilation = 2 ** (index - 1), 1 if index == 1 else 2, dilation
            if index > 1 and self.replace_stride_with_dilation[index - 2]:
                dilation, stride = dilation * 2, 1
            blocks = []
            for block_index in range(blocks_per_stage[index - 1]):
                kwargs = dict(
                    stride=stride if block_index == 0 else 1,
                    dilation=first_dilation if block_index == 0 else dilation,
                    avg_down=self.avg_down,
                )
                width = self.bottleneck_channels * scale if bottleneck else None
                block, variance = self._block(
                    in_channels, res2_channels * scale, width, variance, kwargs
                )
                blocks.append(block)
                in_channels = res2_channels * scale
            stride_so_far *= stride
            yield STAGE_NAMES[index], nn.Sequential(*blocks), in_channels, stride_so_far

    def _block(
        self,
        in_channels: int,
        out_channels: int,
        bottleneck_channels: int | None,
        variance: float,
        kwargs: dict[str, Any],
    ) -> tuple[ResidualBlock, float]:
        """A unit (a bottleneck of ``bottleneck_channels``, or a basic block when None) and the
        variance of its output (normalizer-free units: ``variance`` is its input's)."""
        if self.preact:
            alpha = self.scheme.residual_alpha
            alpha = 1.0 if alpha is None else alpha
            block = preactivation_block(
                self.scheme,
                in_channels,
                out_channels,
                bottleneck_channels=bottleneck_channels,
                alpha=alpha,
                beta=variance**0.5 if alpha != 1 else 1.0,
                **kwargs,
            )
            # The first unit's shortcut takes the scaled input: the variance restarts.
            return block, (1.0 if block.shortcut is not None else variance) + alpha**2
        if bottleneck_channels is not None:
            block = bottleneck_block(
                self.scheme,
                in_channels,
                out_channels,
                bottleneck_channels=bottleneck_channels,
                stride_in_1x1=self.stride_in_1x1,
                **kwargs,
            )
            return block, variance
        return basic_block(self.scheme, in_channels, out_channels, **kwargs), variance


def _frozen_stages(net: ResNet) -> list[nn.Module]:
    """The stages (and ``final``) that ``net.freeze_at`` freezes."""
    frozen = [getattr(net, name) for name in net._stage_names[: net.freeze_at]]
    if net.final is not None and net.freeze_at >= len(net._stage_names):
        frozen.append(net.final)
    return frozen


def _freeze(net: ResNet) -> None:
    """Freeze ``net``'s frozen stages: no gradient to their parameters, eval mode."""
    for stage in _frozen_stages(net):
        stage.requires_grad_(False).eval()


def _config_arguments(cfg: CfgNode, out_features: Sequence[str] | None) -> dict[str, Any]:
    """:class:`ResNet`'s arguments from ``MODEL.RESNETS`` and ``MODEL.BACKBONE.FREEZE_AT``."""
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
    return dict(
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
        _check_arguments(depth, out_features, replace_stride_with_dilation, freeze_at)
        _check_stem(stem_pool, stem_norm, preact)
        scheme = resolve_scheme(norm, "MODEL.RESNETS.NORM")
        self.stem, stem_scheme = _stem(scheme, stem_norm, preact, stem_channels, stem_pool)
        self.preact, self.stem_pool, self.avg_down = preact, stem_pool, avg_down
        # The scheme string (None: no stem norm), for checkpoint code to compare backbones by.
        self.stem_norm = None if stem_scheme is None else str(stem_scheme)
        self.out_features = tuple(out_features)
        self.out_feature_channels, self.out_feature_strides = {"stem": stem_channels}, {"stem": 4}
        stages = _Stages(
            scheme,
            depth,
            res2_channels,
            bottleneck_channels,
            stride_in_1x1,
            replace_stride_with_dilation,
            preact,
            avg_down,
        )
        for name, stage, channels, stride in stages.built(stem_channels, out_features):
            self.add_module(name, stage)
            self.out_feature_channels[name], self.out_feature_strides[name] = channels, stride
        self._stage_names = tuple(self.out_feature_channels)  # the stem, res2 .. the last built
        # ResNet-V2's norm and ReLU after the last unit (nothing follows a unit's addition).
        last_channels = self.out_feature_channels[self._stage_names[-1]]
        self.final = preactivation(scheme, last_channels) if preact else None
        init_plain_layers(self, "msra")
        self.freeze_at = freeze_at
        _freeze(self)

    def train(self, mode: bool = True) -> ResNet:
        """Set train/eval mode; frozen stages always stay in eval mode."""
        super().train(mode)
        for stage in _frozen_stages(self):
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
        return cls(**_config_arguments(cfg, out_features))


__all__ = [
    "RESNET_SPECS",
    "STAGE_NAMES",
    "STEM_POOLS",
    "PreActivationBlock",
    "ResNet",
    "ResidualBlock",
    "basic_block",
    "bottleneck_block",
    "preactivation_block",
]
