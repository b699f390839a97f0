"""Issue 15, item 2: one network per scheme, whatever the route.

For Mask R-CNN R-50-FPN (2fc box head, 4conv mask head) and every registered scheme, the layer
type at every convolution, linear and transposed convolution is listed by its role in the
network — the convolution on the image, the rest of the backbone, the FPN, the RPN's
convolution and predictors, the box head's fully connected layers and predictors, the mask
head's convolutions, deconvolution and predictor — together with the number of noise modules at
residual-unit inputs, and compared with norm_det's own model, for each route:

- ``norm_det.convert`` on torchvision's ``maskrcnn_resnet50_fpn(weights=None,
  weights_backbone=None)``;
- detectron2's own ``mask_rcnn_R_50_FPN_1x.yaml`` with its norm keys set to the scheme, after
  ``import norm_det.integrations.detectron2`` (skipped without detectron2);
- mmdet's own ``mask-rcnn_r50_fpn_1x_coco.py`` with ``norm_cfg=dict(type="NormDet<X>")`` in the
  backbone, neck and RoI heads, after ``import norm_det.integrations.mmdet`` (skipped without
  mmdet).

norm_det's model is configured with the norm keys the route has. detectron2's and mmdet's RPN
head has no norm key: it stays the framework's, as norm_det's own RPN head does with its
``MODEL.RPN.NORM`` left at ``""``; their box heads take the key's scheme even where they hold
fully connected layers only. ``convert`` has no keys: it converts the whole model, so torchvision's
layers outside its backbone (which holds its only norms) are compared with norm_det's under the
key ``""`` for a scheme with a norm (lone convolutions stay plain) and under the scheme for one
without (its convolutions replace lone ones: PWS, ND, CZM). Widths are narrowed (32 channels,
the least GroupNorm(32) takes) where a route's config allows, which changes no layer type;
torchvision's builder has no width option and is built once.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import os
from collections import Counter

import pytest
import torchvision
from torch import nn

from norm_det import convert
from norm_det.config import get_cfg
from norm_det.layers import MultiplicativeNoise
from norm_det.modeling import build_model
from norm_det.schemes import available_schemes, get_scheme

# Narrow layers make GroupNorm and ND fall back to fewer groups / smaller blocks, with a warning.
pytestmark = pytest.mark.filterwarnings("ignore:GroupNorm", "ignore:Deconv")

NOISE = "residual-unit noise"
# route -> (module path pattern, role), the first match wins.
ROLES: dict[str, list[tuple[str, str]]] = {
    "norm_det": [
        ("backbone.body.stem.conv1.conv", "image conv"),
        ("backbone.body.*", "backbone"),
        ("backbone.fpn.*", "FPN"),
        ("rpn.head.conv.*", "RPN conv"),
        ("rpn.head.cls_logits", "RPN predictors"),
        ("rpn.head.bbox_pred", "RPN predictors"),
        ("roi_heads.box_head.fc*", "box-head fcs"),
        ("roi_heads.box_predictor.*", "box predictors"),
        ("roi_heads.mask_head.*", "mask-head convs"),
        ("roi_heads.mask_predictor.conv5_mask", "mask deconv"),
        ("roi_heads.mask_predictor.mask_fcn_logits", "mask predictor"),
    ],
    "convert": [
        ("backbone.body.conv1", "image conv"),
        ("backbone.body.*", "backbone"),
        ("backbone.fpn.*", "FPN"),
        ("rpn.head.conv.*", "RPN conv"),
        ("rpn.head.cls_logits", "RPN predictors"),
        ("rpn.head.bbox_pred", "RPN predictors"),
        ("roi_heads.box_head.*", "box-head fcs"),
        ("roi_heads.box_predictor.*", "box predictors"),
        ("roi_heads.mask_head.*", "mask-head convs"),
        ("roi_heads.mask_predictor.conv5_mask", "mask deconv"),
        ("roi_heads.mask_predictor.mask_fcn_logits", "mask predictor"),
    ],
    "detectron2": [
        ("backbone.bottom_up.stem.conv1", "image conv"),
        ("backbone.bottom_up.*", "backbone"),
        ("backbone.fpn_*", "FPN"),
        ("proposal_generator.rpn_head.conv", "RPN conv"),
        ("proposal_generator.rpn_head.objectness_logits", "RPN predictors"),
        ("proposal_generator.rpn_head.anchor_deltas", "RPN predictors"),
        ("roi_heads.box_head.fc*", "box-head fcs"),
        ("roi_heads.box_predictor.*", "box predictors"),
        ("roi_heads.mask_head.mask_fcn*", "mask-head convs"),
        ("roi_heads.mask_head.deconv", "mask deconv"),
        ("roi_heads.mask_head.predictor", "mask predictor"),
    ],
    "mmdet": [
        ("backbone.conv1", "image conv"),
        ("backbone.*", "backbone"),
        ("neck.*", "FPN"),
        ("rpn_head.rpn_conv", "RPN conv"),
        ("rpn_head.rpn_cls", "RPN predictors"),
        ("rpn_head.rpn_reg", "RPN predictors"),
        ("roi_head.bbox_head.shared_fcs.*", "box-head fcs"),
        ("roi_head.bbox_head.fc_cls", "box predictors"),
        ("roi_head.bbox_head.fc_reg", "box predictors"),
        ("roi_head.mask_head.convs.*", "mask-head convs"),
        ("roi_head.mask_head.upsample", "mask deconv"),
        ("roi_head.mask_head.conv_logits", "mask predictor"),
    ],
}
ALL_ROLES = sorted({role for patterns in ROLES.values() for _, role in patterns})


def layer_kind(layer: nn.Module) -> str:
    """norm_det's layer class by name; any framework's plain layer as torch's base class.

    detectron2's ``Conv2d`` and mmcv's wrappers are plain; a scheme's convolution that applies
    detectron2's norm and activation (surgery's form of it) is named by the scheme's class.
    """
    cls = getattr(type(layer), "_conv_class", type(layer))
    if cls.__module__.startswith("norm_det"):
        return cls.__name__
    base = next(b for b in (nn.ConvTranspose2d, nn.Conv2d, nn.Linear) if isinstance(layer, b))
    return base.__name__


def network_by_role(route: str, model: nn.Module) -> dict[str, Counter]:
    """role -> how many layers of each kind; every layer must have a role."""
    table: dict[str, Counter] = {role: Counter() for role in ALL_ROLES}
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)):
            continue
        role = next((r for pattern, r in ROLES[route] if fnmatch.fnmatchcase(path, pattern)), None)
        assert role is not None, f"{route}: layer {path} ({type(module).__name__}) has no role"
        table[role][layer_kind(module)] += 1
    table[NOISE] = Counter(
        type(m).__name__ for m in model.modules() if isinstance(m, MultiplicativeNoise)
    )
    return table


# ---------------------------------------------------------------------------------------------
# The routes.


NORM_KEYS = ("RESNETS", "FPN", "RPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD")
# Per route: the norm keys it has, and whether the parts it has none for follow the scheme's
# rule for lone layers (``convert``) or stay plain (a framework's part that no key reaches).
SLOTS = {
    "norm_det": (NORM_KEYS, False),
    "convert": (("RESNETS",), True),
    "detectron2": (("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD"), False),
    "mmdet": (("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD"), False),
}


@functools.cache
def norm_det_network(
    scheme: str, slots: tuple[str, ...] = NORM_KEYS, lone_layers_follow: bool = False
) -> dict[str, Counter]:
    """norm_det's Mask R-CNN with ``scheme`` in the norm keys ``slots`` (see the docstring)."""
    follows = lone_layers_follow and get_scheme(scheme).norm is None
    without_slot = scheme if follows else ""
    cfg = get_cfg()
    model = cfg.MODEL
    model.META_ARCHITECTURE = "MaskRCNN"
    model.MASK_ON = True
    model.RESNETS.DEPTH = 50
    _narrow(model)
    for key in NORM_KEYS:
        model[key].NORM = scheme if key in slots else without_slot
    return network_by_role("norm_det", build_model(cfg))


def _narrow(model_cfg) -> None:
    """Narrow widths, every stage trained: the keys norm_det's config shares with detectron2's."""
    model_cfg.BACKBONE.FREEZE_AT = 0
    model_cfg.RESNETS.STEM_OUT_CHANNELS = 32
    model_cfg.RESNETS.RES2_OUT_CHANNELS = 128
    model_cfg.RESNETS.WIDTH_PER_GROUP = 32
    model_cfg.FPN.OUT_CHANNELS = 32
    model_cfg.ROI_BOX_HEAD.FC_DIM = 64
    model_cfg.ROI_MASK_HEAD.CONV_DIM = 32


@functools.lru_cache(maxsize=1)
def _torchvision_mask_rcnn() -> nn.Module:
    return torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)


def convert_network(scheme: str) -> dict[str, Counter]:
    model = convert(copy.deepcopy(_torchvision_mask_rcnn()), scheme, keep_weights=False)
    return network_by_role("convert", model)


def detectron2_network(scheme: str) -> dict[str, Counter]:
    pytest.importorskip("detectron2")
    from detectron2 import model_zoo, modeling
    from detectron2.config import get_cfg as get_detectron2_cfg

    import norm_det.integrations.detectron2  # noqa: F401  (detectron2's get_norm learns schemes)

    cfg = get_detectron2_cfg()
    cfg.merge_from_file(
        model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    )
    model = cfg.MODEL
    model.DEVICE = "cpu"
    model.WEIGHTS = ""
    _narrow(model)
    for key in SLOTS["detectron2"][0]:
        model[key].NORM = scheme
    # Looked up now: the integration rebinds build_model in the modules loaded, not in a name
    # imported before it.
    return network_by_role("detectron2", modeling.build_model(cfg))


@functools.lru_cache(maxsize=1)
def _mmdet_config():
    pytest.importorskip("mmengine")
    pytest.importorskip("mmcv")
    # With mmcv-lite, mmdet's models import only through the bridge (a no-op with full mmcv).
    pytest.importorskip("norm_det.integrations.mmcv_ops_bridge")
    mmdet = pytest.importorskip("mmdet")
    from mmengine.config import Config

    import norm_det.integrations.mmdet  # noqa: F401  (the NormDet<X> types)

    path = os.path.join(
        os.path.dirname(mmdet.__file__),
        ".mim",
        "configs",
        "mask_rcnn",
        "mask-rcnn_r50_fpn_1x_coco.py",
    )
    return Config.fromfile(path)


def mmdet_network(scheme: str) -> dict[str, Counter]:
    config = _mmdet_config()
    from mmengine.registry import MODELS, init_default_scope

    from norm_det.integrations.mmdet import type_names

    norm_cfg = dict(type=type_names(scheme)[1])
    model = copy.deepcopy(config.model)
    model.backbone.update(base_channels=32, stem_channels=32, norm_cfg=norm_cfg, init_cfg=None)
    model.neck.update(in_channels=[128, 256, 512, 1024], out_channels=32, norm_cfg=norm_cfg)
    model.rpn_head.update(in_channels=32, feat_channels=32)
    model.roi_head.bbox_roi_extractor.out_channels = 32
    model.roi_head.mask_roi_extractor.out_channels = 32
    model.roi_head.bbox_head.update(in_channels=32, fc_out_channels=64, norm_cfg=norm_cfg)
    model.roi_head.mask_head.update(in_channels=32, conv_out_channels=32, norm_cfg=norm_cfg)
    init_default_scope("mmdet")
    return network_by_role("mmdet", MODELS.build(model))


ROUTES = {"convert": convert_network, "detectron2": detectron2_network, "mmdet": mmdet_network}


def _differences(reference: dict[str, Counter], other: dict[str, Counter]) -> list[str]:
    return [
        f"{role}: norm_det {dict(reference[role])} vs {dict(other[role])}"
        for role in [*ALL_ROLES, NOISE]
        if reference[role] != other[role]
    ]


# ---------------------------------------------------------------------------------------------
# Tests.


@pytest.mark.parametrize("scheme", available_schemes())
def test_norm_det_network_follows_the_scheme_rule(scheme: str) -> None:
    """The reference itself: the layer types the scheme registry's rule gives at each role."""
    resolved = get_scheme(scheme)
    table = norm_det_network(scheme)
    assert sum(table["backbone"].values()) == 52 and sum(table["FPN"].values()) == 8
    assert sum(table["mask-head convs"].values()) == 4
    plain_predictors = not resolved.replaces_predictors
    for role in ("RPN predictors", "box predictors", "mask predictor"):
        kinds = set(table[role])
        assert (kinds <= {"Conv2d", "Linear"}) == plain_predictors, (role, kinds)
    assert set(table["image conv"]) == (
        {"Conv2d"} if resolved.keep_first_conv_plain else set(table["image conv"])
    )
    noise = 16 if resolved.residual_input is not None else 0  # 16 residual units
    assert sum(table[NOISE].values()) == noise


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("scheme", available_schemes())
def test_every_route_builds_the_same_network(scheme: str, route: str) -> None:
    other = ROUTES[route](scheme)
    reference = norm_det_network(scheme, *SLOTS[route])
    differences = _differences(reference, other)
    assert not differences, f"scheme {scheme}, route {route}:\n" + "\n".join(differences)
