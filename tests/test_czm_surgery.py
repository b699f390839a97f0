"""The CZM scheme: registry options, converting and fusing torchvision ResNets, step work."""

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from norm_det import convert, fuse
from norm_det.layers import CZMConv2d, MultiplicativeNoise, collect_step_losses
from norm_det.schemes import build_conv, build_conv_norm, get_scheme, scheme_options
from tests.model_utils import randomize_norms as _randomize_norms
from tests.model_utils import relative_error as _relative_error


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return _randomize_norms(torchvision.models.resnet18(num_classes=10))


def test_scheme_defaults_are_the_papers_and_options_parse():
    assert scheme_options("CZM") == {"zmg": 0.85, "noise": 0.1, "luma": 5e-4}
    scheme = get_scheme("czmig")
    assert scheme.name == "CZM" and scheme.norm is None and scheme.keep_first_conv_plain
    assert scheme.replaces_lone_convs and scheme.conv_bias
    noise = scheme.residual_input()
    assert isinstance(noise, MultiplicativeNoise) and noise.amplitude == 0.1
    quiet = get_scheme("CZM(zmg=1.0, noise=0, luma=1e-4)")
    assert quiet.residual_input is None
    conv = quiet.conv(4, 8, 3, padding=1)
    assert conv.zmg == 1.0 and conv.luma == 1e-4
    with pytest.raises(ValueError, match="scheme CZM: zmg"):
        get_scheme("CZM(zmg=2)")
    with pytest.raises(ValueError, match="scheme CZM: noise amplitude"):
        get_scheme({"name": "CZM", "noise": -0.1})


def test_builders_give_czm_for_spatial_and_plain_for_pointwise_convs():
    conv, norm = build_conv_norm("CZM", 8, 16, 3, padding=1)
    assert type(conv) is CZMConv2d and conv.bias is not None and isinstance(norm, nn.Identity)
    pointwise, _ = build_conv_norm("CZM", 8, 16, 1)
    assert type(pointwise) is nn.Conv2d and pointwise.bias is not None
    assert type(build_conv("CZM", 8, 8, 3, padding=1)) is CZMConv2d


def test_convert_resnet18_is_exact_in_eval_with_the_papers_layout(resnet18):
    x = torch.randn(2, 3, 64, 64)
    model = convert(copy.deepcopy(resnet18), "CZM")
    # Warm start: BN folded into the conv, W = e^g * V reproduced exactly; noise is off in eval.
    assert _relative_error(model(x), resnet18(x)) < 1e-5
    assert type(model.conv1) is nn.Conv2d  # the first conv on the image stays plain
    assert type(model.layer2[0].downsample[0]) is nn.Conv2d  # 1x1 projection stays plain
    assert sum(type(m) is CZMConv2d for m in model.modules()) == 16
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    blocks = [
        b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer
    ]
    assert all(isinstance(b.residual_input, MultiplicativeNoise) for b in blocks)
    assert sum(isinstance(m, MultiplicativeNoise) for m in model.modules()) == 8
    # The noise module has no state: the checkpoint keys are those of the conversion alone.
    assert not any("residual_input" in key for key in model.state_dict())


def test_convert_bottleneck_resnet_keeps_1x1_plain():
    torch.manual_seed(0)
    model = _randomize_norms(ResNet(Bottleneck, [1, 1, 1, 1], num_classes=5))
    x = torch.randn(1, 3, 64, 64)
    reference = model(x)
    convert(model, "CZM")
    block = model.layer3[0]
    assert type(block.conv1) is nn.Conv2d and type(block.conv3) is nn.Conv2d
    assert type(block.conv2) is CZMConv2d
    assert sum(type(m) is CZMConv2d for m in model.modules()) == 4
    assert _relative_error(model(x), reference) < 1e-5


def test_noise_acts_at_residual_unit_inputs_in_training_only(resnet18):
    model = convert(copy.deepcopy(resnet18), "CZM(noise=0.1)")
    block = model.layer3[1]
    seen = []
    handle = block.conv1.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    x = torch.rand(1, 256, 4, 4) + 1.0
    model.train()
    with torch.no_grad():
        block(x)
        block.eval()
        block(x)
    handle.remove()
    factor = seen[0] / x
    assert factor.min() >= 0.9 and factor.max() <= 1.1 and factor.std() > 0.01
    assert torch.equal(seen[1], x)


def test_converting_twice_replaces_the_noise_without_a_second_hook(resnet18):
    model = convert(copy.deepcopy(resnet18), "CZM(noise=0.1)")
    convert(model, "CZM(noise=0.2)")
    block = model.layer1[0]
    assert len(block._forward_pre_hooks) == 1 and block.residual_input.amplitude == 0.2


def test_exclude_leaves_units_plain_and_without_noise(resnet18):
    model = convert(copy.deepcopy(resnet18), "CZM", exclude="layer4")
    assert type(model.layer3[1].conv2) is CZMConv2d
    assert type(model.layer4[1].conv2) is nn.Conv2d
    assert not hasattr(model.layer4[0], "residual_input")
    assert isinstance(model.layer3[0].residual_input, MultiplicativeNoise)


def test_converted_czm_layers_act_at_every_optimizer_step(resnet18):
    """convert tracks the layers it changed in place: a plain SGD step applies LUMA and CZMG."""
    model = convert(copy.deepcopy(resnet18), "CZM(zmg=0.85, luma=5e-4)").train()
    czm = [m for m in model.modules() if type(m) is CZMConv2d]
    assert len(czm) == 16
    loss = model(torch.randn(2, 3, 32, 32)).square().mean()
    loss.backward()
    raw = {id(c): c.v.grad.mean(dim=(-2, -1)).clone() for c in czm}
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    for conv in czm:
        # Warm start from unit-normalized filters: LUMA's value and gradient start at zero.
        assert conv.step_losses["loss_luma"].item() == pytest.approx(0.0, abs=1e-9)
        corrected = conv.v.grad.mean(dim=(-2, -1))
        assert torch.allclose(corrected, 0.15 * raw[id(conv)], atol=1e-7)
    assert collect_step_losses(model)["loss_luma"].item() == pytest.approx(0.0, abs=1e-8)


def test_fuse_czm_resnet_gives_plain_torch_layers_and_same_outputs(resnet18, tmp_path):
    model = convert(copy.deepcopy(resnet18), "CZM")
    with torch.no_grad():
        for conv in (m for m in model.modules() if isinstance(m, CZMConv2d)):
            conv.g.add_(torch.randn_like(conv.g) * 0.1)  # a trained-looking scale
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    reference = model(x)
    fused = fuse(copy.deepcopy(model))
    assert not [m for m in fused.modules() if type(m).__module__.startswith("norm_det")]
    assert type(fused.layer1[0].conv1) is nn.Conv2d
    # The noise hooks go with the noise: the fused model runs and pickles without norm_det.
    assert not hasattr(fused.layer1[0], "residual_input")
    assert not any(m._forward_pre_hooks for m in fused.modules())
    assert _relative_error(fused(x), reference) < 1e-5
    onnxruntime = pytest.importorskip("onnxruntime")
    path = tmp_path / "resnet18_czm.onnx"
    torch.onnx.export(fused, (x[:1],), str(path), dynamo=False)
    session = onnxruntime.InferenceSession(str(path))
    (out,) = session.run(None, {session.get_inputs()[0].name: x[:1].numpy()})
    assert _relative_error(torch.from_numpy(out), reference[:1]) < 1e-4


def test_residual_units_are_found_by_their_shortcut_attribute():
    from norm_det.surgery import insert_residual_inputs

    class Detectron2Block(nn.Module):  # detectron2 names the projection `shortcut`
        def __init__(self) -> None:
            super().__init__()
            self.shortcut = None
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)

    class NotAUnit(nn.Module):  # a flag with the same name is not a shortcut
        def __init__(self) -> None:
            super().__init__()
            self.shortcut = True
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    model = nn.Sequential(Detectron2Block(), NotAUnit()).train()
    assert insert_residual_inputs(model, lambda: MultiplicativeNoise(0.5)) == 1
    assert isinstance(model[0].residual_input, MultiplicativeNoise)
    assert not hasattr(model[1], "residual_input")
    x = torch.ones(1, 4, 5, 5)
    with torch.no_grad():
        model[0].conv.weight.zero_()
        model[0].conv.bias.zero_()
        noisy = model[0](x)  # x * noise + conv(x * noise), with conv = 0
    assert noisy.min() >= 0.5 and noisy.max() <= 1.5 and noisy.std() > 0.05
