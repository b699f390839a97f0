import torch
import torch.nn.functional as F

from norm_det.modeling.heads import (
    ASPP,
    FastRCNNConvFCHead,
    FastRCNNPredictor,
    MaskRCNNConvHead,
    MaskRCNNPredictor,
    RPNHead,
)


def test_aspp_image_pooling_equals_the_conv_of_the_mean() -> None:
    """The pooling branch convolves before averaging: the same map as averaging first."""
    aspp = ASPP(in_channels=6, out_channels=4, dilations=(1, 2, 3), dropout=0.0, norm="").eval()
    aspp.double()
    x = torch.randn(2, 6, 9, 7, dtype=torch.float64)
    conv = aspp.image_pooling
    with torch.no_grad():
        pooled_first = F.relu(conv(x.mean(dim=(2, 3), keepdim=True)))
        conv_first = F.relu(conv(x).mean(dim=(2, 3), keepdim=True))
        # Equal in exact arithmetic. In float64 (u = 2^-53), each order rounds a mean of 63
        # values (64 u) and a 1x1 convolution of 6 (7 u) of magnitudes |W| mean|x| + |b|.
        bias = None if conv.bias is None else conv.bias.abs()
        magnitude = F.conv2d(x.abs().mean(dim=(2, 3), keepdim=True), conv.weight.abs(), bias)
        assert ((conv_first - pooled_first).abs() <= 2 * (64 + 7) * 2.0**-53 * magnitude).all()
    assert aspp(x).shape == (2, 4, 9, 7)


def test_head_shapes() -> None:
    rpn = RPNHead(in_channels=8, num_anchors=3, norm="GN(groups=4)")
    objectness, deltas = rpn([torch.randn(2, 8, 16, 16), torch.randn(2, 8, 8, 8)])
    assert [o.shape for o in objectness] == [(2, 3, 16, 16), (2, 3, 8, 8)]
    assert [d.shape for d in deltas] == [(2, 12, 16, 16), (2, 12, 8, 8)]

    box_head = FastRCNNConvFCHead(
        in_channels=8,
        resolution=7,
        num_conv=4,
        conv_dim=8,
        num_fc=1,
        fc_dim=32,
        norm="GN(groups=4)",
    )
    assert box_head.out_features == 32
    scores, boxes = FastRCNNPredictor(in_features=32, num_classes=4, norm="")(
        box_head(torch.randn(5, 8, 7, 7))
    )
    assert scores.shape == (5, 4) and boxes.shape == (5, 16)

    mask_head = MaskRCNNConvHead(in_channels=8, num_conv=4, conv_dim=6, norm="GN(groups=2)")
    logits = MaskRCNNPredictor(in_channels=6, num_classes=4, norm="")(
        mask_head(torch.randn(5, 8, 14, 14))
    )
    assert logits.shape == (5, 4, 28, 28)
