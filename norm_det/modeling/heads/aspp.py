"""Atrous spatial pyramid pooling and the DeepLabv3 head, every layer from a scheme.

Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation" (DeepLabv3), 2017,
§3.3: a 1x1 convolution, three 3x3 atrous convolutions and image-level pooling in parallel,
concatenated and projected by a 1x1 convolution, each followed by the norm; then a 1x1 classifier.
torchvision's ``ASPP`` hard-codes ``nn.BatchNorm2d``; this one asks the scheme.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from norm_det.modeling.conv_norm import (
    ConvNormAct,
    SchemeSpec,
    init_plain_layers,
    init_predictor,
    predictor_scheme,
    resolve_scheme,
)
from norm_det.schemes import build_conv


class ASPP(nn.Module):
    """Parallel atrous branches plus image pooling, concatenated and projected.

    The image-pooling branch is a lone 1x1 convolution with bias and no norm (as Detectron2's
    DeepLab does: a norm over a 1x1 map of one image has no statistics). The convolution is
    applied *before* the global average, which is the same linear map (a 1x1 convolution
    commutes with averaging) but gives a scheme that learns from its input's statistics (ND)
    H·W samples per image instead of one.

    Args:
        in_channels: channels of the backbone map.
        out_channels: channels of every branch and of the output.
        dilations: dilation of each 3x3 branch ((6, 12, 18) at output stride 16, doubled at 8).
        dropout: dropout probability after the projection.
        norm: the scheme of every layer.

    Shapes:
        ``(N, in_channels, H, W) -> (N, out_channels, H, W)``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        dilations: Sequence[int],
        dropout: float,
        norm: SchemeSpec,
    ) -> None:
        super().__init__()
        scheme = resolve_scheme(norm, "MODEL.SEM_SEG_HEAD.NORM")
        self.branches = nn.ModuleList(
            [ConvNormAct(scheme, in_channels, out_channels, 1)]
            + [ConvNormAct(scheme, in_channels, out_channels, 3, dilation=d) for d in dilations]
        )
        self.image_pooling = build_conv(scheme, in_channels, out_channels, 1)
        self.project = ConvNormAct(scheme, out_channels * (len(dilations) + 2), out_channels, 1)
        self.dropout = nn.Dropout(dropout)
        init_plain_layers(self, "msra")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [branch(x) for branch in self.branches]
        pooled = F.relu(self.image_pooling(x).mean(dim=(2, 3), keepdim=True))
        outputs.append(pooled.expand(-1, -1, *x.shape[-2:]))
        return self.dropout(self.project(torch.cat(outputs, dim=1)))


class DeepLabV3Head(nn.Sequential):
    """ASPP and a 1x1 classifier (a predictor: plain unless the scheme replaces predictors).

    Shapes:
        ``(N, in_channels, H, W) -> (N, num_classes, H, W)`` logits at the backbone's stride.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        aspp_channels: int,
        aspp_dilations: Sequence[int],
        aspp_dropout: float,
        norm: SchemeSpec,
    ) -> None:
        scheme = resolve_scheme(norm, "MODEL.SEM_SEG_HEAD.NORM")
        aspp = ASPP(
            in_channels=in_channels,
            out_channels=aspp_channels,
            dilations=aspp_dilations,
            dropout=aspp_dropout,
            norm=scheme,
        )
        predictor = build_conv(predictor_scheme(scheme), aspp_channels, num_classes, 1)
        init_predictor(predictor, std=0.001)
        super().__init__(OrderedDict(aspp=aspp, predictor=predictor))
