"""The Fast R-CNN box head (convolutions, then fully connected layers) and its predictor.

Girshick, "Fast R-CNN", ICCV 2015; the "2fc" head of Lin et al., FPN, CVPR 2017, and the
"4conv1fc" head with a norm after every convolution of Wu & He, "Group Normalization", §6
(Detectron's ``FastRCNNConvFCHead``). Convolutions come in conv+norm pairs of the scheme; the
fully connected layers are the scheme's linear layers, the predictor's follow its predictor rule
(:func:`norm_det.schemes.predictor_scheme`).
"""

from __future__ import annotations

from collections import OrderedDict

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
from norm_det.schemes import build_linear


class FastRCNNConvFCHead(nn.Sequential):
    """``num_conv`` 3x3 conv+norm+ReLU, flatten, ``num_fc`` linear+ReLU.

    Args:
        in_channels: channels of the pooled region features.
        resolution: their side (7 for RoIAlign 7x7).
        num_conv, conv_dim: number and width of the convolutions.
        num_fc, fc_dim: number and width of the fully connected layers.
        norm: the scheme of all its layers.

    Attributes:
        out_features: width of the output.

    Shapes:
        ``(R, in_channels, resolution, resolution) -> (R, out_features)``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        resolution: int,
        num_conv: int,
        conv_dim: int,
        num_fc: int,
        fc_dim: int,
        norm: SchemeSpec,
    ) -> None:
        scheme = resolve_scheme(norm, "MODEL.ROI_BOX_HEAD.NORM")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels = in_channels
        for index in range(1, num_conv + 1):
            layers[f"conv{index}"] = ConvNormAct(scheme, channels, conv_dim, 3)
            channels = conv_dim
        layers["flatten"] = nn.Flatten(start_dim=1)
        features = channels * resolution * resolution
        for index in range(1, num_fc + 1):
            layers[f"fc{index}"] = build_linear(scheme, features, fc_dim)
            layers[f"fc{index}_relu"] = nn.ReLU(inplace=True)
            features = fc_dim
        super().__init__(layers)
        self.out_features = features
        for name, layer in self.named_children():
            init_plain_layers(layer, "msra" if name.startswith("conv") else "xavier")


class FastRCNNPredictor(nn.Module):
    """Class scores and class-specific box deltas (background included, torchvision's layout).

    Args:
        in_features: width of the box head's output.
        num_classes: foreground classes + 1.
        norm: the scheme whose predictor rule builds the two linear layers.

    Shapes:
        ``(R, in_features) -> ((R, num_classes), (R, 4 * num_classes))``.
    """

    def __init__(self, *, in_features: int, num_classes: int, norm: SchemeSpec) -> None:
        super().__init__()
        scheme = predictor_scheme(resolve_scheme(norm, "MODEL.ROI_BOX_HEAD.NORM"))
        self.cls_score = build_linear(scheme, in_features, num_classes)
        self.bbox_pred = build_linear(scheme, in_features, 4 * num_classes)
        init_predictor(self.cls_score, std=0.01)
        init_predictor(self.bbox_pred, std=0.001)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)
