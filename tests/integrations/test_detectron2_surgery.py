"""The zero-config route on detectron2: norm_det.convert / fuse on a built detectron2 Mask R-CNN.

Runs where detectron2 is installed from source (see docs/integrations.md). The model is
detectron2's own (``build_resnet_fpn_backbone``, its standard heads), a narrow R-18 FPN with BN in
every part; no norm_det builder is involved.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.nn import functional as F

pytest.importorskip("detectron2")

from detectron2.config import get_cfg
from detectron2.layers import Conv2d
from detectron2.modeling import build_model
from detectron2.structures import Boxes

from norm_det import convert, fuse
from norm_det.layers import CZMConv2d, FrozenBatchNorm2d, GroupNorm, PWSConv2d
from norm_det.schemes import get_scheme
from tests.integrations.test_detectron2 import _loss, instances_batch
from tests.model_utils import randomize_norms
from tests.model_utils import relative_error as _relative_error


def _mask_rcnn() -> nn.Module:
    """detectron2's Mask R-CNN R-18-FPN, narrow, BN everywhere, with "trained" statistics."""
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.merge_from_list(
        ["DEPTH", 18, "RES2_OUT_CHANNELS", 64, "NORM", "BN", "OUT_FEATURES", ["res2", "res3"]]
    )
    cfg.MODEL.RESNETS.OUT_FEATURES += ["res4", "res5"]
    cfg.MODEL.FPN.merge_from_list(
        ["IN_FEATURES", ["res2", "res3", "res4", "res5"], "OUT_CHANNELS", 32, "NORM", "BN"]
    )
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.ROI_HEADS.merge_from_list(
        ["NAME", "StandardROIHeads", "IN_FEATURES", ["p2", "p3", "p4", "p5"], "NUM_CLASSES", 2]
    )
    cfg.MODEL.ROI_BOX_HEAD.merge_from_list(
        ["NAME", "FastRCNNConvFCHead", "NUM_CONV", 2, "NUM_FC", 1, "CONV_DIM", 32, "FC_DIM", 64]
    )
    cfg.MODEL.ROI_BOX_HEAD.NORM = "BN"
    cfg.MODEL.ROI_MASK_HEAD.merge_from_list(
        ["NAME", "MaskRCNNConvUpsampleHead", "NUM_CONV", 2, "CONV_DIM", 32, "NORM", "BN"]
    )
    torch.manual_seed(0)
    model = build_model(cfg)  # FREEZE_AT 2: the stem and res2 hold detectron2's FrozenBN
    return randomize_norms(model)


@pytest.fixture(scope="module")
def mask_rcnn() -> nn.Module:
    return _mask_rcnn()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255


def _outputs(model: nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every learned output of each stage, for fixed proposals.

    Final detections go through score thresholds and NMS, which turn rounding into different
    box sets; the raw outputs of each stage are what a conversion must preserve.
    """
    with torch.no_grad():
        features = model.backbone(model.preprocess_image([{"image": image}]).tensor)
        rpn = model.proposal_generator
        objectness, deltas = rpn.rpn_head([features[f] for f in rpn.in_features])
        heads = model.roi_heads
        boxes = [Boxes(torch.tensor([[4.0, 4.0, 60.0, 50.0], [20.0, 30.0, 62.0, 62.0]]))]
        box_in = heads.box_pooler([features[f] for f in heads.box_in_features], boxes)
        scores, box_deltas = heads.box_predictor(heads.box_head(box_in))
        mask_in = heads.mask_pooler([features[f] for f in heads.mask_in_features], boxes)
        outputs = {f"features.{k}": v for k, v in features.items()}
        outputs.update(
            objectness=torch.cat([o.flatten() for o in objectness]),
            rpn_deltas=torch.cat([d.flatten() for d in deltas]),
            scores=scores,
            box_deltas=box_deltas,
            mask_logits=heads.mask_head.layers(mask_in),
        )
    return outputs


def _norm_det_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__module__.startswith("norm_det")]


def _paired_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    """The convolutions that hold a norm in detectron2's build (all but predictors and RPN)."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and isinstance(getattr(m, "norm", None), nn.Module)
    }


def test_convert_to_frozen_bn_is_exact_and_keeps_detectron2s_layers(mask_rcnn, image) -> None:
    model = copy.deepcopy(mask_rcnn)
    reference = _outputs(model, image)
    with torch.no_grad():
        detections = model([{"image": image}])[0]["instances"]
    keys = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    paired = _paired_convs(model)
    assert len(paired) == 1 + 16 + 3 + 8 + 2 + 2  # stem, blocks, shortcuts, FPN, box, mask
    laterals = list(model.backbone.lateral_convs)

    assert convert(model, "FrozenBN") is model
    # detectron2's Conv2d stays, with the scheme's norm; the FPN's lists hold the same objects.
    for name, conv in paired.items():
        assert type(conv) is Conv2d and type(conv.norm) is FrozenBatchNorm2d, name
    assert all(a is b for a, b in zip(model.backbone.lateral_convs, laterals))
    assert not model.backbone.bottom_up.stem.conv1.weight.requires_grad  # FREEZE_AT kept
    assert list(model.state_dict()) == keys
    converted = _outputs(model, image)
    for key, value in reference.items():
        assert torch.equal(converted[key], value), key
    with torch.no_grad():
        again = model([{"image": image}])[0]["instances"]
    assert len(detections) > 0
    assert torch.equal(again.pred_boxes.tensor, detections.pred_boxes.tensor)
    assert torch.equal(again.pred_masks, detections.pred_masks)


def _probe(scheme: str) -> type[nn.Module]:
    return type(get_scheme(scheme).conv(8, 8, 3, padding=1, bias=True))


@pytest.mark.parametrize("scheme", ["GN+WS", "PWS"])
def test_convert_to_a_conv_scheme_gives_its_layers_and_trains(mask_rcnn, image, scheme) -> None:
    model = copy.deepcopy(mask_rcnn)
    paired = _paired_convs(model)
    layers = {key.rsplit(".", 1)[0] for key in model.state_dict()}
    convert(model, scheme)
    norm_class = GroupNorm if scheme == "GN+WS" else None
    for name, conv in paired.items():
        assert isinstance(conv, _probe(scheme)), name
        if norm_class is None:  # the BN went into the convolution's weight and bias
            assert conv.norm is None and conv.bias is not None, name
        else:
            assert type(conv.norm) is norm_class, name
    backbone, heads = model.backbone, model.roi_heads
    # Plain Python lists of detectron2 reach the converted layers.
    assert all(isinstance(c, _probe(scheme)) for c in backbone.lateral_convs)
    assert list(heads.box_head.conv_norm_relus) == [heads.box_head.conv1, heads.box_head.conv2]
    # A lone convolution with an activation (the RPN's) keeps it where the scheme replaces it.
    rpn_conv = model.proposal_generator.rpn_head.conv
    if scheme == "PWS":
        assert isinstance(rpn_conv, PWSConv2d) and isinstance(rpn_conv.activation, nn.ReLU)
        x = torch.randn(1, 32, 8, 8)
        plain = F.conv2d(x, rpn_conv.standardized_weight(), rpn_conv.bias, padding=1)
        torch.testing.assert_close(rpn_conv(x), torch.relu(plain))
    else:
        assert type(rpn_conv) is Conv2d
    # Module paths stay detectron2's (``res3.0.conv1.norm.weight``): no layer moves, PWS drops
    # the norms and adds its ``alpha``.
    assert {key.rsplit(".", 1)[0] for key in model.state_dict()} <= layers
    # The frozen stages stay frozen, their new norms included.
    stem = backbone.bottom_up.stem.conv1
    assert not any(p.requires_grad for p in stem.parameters())
    assert all(p.requires_grad for p in backbone.bottom_up.res3.parameters())

    model.train()
    batch = instances_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    before = _loss(model, batch)
    before.backward()
    res5 = backbone.bottom_up.res5[1].conv2
    assert isinstance(res5, _probe(scheme)) and res5.weight.grad.abs().sum() > 0
    optimizer.step()
    with torch.no_grad():
        after = _loss(model, batch)
    assert torch.isfinite(before) and torch.isfinite(after)
    # The same batch and sampling: one small step lowers the loss.
    assert after < before

    # Eval after training mode: the scheme's layers run and give finite outputs.
    model.eval()
    assert all(torch.isfinite(v).all() for v in _outputs(model, image).values())


def test_convert_to_czm_keeps_the_image_conv_plain_and_the_function(mask_rcnn, image) -> None:
    model = copy.deepcopy(mask_rcnn)
    reference = _outputs(model, image)
    convert(model, "CZM")
    bottom_up = model.backbone.bottom_up
    # The convolution on the image, though detectron2 registers the FPN's first.
    stem = bottom_up.stem.conv1
    assert type(stem) is Conv2d and stem.norm is None and stem.bias is not None
    assert isinstance(bottom_up.res3[0].conv1, CZMConv2d)
    assert type(bottom_up.res3[0].shortcut) is Conv2d  # 1x1: CZM keeps it plain
    blocks = [block for stage in bottom_up.stages for block in stage]
    assert len(blocks) == 8 and all(b.residual_input.amplitude == 0.1 for b in blocks)
    # Warm start: each BN folded into its convolution, e^g * V == W; the noise is off in eval.
    converted = _outputs(model, image)
    for key, value in reference.items():
        assert _relative_error(converted[key], value) < 1e-5, key


@pytest.mark.parametrize("scheme", ["FrozenBN", "GN+WS", "PWS"])
def test_fuse_leaves_detectron2_layers_and_the_same_outputs(mask_rcnn, image, scheme) -> None:
    model = convert(copy.deepcopy(mask_rcnn), scheme)
    with torch.no_grad():  # a trained-looking GN affine
        for module in model.modules():
            if isinstance(module, GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    if scheme == "GN+WS":  # a converted model pickles, with the same outputs
        restored = pickle.loads(pickle.dumps(model))
        for key, value in _outputs(model, image).items():
            assert torch.equal(_outputs(restored, image)[key], value), key
    reference = _outputs(model, image)
    fused = fuse(model)
    assert _norm_det_modules(fused) == []
    assert not [n for n, m in fused.named_modules() if m._forward_pre_hooks or m._forward_hooks]
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert {type(c) for c in convs} <= {Conv2d, nn.Conv2d}
    for conv in _paired_convs(mask_rcnn):
        held = fused.get_submodule(conv).norm
        if scheme == "GN+WS":
            assert type(held) is nn.GroupNorm
        else:  # FrozenBN folded into the weights, the activation kept
            assert held is None
    assert isinstance(fused.roi_heads.mask_head.mask_fcn1.activation, nn.ReLU)
    assert fused.backbone.output_convs[-1] is fused.backbone.fpn_output2
    fused_outputs = _outputs(fused, image)
    for key, value in reference.items():
        assert _relative_error(fused_outputs[key], value) < 1e-4, key
    # The fused model still detects with detectron2's own code.
    with torch.no_grad():
        instances = fused([{"image": image}])[0]["instances"]
    assert instances.pred_masks.shape[1:] == (64, 64)
