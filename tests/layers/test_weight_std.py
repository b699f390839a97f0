import math

import torch
from torch.nn import functional as F

from norm_det.layers import PWSConv2d, WSConv2d
from tests.model_utils import U64, two_conv_bound


def _standardization_roundings(
    flat: torch.Tensor, scale: torch.Tensor, w_hat: torch.Tensor
) -> float:
    """By how many ``u``, relative to ``max|w_hat|``, two float64 ``(w - mean) * scale`` differ.

    Per side, the mean errs by ``n u max|w_o|``, which ``scale`` carries into every element, and
    the spread by ``n kappa_o u`` relatively, ``kappa_o = max|w_o| / std_o`` (Chan, Golub &
    LeVeque's bound for torch.var's updating formula; a two-pass norm errs by less), plus 6 ``u``
    for the square roots, sums and products.

    Args:
        flat: ``(O, n)`` filters; scale: ``(O, 1)``; w_hat: ``(O, ...)``, the result.
    """
    n = flat.shape[1]
    carried = (flat.abs().amax(1, keepdim=True) * scale.abs()).max() / w_hat.abs().max()
    kappa = (flat.abs().amax(1) / flat.std(1)).max()
    return 2 * (n * (carried + kappa).item() + 6)


def _conv64(x, weight, bias, conv):
    return F.conv2d(
        x.double(),
        weight.double(),
        None if bias is None else bias.double(),
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
    )


def test_ws_matches_float64_formula():
    conv = WSConv2d(6, 10, 3, padding=1, groups=2, bias=True).double()
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    w = conv.weight.detach()
    flat = w.flatten(1)
    mean = flat.mean(1, keepdim=True)
    std = flat.std(1, keepdim=True)  # unbiased, as the WS authors' code
    w_hat = ((flat - mean) / (std + 1e-5)).view_as(w)
    expected = _conv64(x, w_hat, conv.bias.detach(), conv)
    roundings = _standardization_roundings(flat, 1 / (std + 1e-5), w_hat)
    bound = two_conv_bound(w_hat, conv.bias, x, weight_roundings=roundings)
    assert (conv(x) - expected).abs().max() <= bound


def test_pws_matches_eq12_in_float64():
    conv = PWSConv2d(4, 7, 3, padding=1, gamma=1e-3).double()
    with torch.no_grad():
        conv.alpha.uniform_(0.5, 2.0)
        conv.bias.uniform_(-1, 1)
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    w = conv.weight.detach()
    n = 3 * 3 * 4
    flat = w.flatten(1)
    mean = flat.mean(1, keepdim=True)
    var = ((flat - mean) ** 2).mean(1, keepdim=True)  # the filter's population variance
    alpha = conv.alpha.detach().view(-1, 1)
    scale = alpha * math.sqrt(2.0 / n) / torch.sqrt(var + 1e-3)
    w_eff = ((flat - mean) * scale).view_as(w)
    expected = _conv64(x, w_eff, conv.bias.detach(), conv)
    roundings = _standardization_roundings(flat, scale, w_eff)
    bound = two_conv_bound(w_eff, conv.bias, x, weight_roundings=roundings)
    assert (conv(x) - expected).abs().max() <= bound


def test_pws_defaults_and_alpha_without_weight_decay():
    from norm_det.layers import no_weight_decay_parameters

    conv = PWSConv2d(8, 8, 3)
    assert conv.gamma == 1e-4
    assert torch.equal(conv.alpha, torch.ones(8))
    assert conv.bias is not None and torch.equal(conv.bias, torch.zeros(8))
    model = torch.nn.Sequential(conv)
    assert no_weight_decay_parameters(model) == {"0.alpha"}


def test_pws_gradient_has_zero_mean_per_filter():
    # PWS paper eq. 13: E[grad W_o] = 0 for every filter o.
    conv = PWSConv2d(5, 6, 3, padding=1).double()
    x = torch.randn(2, 5, 7, 7, dtype=torch.float64)
    (conv(x) ** 2).sum().backward()
    per_filter_mean = conv.weight.grad.flatten(1).mean(1)
    scale = conv.weight.grad.abs().max()
    assert per_filter_mean.abs().max() < 1e-12 * max(scale.item(), 1.0)


def test_fused_ws_and_pws_equal_unfused():
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    for conv in (WSConv2d(4, 6, 3, stride=2, bias=False), PWSConv2d(4, 6, 3, dilation=2)):
        conv.double()
        plain = conv.fuse()
        assert type(plain) is torch.nn.Conv2d and plain.weight.dtype == torch.float64
        with torch.no_grad():
            # fuse stores what forward computes (the same ops on the same values): only the
            # convolutions' sums may differ.
            bound = two_conv_bound(plain.weight, plain.bias, x)
            assert (plain(x) - conv(x)).abs().max() <= bound


def test_pws_load_plain_weights_removes_only_the_filter_mean():
    plain = torch.nn.Conv2d(3, 4, 3, bias=True, dtype=torch.float64)
    conv = PWSConv2d(3, 4, 3).double()
    conv.load_plain_weights(plain.weight.detach(), plain.bias.detach())
    flat = plain.weight.detach().flatten(1)
    expected = (flat - flat.mean(1, keepdim=True)).view_as(plain.weight)
    # The layer's scale is alpha sqrt(2/n) / sqrt(var + gamma) = 1 up to rounding.
    roundings = _standardization_roundings(flat, torch.ones_like(flat[:, :1]), expected)
    atol = roundings * U64 * expected.abs().max().item()
    assert torch.allclose(conv.standardized_weight(), expected, rtol=0, atol=atol)
    assert torch.equal(conv.bias, plain.bias)
