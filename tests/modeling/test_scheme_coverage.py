"""Issue 5, item 1: every layer a norm key covers is built by that key's scheme.

For each of the four models and each registered scheme (new schemes are picked up from the
registry), every convolution, norm, linear and transposed convolution is compared with the layer
the scheme builds for the same geometry — predictors with the layer of the scheme's predictor
rule (plain unless the scheme replaces predictors); no norm of another kind may remain, and no
parameter may live outside the checked layers.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from norm_det import convert
from norm_det.layers.protocol import ActivationInNorm
from norm_det.modeling import build_model
from norm_det.schemes import (
    available_schemes,
    build_conv,
    build_conv_norm,
    build_conv_transpose,
    build_linear,
    build_norm,
    get_scheme,
    predictor_scheme,
)
from norm_det.surgery import is_norm, predictor_paths
from tests.modeling.tiny import NORM_KEYS, tiny_batch, tiny_cfg

# Narrow test layers make GroupNorm fall back to fewer groups, with a warning.
pytestmark = pytest.mark.filterwarnings("ignore:GroupNorm")

# Module path prefix -> the config key whose scheme builds it.
REGIONS = {
    "MaskRCNN": {
        "backbone.body.": "RESNETS",
        "backbone.fpn.": "FPN",
        "rpn.head.": "RPN",
        "roi_heads.box_head.": "ROI_BOX_HEAD",
        "roi_heads.box_predictor.": "ROI_BOX_HEAD",
        "roi_heads.mask_head.": "ROI_MASK_HEAD",
        "roi_heads.mask_predictor.": "ROI_MASK_HEAD",
    },
    "FasterRCNN": {
        "backbone.body.": "RESNETS",
        "backbone.fpn.": "FPN",
        "rpn.head.": "RPN",
        "roi_heads.box_head.": "ROI_BOX_HEAD",
        "roi_heads.box_predictor.": "ROI_BOX_HEAD",
    },
    "SSD": {
        "backbone.features.": "VGG",
        "backbone.fc.": "VGG",
        "backbone.extras.": "SSD",
        "head.": "SSD",
    },
    "DeepLabV3": {"backbone.body.": "RESNETS", "classifier.": "SEM_SEG_HEAD"},
}
# The convolution that sees the image: plain for schemes with keep_first_conv_plain.
FIRST_CONV = {
    "MaskRCNN": "backbone.body.stem.conv1.conv",
    "FasterRCNN": "backbone.body.stem.conv1.conv",
    "SSD": "backbone.features.conv1_1.conv",
    "DeepLabV3": "backbone.body.stem.conv1.conv",
}
# Parameters that belong to no scheme layer: SSD's conv4_3 L2 normalization scale.
EXEMPT_PARAMETERS = {"backbone.l2norm.weight"}


def _geometry(conv: nn.Module) -> dict:
    return dict(
        stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups
    )


def expected_layer(
    scheme: str, role: str, layer: nn.Module, first: bool, predictor: bool = False
) -> nn.Module:
    """The layer ``scheme`` builds for ``layer``'s geometry (the reference)."""
    resolved = get_scheme(scheme)
    if first and resolved.keep_first_conv_plain:
        resolved = get_scheme("none")
    if predictor:
        resolved = predictor_scheme(resolved)
    if role == "pair_conv":
        return build_conv_norm(
            resolved, layer.in_channels, layer.out_channels, layer.kernel_size, **_geometry(layer)
        )[0]
    if role == "lone_conv":
        return build_conv(
            resolved,
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            bias=layer.bias is not None,
            **_geometry(layer),
        )
    if role == "deconv":
        return build_conv_transpose(
            resolved, layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride
        )
    if role == "linear":
        return build_linear(resolved, layer.in_features, layer.out_features)
    channels = getattr(layer, "num_features", getattr(layer, "num_channels", None))
    # A norm the model activates (a ReLU slot follows it) is the scheme's norm_act, if any.
    return build_norm(resolved, channels, activation=role == "activated_norm")


def scheme_layers(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Every conv / deconv / linear / norm of ``model`` by path, with its role.

    A convolution directly followed by a norm or by ``nn.Identity`` (the empty norm slot of a
    scheme without norm) is a conv+norm pair; any other is a lone convolution.
    """
    layers: dict[str, tuple[str, nn.Module]] = {}
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for index, (name, child) in enumerate(children):
            path = f"{parent_name}.{name}" if parent_name else name
            following = children[index + 1][1] if index + 1 < len(children) else None
            if isinstance(child, nn.ConvTranspose2d):
                layers[path] = ("deconv", child)
            elif isinstance(child, nn.Conv2d):
                paired = following is not None and (
                    is_norm(following) or isinstance(following, nn.Identity)
                )
                layers[path] = ("pair_conv" if paired else "lone_conv", child)
            elif isinstance(child, nn.Linear):
                layers[path] = ("linear", child)
            elif is_norm(child) or (isinstance(child, nn.Identity) and name == "norm"):
                activated = isinstance(following, (nn.ReLU, ActivationInNorm))
                layers[path] = ("activated_norm" if activated else "norm", child)
    return layers


def check_model(arch: str, model: nn.Module, schemes: dict[str, str]) -> dict[str, int]:
    """Assert every layer of ``model`` is of the scheme of its region; count layers by role."""
    layers = scheme_layers(model)
    predictors = tuple(predictor_paths(model))
    roles = ("pair_conv", "lone_conv", "deconv", "linear", "norm", "activated_norm", "predictor")
    counts = dict.fromkeys(roles, 0)
    for path, (role, layer) in layers.items():
        key = next((k for prefix, k in REGIONS[arch].items() if path.startswith(prefix)), None)
        assert key is not None, f"{arch}: layer {path} is outside every norm key's region"
        first = path == FIRST_CONV[arch] or path == FIRST_CONV[arch].replace(".conv", ".norm")
        predictor = any(path == p or path.startswith(p + ".") for p in predictors)
        counts["predictor"] += predictor
        if "norm" in role and first and get_scheme(schemes[key]).keep_first_conv_plain:
            expected = nn.Identity()
        else:
            expected = expected_layer(schemes[key], role, layer, first, predictor)
        assert type(layer) is type(expected), (
            f"{arch} with MODEL.{key}.NORM={schemes[key]!r}: {path} ({role}) is "
            f"{type(layer).__name__}, the scheme builds {type(expected).__name__}"
        )
        counts[role] += 1
    owned = {
        f"{path}.{name}"
        for path, (_, layer) in layers.items()
        for name, _ in layer.named_parameters()
    }
    stray = {name for name, _ in model.named_parameters()} - owned - EXEMPT_PARAMETERS
    assert not stray, f"{arch}: parameters outside any scheme layer: {sorted(stray)}"
    return counts


def _residual_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for name, m in model.named_modules() if name.count(".") == 3 and ".res" in name]


@pytest.mark.parametrize("arch", sorted(REGIONS))
@pytest.mark.parametrize("scheme", available_schemes())
def test_every_covered_layer_is_of_the_scheme(arch: str, scheme: str) -> None:
    model = build_model(tiny_cfg(arch, scheme))
    counts = check_model(arch, model, dict.fromkeys(NORM_KEYS[arch], scheme))
    resolved = get_scheme(scheme)
    assert counts["pair_conv"] >= 10
    assert counts["norm"] + counts["activated_norm"] == counts["pair_conv"]
    if arch == "MaskRCNN":
        assert counts["linear"] == 4 and counts["deconv"] == 1  # fc6, fc7, cls, bbox; mask deconv
        # RPN objectness and deltas, class scores and box deltas, mask logits.
        assert counts["predictor"] == 5
    if arch == "SSD":
        assert counts["predictor"] == 12  # a classifier and a regressor on each of 6 maps
    if arch == "DeepLabV3":
        assert counts["predictor"] == 1
    # A scheme with a norm leaves no norm of another kind (no BatchNorm in a GN or NDPP model).
    norm_types = {type(m) for m in model.modules() if is_norm(m)}
    built = {type(build_norm(resolved, 8, activation=a)) for a in (False, True)} - {nn.Identity}
    assert norm_types == built
    # The scheme's residual-unit input module sits at the input of every residual unit.
    if "RESNETS" in NORM_KEYS[arch]:
        blocks = _residual_blocks(model)
        assert len(blocks) == 8  # ResNet-18
        kind = nn.Identity if resolved.residual_input is None else type(resolved.residual_input())
        assert all(type(block.residual_input) is kind for block in blocks)


@pytest.mark.parametrize("arch", sorted(REGIONS))
def test_each_norm_key_governs_only_its_region(arch: str) -> None:
    """Different schemes per key: each region follows its own key."""
    keys = NORM_KEYS[arch]
    schemes = dict(zip(keys, itertools.islice(itertools.cycle(available_schemes()), 1, None)))
    cfg = tiny_cfg(arch)
    for key, scheme in schemes.items():
        cfg.MODEL[key].NORM = scheme
    model = build_model(cfg)
    check_model(arch, model, schemes)


@pytest.mark.parametrize("arch", sorted(REGIONS))
@pytest.mark.parametrize("scheme", available_schemes())
def test_every_scheme_trains_in_every_model(arch: str, scheme: str) -> None:
    """One training step: finite losses, finite gradients on every trainable parameter."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(arch, scheme))
    images, targets = tiny_batch()
    losses = model(images, targets)
    total = sum(losses.values())
    assert all(torch.isfinite(v) for v in losses.values()), losses
    if "loss_objectness" in losses:
        # Predictors start near zero output in every scheme: objectness and masks at p = 1/2.
        assert abs(losses["loss_objectness"].item() - math.log(2)) < 0.1
        assert abs(losses.get("loss_mask", torch.tensor(math.log(2))).item() - math.log(2)) < 0.01
    total.backward()
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert torch.isfinite(parameter.grad).all(), name


@pytest.mark.parametrize("arch", sorted(REGIONS))
@pytest.mark.parametrize("scheme", available_schemes())
def test_converting_a_built_model_gives_the_natively_built_one(arch: str, scheme: str) -> None:
    """norm_det.convert(FrozenBN model, scheme) has the layers build_model(scheme) has."""
    native = build_model(tiny_cfg(arch, scheme))
    converted = convert(build_model(tiny_cfg(arch, "FrozenBN")), scheme)
    native_types = {name: type(m) for name, m in native.named_modules()}
    converted_types = {name: type(m) for name, m in converted.named_modules()}
    assert converted_types == native_types
    # The residual-unit input module runs once per unit (no second application by a hook).
    calls = []
    for name, module in converted.named_modules():
        if name.endswith("residual_input"):
            module.register_forward_hook(lambda *_: calls.append(1))
    if "RESNETS" in NORM_KEYS[arch]:
        converted(*tiny_batch())
        assert len(calls) == 8
