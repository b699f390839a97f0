"""norm_det.surgery.keep_norm: a norm that is not the scheme's stays through convert."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from norm_det import convert
from norm_det.modeling.backbone.resnet import ResNet
from norm_det.surgery import is_kept_norm, keep_norm
from norm_det.weights.sources.standardization_releases import PWS_RELEASE_SCHEME, PWS_STEM_NORM
from tests.model_utils import relative_error
from tests.test_surgery import _NormActConv

_SHAPE = dict(depth=18, preact=True, stem_norm=PWS_STEM_NORM, res2_channels=32, stem_channels=32)


def _release_like_backbone(seed: int = 0) -> ResNet:
    """The PWS release's backbone: PWS convolutions, a one-group GN after the stem conv."""
    torch.manual_seed(seed)
    net = ResNet(norm=PWS_RELEASE_SCHEME, **_SHAPE).eval()
    with torch.no_grad():
        net.stem.conv1.norm.weight.uniform_(0.5, 1.5)
        net.stem.conv1.norm.bias.uniform_(-0.5, 0.5)
    return net


def test_resnet_marks_its_stem_norm_only() -> None:
    net = _release_like_backbone()
    assert is_kept_norm(net.stem.conv1.norm)
    kept = [name for name, m in net.named_modules() if is_kept_norm(m)]
    assert kept == ["stem.conv1.norm"]
    # The mark survives copies and pickles and is no tensor of the state dict.
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert is_kept_norm(clone.stem.conv1.norm)
    plain = nn.GroupNorm(1, 32)
    keys = list(plain.state_dict())
    assert keep_norm(plain) is plain and list(plain.state_dict()) == keys


@pytest.mark.parametrize("scheme", ["BN", "GN", "GN+WS", "ND", "PWS", "none", "CZM", "FRN"])
def test_convert_keeps_the_stem_norm_of_a_stem_norm_backbone(scheme: str) -> None:
    net = _release_like_backbone()
    stem_norm = net.stem.conv1.norm
    weight, bias = stem_norm.weight.clone(), stem_norm.bias.clone()
    converted = convert(net, scheme).eval()
    stem = converted.stem.conv1
    # The same norm object, class and weights; the ReLU after it stays a ReLU.
    assert stem.norm is stem_norm and is_kept_norm(stem.norm)
    assert type(stem.norm) is type(stem_norm) and stem.norm.num_groups == 1
    assert torch.equal(stem.norm.weight, weight) and torch.equal(stem.norm.bias, bias)
    assert type(stem.relu) is nn.ReLU
    assert {"stem.conv1.norm.weight", "stem.conv1.norm.bias"} <= set(converted.state_dict())
    # The convolution is the scheme's, as ResNet builds it there, with the bias it keeps.
    built = ResNet(norm=scheme, **_SHAPE)
    assert type(stem.conv) is type(built.stem.conv1.conv) and stem.conv.bias is not None
    assert type(converted.res2[0].conv1.conv) is type(built.res2[0].conv1.conv)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = F.group_norm(stem.conv(x), 1, weight, bias)
        torch.testing.assert_close(converted.stem(x), F.max_pool2d(F.relu(h), 3, 2, 1))


def test_convert_to_nd_reproduces_the_release_stem_in_float64() -> None:
    # ND in eval computes the PWS kernels (identity statistics), and the kept GN is the same:
    # the converted stem is the release's stem.
    net = _release_like_backbone(seed=1).double()
    reference = copy.deepcopy(net)
    converted = convert(net, "ND").eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(converted.stem(x), reference.stem(x)) < 1e-12


@pytest.mark.parametrize("scheme", ["GN", "none"])
def test_a_kept_norm_a_conv_holds_or_a_lone_one_stays(scheme: str) -> None:
    torch.manual_seed(0)
    held = keep_norm(nn.BatchNorm2d(32))
    lone = keep_norm(nn.BatchNorm2d(32))
    model = nn.Sequential(
        _NormActConv(3, 32, 3, padding=1, bias=False, norm=held, activation=nn.ReLU()),
        lone,
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
    )
    convert(model, scheme)
    assert model[0].norm is held and type(held) is nn.BatchNorm2d
    assert model[1] is lone and type(lone) is nn.BatchNorm2d and type(model[2]) is nn.ReLU
    # An unmarked norm is the scheme's (none: folded into its convolution).
    assert isinstance(model[4], nn.GroupNorm if scheme == "GN" else nn.Identity)


def test_keep_norm_refuses_what_is_no_norm() -> None:
    with pytest.raises(ValueError, match=r"keep_norm: expected a 2-d norm layer .*got ReLU"):
        keep_norm(nn.ReLU())
    assert not is_kept_norm(None) and not is_kept_norm(nn.BatchNorm2d(4))


@pytest.mark.parametrize("scheme", ["none", "PWS", "GN"])
def test_warm_start_applies_a_bn_stem_norm_once(scheme: str) -> None:
    # A BN stem_norm could be folded into the stem convolution; kept, it must not also be
    # folded (before keep_norm, warm_start restored it after convert had folded it: twice).
    from norm_det.weights.warm_start import warm_start

    torch.manual_seed(0)
    shape = dict(_SHAPE, stem_norm="BN")
    net = ResNet(norm="BN", **shape).eval()
    bn = net.stem.conv1.norm
    with torch.no_grad():
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    model = warm_start(net, scheme)
    stem = model.stem.conv1
    assert type(stem.norm) is nn.BatchNorm2d and is_kept_norm(stem.norm)
    assert torch.equal(stem.norm.running_mean, bn.running_mean)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = F.max_pool2d(F.relu(bn(stem.conv(x))), 3, 2, 1)
        torch.testing.assert_close(model.stem(x), expected)
        if scheme != "PWS":  # a plain stem convolution keeps its weights: the stem is the same
            torch.testing.assert_close(model.stem(x), net.stem(x), rtol=1e-5, atol=1e-5)
