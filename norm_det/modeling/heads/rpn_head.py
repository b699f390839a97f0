"""The region proposal network head, shared by all pyramid levels.

Ren et al., "Faster R-CNN: Towards Real-Time Object Detection with Region Proposal Networks",
NeurIPS 2015; one head over all FPN levels as in Lin et al., FPN, CVPR 2017. The 3x3 convolution
takes the scheme's norm (``MODEL.RPN.NORM``, a norm_det addition: Detectron's RPN head has none);
the two 1x1 predictors follow the scheme's predictor rule (plain unless it replaces predictors).
"""

from __future__ import annotations

import torch
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


class RPNHead(nn.Module):
    """Objectness logits and box deltas for ``num_anchors`` anchors at every position.

    Args:
        in_channels: channels of every feature map.
        num_anchors: anchors per position (sizes x aspect ratios of one level).
        norm: the scheme of the head's convolutions.

    Shapes:
        ``forward([(N, in_channels, H_l, W_l)])`` ->
        ``([(N, num_anchors, H_l, W_l)], [(N, 4 * num_anchors, H_l, W_l)])``, the interface of
        torchvision's ``RegionProposalNetwork``.
    """

    def __init__(self, *, in_channels: int, num_anchors: int, norm: SchemeSpec) -> None:
        super().__init__()
        scheme = resolve_scheme(norm, "MODEL.RPN.NORM")
        self.conv = ConvNormAct(scheme, in_channels, in_channels, 3)
        predictor = predictor_scheme(scheme)
        self.cls_logits = build_conv(predictor, in_channels, num_anchors, 1)
        self.bbox_pred = build_conv(predictor, in_channels, 4 * num_anchors, 1)
        init_plain_layers(self.conv, "normal", std=0.01)
        init_predictor(self.cls_logits, std=0.01)
        init_predictor(self.bbox_pred, std=0.01)

    def forward(
        self, features: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        objectness, deltas = [], []
        for feature in features:
            hidden = self.conv(feature)
            objectness.append(self.cls_logits(hidden))
            deltas.append(self.bbox_pred(hidden))
        return objectness, deltas
