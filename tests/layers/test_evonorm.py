"""EvoNorm-B0 and EvoNorm-S0 against the paper's expressions (Liu et al., NeurIPS 2020, Table 1)
and the authors' release (biased variances, eps 1e-5, an affine map without the activation)."""

import warnings

import pytest
import torch
from torch import nn

import norm_det.layers.row_blocks as row_blocks
from norm_det.layers import GroupNorm
from norm_det.layers.evonorm import EvoNormB0, EvoNormS0
from norm_det.layers.protocol import no_weight_decay_parameters

# Rows of 12 (B0) or 24 (S0, two channels a group) elements: one or a few rows a block, or all.
BLOCK_SIZES = [13, 50, row_blocks.CPU_BLOCK_NUMEL]


def biased_var(x, dims):
    mean = x.mean(dim=dims, keepdim=True)
    return ((x - mean) ** 2).mean(dim=dims, keepdim=True)


def paper_s0(x, gamma, beta, v, groups, eps=1e-5):
    """x sigmoid(v x) / sqrt(s2_{w,h,c/g}(x) + eps) gamma + beta, consecutive channel groups."""
    n, c, h, w = x.shape
    grouped = x.reshape(n, groups, c // groups, h, w)
    std = torch.sqrt(biased_var(grouped, (2, 3, 4)) + eps).expand_as(grouped).reshape_as(x)
    per_channel = (1, -1, 1, 1)
    v, gamma, beta = v.view(per_channel), gamma.view(per_channel), beta.view(per_channel)
    return x * (1 / (1 + torch.exp(-v * x))) / std * gamma + beta


def paper_b0(x, gamma, beta, v, batch_var, eps=1e-5):
    """x / max(sqrt(s2_{b,w,h} + eps), v x + sqrt(s2_{w,h}(x) + eps)) gamma + beta."""
    per_channel = (1, -1, 1, 1)
    left = torch.sqrt(batch_var.view(per_channel) + eps).expand_as(x)
    right = v.view(per_channel) * x + torch.sqrt(biased_var(x, (2, 3)) + eps)
    return x / torch.maximum(left, right) * gamma.view(per_channel) + beta.view(per_channel)


def randomized(layer):
    layer = layer.double()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_()
        if getattr(layer, "v", None) is not None:
            layer.v.mul_(0.3)  # both branches of B0's max are taken
    return layer


@pytest.fixture(params=BLOCK_SIZES, ids=lambda b: f"block{b}")
def block_numel(request, monkeypatch):
    monkeypatch.setattr(row_blocks, "CPU_BLOCK_NUMEL", request.param)
    return request.param


def params_of(layer):
    return tuple(layer.parameters())


# ---------------------------------------------------------------------------------------------
# EvoNorm-S0


def test_s0_is_the_papers_expression(block_numel):
    torch.manual_seed(0)
    layer = randomized(EvoNormS0(8, groups=4))
    x = torch.randn(3, 8, 3, 4, dtype=torch.float64, requires_grad=True)
    expected = paper_s0(x.detach(), *(p.detach() for p in (layer.weight, layer.bias, layer.v)), 4)
    torch.testing.assert_close(layer(x), expected, rtol=1e-13, atol=1e-13)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-13, atol=1e-13)
    assert torch.equal(layer.eval()(x), layer.train()(x))  # no running statistic


def test_s0_without_activation_is_the_releases_affine_map():
    torch.manual_seed(1)
    layer = randomized(EvoNormS0(6, groups=3, activation=False))
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    expected = x * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-15, atol=1e-15)
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]


@pytest.mark.parametrize("activation", [True, False])
def test_s0_gradcheck(block_numel, activation):
    torch.manual_seed(2)
    layer = randomized(EvoNormS0(8, groups=4, activation=activation))
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: layer(x), (x, *params_of(layer)))


def test_s0_a_samples_output_does_not_depend_on_the_other_samples():
    torch.manual_seed(3)
    layer = randomized(EvoNormS0(8, groups=2))
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    alone = layer(x[:1])
    others = torch.cat([x[:1], 50 * torch.randn(5, 8, 4, 4, dtype=torch.float64) + 7])
    torch.testing.assert_close(layer(others)[:1], alone, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(layer(x)[:1], alone, rtol=1e-14, atol=1e-14)


def test_s0_group_variance_is_accurate_far_from_zero_mean():
    # mean 1000, spread 0.1: E[x^2] - E[x]^2 in float32 would lose the variance entirely.
    torch.manual_seed(4)
    layer = EvoNormS0(4, groups=2)
    x = 1000 + 0.1 * torch.randn(2, 4, 8, 8)
    expected = paper_s0(x.double(), *(p.double() for p in (layer.weight, layer.bias, layer.v)), 2)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-4, atol=1e-3)


def test_s0_groups_behave_as_group_norms():
    for channels, groups, strict in [
        (64, 32, False),
        (24, 32, False),
        (16, 4, True),
        (48, 32, False),
    ]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = GroupNorm(channels, groups, strict=strict).num_groups
            assert EvoNormS0(channels, groups=groups, strict=strict).groups == expected
    with pytest.warns(UserWarning, match=r"^EvoNormS0: 32 groups do not divide 24 channels; "):
        assert EvoNormS0(24).groups == 8
    with pytest.raises(
        ValueError,
        match=r"^EvoNormS0: 32 groups do not divide 24 channels; set the scheme's groups option "
        r"to a divisor of 24 \(e\.g\. 'EvoNorm-S0\(groups=24\)'\)",
    ):
        EvoNormS0(24, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback on the way to the error
        with pytest.raises(ValueError, match=r"7 groups do not divide 16 channels.*groups=4\)"):
            EvoNormS0(16, groups=7)


# ---------------------------------------------------------------------------------------------
# EvoNorm-B0


def test_b0_training_uses_the_batch_variance_and_updates_the_running_one(block_numel):
    torch.manual_seed(5)
    layer = randomized(EvoNormB0(5, momentum=0.1))
    x = torch.randn(3, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    batch_var = biased_var(x.detach(), (0, 2, 3)).flatten()
    params = (p.detach() for p in (layer.weight, layer.bias, layer.v))
    expected = paper_b0(x.detach(), *params, batch_var)
    torch.testing.assert_close(layer(x), expected, rtol=1e-13, atol=1e-13)
    count = 3 * 3 * 4
    unbiased = batch_var * count / (count - 1)
    torch.testing.assert_close(layer.running_var, 0.9 * 1.0 + 0.1 * unbiased, rtol=1e-14, atol=0)
    with torch.no_grad():
        layer(x)  # the forward alone updates it too
    twice = 0.9 * (0.9 + 0.1 * unbiased) + 0.1 * unbiased
    torch.testing.assert_close(layer.running_var, twice, rtol=1e-14, atol=0)


def test_b0_eval_uses_the_running_variance_and_keeps_it(block_numel):
    torch.manual_seed(6)
    layer = randomized(EvoNormB0(5))
    layer.running_var.uniform_(0.5, 2.0)
    running = layer.running_var.clone()
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    layer.eval()
    params = (p.detach() for p in (layer.weight, layer.bias, layer.v))
    torch.testing.assert_close(layer(x), paper_b0(x.detach(), *params, running), rtol=1e-13, atol=0)
    assert torch.equal(layer.running_var, running)
    # In eval a sample's output is its own.
    mixed = layer(torch.cat([x[:1], 9 * x[1:]]))[:1]
    torch.testing.assert_close(layer(x[:1]), mixed, rtol=1e-14, atol=1e-14)


def test_b0_momentum_one_sets_the_population_statistic_of_the_batch():
    # What PreciseBN relies on: momentum = 1 leaves the batch's unbiased variance.
    torch.manual_seed(7)
    layer = EvoNormB0(4, momentum=1.0).double()
    x = 3 * torch.randn(4, 4, 5, 5, dtype=torch.float64) + 2
    layer(x)
    torch.testing.assert_close(layer.running_var, x.var(dim=(0, 2, 3)), rtol=1e-13, atol=0)


def test_b0_training_depends_on_the_batch():
    torch.manual_seed(8)
    layer = randomized(EvoNormB0(4))
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    assert not torch.allclose(layer(x)[:1], layer(torch.cat([x[:1], 10 * x[1:]]))[:1])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [True, False])
def test_b0_gradcheck(block_numel, training, activation):
    torch.manual_seed(9)
    layer = randomized(EvoNormB0(5, activation=activation)).train(training)
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: layer(x), (x, *params_of(layer)))


def test_b0_statistics_are_accurate_far_from_zero_mean():
    torch.manual_seed(10)
    layer = EvoNormB0(3, momentum=1.0)
    x = -500 + 0.05 * torch.randn(2, 3, 8, 8)
    out = layer(x)
    params = (p.double() for p in (layer.weight, layer.bias, layer.v))
    expected = paper_b0(x.double(), *params, biased_var(x.double(), (0, 2, 3)).flatten())
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(
        layer.running_var.double(), x.double().var(dim=(0, 2, 3)), rtol=1e-3, atol=0
    )


def test_b0_without_activation_is_affine_and_folds_into_the_convolution():
    torch.manual_seed(11)
    norm = randomized(EvoNormB0(4, activation=False))
    assert norm.running_var is None and list(norm.buffers()) == []
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    expected = norm.train()(conv(x))
    torch.testing.assert_close(norm.eval()(conv(x)), expected, rtol=0, atol=0)
    scale, shift = norm.folded_affine()
    folded = nn.Conv2d(3, 4, 3, padding=1).double()
    with torch.no_grad():
        folded.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        folded.bias.copy_(conv.bias * scale + shift)
    torch.testing.assert_close(folded(x), expected, rtol=1e-13, atol=1e-13)
    s0 = randomized(EvoNormS0(4, groups=2, activation=False))
    torch.testing.assert_close(s0.folded_affine()[0], s0.weight.detach(), rtol=0, atol=0)


def test_b0_refuses_a_batch_of_one_value_per_channel():
    with pytest.raises(ValueError, match=r"more than one value per channel.*\(1, 3, 1, 1\)"):
        EvoNormB0(3)(torch.randn(1, 3, 1, 1))
    assert EvoNormB0(3).eval()(torch.randn(1, 3, 1, 1)).shape == (1, 3, 1, 1)


# ---------------------------------------------------------------------------------------------
# Both


@pytest.mark.parametrize("make", [EvoNormB0, lambda c: EvoNormS0(c, groups=2)])
def test_with_activation_nothing_folds(make):
    assert make(4).folded_affine() is None
    assert not hasattr(make(4), "fuse")


@pytest.mark.parametrize("cls", [EvoNormB0, EvoNormS0])
def test_parameters_start_at_the_releases_values_and_take_no_weight_decay(cls):
    layer = cls(64)
    assert torch.equal(layer.weight, torch.ones(64)) and torch.equal(layer.v, torch.ones(64))
    assert torch.equal(layer.bias, torch.zeros(64)) and layer.eps == 1e-5
    assert no_weight_decay_parameters(layer) == {"weight", "bias", "v"}
    assert no_weight_decay_parameters(cls(64, activation=False)) == {"weight", "bias"}


@pytest.mark.parametrize("make", [EvoNormB0, lambda c: EvoNormS0(c, groups=3)])
def test_state_dict_round_trip(make):
    torch.manual_seed(12)
    layer = randomized(make(6))
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    layer(x)
    copy = make(6).double()
    copy.load_state_dict(layer.state_dict())
    assert set(layer.state_dict()) >= {"weight", "bias", "v"}
    layer.eval(), copy.eval()
    assert torch.equal(copy(x), layer(x))


@pytest.mark.parametrize("make", [EvoNormB0, lambda c: EvoNormS0(c, groups=2)])
def test_low_precision_input_keeps_its_dtype(make):
    torch.manual_seed(13)
    layer = make(4)
    x = 4 * torch.randn(2, 4, 8, 8)
    expected = layer.eval()(x)
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("make", [EvoNormB0, lambda c: EvoNormS0(c, groups=2)])
def test_traced_module_computes_the_same(make):
    torch.manual_seed(14)
    layer = randomized(make(4)).eval()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    traced = torch.jit.trace(layer, x)
    torch.testing.assert_close(traced(x), layer(x), rtol=1e-13, atol=1e-13)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"^EvoNormB0: momentum must be in \[0, 1\]; got 1.5"):
        EvoNormB0(4, momentum=1.5)
    with pytest.raises(ValueError, match=r"^EvoNormS0: eps must be > 0; got -1"):
        EvoNormS0(4, groups=2, eps=-1)
    with pytest.raises(
        ValueError, match=r"^EvoNormB0: num_channels must be an integer >= 1; got 0"
    ):
        EvoNormB0(0)
    with pytest.raises(ValueError, match=r"^EvoNormS0: groups must be >= 1; got 0"):
        EvoNormS0(4, groups=0)
    with pytest.raises(ValueError, match=r"expected \(N, 4, H, W\) input; got \(2, 8, 3, 3\)"):
        EvoNormS0(4, groups=2)(torch.randn(2, 8, 3, 3))
    with pytest.raises(ValueError, match=r"EvoNormB0\(4, .*expected \(N, 4, H, W\)"):
        EvoNormB0(4)(torch.randn(2, 4, 3))


@pytest.mark.parametrize("make", [EvoNormB0, lambda c: EvoNormS0(c, groups=2)])
def test_empty_batch(make):
    layer = make(4)
    x = torch.randn(0, 4, 3, 3, requires_grad=True)
    running = layer.running_var.clone() if isinstance(layer, EvoNormB0) else None
    out = layer(x)
    out.sum().backward()
    assert out.shape == x.shape and x.grad.shape == x.shape
    if running is not None:
        assert torch.equal(layer.running_var, running)
