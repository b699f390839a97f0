"""Normalizer-free layers: scaled weight standardization (NF-ResNets) and scaled activations."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from norm_det.layers import no_weight_decay_parameters
from norm_det.layers.nf import ACTIVATION_GAMMAS, ScaledActivation, ScaledStdConv2d


def _conv(**options) -> ScaledStdConv2d:
    torch.manual_seed(0)
    options = {"padding": 1, **options}
    layer = ScaledStdConv2d(6, 4, 3, **options).double()
    with torch.no_grad():
        layer.weight.mul_(0.3).add_(0.05)  # a mean and a scale for the standardization to remove
        layer.gain.copy_(torch.linspace(0.5, 2.0, 4, dtype=torch.float64))
        layer.bias.normal_()
    return layer


def _reference_weight(weight: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """The paper's formula, written out: gain (W - mean) / sqrt(N (population var + eps))."""
    out = torch.empty_like(weight)
    for o in range(weight.shape[0]):
        filt = weight[o]
        n = filt.numel()
        mean = filt.sum() / n
        var = ((filt - mean) ** 2).sum() / n
        out[o] = gain[o] * (filt - mean) / torch.sqrt(n * (var + eps))
    return out


def test_standardized_weight_is_the_papers_formula() -> None:
    for groups in (1, 2):
        layer = _conv(groups=groups)
        assert layer.fan_in == 6 // groups * 9
        expected = _reference_weight(layer.weight.detach(), layer.gain.detach(), layer.eps)
        torch.testing.assert_close(layer.standardized_weight(), expected, rtol=1e-12, atol=1e-15)


def test_each_filter_has_mean_0_and_variance_gain_squared_over_fan_in() -> None:
    layer = _conv(eps=1e-12)  # eps out of the way of the exact moments
    w = layer.standardized_weight().detach().flatten(1)
    n = layer.fan_in
    torch.testing.assert_close(
        w.mean(dim=1), torch.zeros(4, dtype=torch.float64), atol=1e-15, rtol=0
    )
    gain = layer.gain.detach()
    torch.testing.assert_close(w.var(dim=1, unbiased=False), gain**2 / n, rtol=1e-9, atol=0)
    # Hence sum_j W_ij^2 = gain_i^2: a unit-variance input keeps its variance.
    torch.testing.assert_close(w.square().sum(dim=1), gain**2, rtol=1e-9, atol=0)


def test_forward_is_the_convolution_with_the_standardized_weight() -> None:
    layer = _conv(stride=2, dilation=2, padding=2)
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    expected = F.conv2d(
        x,
        _reference_weight(layer.weight.detach(), layer.gain.detach(), layer.eps),
        layer.bias.detach(),
        stride=2,
        padding=2,
        dilation=2,
    )
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_gradcheck() -> None:
    layer = ScaledStdConv2d(3, 2, 3, padding=1).double()
    with torch.no_grad():
        layer.gain.copy_(torch.tensor([0.7, 1.3], dtype=torch.float64))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)

    def function(x, weight, gain, bias):
        parameters = {"weight": weight, "gain": gain, "bias": bias}
        return torch.func.functional_call(layer, parameters, (x,))

    parameters = (layer.weight, layer.gain, layer.bias)
    inputs = [x] + [t.detach().clone().requires_grad_() for t in parameters]
    assert torch.autograd.gradcheck(function, inputs)


def test_fuse_gives_a_plain_conv_with_the_same_output() -> None:
    layer = _conv(groups=2).eval()
    fused = layer.fuse()
    assert type(fused) is nn.Conv2d
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(fused(x), layer(x), rtol=1e-12, atol=1e-12)


def test_load_plain_weights_reproduces_the_plain_convolution_less_its_mean() -> None:
    layer = _conv()
    plain = nn.Conv2d(6, 4, 3, padding=1).double()
    layer.load_plain_weights(plain.weight.detach(), plain.bias.detach())
    x = torch.randn(2, 6, 6, 6, dtype=torch.float64)
    centered = plain.weight.detach() - plain.weight.detach().mean(dim=(1, 2, 3), keepdim=True)
    expected = F.conv2d(x, centered, plain.bias.detach(), padding=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    no_bias = ScaledStdConv2d(6, 4, 3, bias=True).double()
    no_bias.load_plain_weights(plain.weight.detach(), None)
    assert torch.equal(no_bias.bias, torch.zeros(4, dtype=torch.float64))


def test_signal_propagation_through_ten_layers() -> None:
    """The mean square of each random-init conv's output on unit-Gaussian input stays ~1.

    Ten ScaledStdConv2d(64, 64, 3) + ScaledActivation("relu") at initialization (circular
    padding, so that every position sees a full patch and the zero-sum filters remove the
    activations' mean exactly). Each filter has sum(W^2) = 1, so a layer's output second moment
    is that of a random unit vector's quadratic form in the input covariance: about 1% off per
    layer, averaged over 64 channels. Over ten layers those deviations compound like a random
    walk, to about sqrt(10) * 1.2% ~ 4% (3.7% standard deviation over 8 seeds measured in
    float64); the bound 0.15 is 4 of those. Without gamma a ReLU layer keeps
    Var[relu(z)] = (1 - 1/pi) / 2 ~ 0.34 of it, 2e-5 after ten layers.
    """
    torch.manual_seed(0)
    convs = [
        ScaledStdConv2d(64, 64, 3, padding=1, padding_mode="circular", bias=False).double()
        for _ in range(10)
    ]
    x = torch.randn(4, 64, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        for scaled in (True, False):
            activation = ScaledActivation("relu") if scaled else nn.ReLU()
            h = x
            moments = []
            for conv in convs:
                out = conv(h)
                moments.append(float(out.square().mean()))
                h = activation(out)
            if scaled:
                assert all(abs(m - 1.0) < 0.15 for m in moments), moments
                assert float(h.var()) == pytest.approx(1.0, abs=0.15)
            else:
                assert moments[-1] < 1e-3


def test_activation_gammas_restore_unit_variance() -> None:
    """gamma = 1 / sqrt(Var[g(z)]) for z ~ N(0, 1), by a float64 trapezoid integral."""
    assert ACTIVATION_GAMMAS["relu"] == math.sqrt(2.0 / (1.0 - 1.0 / math.pi))
    z = torch.linspace(-14.0, 14.0, 400_001, dtype=torch.float64)
    density = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    functions = {
        "relu": z.clamp_min(0),
        "silu": z / (1 + torch.exp(-z)),
        "gelu": 0.5 * z * (1 + torch.erf(z / math.sqrt(2))),
    }
    for name, values in functions.items():
        mean = torch.trapezoid(values * density, z)
        second = torch.trapezoid(values**2 * density, z)
        gamma = float(1 / torch.sqrt(second - mean**2))
        assert ACTIVATION_GAMMAS[name] == pytest.approx(gamma, rel=1e-8), name


def test_scaled_activation_computes_gamma_times_g() -> None:
    x = torch.randn(3, 4, dtype=torch.float64)
    gamma = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))
    torch.testing.assert_close(ScaledActivation()(x), gamma * x.clamp_min(0), rtol=1e-15, atol=0)
    for name in ("SiLU", "swish", "si_lu"):
        layer = ScaledActivation(name)
        assert layer.activation == "silu"
        torch.testing.assert_close(layer(x), ACTIVATION_GAMMAS["silu"] * x * torch.sigmoid(x))
    assert "gamma=1.7128586" in repr(ScaledActivation("relu"))


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match=r"activation is 'tanh'.*'gelu', 'relu', 'silu'"):
        ScaledActivation("tanh")
    with pytest.raises(ValueError, match=r"ScaledStdConv2d: eps must be > 0; got 0"):
        ScaledStdConv2d(2, 2, 1, eps=0)


def test_state_dict_round_trip_and_no_weight_decay_on_gain() -> None:
    layer = _conv()
    assert set(layer.state_dict()) == {"weight", "bias", "gain"}
    other = ScaledStdConv2d(6, 4, 3, padding=1).double()
    other.load_state_dict(layer.state_dict())
    x = torch.randn(1, 6, 5, 5, dtype=torch.float64)
    assert torch.equal(other(x), layer(x))
    model = nn.Sequential(layer, ScaledActivation())
    assert no_weight_decay_parameters(model) == {"0.gain"}
