"""Warm-starting schemes from BN weights: measured output agreement per scheme (docs/weights.md)."""

from __future__ import annotations

import copy

import pytest
import torch

from norm_det import convert
from norm_det.modeling import ResNet, build_model
from norm_det.weights import (
    calibrate,
    load_pretrained_backbone,
    output_agreement,
    pretrained_reference,
    read_state_dict,
    warm_start,
)
from tests.modeling.tiny import tiny_cfg
from tests.weights.conftest import randomize_norms


@pytest.fixture(scope="module")
def reference(resnet18):
    return pretrained_reference(read_state_dict(resnet18.state_dict()))


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(1)
    calibration = torch.randn(8, 3, 64, 64, generator=generator)
    evaluation = torch.randn(4, 3, 64, 64, generator=generator)
    return calibration, evaluation


@pytest.mark.parametrize("scheme", ["FrozenBN", "BN", "none", "CZM", "ND", "IterNorm"])
def test_function_preserving_conversions(reference, images, scheme):
    model = warm_start(reference, scheme)
    agreement = output_agreement(reference, model, images[1])
    # FrozenBN computes BN's arithmetic; the others fold it, to float rounding.
    assert agreement["relative_l2"] < (1e-7 if "BN" in scheme else 1e-5)


# Measured (docs/weights.md): relative L2 difference of the four res2..res5 maps (worst) in
# eval, zero-shot and after calibration on 8 other images; the bounds leave some margin.
WARM_STARTS = {
    "PWS": (0.7, 0.35),
    "GN": (0.7, 0.1),
    "GN+WS": (0.8, 0.35),
    "NDPP": (0.8, 0.6),
}


@pytest.mark.parametrize("scheme", list(WARM_STARTS))
def test_warm_starts_that_cannot_preserve_the_function(reference, images, scheme):
    calibration, evaluation = images
    zero_shot = output_agreement(reference, warm_start(reference, scheme), evaluation)
    calibrated = warm_start(reference, scheme, calibration_images=calibration)
    fitted = output_agreement(reference, calibrated, evaluation)
    at_least, at_most = WARM_STARTS[scheme]
    assert zero_shot["relative_l2"] > at_least
    assert fitted["relative_l2"] < at_most < zero_shot["relative_l2"]
    assert fitted["cosine"] > zero_shot["cosine"]


def test_pws_is_exact_for_zero_mean_filters(resnet18):
    state = dict(resnet18.state_dict())
    for key, value in state.items():
        if value.dim() == 4:
            state[key] = value - value.mean(dim=(1, 2, 3), keepdim=True)
    reference = pretrained_reference(read_state_dict(state))
    agreement = output_agreement(reference, warm_start(reference, "PWS"), torch.randn(2, 3, 64, 64))
    assert agreement["relative_l2"] < 1e-5


def test_calibrated_ndpp_is_exact_where_every_sample_has_the_same_statistics():
    # ND++ standardizes each sample; with zero-mean inputs of one standard deviation the
    # standardization is one scale, which calibration absorbs exactly (the stem alone).
    torch.manual_seed(0)
    reference = randomize_norms(ResNet(depth=18, norm="BN", out_features=["stem"]))

    def standardized(n: int) -> torch.Tensor:
        x = torch.randn(n, 3, 32, 32)
        flat = x.flatten(1)
        flat = (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)
        return 1.7 * flat.view_as(x)

    zero_shot = output_agreement(reference, warm_start(reference, "NDPP"), standardized(4))
    model = warm_start(reference, "NDPP", calibration_images=standardized(4))
    assert zero_shot["relative_l2"] > 0.3
    assert output_agreement(reference, model, standardized(4))["relative_l2"] < 1e-5


def test_calibrated_nd_also_agrees_in_training_mode_on_its_batch():
    torch.manual_seed(0)
    reference = randomize_norms(
        ResNet(depth=18, norm="BN", stem_channels=8, res2_channels=8, bottleneck_channels=8)
    )
    batch = torch.randn(16, 3, 64, 64)
    # Blocks of 4 channels: every layer's covariance has fewer features than the batch samples.
    scheme = "ND(block=4)"
    plain = warm_start(reference, scheme)
    calibrated = convert(copy.deepcopy(reference), scheme).eval()
    report = calibrate(calibrated, reference, batch)
    assert len(report["statistics"]) == 20 and report["too_few_samples"] == []
    # Eval: both exact. Training: ND whitens with the batch's statistics, which calibration
    # estimated and folded into the weights; uncalibrated weights assume identity statistics.
    assert output_agreement(reference, plain, batch)["relative_l2"] < 1e-5
    assert output_agreement(reference, calibrated, batch)["relative_l2"] < 1e-5
    assert output_agreement(reference, plain, batch, train=True)["relative_l2"] > 0.1
    assert output_agreement(reference, calibrated, batch, train=True)["relative_l2"] < 1e-4


def test_calibration_reports_layers_with_too_few_samples():
    torch.manual_seed(0)
    reference = randomize_norms(ResNet(depth=18, norm="BN", stem_channels=8, res2_channels=8))
    model = convert(copy.deepcopy(reference), "ND").eval()
    report = calibrate(model, reference, torch.randn(2, 3, 64, 64))
    assert "res5.1.conv2.conv (2 samples for 576 features)" in report["too_few_samples"]
    assert report["statistics"] == ["res3.0.shortcut.conv"]  # 1x1: 8 features, 8 samples


def _resnet18_cfg(scheme: str):
    cfg = tiny_cfg("FasterRCNN", scheme)
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 64
    return cfg


def test_load_pretrained_backbone_into_a_detector(resnet18, reference, tmp_path):
    torch.save(resnet18.state_dict(), tmp_path / "resnet18.pth")
    model = build_model(_resnet18_cfg("PWS")).eval()
    report = load_pretrained_backbone(model, tmp_path / "resnet18.pth", "PWS")
    assert report["backbone"] == "backbone.body"
    assert report["left_out"] == ["fc.weight", "fc.bias"]
    # 20 convolutions: weight, alpha, bias, and init_alpha's flag that keeps the loaded alpha
    assert report["loaded"] == 80
    x = torch.randn(2, 3, 64, 64)
    expected = warm_start(reference, "PWS")
    with torch.no_grad():
        outputs, targets = model.backbone.body(x), expected(x)
    for name in targets:
        torch.testing.assert_close(outputs[name], targets[name], rtol=1e-5, atol=1e-5)


def test_load_pretrained_backbone_errors(resnet18):
    narrow = build_model(tiny_cfg("FasterRCNN", "PWS"))
    with pytest.raises(
        ValueError,
        match=r"'stem\.conv1\.conv\.weight' has shape \(64, 3, 7, 7\) "
        r"in the checkpoint and \(8, 3, 7, 7\)",
    ):
        load_pretrained_backbone(narrow, read_state_dict(resnet18.state_dict()), "PWS")
    ssd = build_model(tiny_cfg("SSD", "PWS"))
    with pytest.raises(ValueError, match=r"holds a RESNET backbone but .* is a VGG"):
        load_pretrained_backbone(ssd, read_state_dict(resnet18.state_dict()), "PWS")
    model = build_model(_resnet18_cfg("PWS"))
    with pytest.raises(ValueError, match=r"do not fit .* built with scheme GN"):
        load_pretrained_backbone(model, read_state_dict(resnet18.state_dict()), "GN")


def test_a_checkpoint_of_another_depth_is_refused(resnet18):
    deeper = ResNet(depth=34, norm="FrozenBN").eval()
    with pytest.raises(ValueError, match=r"holds a ResNet-18 but .* is a ResNet-34"):
        load_pretrained_backbone(deeper, read_state_dict(resnet18.state_dict()), "FrozenBN")


@pytest.mark.parametrize("source", ["none", "ND", "PWS"])
def test_warm_starts_from_norm_free_sources_into_normed_schemes(source):
    """A norm-free unit's bias becomes the new norm's: exact for BN-like norms in eval."""
    torch.manual_seed(0)
    reference = ResNet(depth=18, norm=source, out_features=("res3",)).eval()
    with torch.no_grad():
        for name, tensor in reference.named_parameters():
            if name.endswith("conv.bias"):
                tensor.normal_()
    x = torch.randn(2, 3, 32, 32)
    for scheme in ("FrozenBN", "GN"):
        converted = warm_start(reference, scheme)
        native = ResNet(depth=18, norm=scheme, out_features=("res3",))
        assert converted.state_dict().keys() == native.state_dict().keys()
        if scheme == "FrozenBN":
            with torch.no_grad():
                out, ref = converted(x)["res3"], reference(x)["res3"]
            assert float((out - ref).norm() / ref.norm()) < 1e-5


def test_ambiguous_sources_need_their_scheme(resnet18):
    gn = read_state_dict(pretrained_reference(read_state_dict(resnet18.state_dict())).state_dict())
    converted = warm_start(pretrained_reference(gn), "GN+WS")
    weights = read_state_dict(converted.state_dict())
    with pytest.raises(ValueError, match=r"GN and GN\+WS alike.*--source-scheme"):
        pretrained_reference(weights)
    again = pretrained_reference(weights, "GN+WS")
    agreement = output_agreement(converted, again, torch.randn(2, 3, 64, 64))
    assert agreement["relative_l2"] == 0.0
