"""norm_det schemes in detectron2's norm keys (runs where detectron2 is installed from source).

The models here are narrow R-50-FPNs from ``configs/detectron2`` (same layer kinds, fast);
``test_detectron2_native.py`` trains detectron2's own config files.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("detectron2")

import detectron2.config
import detectron2.engine.defaults
import detectron2.layers
import detectron2.model_zoo.model_zoo
import detectron2.modeling.backbone.fpn
import detectron2.modeling.backbone.resnet
import detectron2.modeling.roi_heads.box_head
import detectron2.modeling.roi_heads.mask_head
from detectron2.config import get_cfg
from detectron2.layers import Conv2d, NaiveSyncBatchNorm
from detectron2.layers import FrozenBatchNorm2d as D2FrozenBatchNorm2d
from detectron2.modeling import build_backbone, build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from norm_det.integrations import detectron2 as nd_d2
from norm_det.layers import FrozenBatchNorm2d, GroupNorm, SyncBatchNorm, WSConv2d
from norm_det.schemes import available_schemes, build_norm, carries_activation, get_scheme

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "detectron2"
YAML_FILES = sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("Base"))
# The modules that bind detectron2's get_norm by name: the hook must reach each of them.
GET_NORM_USERS = (
    detectron2.layers,
    detectron2.modeling.backbone.resnet,
    detectron2.modeling.backbone.fpn,
    detectron2.modeling.roi_heads.box_head,
    detectron2.modeling.roi_heads.mask_head,
)


def _narrow(cfg):
    """``cfg`` shrunk to a narrow R50-FPN on the CPU (the same layer kinds)."""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.merge_from_list(
        ["WIDTH_PER_GROUP", 32, "STEM_OUT_CHANNELS", 32, "RES2_OUT_CHANNELS", 128]
    )
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ROI_BOX_HEAD.merge_from_list(["CONV_DIM", 32, "FC_DIM", 64])
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 32
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    return cfg


def _cfg(name: str | None = None):
    """The config of ``name`` (no add_normdet_config: detectron2's own keys), narrow."""
    cfg = get_cfg()
    cfg.merge_from_file(str(CONFIGS / (name or "Base-RCNN-FPN-NormDet.yaml")))
    return _narrow(cfg)


def _scheme_of_yaml(name: str) -> str:
    cfg = get_cfg()
    cfg.merge_from_file(str(CONFIGS / name))
    return cfg.MODEL.RESNETS.NORM


def _probe_conv(scheme: str, kernel: int = 3) -> type[nn.Module]:
    return type(get_scheme(scheme).conv(8, 8, kernel, padding=kernel // 2, bias=True))


def _d2_convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def expected_norm(scheme: str, frozen: bool = False) -> type[nn.Module] | None:
    """The norm class a key naming ``scheme`` puts after a convolution (None: no norm).

    detectron2's own names keep detectron2's layers; a stage frozen by ``FREEZE_AT`` holds a
    FrozenBN where the scheme's norm is a BatchNorm (detectron2's, or norm_det's for a scheme).
    """
    if scheme in nd_d2.DETECTRON2_NORMS:
        norm = type(detectron2.layers.get_norm(scheme, 64))
        if frozen and issubclass(norm, nn.modules.batchnorm._BatchNorm):
            return D2FrozenBatchNorm2d
        return norm
    if get_scheme(scheme).norm is None:
        return None
    norm = type(build_norm(scheme, 64))
    if frozen and issubclass(norm, nn.modules.batchnorm._BatchNorm):
        return FrozenBatchNorm2d
    return norm


def assert_follows(convs: list[nn.Conv2d], scheme: str, *, first_is_image_conv: bool) -> None:
    """Every covered convolution is the scheme's, with the scheme's norm (or none) as ``.norm``.

    For detectron2's own names the convolution is detectron2's ``Conv2d``.
    """
    resolved = get_scheme(scheme)
    native = scheme in nd_d2.DETECTRON2_NORMS
    for index, conv in enumerate(convs):
        frozen = not conv.weight.requires_grad
        if native or (index == 0 and first_is_image_conv and resolved.keep_first_conv_plain):
            assert type(conv) is Conv2d, (index, type(conv), scheme)
        else:
            assert isinstance(conv, _probe_conv(scheme, conv.kernel_size[0])), (conv, scheme)
        norm = expected_norm(scheme, frozen)
        if not native and carries_activation(conv.norm):
            # Where a ReLU follows, a normalization-activation layer (FRN, EvoNorm, NF).
            norm = type(build_norm(scheme, 64, activation=True))
        if norm is None:
            assert conv.norm is None and conv.bias is not None, (index, scheme)
        else:
            assert type(conv.norm) is norm, (index, type(conv.norm), norm, scheme)


def assert_no_marker(model: nn.Module) -> None:
    left = [n for n, m in model.named_modules() if isinstance(m, nd_d2.SchemeMarker)]
    assert left == []


@pytest.mark.parametrize("name", YAML_FILES)
def test_yaml_builds_with_the_scheme_everywhere_it_says(name: str) -> None:
    scheme = _scheme_of_yaml(name)
    cfg = _cfg(name)
    model = build_model(cfg)
    resolved = get_scheme(scheme)
    backbone, heads = model.backbone, model.roi_heads
    assert_follows(_d2_convs(backbone.bottom_up), scheme, first_is_image_conv=True)
    everywhere = scheme == cfg.MODEL.FPN.NORM
    fpn_convs = [*backbone.lateral_convs, *backbone.output_convs]
    box_convs = list(heads.box_head.conv_norm_relus)
    if everywhere:
        assert len(box_convs) == 4
        assert_follows(fpn_convs, scheme, first_is_image_conv=False)
        assert_follows(box_convs, scheme, first_is_image_conv=False)
        if cfg.MODEL.MASK_ON:
            assert_follows(heads.mask_head.conv_norm_relus, scheme, first_is_image_conv=False)
            if resolved.conv_transpose is not nn.ConvTranspose2d:
                assert isinstance(heads.mask_head.deconv, type(build_deconv(scheme)))
        if resolved.linear is not nn.Linear:
            assert isinstance(heads.box_head.fc1, type(resolved.linear(4, 4, bias=True)))
    else:
        assert all(conv.norm is None and type(conv) is Conv2d for conv in fpn_convs)
    if resolved.residual_input is not None:  # CZM's noise at every residual unit's input
        units = [m for m in backbone.bottom_up.modules() if hasattr(m, "shortcut")]
        assert units and all(isinstance(u.residual_input, nn.Module) for u in units)
    assert_no_marker(model)


def build_deconv(scheme: str) -> nn.Module:
    return get_scheme(scheme).conv_transpose(8, 8, 2, stride=2, padding=0, bias=True)


def test_get_norm_hook_reaches_every_binding_and_is_reversible() -> None:
    original = nd_d2._ORIGINALS["get_norm"]
    assert nd_d2.is_enabled()
    hooked = detectron2.layers.get_norm
    assert hooked is not original
    assert all(module.get_norm is hooked for module in GET_NORM_USERS)
    marker = detectron2.modeling.backbone.resnet.get_norm("NDPP", 16)
    assert isinstance(marker, nd_d2.SchemeMarker) and marker.num_features == 16
    assert type(hooked("GN", 64)) is nn.GroupNorm  # detectron2's own names: its layers
    nd_d2.disable()
    try:
        assert not nd_d2.is_enabled()
        assert all(module.get_norm is original for module in GET_NORM_USERS)
        assert detectron2.modeling.build_model is nd_d2._ORIGINALS["build_model"]
        with pytest.raises(KeyError):
            detectron2.modeling.backbone.fpn.get_norm("NDPP", 16)
        with nd_d2.enabled():  # the context manager enables for its block only
            assert detectron2.modeling.roi_heads.mask_head.get_norm is hooked
        assert detectron2.modeling.roi_heads.mask_head.get_norm is original
    finally:
        nd_d2.enable()
    assert all(module.get_norm is hooked for module in GET_NORM_USERS)
    nd_d2.enable()  # idempotent
    assert detectron2.layers.get_norm is hooked


def test_detectron2s_own_tools_build_converted_models() -> None:
    # DefaultTrainer / DefaultPredictor call engine.defaults' build_model; the model zoo's
    # LazyConfig loader calls its own binding of instantiate.
    assert detectron2.engine.defaults.build_model is detectron2.modeling.build_model
    assert detectron2.model_zoo.model_zoo.instantiate is detectron2.config.instantiate
    assert detectron2.config.instantiate is not nd_d2._ORIGINALS["instantiate"]
    cfg = _cfg()
    cfg.MODEL.RESNETS.NORM = "CZM"
    model = detectron2.engine.defaults.DefaultTrainer.build_model(cfg)
    assert_no_marker(model)
    assert isinstance(model.backbone.bottom_up.res3[0].conv2, _probe_conv("CZM"))


def test_a_model_built_around_the_hook_says_how_to_convert_it() -> None:
    cfg = _cfg()
    cfg.MODEL.RESNETS.NORM = cfg.MODEL.FPN.NORM = "GN+WS"
    backbone = build_backbone(cfg)  # not detectron2's build_model: nothing converts it
    assert isinstance(backbone.bottom_up.res2[0].conv1.norm, nd_d2.SchemeMarker)
    image = torch.rand(1, 3, 64, 64)
    with pytest.raises(RuntimeError, match="convert_marked"):
        backbone(image)
    assert nd_d2.convert_marked(backbone) is backbone
    assert_no_marker(backbone)
    assert isinstance(backbone.bottom_up.res2[0].conv1, WSConv2d)
    assert type(backbone.fpn_lateral2.norm) is GroupNorm
    assert all(torch.isfinite(f).all() for f in backbone(image).values())


def test_legacy_normdet_builders_build_the_same_network() -> None:
    stock = _cfg("mask_rcnn_R_50_FPN_1x_ndpp.yaml")
    legacy = stock.clone()
    nd_d2.add_normdet_config(legacy)
    legacy.MODEL.BACKBONE.NAME = "build_normdet_backbone"
    legacy.MODEL.ROI_BOX_HEAD.NAME = "NormDetBoxHead"
    legacy.MODEL.ROI_MASK_HEAD.NAME = "NormDetMaskHead"
    ours, theirs = build_model(stock), build_model(legacy)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    kinds = [(n, type(m)) for n, m in ours.named_modules()]
    assert kinds == [(n, type(m)) for n, m in theirs.named_modules()]


@pytest.mark.parametrize(
    "ours_name, stock_name",
    [("frozen_bn", "FrozenBN"), ("GroupNorm", "GN")],
)
def test_norm_det_schemes_match_detectron2_norms_key_for_key_and_number_for_number(
    ours_name: str, stock_name: str
) -> None:
    def build(norm: str) -> nn.Module:
        cfg = _cfg()
        cfg.MODEL.MASK_ON = True
        cfg.MODEL.RESNETS.NORM = norm
        if stock_name == "GN":
            cfg.MODEL.FPN.NORM = cfg.MODEL.ROI_BOX_HEAD.NORM = cfg.MODEL.ROI_MASK_HEAD.NORM = norm
            cfg.MODEL.ROI_BOX_HEAD.merge_from_list(["NUM_CONV", 4, "NUM_FC", 1])
        return build_model(cfg).eval()

    ours, stock = build(ours_name), build(stock_name)
    ours_norm = ours.backbone.bottom_up.res3[0].conv1.norm
    assert type(ours_norm) is (FrozenBatchNorm2d if stock_name == "FrozenBN" else GroupNorm)
    assert list(ours.state_dict()) == list(stock.state_dict())  # checkpoints load either way
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in stock.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
        ours.load_state_dict(stock.state_dict())
        image = torch.randn(1, 3, 64, 64, generator=generator)
        expected = stock.backbone(image)
        got = ours.backbone(image)
        box_in = torch.randn(3, 32, 7, 7, generator=generator)
        box_expected, box_got = stock.roi_heads.box_head(box_in), ours.roi_heads.box_head(box_in)
    for key, value in expected.items():
        assert value.abs().sum() > 0
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(box_got, box_expected, rtol=1e-4, atol=1e-5)


def test_scheme_conv_applies_detectron2_norm_and_activation() -> None:
    cfg = _cfg("mask_rcnn_R_50_FPN_1x_gn_ws.yaml")
    conv = build_model(cfg).roi_heads.mask_head.mask_fcn1.eval()
    x = torch.randn(2, 32, 6, 6, generator=torch.Generator().manual_seed(1))
    standardized = nn.functional.conv2d(x, conv.standardized_weight(), None, 1, conv.padding)
    torch.testing.assert_close(conv(x), torch.relu(conv.norm(standardized)), rtol=1e-5, atol=1e-5)
    assert conv.norm.num_groups == 32 and conv.bias is None
    # fuse() keeps detectron2's contract: a detectron2 Conv2d with the norm and the activation.
    fused = conv.fuse()
    assert type(fused) is Conv2d and fused.activation is conv.activation
    torch.testing.assert_close(fused(x), conv(x), rtol=1e-5, atol=1e-5)


def test_frozen_stages_stay_frozen() -> None:
    cfg = _cfg("mask_rcnn_R_50_FPN_1x_syncbn.yaml")
    cfg.MODEL.RESNETS.NORM = "SyncBatchNorm"  # norm_det's SyncBN (detectron2's is "SyncBN")
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 2
    bottom_up = build_model(cfg).backbone.bottom_up
    stem, res3 = bottom_up.stem.conv1, bottom_up.res3[0].conv1
    assert isinstance(stem.norm, FrozenBatchNorm2d) and not stem.weight.requires_grad
    assert isinstance(bottom_up.res2[0].conv1.norm, FrozenBatchNorm2d)
    assert type(res3.norm) is SyncBatchNorm and res3.weight.requires_grad


def test_config_errors_name_the_key() -> None:
    cfg = _cfg("mask_rcnn_R_50_FPN_1x_gn.yaml")
    cfg.MODEL.FPN.NORM = "NotANorm"
    with pytest.raises(ValueError, match=r"MODEL\.FPN\.NORM: 'NotANorm'"):
        build_model(cfg)
    cfg.MODEL.FPN.NORM = "GN(grups=2)"
    with pytest.raises(ValueError, match=r"MODEL\.FPN\.NORM: .*no option 'grups'"):
        build_model(cfg)
    with pytest.raises(ValueError, match="get_norm: 'NotANorm'"):  # no bare KeyError
        detectron2.layers.get_norm("NotANorm", 8)
    cfg = get_cfg()  # the legacy builders without add_normdet_config
    cfg.MODEL.BACKBONE.NAME = "build_normdet_backbone"
    cfg.MODEL.DEVICE = "cpu"
    with pytest.raises(ValueError, match="add_normdet_config"):
        build_model(cfg)


def test_detectron2_only_norm_names_pass_through() -> None:
    cfg = _cfg("mask_rcnn_R_50_FPN_1x_gn.yaml")
    cfg.MODEL.ROI_MASK_HEAD.NORM = "naiveSyncBN"
    model = build_model(cfg)
    assert isinstance(model.roi_heads.mask_head.mask_fcn1.norm, NaiveSyncBatchNorm)


def test_a_part_mixing_detectron2_norms_and_a_scheme_converts_only_the_marked_convs() -> None:
    backbone = build_backbone(_cfg())
    stem = backbone.bottom_up.stem
    with nd_d2.enabled():
        # A LazyConfig can name the stem's norm and the stages' norm separately.
        stem.conv1.norm = detectron2.layers.get_norm("IterNorm", stem.conv1.out_channels)
    nd_d2.convert_marked(backbone)
    assert type(stem.conv1.norm) is type(build_norm("IterNorm", 32))
    block = backbone.bottom_up.res2[0]
    assert type(block.conv1.norm) is D2FrozenBatchNorm2d  # detectron2's FrozenBN, untouched


def test_retinanet_subnets_pair_a_marker_with_the_conv_before_it() -> None:
    cfg = _cfg()
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.RETINANET.merge_from_list(["NORM", "GN+WS", "NUM_CONVS", 2, "NUM_CLASSES", 2])
    head = build_model(cfg).head
    layers = list(head.cls_subnet)
    assert [type(m) for m in layers] == [WSConv2d, GroupNorm, nn.ReLU] * 2
    assert type(head.cls_score) is nn.Conv2d  # outside the subnets: detectron2's predictor


# ---------------------------------------------------------------------------------------------
# Training


def instances_batch(size: int = 64, seed: int = 0) -> list[dict]:
    """One synthetic image with two boxes and their masks, in detectron2's input format."""
    generator = torch.Generator().manual_seed(seed)
    instances = Instances((size, size))
    scale = size / 64
    boxes = torch.tensor([[8.0, 10.0, 40.0, 44.0], [30.0, 20.0, 62.0, 60.0]]) * scale
    instances.gt_boxes = Boxes(boxes)
    instances.gt_classes = torch.tensor([0, 1])
    masks = torch.zeros(2, size, size, dtype=torch.bool)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.round().long().tolist()):
        mask[y0:y1, x0:x1] = True
    instances.gt_masks = BitMasks(masks)
    image = torch.randint(0, 255, (3, size, size), generator=generator).float()
    return [{"image": image, "instances": instances, "height": size, "width": size}]


def _loss(model: nn.Module, batch: list[dict]) -> torch.Tensor:
    torch.manual_seed(0)  # the same anchor and RoI sampling each time
    # One thread: with two, rounding can break IoU ties differently and sample other RoIs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with EventStorage(0):
            return sum(model(batch).values())
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "name", ["mask_rcnn_R_50_FPN_1x_gn_ws.yaml", "mask_rcnn_R_50_FPN_1x_pws.yaml"]
)
def test_mask_rcnn_train_step_lowers_the_loss(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(_cfg(name)).train()
    batch = instances_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    before = _loss(model, batch)
    before.backward()
    grads = [p.grad for p in model.backbone.bottom_up.res5.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    optimizer.step()
    with torch.no_grad():
        after = _loss(model, batch)
    assert torch.isfinite(before) and after < before


def test_semantic_fpn_head_follows_sem_seg_head_norm() -> None:
    cfg = _cfg()
    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    cfg.MODEL.SEM_SEG_HEAD.merge_from_list(["NORM", "GN+WS", "CONVS_DIM", 32, "NUM_CLASSES", 3])
    cfg.MODEL.RESNETS.NORM = cfg.MODEL.FPN.NORM = "GN+WS"
    model = build_model(cfg).train()
    head_convs = [m for m in model.sem_seg_head.modules() if isinstance(m, nn.Conv2d)]
    assert_follows(head_convs[:-1], "GN+WS", first_is_image_conv=False)  # all but the predictor
    label = torch.zeros(64, 64, dtype=torch.long)
    label[16:, 20:] = 2
    batch = [{"image": torch.rand(3, 64, 64) * 255, "sem_seg": label}]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = sum(model(batch).values())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_every_registered_scheme_works_in_every_key() -> None:
    cfg = _cfg()
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.ROI_BOX_HEAD.merge_from_list(["NUM_CONV", 1, "NUM_FC", 1])
    for scheme in available_schemes():
        for key in ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD"):
            cfg.MODEL[key].NORM = scheme
        model = build_model(cfg)
        conv = model.backbone.bottom_up.res4[0].conv2
        if scheme in nd_d2.DETECTRON2_NORMS:
            assert type(conv) is Conv2d, scheme
        else:
            assert isinstance(conv, _probe_conv(scheme)), scheme
        expected = expected_norm(scheme)
        if scheme not in nd_d2.DETECTRON2_NORMS:
            # The block's forward follows conv2 by a ReLU: a normalization-activation layer.
            expected = type(build_norm(scheme, 64, activation=True))
            expected = None if expected is nn.Identity else expected
        assert (None if conv.norm is None else type(conv.norm)) is expected, scheme
        assert_no_marker(model)
