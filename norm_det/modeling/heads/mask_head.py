"""The Mask R-CNN mask branch: 3x3 convolutions, a 2x deconvolution and a per-class predictor.

He et al., "Mask R-CNN", ICCV 2017 (the FPN mask head, Fig. 4 right); a norm after each
convolution as in Wu & He, "Group Normalization", §6. The deconvolution is the scheme's
transposed convolution, the predictor a lone convolution of the scheme's predictor rule
(:func:`norm_det.schemes.predictor_scheme`: plain unless the scheme's paper says otherwise).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from norm_det.modeling.conv_norm import (
    ConvNormAct,
    SchemeSpec,
    init_plain_layers,
    init_predictor,
    predictor_scheme,
    resolve_scheme,
)
from norm_det.schemes import build_conv, build_conv_transpose


class MaskRCNNConvHead(nn.Sequential):
    """``num_conv`` 3x3 conv+norm+ReLU of width ``conv_dim``.

    Shapes:
        ``(R, in_channels, 14, 14) -> (R, out_channels, 14, 14)``; ``out_channels`` is
        ``conv_dim`` (``in_channels`` when ``num_conv`` is 0).
    """

    def __init__(self, *, in_channels: int, num_conv: int, conv_dim: int, norm: SchemeSpec) -> None:
        scheme = resolve_scheme(norm, "MODEL.ROI_MASK_HEAD.NORM")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels = in_channels
        for index in range(1, num_conv + 1):
            layers[f"mask_fcn{index}"] = ConvNormAct(scheme, channels, conv_dim, 3)
            channels = conv_dim
        super().__init__(layers)
        self.out_channels = channels
        init_plain_layers(self, "msra")


class MaskRCNNPredictor(nn.Sequential):
    """2x2 stride-2 deconvolution + ReLU, then a 1x1 convolution to one mask per class.

    Args:
        in_channels: channels of the mask head's output (also the deconvolution's width).
        num_classes: foreground classes + 1 (torchvision's layout; channel 0 is unused).
        norm: the scheme of the deconvolution; the predictor follows its predictor rule.

    Shapes:
        ``(R, in_channels, S, S) -> (R, num_classes, 2S, 2S)`` mask logits.
    """

    def __init__(self, *, in_channels: int, num_classes: int, norm: SchemeSpec) -> None:
        scheme = resolve_scheme(norm, "MODEL.ROI_MASK_HEAD.NORM")
        super().__init__(
            OrderedDict(
                conv5_mask=build_conv_transpose(scheme, in_channels, in_channels, 2, stride=2),
                relu=nn.ReLU(inplace=True),
                mask_fcn_logits=build_conv(predictor_scheme(scheme), in_channels, num_classes, 1),
            )
        )
        init_plain_layers(self.conv5_mask, "msra")
        init_predictor(self.mask_fcn_logits, std=0.001)
