"""Deployment: fused weights load into plain torchvision models; fused models export to ONNX."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from norm_det.modeling import VGG16SSD, build_model
from norm_det.weights import (
    deploy_config,
    export_onnx,
    fuse_weights,
    pretrained_reference,
    read_checkpoint,
    read_state_dict,
    run_onnx,
    warm_start,
    write_checkpoint,
)
from norm_det.weights.warm_start import backbone_weights
from tests.modeling.tiny import tiny_batch, tiny_cfg
from tests.weights.conftest import (
    NarrowVGG,
    relative_error,
    torchvision_resnet_features,
)


def _trained(model: nn.Module, seed: int = 0, size: int = 64) -> nn.Module:
    """``model`` as after some training: parameters moved, statistics estimated on a batch."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(0.05 * parameter.std().nan_to_num(1.0) * noise)
        model.train()
        model(torch.randn(2, 3, size, size, generator=generator))
    return model.eval()


PLAIN_RESNET_NORMS = {"GN+WS": lambda channels: nn.GroupNorm(32, channels)}


@pytest.mark.parametrize("scheme", ["FrozenBN", "none", "PWS", "CZM", "ND", "IterNorm", "GN+WS"])
def test_fused_weights_load_into_plain_torchvision_resnet(resnet18, scheme, tmp_path):
    source = read_state_dict(resnet18.state_dict())
    trained = _trained(warm_start(pretrained_reference(source), scheme))
    weights = backbone_weights(trained, source, scheme)
    write_checkpoint(fuse_weights(weights), tmp_path / "plain.pth", "torchvision")

    plain = torchvision.models.resnet18(norm_layer=PLAIN_RESNET_NORMS.get(scheme))
    plain.load_state_dict(torch.load(tmp_path / "plain.pth", weights_only=True))
    plain.eval()
    assert not any(type(m).__module__.startswith("norm_det") for m in plain.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, outputs = trained(x), torchvision_resnet_features(plain, x)
    for name in expected:
        assert relative_error(outputs[name], expected[name]) < 1e-5, name
    with torch.no_grad():  # the ImageNet classifier came along unchanged
        torch.testing.assert_close(plain.fc.weight, resnet18.fc.weight, rtol=0, atol=0)


def test_ndpp_weights_cannot_be_plain_without_their_standardization(resnet18, tmp_path):
    source = read_state_dict(resnet18.state_dict())
    trained = _trained(warm_start(pretrained_reference(source), "NDPP"))
    weights = backbone_weights(trained, source, "NDPP")
    with pytest.raises(ValueError, match=r"per-sample input standardization.*allow_inexact"):
        fuse_weights(weights)
    write_checkpoint(fuse_weights(weights, allow_inexact=True), tmp_path / "x.pth", "torchvision")
    plain = torchvision.models.resnet18().eval()
    plain.load_state_dict(torch.load(tmp_path / "x.pth", weights_only=True))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, outputs = trained(x), torchvision_resnet_features(plain, x)
    # Measured: the plain layers without the standardization are far off (docs/deploy.md).
    assert relative_error(outputs["res5"], expected["res5"]) > 0.3


def test_fused_vgg_loads_into_plain_torchvision_vgg16(tmp_path):
    torch.manual_seed(0)
    trained = _trained(VGG16SSD(norm="PWS", extra_norm="PWS", base_channels=8), size=300)
    weights = read_state_dict(trained.state_dict())
    weights.meta["scheme"] = "PWS"
    fused = fuse_weights(weights)
    assert fused.scheme == "none"
    with pytest.raises(ValueError, match="no counterpart in torchvision"):
        write_checkpoint(fused, tmp_path / "vgg.pth", "torchvision")
    write_checkpoint(fused, tmp_path / "vgg.pth", "torchvision", drop_unmapped=True)
    plain = NarrowVGG(batch_norm=False).eval()
    result = plain.load_state_dict(torch.load(tmp_path / "vgg.pth", weights_only=True), False)
    assert result.missing_keys == [
        f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")
    ]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(plain.features[:23](x), trained.features(x)) < 1e-5
    # mmdet's SSD keeps fc6, fc7, L2Norm and the extra layers.
    write_checkpoint(fused, tmp_path / "ssd_mmdet.pth", "mmdet")
    assert read_checkpoint(tmp_path / "ssd_mmdet.pth").tensors.keys() == fused.tensors.keys()


def test_deploy_config_builds_the_fused_model():
    cfg = tiny_cfg("FasterRCNN", "PWS")
    cfg.MODEL.RPN.NORM = "GN+WS(groups=4)"
    model = build_model(cfg)
    images, targets = tiny_batch(2)
    model.train()
    model(images, targets)
    model.eval()
    fused = fuse_eval = copy.deepcopy(model)
    from norm_det import fuse

    fuse_eval = fuse(fused)
    plain = build_model(deploy_config(cfg)).eval()
    assert plain.rpn.head.conv[1].num_groups == 4
    plain.load_state_dict(fuse_eval.state_dict())
    with torch.no_grad():
        expected, outputs = model(images), plain(images)
    for a, b in zip(expected, outputs):
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"MODEL\.RESNETS\.NORM is 'NDPP'"):
        deploy_config(tiny_cfg("FasterRCNN", "NDPP"))


def _trained_ndpp(arch: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(arch, "NDPP"))
    images, targets = tiny_batch(2)
    model.train()
    model(images, targets)  # running statistics of every ND++ layer move off the identity
    return model.eval(), images[0]


@pytest.mark.parametrize("arch", ["FasterRCNN", "DeepLabV3"])
def test_onnx_export_of_a_fused_ndpp_model_matches(arch, tmp_path):
    pytest.importorskip("onnxruntime")
    model, image = _trained_ndpp(arch)
    path, names = export_onnx(model, image, tmp_path / f"{arch}.onnx")
    with torch.no_grad():
        expected = model([image])[0]
    outputs = run_onnx(path, image)
    assert len(outputs) == len(names)
    got = {name: torch.from_numpy(o).to(expected[name].dtype) for name, o in zip(names, outputs)}
    for name, output in got.items():
        assert output.shape == expected[name].shape, name
    if arch == "DeepLabV3":
        torch.testing.assert_close(got["sem_seg"], expected["sem_seg"], rtol=1e-4, atol=1e-4)
        return
    assert len(expected["boxes"]) > 0

    def rows(d: dict) -> torch.Tensor:
        return torch.cat([d["boxes"], d["scores"][:, None], d["labels"][:, None].float()], 1)

    # Detections whose scores tie to rounding may come out in either order: compare the sets,
    # each detection against its nearest counterpart (boxes in pixels of a 128-px image).
    distance = (rows(got)[:, None, :] - rows(expected)[None, :, :]).abs().amax(-1)
    assert distance.amin(1).max() < 1e-3 and distance.amin(0).max() < 1e-3
