import pytest
import torch
from torch import nn

from norm_det.layers import FrozenBatchNorm2d, GroupNorm, PWSConv2d, SyncBatchNorm, WSConv2d
from norm_det.schemes import (
    Scheme,
    available_schemes,
    build_conv,
    build_conv_norm,
    build_conv_transpose,
    build_linear,
    get_scheme,
    image_conv_scheme,
    parse_scheme_spec,
    predictor_scheme,
    register_scheme,
    scheme_options,
)


@pytest.mark.parametrize("name", ["GN+WS", "gn_ws", "gnws", "GN-WS", " Gn+Ws ", "ws+gn"])
def test_names_forgive_case_and_separators(name):
    assert get_scheme(name).name == "GN+WS"


@pytest.mark.parametrize(
    ("name", "conv", "norm"),
    [
        ("none", nn.Conv2d, nn.Identity),
        ("BN", nn.Conv2d, nn.BatchNorm2d),
        ("SyncBN", nn.Conv2d, SyncBatchNorm),
        ("frozen_bn", nn.Conv2d, FrozenBatchNorm2d),
        ("GN", nn.Conv2d, GroupNorm),
        ("GN+WS", WSConv2d, GroupNorm),
        ("PWS", PWSConv2d, nn.Identity),
    ],
)
def test_build_conv_norm_classes_and_bias(name, conv, norm):
    c, n = build_conv_norm(name, 64, 64, 3, stride=2, padding=1)
    assert type(c) is conv and type(n) is norm
    assert c.stride == (2, 2) and c.padding == (1, 1)
    # A norm supplies the shift, so the conv of a conv+norm pair has a bias only without one.
    assert (c.bias is not None) == (norm is nn.Identity)
    assert c(torch.randn(1, 64, 8, 8)).shape == (1, 64, 4, 4)


def test_options_in_string_dict_and_keywords():
    assert build_conv_norm("GN(groups=16)", 64, 64, 1)[1].num_groups == 16
    assert build_conv_norm({"name": "GN", "groups": 8}, 64, 64, 1)[1].num_groups == 8
    assert get_scheme("PWS(gamma=1e-3)").options == {"gamma": 1e-3}
    assert build_conv_norm(get_scheme("PWS", gamma=1e-3), 4, 4, 3)[0].gamma == 1e-3
    assert str(get_scheme("GN(groups=16)")) == "GN(groups=16)"
    assert parse_scheme_spec("GN( groups = 4 , eps=1e-6 )") == ("GN", {"groups": 4, "eps": 1e-6})


def test_empty_and_none_mean_plain():
    assert get_scheme("").name == "none"
    assert get_scheme(None).name == "none"


def test_unknown_name_lists_known_schemes():
    with pytest.raises(ValueError, match="unknown normalization scheme 'BatchRenorm'") as error:
        get_scheme("BatchRenorm")
    for name in ("BN", "FrozenBN", "GN+WS", "PWS"):
        assert name in str(error.value)


def test_unknown_option_lists_valid_options():
    with pytest.raises(ValueError, match=r"no option 'group'.*groups=32") as error:
        get_scheme("GN(group=16)")
    assert "eps=1e-05" in str(error.value)


def test_malformed_spec_is_explained():
    with pytest.raises(ValueError, match="option=value"):
        get_scheme("GN(16)")
    with pytest.raises(ValueError, match="literal"):
        get_scheme("GN(groups=foo())")


def test_lone_conv_linear_and_transpose_builders():
    assert type(build_conv("GN", 8, 8, 3)) is nn.Conv2d
    assert type(build_conv("PWS", 8, 8, 3)) is PWSConv2d
    assert type(build_linear("GN", 8, 4)) is nn.Linear
    assert type(build_conv_transpose("BN", 8, 4, 2, stride=2)) is nn.ConvTranspose2d
    assert build_conv_transpose("none", 8, 4, 2, stride=2)(torch.randn(1, 8, 3, 3)).shape == (
        1,
        4,
        6,
        6,
    )


def test_register_a_new_scheme_in_a_few_lines():
    @register_scheme("TestInstanceNorm", aliases=("test_in",))
    def _test_in(affine: bool = True) -> Scheme:
        return Scheme(norm=lambda c: nn.InstanceNorm2d(c, affine=affine))

    try:
        conv, norm = build_conv_norm("test-in(affine=False)", 3, 5, 3)
        assert isinstance(norm, nn.InstanceNorm2d) and not norm.affine
        assert conv.bias is None
        assert "TestInstanceNorm" in available_schemes()
        with pytest.raises(ValueError, match="already registered"):
            register_scheme("Other", aliases=("testinstancenorm",))(_test_in)
    finally:
        from norm_det import schemes

        for key in ("testinstancenorm", "testin", "other"):
            schemes._REGISTRY.pop(key, None)


@pytest.mark.parametrize("name", available_schemes())
def test_where_each_scheme_puts_its_layers(name):
    """The rule of every route: predictors plain except where the paper normalizes them (ND,
    ND++: "all layers"), the image convolution plain for CZM only."""
    scheme = get_scheme(name)
    assert scheme.replaces_predictors == (name in ("ND", "NDPP"))
    predictor = predictor_scheme(name)
    assert predictor.name == (name if scheme.replaces_predictors else "none")
    assert type(build_conv(predictor, 8, 4, 1)) in (
        (type(build_conv(scheme, 8, 4, 1)),) if scheme.replaces_predictors else (nn.Conv2d,)
    )
    assert type(build_linear(predictor, 8, 4)) is (
        type(build_linear(scheme, 8, 4)) if scheme.replaces_predictors else nn.Linear
    )
    image = image_conv_scheme(name)
    assert image.name == ("none" if name == "CZM" else name)


def test_nd_is_ndpp_without_scale_invariance():
    nd, ndpp = scheme_options("ND"), scheme_options("NDPP")
    assert list(ndpp) == [*nd, "scale_invariance"]
    assert ndpp == {**nd, "scale_invariance": "layernorm"}
    a = get_scheme("ND(block=32, stride=3, sync=False)")
    b = get_scheme("NDPP(block=32, stride=3, sync=False, scale_invariance='none')")
    for layer in ("conv", "linear", "conv_transpose"):
        built, reference = getattr(a, layer), getattr(b, layer)
        assert built.func is reference.func and built.keywords == reference.keywords
    assert a.conv.keywords["scale_invariance"] == "none" and a.linear.keywords["block"] == 256
    assert a.replaces_predictors and a.norm is None and a.replaces_lone_convs
    with pytest.raises(ValueError, match="scheme 'ND' has no option 'scale_invariance'"):
        get_scheme("ND(scale_invariance='layernorm')")


def test_the_package_registers_on_import_and_keeps_its_names():
    from norm_det import schemes
    from norm_det.schemes import builders, registry

    assert schemes._REGISTRY is registry._REGISTRY
    assert set(schemes.scheme_papers()) >= {"BN", "GN", "ND", "NDPP", "PWS", "CZM"}
    for name in schemes.__all__:
        assert any(getattr(m, name, None) is getattr(schemes, name) for m in (builders, registry))
