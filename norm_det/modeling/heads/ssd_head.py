"""The SSD prediction head: one 3x3 classifier and one 3x3 box regressor per feature map.

Liu et al., "SSD: Single Shot MultiBox Detector", ECCV 2016, §2.1. Built on torchvision's
``SSDScoringHead`` (which flattens per-map outputs into per-anchor rows); the convolutions are
predictors, of the scheme's predictor rule (:func:`norm_det.schemes.predictor_scheme`: plain
unless the scheme replaces predictors, as ND and ND++ do).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.detection.ssd import SSDScoringHead

from norm_det.modeling.conv_norm import SchemeSpec, predictor_scheme, resolve_scheme
from norm_det.schemes import build_conv


class SSDHead(nn.Module):
    """Class logits and box deltas for every default box.

    Args:
        in_channels: channels of each feature map.
        num_anchors: default boxes per position on each map.
        num_classes: foreground classes + 1.
        norm: the scheme whose predictor rule builds the predictors.

    Shapes:
        ``forward([(N, in_channels[i], H_i, W_i)])`` -> ``{"bbox_regression": (N, A, 4),
        "cls_logits": (N, A, num_classes)}`` with ``A`` default boxes in all, the interface of
        torchvision's ``SSD``.
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        num_anchors: Sequence[int],
        num_classes: int,
        norm: SchemeSpec,
    ) -> None:
        super().__init__()
        scheme = predictor_scheme(resolve_scheme(norm, "MODEL.SSD.NORM"))

        def predictors(columns: int) -> nn.ModuleList:
            layers = nn.ModuleList(
                build_conv(scheme, c, columns * a, 3, padding=1)
                for c, a in zip(in_channels, num_anchors)
            )
            # torchvision's initialisation of these predictors; scheme layers keep their own.
            for layer in layers:
                if type(layer) is nn.Conv2d:
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.zeros_(layer.bias)
            return layers

        self.classification_head = SSDScoringHead(predictors(num_classes), num_classes)
        self.regression_head = SSDScoringHead(predictors(4), 4)

    def forward(self, x: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "bbox_regression": self.regression_head(x),
            "cls_logits": self.classification_head(x),
        }
