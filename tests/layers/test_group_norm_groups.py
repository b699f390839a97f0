"""GN groups that do not divide the channels: only the default 32, not asked for, fall back."""

import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

from norm_det import convert
from norm_det.layers import GroupNorm
from norm_det.schemes import build_conv_norm, build_norm, get_scheme, scheme_options


@pytest.mark.parametrize("scheme", ["GN", "GN+WS"])
def test_the_default_groups_fall_back_to_the_gcd_with_a_warning(scheme):
    with pytest.warns(UserWarning, match=r"^GroupNorm: 32 groups do not divide 24 channels"):
        norm = build_norm(scheme, 24)
    assert (norm.num_groups, norm.num_channels) == (8, 24)
    assert scheme_options(scheme)["groups"] == 32
    assert get_scheme(scheme).options == {}


@pytest.mark.parametrize(
    "scheme", ["GN(groups=7)", "GN+WS(groups=7)", {"name": "GN", "groups": 7}, "gn_ws(groups=7)"]
)
def test_groups_given_that_do_not_divide_are_an_error(scheme):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning on the way to the error
        with pytest.raises(ValueError, match=r"7 groups do not divide 16 channels.*groups=4\)"):
            build_norm(scheme, 16)
        with pytest.raises(ValueError, match=r"7 groups do not divide 16 channels"):
            build_conv_norm(scheme, 3, 16, 3)


@pytest.mark.parametrize(
    "scheme", ["GN(groups=32)", "GN+WS(groups=32)", {"name": "GN", "groups": 32}]
)
def test_the_default_count_given_explicitly_is_held_to(scheme):
    with pytest.raises(ValueError, match=r"32 groups do not divide 16 channels.*groups=16\)"):
        build_norm(scheme, 16)
    assert build_norm(scheme, 64).num_groups == 32


@pytest.mark.parametrize("scheme", ["GN(groups=4)", "GN+WS(groups=4)"])
def test_groups_given_that_divide_are_used_as_given(scheme):
    norm = build_norm(scheme, 16)
    x = torch.randn(2, 16, 3, 3)
    assert norm.num_groups == 4
    assert torch.equal(norm(x), nn.GroupNorm(4, 16)(x))


def test_the_layer_falls_back_only_for_the_default_count_not_asked_for():
    with pytest.warns(UserWarning, match="using 16 groups"):
        assert GroupNorm(16).num_groups == 16
    with pytest.raises(ValueError, match=r"32 groups do not divide 16 channels"):
        GroupNorm(16, strict=True)
    with pytest.raises(ValueError, match=r"12 groups do not divide 16 channels.*groups=8\)"):
        GroupNorm(16, num_groups=12)
    assert GroupNorm(16, num_groups=8, strict=True).num_groups == 8


def test_convert_names_the_layer_whose_groups_do_not_divide():
    model = nn.Sequential(
        OrderedDict(stem=nn.Conv2d(3, 16, 3, bias=False), bn=nn.BatchNorm2d(16), relu=nn.ReLU())
    )
    with pytest.raises(
        ValueError, match=r"^the norm after convolution 'stem': GroupNorm: 7 groups .* 16 channels"
    ):
        convert(model, "GN(groups=7)")
    lone = nn.Sequential(OrderedDict(head=nn.Sequential(OrderedDict(bn=nn.BatchNorm2d(16)))))
    with pytest.raises(ValueError, match=r"^norm 'head\.bn': GroupNorm: 7 groups .* 16 channels"):
        convert(lone, "GN+WS(groups=7)")
    converted = convert(model, "GN(groups=4)")
    assert converted.bn.num_groups == 4
