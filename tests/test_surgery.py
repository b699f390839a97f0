import copy
import pickle

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from norm_det import convert, fuse
from norm_det.activation_blocks import _LeavesOutCarriedReLUs
from norm_det.layers import CZMConv2d, FrozenBatchNorm2d, GroupNorm, PWSConv2d, WSConv2d
from norm_det.schemes import available_schemes, carries_activation
from tests.model_utils import randomize_norms as _randomize_norms
from tests.model_utils import relative_error as _relative_error


def _norm_det_modules(model: nn.Module) -> list[str]:
    """norm_det layers left in ``model``, except the norms that have no eval form in torch's
    layers (per-sample statistics or a non-linearity: FRN, EvoNorm with its activation), which
    say so by having no ``fuse`` and no affine to fold, and the framework blocks that leave out
    the ReLU after such a norm."""

    def fusable(m: nn.Module) -> bool:
        if isinstance(m, _LeavesOutCarriedReLUs):
            return not any(carries_activation(c) for c in m.children())
        return hasattr(m, "fuse") or not hasattr(m, "folded_affine") or bool(m.folded_affine())

    return [
        f"{name}: {type(m).__name__}"
        for name, m in model.named_modules()
        if type(m).__module__.startswith("norm_det") and fusable(m)
    ]


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return _randomize_norms(torchvision.models.resnet18(num_classes=10))


def test_bn_to_frozen_bn_is_exact(resnet18):
    x = torch.randn(2, 3, 64, 64)
    converted = convert(copy.deepcopy(resnet18), "FrozenBN")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in converted.modules()) == 20
    assert torch.allclose(converted(x), resnet18(x), atol=1e-6, rtol=0)


def test_conversion_to_plain_folds_the_norms_exactly(resnet18):
    x = torch.randn(2, 3, 64, 64)
    converted = convert(copy.deepcopy(resnet18), "none")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    assert _relative_error(converted(x), resnet18(x)) < 1e-5


def test_gn_ws_and_pws_keep_conv_weights(resnet18):
    gn_ws = convert(copy.deepcopy(resnet18), "GN+WS")
    assert type(gn_ws.layer1[0].conv1) is WSConv2d
    assert type(gn_ws.layer1[0].bn1) is GroupNorm
    assert torch.equal(gn_ws.layer1[0].conv1.weight, resnet18.layer1[0].conv1.weight)
    assert torch.equal(gn_ws.layer1[0].bn1.weight, resnet18.layer1[0].bn1.weight)
    pws = convert(copy.deepcopy(resnet18), "PWS")
    assert type(pws.layer2[0].downsample[0]) is PWSConv2d
    assert isinstance(pws.layer2[0].downsample[1], nn.Identity)
    # The fc layer is not touched by a scheme whose linear layer is plain.
    assert pws.fc is not resnet18.fc and torch.equal(pws.fc.weight, resnet18.fc.weight)


@pytest.mark.parametrize("scheme", available_schemes())
def test_convert_then_fuse_round_trip_on_resnet18(resnet18, scheme):
    x = torch.randn(2, 3, 64, 64)
    model = convert(copy.deepcopy(resnet18), scheme)
    model.train()
    with torch.no_grad():
        for _ in range(3):  # fill running statistics of schemes that keep them
            model(torch.randn(4, 3, 64, 64))
    model.eval()
    reference = model(x)
    fused = fuse(copy.deepcopy(model))
    assert _norm_det_modules(fused) == []
    assert _relative_error(fused(x), reference) < 1e-4
    # Every BN-like statistic folds into its convolution; BCN's batch stage is followed by its
    # per-sample channel stage inside one layer, and stays a BatchNorm2d before a GroupNorm.
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) or scheme in (
        "GN",
        "GN+WS",
        "BCN+WS",
    )


def test_include_and_exclude_select_module_paths(resnet18):
    model = convert(
        copy.deepcopy(resnet18), "GN", include=["layer1", "layer2.0.*"], exclude="layer1.1"
    )
    assert isinstance(model.layer1[0].bn1, GroupNorm)
    assert isinstance(model.layer1[1].bn1, nn.BatchNorm2d)
    assert isinstance(model.layer2[0].bn2, GroupNorm)
    assert isinstance(model.layer2[1].bn1, nn.BatchNorm2d)
    assert isinstance(model.bn1, nn.BatchNorm2d)


def test_unconvertible_layer_inside_include_is_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.LayerNorm(4)))
    with pytest.raises(ValueError, match=r"'2\.0' of type LayerNorm"):
        convert(model, "GN", include=["2"])
    # Outside an explicit include it is left alone.
    convert(model, "GN")
    assert isinstance(model[2][0], nn.LayerNorm)


def test_fused_resnet_exports_to_onnx(tmp_path, resnet18):
    onnx = pytest.importorskip("onnxruntime")
    x = torch.randn(1, 3, 64, 64)
    fused = fuse(convert(copy.deepcopy(resnet18), "PWS"))
    path = tmp_path / "resnet18_pws.onnx"
    torch.onnx.export(fused, (x,), str(path), dynamo=False)
    session = onnx.InferenceSession(str(path))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert _relative_error(torch.from_numpy(out), fused(x)) < 1e-4


def _mask_rcnn_outputs(model, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every learned output of a torchvision Mask R-CNN for fixed proposals.

    Final detections go through score thresholds and NMS, which turn rounding into different
    box sets; the raw outputs of each stage are what a conversion must preserve.
    """
    batch = model.transform(images)[0]
    features = model.backbone(batch.tensors)
    objectness, deltas = model.rpn.head(list(features.values()))
    proposals = [torch.tensor([[4.0, 4.0, 60.0, 50.0], [20.0, 30.0, 90.0, 90.0]])]
    heads = model.roi_heads
    box_features = heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes))
    class_logits, box_regression = heads.box_predictor(box_features)
    mask_features = heads.mask_head(heads.mask_roi_pool(features, proposals, batch.image_sizes))
    outputs = {f"features.{k}": v for k, v in features.items()}
    outputs.update(
        objectness=torch.cat([o.flatten() for o in objectness]),
        rpn_deltas=torch.cat([d.flatten() for d in deltas]),
        class_logits=class_logits,
        box_regression=box_regression,
        mask_logits=heads.mask_predictor(mask_features),
    )
    return outputs


@pytest.mark.parametrize("scheme", ["FrozenBN", "PWS"])
def test_convert_and_fuse_a_torchvision_mask_rcnn(scheme):
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=96, max_size=96
    )
    model = _randomize_norms(model)
    images = [torch.rand(3, 96, 96)]
    with torch.no_grad():
        reference = _mask_rcnn_outputs(model, images)
        converted = convert(model, scheme)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
        converted_outputs = _mask_rcnn_outputs(converted, images)
        fused = fuse(converted)
        assert _norm_det_modules(fused) == []
        fused_outputs = _mask_rcnn_outputs(fused, images)
        detections = fused(images)[0]
    assert set(detections) == {"boxes", "labels", "scores", "masks"}
    for key, value in converted_outputs.items():
        assert _relative_error(fused_outputs[key], value) < 1e-4, key
        if scheme == "FrozenBN":
            assert _relative_error(value, reference[key]) < 1e-5, key


# ---------------------------------------------------------------------------------------------
# Convolutions that apply their own norm and activation (detectron2's Conv2d contract; the real
# detectron2 models are in tests/integrations/test_detectron2_surgery.py).


class _NormActConv(nn.Conv2d):
    """``activation(norm(conv(x)))`` with ``self.norm`` and ``self.activation``, either None."""

    def __init__(self, *args, norm=None, activation=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x):
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class _ListedConvs(nn.Module):
    """A model that also keeps its convolutions in a plain list, as detectron2's FPN does."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _NormActConv(
            3, 32, 3, padding=1, bias=False, norm=nn.BatchNorm2d(32), activation=F.relu
        )
        self.convs = []
        for index in range(2):
            conv = _NormActConv(
                32, 32, 3, padding=1, bias=False, norm=nn.BatchNorm2d(32), activation=nn.ReLU()
            )
            self.add_module(f"conv{index}", conv)
            self.convs.append(conv)
        self.head = _NormActConv(32, 8, 3, padding=1, activation=nn.ReLU())  # no norm
        self.predictor = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        for conv in self.convs:
            x = conv(x)
        return self.predictor(self.head(x))


@pytest.fixture
def listed_convs() -> _ListedConvs:
    torch.manual_seed(0)
    return _randomize_norms(_ListedConvs())


def _hooks(model: nn.Module) -> list[str]:
    return [
        name
        for name, m in model.named_modules()
        if m._forward_pre_hooks or m._forward_hooks or m._backward_hooks
    ]


def test_conv_holding_its_norm_converts_in_place_and_exactly(listed_convs):
    x = torch.randn(2, 3, 16, 16)
    reference = listed_convs(x)
    keys = [k for k in listed_convs.state_dict() if not k.endswith("num_batches_tracked")]
    conv0 = listed_convs.conv0
    model = convert(listed_convs, "FrozenBN")
    assert model is listed_convs and model.conv0 is conv0  # the same objects, changed in place
    assert model.convs == [model.conv0, model.conv1]
    # The scheme keeps plain convolutions: the model's own class stays, with the new norm.
    assert all(type(c) is _NormActConv for c in (model.stem, model.conv0, model.head))
    assert type(model.conv1.norm) is FrozenBatchNorm2d and isinstance(
        model.conv1.activation, nn.ReLU
    )
    assert list(model.state_dict()) == keys
    assert torch.equal(model(x), reference)


def test_scheme_conv_in_the_place_of_a_conv_holding_its_norm(listed_convs):
    x = torch.randn(2, 3, 16, 16)
    model = convert(listed_convs, "GN+WS")
    conv = model.convs[0]
    assert conv is model.conv0 and isinstance(conv, WSConv2d)
    assert type(conv.norm) is GroupNorm and conv.bias is None
    hidden = torch.randn(2, 32, 8, 8)
    standardized = F.conv2d(hidden, conv.standardized_weight(), None, 1, 1)
    torch.testing.assert_close(conv(hidden), torch.relu(conv.norm(standardized)))
    assert torch.equal(conv.norm.weight, listed_convs.conv0.norm.weight)
    # A lone convolution keeps its activation; GN+WS does not replace lone convolutions.
    assert type(model.head) is _NormActConv and isinstance(model.head.activation, nn.ReLU)
    model.train()
    model(x).square().mean().backward()
    assert conv.weight.grad.abs().sum() > 0 and conv.norm.weight.grad.abs().sum() > 0
    # A converted model pickles (the scheme's conv with the norm and activation is made at run
    # time) and computes the same afterwards.
    model.eval()
    restored = pickle.loads(pickle.dumps(model))
    assert type(restored.conv0) is type(conv) and restored.convs[0] is restored.conv0
    torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["none", "PWS", "GN+WS", "FrozenBN", "CZM"])
def test_fuse_a_model_of_convs_holding_their_norms(listed_convs, scheme):
    x = torch.randn(2, 3, 16, 16)
    model = convert(listed_convs, scheme).eval()
    if scheme in ("none", "PWS", "CZM"):  # the norm went into the convolution
        assert model.conv0.norm is None and model.conv0.bias is not None
    if scheme == "PWS":  # a lone convolution becomes the scheme's and keeps its activation
        assert isinstance(model.head, PWSConv2d) and isinstance(model.head.activation, nn.ReLU)
        hidden = torch.randn(2, 32, 8, 8)
        plain = F.conv2d(hidden, model.head.standardized_weight(), model.head.bias, padding=1)
        torch.testing.assert_close(model.head(hidden), torch.relu(plain))
    if scheme == "CZM":  # the convolution on the image stays plain
        assert type(model.stem) is _NormActConv and isinstance(model.conv0, CZMConv2d)
    reference = model(x)
    fused = fuse(model)
    assert _norm_det_modules(fused) == [] and _hooks(fused) == []
    assert all(
        type(m) in (_NormActConv, nn.Conv2d)
        for m in fused.modules()
        if m is not fused and isinstance(m, nn.Conv2d)
    )
    assert fused.convs == [fused.conv0, fused.conv1]
    if scheme != "GN+WS":  # every norm had a fixed eval transform: folded into the weights
        assert all(c.norm is None for c in (fused.stem, fused.conv0, fused.conv1))
    else:
        assert type(fused.conv0.norm) is nn.GroupNorm
    assert isinstance(fused.conv1.activation, nn.ReLU) and fused.stem.activation is F.relu
    assert _relative_error(fused(x), reference) < 1e-5


def test_norm_after_an_activation_is_no_pair():
    # conv -> ReLU (inside the conv) -> BN: the BN cannot be folded into the convolution.
    torch.manual_seed(0)
    model = _randomize_norms(
        nn.Sequential(_NormActConv(3, 8, 3, activation=nn.ReLU()), nn.BatchNorm2d(8))
    )
    x = torch.randn(2, 3, 8, 8)
    reference = model(x)
    convert(model, "none")
    assert isinstance(model[1], nn.BatchNorm2d)  # nothing to put it into
    assert torch.equal(model(x), reference)
    fused = fuse(model)
    assert isinstance(fused[1], nn.BatchNorm2d)
    assert torch.equal(fused(x), reference)


def test_a_conv_subclass_is_not_downgraded_where_the_scheme_keeps_plain_convs():
    class WrappedConv(nn.Conv2d):  # a framework's conv wrapper (mmcv's empty-input Conv2d)
        pass

    torch.manual_seed(0)
    model = _randomize_norms(nn.Sequential(WrappedConv(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    x = torch.randn(1, 3, 8, 8)
    reference = model(x)
    frozen = convert(copy.deepcopy(model), "FrozenBN")
    assert type(frozen[0]) is WrappedConv and type(frozen[1]) is FrozenBatchNorm2d
    assert torch.equal(frozen(x), reference)
    plain = convert(copy.deepcopy(model), "none")
    assert type(plain[0]) is WrappedConv and isinstance(plain[1], nn.Identity)
    assert _relative_error(plain(x), reference) < 1e-6
    assert type(convert(model, "PWS")[0]) is PWSConv2d


def test_the_image_conv_is_found_whatever_the_registration_order():
    class NeckFirst(nn.Module):  # detectron2's FPN registers its convolutions before its ResNet
        def __init__(self) -> None:
            super().__init__()
            self.lateral = nn.Conv2d(16, 8, 3, padding=1)
            self.bottom_up = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16))

        def forward(self, x):
            return self.lateral(self.bottom_up(x))

    model = convert(NeckFirst(), "CZM")
    assert type(model.bottom_up[0]) is nn.Conv2d and type(model.lateral) is CZMConv2d
    # A part that sees no image (a head) has no convolution to keep plain.
    head = convert(nn.Sequential(nn.Conv2d(16, 8, 3), nn.BatchNorm2d(8)), "CZM")
    assert type(head[0]) is CZMConv2d


def test_keep_weights_false_gives_the_schemes_own_initialisation(listed_convs):
    stem_weight = listed_convs.stem.weight.clone()
    model = convert(listed_convs, "CZM", keep_weights=False)
    # CZM's initialisation (section 3.2): channel-wise zero mean, unit-norm filters.
    v = model.conv0.v
    assert v.mean(dim=(-2, -1)).abs().max() < 1e-6
    torch.testing.assert_close(v.flatten(1).norm(dim=1), torch.ones(32))
    # The image convolution is kept (CZM leaves it plain), with its weights, and a zero shift.
    assert type(model.stem) is _NormActConv and torch.equal(model.stem.weight, stem_weight)
    assert model.stem.norm is None and torch.equal(model.stem.bias, torch.zeros(32))


# ---------------------------------------------------------------------------------------------
# Where the scheme's layers go: predictors, layers already of the scheme.


def _framework_class(module: str, name: str, base: type = nn.Module) -> type:
    """A class that looks like a framework's (its module and name), without the framework."""
    return type(name, (base,), {"__module__": module})


def _heads_of_three_frameworks() -> nn.Module:
    """A detectron2 box predictor, an mmdet box head (a subclass) and a torchvision RPN head."""
    detectron2_predictor = _framework_class(
        "detectron2.modeling.roi_heads.fast_rcnn", "FastRCNNOutputLayers"
    )()
    detectron2_predictor.cls_score = nn.Linear(16, 4)
    detectron2_predictor.bbox_pred = nn.Linear(16, 12)
    bbox_head = _framework_class("mmdet.models.roi_heads.bbox_heads.bbox_head", "BBoxHead")
    mmdet_head = _framework_class("mmdet.models.roi_heads", "Shared2FCBBoxHead", bbox_head)()
    mmdet_head.shared_fcs = nn.ModuleList([nn.Linear(16, 16)])
    mmdet_head.fc_cls = nn.Linear(16, 4)
    mmdet_head.fc_reg = nn.Linear(16, 12)
    rpn = _framework_class("torchvision.models.detection.rpn", "RPNHead")()
    rpn.conv = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1))
    rpn.cls_logits = nn.Conv2d(16, 3, 1)
    rpn.bbox_pred = nn.Conv2d(16, 12, 1)
    return nn.ModuleDict({"d2": detectron2_predictor, "mmdet": mmdet_head, "rpn": rpn})


def test_predictors_are_found_in_every_framework_and_stay_plain_for_pws():
    from norm_det.surgery import predictor_paths

    model = _heads_of_three_frameworks()
    assert predictor_paths(model) == [
        "d2.cls_score",
        "d2.bbox_pred",
        "mmdet.fc_cls",
        "mmdet.fc_reg",
        "rpn.cls_logits",
        "rpn.bbox_pred",
    ]
    predictors = {path: model.get_submodule(path) for path in predictor_paths(model)}
    weights = {path: layer.weight.clone() for path, layer in predictors.items()}
    convert(model, "PWS", keep_weights=False)
    for path, layer in predictors.items():
        assert type(model.get_submodule(path)) in (nn.Linear, nn.Conv2d)
        assert torch.equal(layer.weight, weights[path])
    assert type(model["rpn"].conv[0]) is PWSConv2d  # the head's own convolution is not one


def test_predictors_of_nd_are_nd_layers_with_the_models_weights():
    from norm_det.layers import DeconvConv2d, DeconvLinear

    model = _heads_of_three_frameworks()
    torch.manual_seed(0)
    with torch.no_grad():
        model["rpn"].cls_logits.weight.normal_(std=0.01)
    weight = model["rpn"].cls_logits.weight.clone()
    convert(model, "ND", keep_weights=False)
    assert type(model["d2"].cls_score) is DeconvLinear
    assert type(model["mmdet"].fc_reg) is DeconvLinear
    assert type(model["mmdet"].shared_fcs[0]) is DeconvLinear
    predictor = model["rpn"].cls_logits
    assert type(predictor) is DeconvConv2d
    # keep_weights=False, but a predictor keeps the detector's near-zero start.
    assert torch.allclose(predictor.fuse().weight, weight, rtol=0, atol=1e-6)


def test_register_predictor_for_a_new_head_and_its_errors():
    from norm_det.surgery import is_predictor, register_predictor

    class MyHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tower = nn.Conv2d(8, 8, 3, padding=1)
            self.logits = nn.Conv2d(8, 2, 3, padding=1)

    register_predictor(MyHead, "logits")
    head = convert(MyHead(), "CZM")
    assert is_predictor(head, "logits") and not is_predictor(head, "tower")
    assert type(head.logits) is nn.Conv2d and type(head.tower) is CZMConv2d
    with pytest.raises(ValueError, match=r"package\.ClassName"):
        register_predictor("BBoxHead", "fc_cls")
    with pytest.raises(ValueError, match="names of the predictor children"):
        register_predictor("mmdet.BBoxHead")


@pytest.mark.parametrize("scheme", available_schemes())
def test_converting_a_converted_model_again_changes_nothing(resnet18, scheme):
    model = convert(copy.deepcopy(resnet18), scheme, keep_weights=False)
    parameters = dict(model.named_parameters())
    types = {name: type(m) for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    convert(model, scheme, keep_weights=False)
    assert {name: type(m) for name, m in model.named_modules()} == types
    assert all(p is parameters[name] for name, p in model.named_parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_converting_again_with_other_options_rebuilds_the_layers(resnet18):
    model = convert(copy.deepcopy(resnet18), "PWS(gamma=1e-4)")
    convert(model, "PWS(gamma=1e-3)")
    assert model.layer1[0].conv1.gamma == 1e-3
