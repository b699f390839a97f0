"""Key maps between torchvision, norm_det, detectron2 and mmdet: lossless, and loadable by each."""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest
import torch

from norm_det.modeling import VGG16SSD, ResNet
from norm_det.weights import (
    BackboneWeights,
    read_checkpoint,
    read_state_dict,
    to_framework,
    write_checkpoint,
)
from norm_det.weights.backbones import load_backbone_tensors
from tests.weights.conftest import make_narrow_vgg, randomize_norms, torchvision_resnet_features

OTHERS = ("norm_det", "detectron2", "mmdet")


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


def _through(state: dict[str, torch.Tensor], frameworks: tuple[str, ...]) -> dict:
    """Convert ``state`` through ``frameworks`` in turn, reading each result back."""
    weights = read_state_dict(state)
    for framework in frameworks:
        weights = read_state_dict(to_framework(weights, framework), hint=framework)
        assert weights.framework == framework
    return to_framework(weights, frameworks[-1])


@pytest.mark.parametrize("order", list(itertools.permutations(OTHERS)))
def test_resnet_round_trips_are_bitwise_lossless(resnet18, order):
    state = resnet18.state_dict()
    _assert_identical(_through(state, (*order, "torchvision")), state)


def test_resnet_names_in_each_framework(resnet18):
    weights = read_state_dict(resnet18.state_dict())
    assert weights.framework == "torchvision" and weights.arch == "resnet"
    names = {
        "torchvision": "layer2.0.downsample.1.running_var",
        "norm_det": "res3.0.shortcut.norm.running_var",
        "detectron2": "res3.0.shortcut.norm.running_var",
        "mmdet": "backbone.layer2.0.downsample.1.running_var",
    }
    value = resnet18.state_dict()["layer2.0.downsample.1.running_var"]
    for framework, key in names.items():
        assert torch.equal(to_framework(weights, framework)[key], value)
    detectron2 = to_framework(weights, "detectron2")
    assert {
        "stem.conv1.weight",
        "stem.conv1.norm.bias",
        "res2.1.conv2.weight",
        "stem.fc.weight",
    } <= set(detectron2)
    assert "res3.0.shortcut.weight" in detectron2


def test_files_of_every_framework_round_trip(resnet18, tmp_path):
    state = resnet18.state_dict()
    weights = read_state_dict(state)
    path = {
        "detectron2": tmp_path / "r18.pkl",
        "mmdet": tmp_path / "r18_mmdet.pth",
        "norm_det": tmp_path / "r18_nd.pth",
    }
    for framework, file in path.items():
        write_checkpoint(weights, file, framework)
        weights = read_checkpoint(file, allow_pickle=True)
        assert weights.framework == framework
    write_checkpoint(weights, tmp_path / "r18_tv.pth", "torchvision")
    _assert_identical(torch.load(tmp_path / "r18_tv.pth", weights_only=True), state)

    # detectron2's model-zoo layout: a plain pickle of NumPy arrays.
    with open(path["detectron2"], "rb") as file:
        raw = pickle.load(file)
    assert raw["matching_heuristics"] is True and raw["__author__"] == "norm_det"
    assert all(isinstance(v, np.ndarray) for v in raw["model"].values())
    assert raw["model"]["stem.conv1.norm.num_batches_tracked"].shape == ()
    mmdet = torch.load(path["mmdet"], weights_only=True)
    assert set(mmdet) == {"state_dict", "meta"} and "backbone.bn1.weight" in mmdet["state_dict"]


@pytest.mark.parametrize(
    ("scheme", "mmdet_key"),
    [
        ("PWS", "backbone.layer1.0.conv1.alpha"),
        ("GN+WS(groups=4)", "backbone.layer1.0.gn1.weight"),
        ("NDPP", "backbone.layer1.0.conv1.running_deconv"),
        ("IterNorm", "backbone.layer1.0.iternorm1.running_wm"),
        ("CZM", "backbone.layer1.0.conv2.v"),
    ],
)
def test_every_scheme_round_trips(scheme, mmdet_key):
    backbone = ResNet(depth=18, norm=scheme, stem_channels=8, res2_channels=16)
    with torch.no_grad():
        for tensor in backbone.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor))
    state = backbone.state_dict()
    weights = BackboneWeights("resnet", dict(state))
    for framework in ("detectron2", "mmdet", "torchvision", "norm_det"):
        converted = to_framework(weights, framework)
        if framework == "mmdet":
            assert mmdet_key in converted
        weights = read_state_dict(converted, hint=framework)
    _assert_identical(weights.tensors, state)


def test_norm_det_resnet_computes_torchvision_features(resnet18):
    weights = read_state_dict(resnet18.state_dict())
    backbone = ResNet(depth=18, norm="BN").eval()
    left_out = load_backbone_tensors(backbone, weights.tensors)
    assert left_out == ["fc.weight", "fc.bias"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, outputs = torchvision_resnet_features(resnet18, x), backbone(x)
    for name in expected:
        assert torch.equal(outputs[name], expected[name])


def test_detectron2_loads_the_pkl(resnet18, tmp_path):
    pytest.importorskip("detectron2")
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    write_checkpoint(read_state_dict(resnet18.state_dict()), tmp_path / "R-18.pkl", "detectron2")
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    DetectionCheckpointer(backbone).load(str(tmp_path / "R-18.pkl"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, outputs = torchvision_resnet_features(resnet18, x), backbone(x)
    for name in expected:
        torch.testing.assert_close(outputs[name], expected[name], rtol=1e-5, atol=1e-5)


def test_mmdet_loads_its_checkpoint(resnet18, tmp_path):
    pytest.importorskip("mmengine")
    pytest.importorskip("norm_det.integrations.mmcv_ops_bridge")
    resnet = pytest.importorskip("mmdet.models.backbones")

    write_checkpoint(read_state_dict(resnet18.state_dict()), tmp_path / "r18.pth", "mmdet")
    state = torch.load(tmp_path / "r18.pth", weights_only=True)["state_dict"]
    backbone = resnet.ResNet(depth=18, out_indices=(0, 1, 2, 3))
    backbone.eval()  # mmdet's train() returns None
    prefix = "backbone."
    result = backbone.load_state_dict({k[len(prefix) :]: v for k, v in state.items()}, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == ["fc.weight", "fc.bias"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, outputs = torchvision_resnet_features(resnet18, x), backbone(x)
    for name, output in zip(expected, outputs):
        torch.testing.assert_close(output, expected[name], rtol=0, atol=0)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg_round_trips_and_feeds_norm_det_vgg(batch_norm):
    vgg = make_narrow_vgg(batch_norm)
    state = vgg.state_dict()
    weights = read_state_dict(state)
    assert weights.naming == f"torchvision/vgg/{'vgg16_bn' if batch_norm else 'vgg16'}"
    assert "fc.conv5_3.conv.weight" in weights.tensors
    _assert_identical(_through(state, ("norm_det", "mmdet", "torchvision")), state)
    with pytest.raises(ValueError, match="detectron2 has no VGG"):
        to_framework(weights, "detectron2")

    # vgg16_bn's conv biases fold into the BN means of norm_det's bias-free BN convolutions.
    backbone = VGG16SSD(
        norm="BN" if batch_norm else "none", extra_norm="none", base_channels=8
    ).eval()
    load_backbone_tensors(backbone, weights.tensors)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        conv4_3 = 33 if batch_norm else 23  # torchvision's index after conv4_3's ReLU
        torch.testing.assert_close(
            backbone.features(x), vgg.features[:conv4_3](x), rtol=1e-5, atol=1e-5
        )


def test_ssd_vgg_parts_have_no_torchvision_counterpart():
    backbone = randomize_norms(VGG16SSD(norm="BN", extra_norm="GN(groups=4)", base_channels=8))
    state = backbone.state_dict()
    weights = BackboneWeights("vgg", dict(state))
    with pytest.raises(ValueError, match=r"no counterpart in torchvision.*fc\.fc6"):
        to_framework(weights, "torchvision")
    torchvision_state = to_framework(weights, "torchvision", drop_unmapped=True)
    assert "features.41.running_var" in torchvision_state  # vgg16_bn's conv5_3 BN
    assert not any(k.startswith(("fc.", "extras.", "l2norm")) for k in torchvision_state)
    mmdet = to_framework(weights, "mmdet")
    assert {"neck.l2_norm.weight", "backbone.features.33.norm.running_mean"} <= set(mmdet)
    assert "neck.extra_layers.3.1.gn.weight" in mmdet
    _assert_identical(read_state_dict(mmdet, hint="mmdet").tensors, state)


def test_detector_checkpoint_keeps_its_other_parts_within_its_framework():
    from norm_det.modeling import build_model
    from tests.modeling.tiny import tiny_cfg

    model = build_model(tiny_cfg("FasterRCNN", "FrozenBN"))
    state = model.state_dict()
    weights = read_state_dict(state)
    assert (weights.framework, weights.prefix) == ("norm_det", "backbone.body.")
    assert any(k.startswith("backbone.fpn.") for k in weights.others)
    assert any(k.startswith("roi_heads.") for k in weights.others)
    assert dict(to_framework(weights, "norm_det")) == dict(state)
    with pytest.raises(ValueError, match=r"not detector necks or heads.*drop-unmapped"):
        to_framework(weights, "detectron2")
    detectron2 = to_framework(weights, "detectron2", drop_unmapped=True)
    assert len(detectron2) == len(weights.tensors) and "stem.conv1.norm.running_mean" in detectron2


def test_torchvision_detection_and_detectron2_model_prefixes(resnet18):
    state = {f"backbone.body.{k}": v for k, v in resnet18.state_dict().items() if "fc" not in k}
    state["backbone.fpn.inner_blocks.0.0.weight"] = torch.zeros(1)
    weights = read_state_dict(state)
    assert (weights.framework, weights.prefix) == ("torchvision", "backbone.body.")
    detectron2 = {
        f"backbone.bottom_up.{k}": v
        for k, v in to_framework(weights, "detectron2", drop_unmapped=True).items()
    }
    detectron2["backbone.fpn_lateral2.weight"] = torch.zeros(1)
    detectron2["pixel_mean"] = torch.zeros(3)
    again = read_state_dict(detectron2)
    assert (again.framework, again.prefix) == ("detectron2", "backbone.bottom_up.")
    _assert_identical(again.tensors, weights.tensors)


def test_bare_mmdet_names_read_as_torchvision_unless_the_container_says_mmdet(resnet18):
    state = {k: v for k, v in resnet18.state_dict().items()}
    assert read_state_dict(state).framework == "torchvision"
    assert read_state_dict(state, hint="mmdet").framework == "mmdet"
