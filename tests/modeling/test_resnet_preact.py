"""The pre-activation ResNet-V2 (``MODEL.RESNETS.PREACT``) and its normalizer-free form."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from norm_det.modeling import build_model
from norm_det.modeling.backbone.resnet import PreActivationBlock, ResNet
from norm_det.schemes import get_scheme
from tests.modeling.tiny import tiny_batch, tiny_cfg

pytestmark = pytest.mark.filterwarnings("ignore:GroupNorm")


def _nf_like(alpha: float = 0.2):
    """A scheme with a residual alpha and no norm: what the normalizer-free rule applies to."""
    return dataclasses.replace(get_scheme("none"), residual_alpha=alpha)


def test_unit_computes_the_pre_activation_formula() -> None:
    torch.manual_seed(0)
    net = ResNet(depth=50, norm="BN", preact=True, res2_channels=32, bottleneck_channels=8)
    block = net.res3[0]
    assert isinstance(block, PreActivationBlock) and block.shortcut is not None
    block.eval()
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 32, 12, 12)

    def bn(norm: nn.BatchNorm2d, t: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(t, norm.running_mean, norm.running_var, norm.weight, norm.bias)

    pre = F.relu(bn(block.preact.norm, x))
    out = F.relu(bn(block.conv1.norm, F.conv2d(pre, block.conv1.conv.weight)))
    out = F.relu(bn(block.conv2.norm, F.conv2d(out, block.conv2.conv.weight, stride=2, padding=1)))
    out = F.conv2d(out, block.conv3.weight)
    # The projection takes the pre-activated input; nothing follows the addition.
    expected = F.conv2d(pre, block.shortcut.weight, stride=2) + out
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_normalizer_free_units_scale_by_the_expected_std() -> None:
    alpha = 0.2
    net = ResNet(depth=50, norm=_nf_like(alpha), preact=True, res2_channels=16)
    variance, seen = 1.0, []
    for stage, blocks in zip(("res2", "res3", "res4", "res5"), (3, 4, 6, 3)):
        for index in range(blocks):
            block = getattr(net, stage)[index]
            seen.append((block.alpha, block.beta))
            assert block.alpha == alpha
            assert block.beta == pytest.approx(math.sqrt(variance), rel=1e-12)
            # Var(x + a f(x / b)) = Var(x) + a^2; a transition unit restarts from its shortcut.
            variance = (1.0 if index == 0 else variance) + alpha**2
    assert seen[1][1] == pytest.approx(math.sqrt(1 + alpha**2))
    assert seen[2][1] == pytest.approx(math.sqrt(1 + 2 * alpha**2))
    # Units of a scheme without residual_alpha are plain: alpha = beta = 1.
    plain = ResNet(depth=18, norm="GN", preact=True, res2_channels=16)
    assert all(b.alpha == 1 and b.beta == 1 for b in plain.modules() if hasattr(b, "beta"))


def test_normalizer_free_unit_output() -> None:
    torch.manual_seed(1)
    net = ResNet(depth=18, norm=_nf_like(0.2), preact=True, res2_channels=8, stem_channels=8)
    block = net.res2[1]
    x = torch.randn(2, 8, 6, 6)
    pre = F.relu(x / block.beta)
    out = F.conv2d(pre, block.conv1.conv.weight, block.conv1.conv.bias, padding=1)
    out = F.conv2d(F.relu(out), block.conv2.weight, block.conv2.bias, padding=1)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x + 0.2 * out)


def test_stem_has_no_norm_and_a_final_norm_follows_the_last_stage() -> None:
    net = ResNet(depth=18, norm="GN", preact=True, res2_channels=32, stem_channels=32)
    assert type(net.stem.conv1) is nn.Conv2d and net.stem.conv1.bias is None
    assert isinstance(net.final.norm, nn.GroupNorm)
    # GN+WS: every convolution is weight-standardized, the stem and the last ones too (BiT).
    ws = ResNet(depth=50, norm="GN+WS", preact=True, res2_channels=64, bottleneck_channels=16)
    convs = [m for m in ws.modules() if isinstance(m, nn.Conv2d)]
    assert all(type(m).__name__ == "WSConv2d" for m in convs)
    x = torch.randn(1, 3, 64, 64)
    outputs = net(x)
    body = dict(net.named_children())
    last = net.stem(x)
    for stage in ("res2", "res3", "res4"):
        last = body[stage](last)
        torch.testing.assert_close(outputs[stage], last)
    torch.testing.assert_close(outputs["res5"], net.final(body["res5"](last)))


def test_freezing_everything_freezes_the_final_norm() -> None:
    net = ResNet(depth=18, norm="BN", preact=True, res2_channels=8, stem_channels=8, freeze_at=5)
    net.train()
    assert not net.final.training
    assert not any(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("scheme", ["GN+WS", "BN", "NDPP"])
def test_pre_activation_mask_rcnn_trains(scheme: str) -> None:
    torch.manual_seed(0)
    cfg = tiny_cfg("MaskRCNN", scheme)
    cfg.MODEL.RESNETS.PREACT = True
    model = build_model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, targets = tiny_batch()
    losses = []
    for _ in range(6):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("scheme", ["PWS", "none"])
def test_norm_free_units_add_their_input_unrectified(scheme: str) -> None:
    # No norm before the pre-activation ReLU: it must not rectify the unit's input in place,
    # which the identity path adds, nor a map already returned (res4, the input of res5).
    torch.manual_seed(2)
    net = ResNet(depth=18, norm=scheme, preact=True, res2_channels=8, stem_channels=8).eval()
    block = net.res2[1]
    x = torch.randn(2, 8, 6, 6)
    out = block.conv1(F.relu(x))
    out = block.conv2(out)
    with torch.no_grad():
        torch.testing.assert_close(block(x.clone()), x + out)
        outputs = net(torch.randn(1, 3, 64, 64))
        res4 = outputs["res4"].clone()
        assert (res4 < 0).any()
        torch.testing.assert_close(outputs["res5"], net.final(net.res5(res4)))
    torch.testing.assert_close(outputs["res4"], res4)


def test_stem_norm_follows_the_stem_convolution() -> None:
    torch.manual_seed(3)
    net = ResNet(
        depth=18,
        norm="PWS",
        preact=True,
        stem_norm="GN(groups=1)",
        res2_channels=8,
        stem_channels=8,
    ).eval()
    assert net.stem_norm == "GN(groups=1)"
    stem = net.stem.conv1
    assert [name for name, _ in stem.named_children()] == ["conv", "norm", "relu"]
    assert isinstance(stem.norm, nn.GroupNorm) and stem.norm.num_groups == 1
    stem_keys = [k for k in net.state_dict() if k.startswith("stem.")]
    assert {k.rpartition(".")[0] for k in stem_keys} == {"stem.conv1.conv", "stem.conv1.norm"}
    assert {"stem.conv1.conv.bias", "stem.conv1.norm.weight", "stem.conv1.norm.bias"} <= set(
        stem_keys
    )
    with torch.no_grad():
        stem.norm.weight.uniform_(0.5, 1.5)
        stem.norm.bias.uniform_(-0.5, 0.5)
        x = torch.randn(2, 3, 32, 32)
        h = F.group_norm(stem.conv(x), 1, stem.norm.weight, stem.norm.bias)
        expected = F.max_pool2d(F.relu(h), 3, stride=2, padding=1)
        torch.testing.assert_close(net.stem(x), expected)
    # A scheme with a norm: its image convolution keeps a bias, which a one-group GN does not
    # absorb per channel.
    gn = ResNet(depth=18, norm="GN", preact=True, stem_norm="GN(groups=1)", res2_channels=32)
    assert type(gn.stem.conv1.conv) is nn.Conv2d and gn.stem.conv1.conv.bias is not None
    assert gn.stem.conv1.norm.num_groups == 1 and gn.final.norm.num_groups == 32


def test_stem_norm_errors_and_config() -> None:
    with pytest.raises(ValueError, match=r"MODEL.RESNETS.STEM_NORM\) is for the pre-activation"):
        ResNet(depth=18, norm="GN", stem_norm="GN(groups=1)")
    with pytest.raises(ValueError, match=r"MODEL.RESNETS.STEM_NORM\) 'PWS' has no norm"):
        ResNet(depth=18, norm="GN", preact=True, stem_norm="PWS")
    with pytest.raises(ValueError, match=r"^MODEL.RESNETS.STEM_NORM: .*'GNN'"):
        ResNet(depth=18, norm="GN", preact=True, stem_norm="GNN")
    cfg = tiny_cfg("FasterRCNN", "PWS")
    assert cfg.MODEL.RESNETS.STEM_NORM == ""
    assert ResNet.from_config(cfg).stem_norm is None
    cfg.MODEL.RESNETS.PREACT = True
    cfg.MODEL.RESNETS.STEM_NORM = "gn(groups=1)"
    net = ResNet.from_config(cfg)
    assert net.stem_norm == "GN(groups=1)" and net.stem.conv1.norm.num_groups == 1
