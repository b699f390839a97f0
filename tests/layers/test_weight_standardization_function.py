"""FilterStandardization (the WS/PWS autograd function) against the composed tensor-op formulas."""

import math

import pytest
import torch
from torch.autograd import gradcheck
from torch.nn import functional as F

from norm_det.layers import PWSConv2d, WSConv2d
from norm_det.layers.weight_std import parametric_standardize_filters, standardize_filters
from tests.model_utils import two_conv_bound

# Unit roundoffs.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def _composed_ws(weight, eps):
    # The formula WSConv2d used before the autograd function, recorded op by op by autograd.
    flat = weight.flatten(1)
    mean = flat.mean(dim=1, keepdim=True)
    std = flat.std(dim=1, keepdim=True)
    return ((flat - mean) / (std + eps)).view_as(weight)


def _composed_pws(weight, alpha, gamma):
    # The formula PWSConv2d used before the autograd function.
    flat = weight.flatten(1)
    mean = flat.mean(dim=1, keepdim=True)
    var = flat.var(dim=1, unbiased=False, keepdim=True)
    scale = alpha.view(-1, 1) * math.sqrt(2.0 / flat.shape[1]) * torch.rsqrt(var + gamma)
    return ((flat - mean) * scale).view_as(weight)


def _weights(shape, dtype, *, near_constant_row):
    """He-scaled filters with means up to a few times their spread, and ``alpha``."""
    gen = torch.Generator().manual_seed(0)
    n = math.prod(shape[1:])
    w = torch.randn(shape, generator=gen, dtype=dtype) * math.sqrt(2.0 / n)
    w += 0.5 * math.sqrt(2.0 / n) * torch.randn(shape[0], *[1] * (len(shape) - 1), generator=gen)
    w[0] += 3 * w[0].std()
    if near_constant_row:
        w[1] = 0.3 + 1e-4 * torch.randn(shape[1:], generator=gen, dtype=dtype)
    alpha = torch.rand(shape[0], generator=gen, dtype=dtype) * 1.5 + 0.5
    return w.requires_grad_(), alpha.requires_grad_()


def _relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def _magnitudes(weight, alpha, grad, *, eps=0.0, gamma=0.0):
    """What bounds the rounding of the standardization ``y``, ``dL/dw`` and ``dL/dalpha``.

    Each is the formula evaluated on magnitudes: ``|w_i| + mean|w|`` (>= ``|w_i - mean|``) for
    the centered weight, ``|g|`` for the gradient ``g = dL/dy``. With ``c`` the row's scale,
    ``S = sum |g| (|w| + mean|w|)`` and ``d`` the slope ``dc/dv * 2 / (n - correction)``:
    ``Y = (|w| + mean|w|) c``, ``G = c (|g| + mean|g|) + |d| S (|w| + mean|w|)`` and
    ``A = S sqrt(2/n) / sqrt(v + gamma)``, each times ``kappa = rms(w) / std(w)`` of its row: a
    variance by torch.var's updating formula errs by ``n kappa u`` relatively (Chan, Golub &
    LeVeque, 1983), a two-pass one by less. Every sum in either implementation (the autograd
    function, or the composed ops under autograd) has at most ``n`` terms and every scale a few
    roundings, so each result is within ``(3 n + 12) u`` of these, in any summation order.

    Args:
        weight: ``(O, ...)``; alpha: ``(O,)`` for PWS, None for WS; grad: ``dL/dy``, like weight.

    Returns:
        ``(Y, G, A)``, float64, shaped like weight, weight and alpha (A None for WS).
    """
    flat = weight.detach().double().flatten(1)
    g = grad.double().flatten(1)
    n = flat.shape[1]
    spread = flat.abs() + flat.abs().mean(1, keepdim=True)
    kappa = flat.square().mean(1, keepdim=True).sqrt() / flat.std(1, keepdim=True)
    if alpha is None:
        std = flat.std(1, keepdim=True)
        c = 1 / (std + eps)
        slope = torch.where(std > 0, c * c / ((n - 1) * std), 0.0)
        root = None
    else:
        var = flat.var(1, unbiased=False, keepdim=True)
        root = torch.rsqrt((var + gamma) * (n / 2))
        c = alpha.detach().double().abs().view(-1, 1) * root
        slope = c / (n * (var + gamma))
    total = (g.abs() * spread).sum(1, keepdim=True)
    y = (kappa * spread * c).view_as(weight)
    dw = kappa * (c * (g.abs() + g.abs().mean(1, keepdim=True)) + slope * total * spread)
    dalpha = None if root is None else (kappa * total * root).view(-1)
    return y, dw.view_as(weight), dalpha


def _within_rounding(a, b, magnitude, n, dtype):
    """``|a - b| <= 2 (3 n + 12) u magnitude`` elementwise: both sides' rounding (above)."""
    bound = 2 * (3 * n + 12) * UNIT_ROUNDOFF[dtype] * magnitude
    return bool(((a.double() - b.double()).abs() <= bound).all())


def test_ws_gradcheck_in_float64():
    w, _ = _weights((5, 2, 3, 3), torch.float64, near_constant_row=False)
    with torch.no_grad():
        w[1] = 0.3 + 1e-3 * torch.randn(2, 3, 3, dtype=torch.float64)  # std 1e-3 >> eps
    assert gradcheck(lambda w: standardize_filters(w, eps=1e-5), (w,))


@pytest.mark.parametrize("gamma", [1e-4, 1e-3])
def test_pws_gradcheck_in_float64_including_alpha(gamma):
    # Row 1 is near-constant: Var = 1e-8 << gamma.
    w, alpha = _weights((5, 2, 3, 3), torch.float64, near_constant_row=True)
    assert gradcheck(lambda w, a: parametric_standardize_filters(w, a, gamma=gamma), (w, alpha))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(32, 16, 3, 3), (24, 8, 1, 1), (16, 3, 7, 7)])
def test_equals_the_composed_formulas(shape, dtype):
    # No near-constant filter here: in float32 its few significant bits make both formulas
    # differ from exact arithmetic by ~1e-4 (WS), so it is compared in float64 below. Element
    # by element, so that the filter with a large mean is checked on its own scale: in float64
    # within ~1e-13 of the magnitudes; in float32 within float32's worst case (~1e-4 of them),
    # which no processor's summation order exceeds.
    w, alpha = _weights(shape, dtype, near_constant_row=False)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    n = math.prod(shape[1:])
    cases = [
        (
            lambda w, a: standardize_filters(w, eps=1e-5),
            lambda w, a: _composed_ws(w, 1e-5),
            _magnitudes(w, None, grad, eps=1e-5),
        ),
        (
            lambda w, a: parametric_standardize_filters(w, a, gamma=1e-4),
            lambda w, a: _composed_pws(w, a, 1e-4),
            _magnitudes(w, alpha, grad, gamma=1e-4),
        ),
    ]
    for new, old, (y_size, dw_size, dalpha_size) in cases:
        y_new, y_old = new(w, alpha), old(w, alpha)
        assert y_new.shape == shape and y_new.dtype == dtype
        assert _within_rounding(y_new, y_old, y_size, n, dtype)
        grads_new = torch.autograd.grad(y_new, (w, alpha), grad, allow_unused=True)
        grads_old = torch.autograd.grad(y_old, (w, alpha), grad, allow_unused=True)
        assert grads_new[0].dtype == dtype
        assert _within_rounding(grads_new[0], grads_old[0], dw_size, n, dtype)
        if grads_old[1] is None:
            assert grads_new[1] is None
        else:
            assert _within_rounding(grads_new[1], grads_old[1], dalpha_size, n, dtype)


def test_equals_the_composed_formulas_in_float64_with_a_near_constant_filter():
    w, alpha = _weights((12, 6, 3, 3), torch.float64, near_constant_row=True)
    grad = torch.randn(12, 6, 3, 3, dtype=torch.float64)
    cases = [
        (standardize_filters(w, eps=1e-5), _composed_ws(w, 1e-5), (w,)),
        (
            parametric_standardize_filters(w, alpha, gamma=1e-3),
            _composed_pws(w, alpha, 1e-3),
            (w, alpha),
        ),
    ]
    for y_new, y_old, inputs in cases:
        assert y_new.dtype == torch.float64
        assert _relative_error(y_new, y_old) < 1e-12
        new = torch.autograd.grad(y_new, inputs, grad)
        old = torch.autograd.grad(y_old, inputs, grad)
        for a, b in zip(new, old):
            assert _relative_error(a, b) < 1e-10
            assert _relative_error(a[1], b[1]) < 1e-10


def test_ws_constant_filter_gets_the_masked_std_gradient():
    # torch.std gives no gradient at std = 0; only the mean subtraction's remains:
    # dL/dw = (g - mean(g)) / eps.
    w = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    w[2] = 0.5
    w.requires_grad_()
    grad = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    (new,) = torch.autograd.grad(standardize_filters(w, eps=1e-5), w, grad)
    (old,) = torch.autograd.grad(_composed_ws(w, 1e-5), w, grad)
    assert torch.isfinite(new).all()
    assert torch.allclose(new, old, rtol=1e-10, atol=0)
    expected = (grad[2] - grad[2].mean()) / 1e-5
    assert torch.allclose(new[2], expected, rtol=1e-10, atol=0)


def test_frozen_weight_gives_only_the_alpha_gradient():
    w, alpha = _weights((8, 4, 3, 3), torch.float64, near_constant_row=False)
    w = w.detach()
    grad = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    y = parametric_standardize_filters(w, alpha, gamma=1e-4)
    y.backward(grad)
    (expected,) = torch.autograd.grad(_composed_pws(w, alpha, 1e-4), alpha, grad)
    assert w.grad is None
    assert _relative_error(alpha.grad, expected) < 1e-12


def test_ws_gradient_has_zero_mean_per_filter():
    # As for PWS (test_weight_std.py, the PWS paper's eq. 13): the mean is subtracted, so the
    # gradient has none.
    conv = WSConv2d(5, 6, 3, padding=1).double()
    x = torch.randn(2, 5, 7, 7, dtype=torch.float64)
    (conv(x) ** 2).sum().backward()
    per_filter_mean = conv.weight.grad.flatten(1).mean(1)
    scale = conv.weight.grad.abs().max()
    assert per_filter_mean.abs().max() < 1e-12 * max(scale.item(), 1.0)


@pytest.mark.parametrize("cls", [WSConv2d, PWSConv2d])
def test_no_grad_and_traced_weights_equal_the_trained_one(cls):
    conv = cls(4, 6, 3).double()
    trained = conv.standardized_weight()
    assert trained.grad_fn is not None
    with torch.no_grad():
        # Both run _center_and_scale on the same values: equal bit for bit on any machine.
        assert torch.equal(conv.standardized_weight(), trained)
    # Tracing (ONNX, TorchScript) records plain ops, which autograd still differentiates.
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    traced = torch.jit.trace(conv, (x,))
    with torch.no_grad():
        # The traced ops are those of the eager forward (out of place): the same weight.
        bound = two_conv_bound(trained, conv.bias, x)
        assert (traced(x) - conv(x)).abs().max() <= bound
    (traced_grad,) = torch.autograd.grad(traced(x).square().sum(), conv.weight)
    (eager_grad,) = torch.autograd.grad(conv(x).square().sum(), conv.weight)
    # Both back-propagate dL/dW_hat (the same convolution backward) through the standardization.
    w_hat = trained.detach().requires_grad_()
    (grad_w_hat,) = torch.autograd.grad(F.conv2d(x, w_hat, conv.bias).square().sum(), w_hat)
    alpha = getattr(conv, "alpha", None)
    options = dict(eps=conv.eps) if alpha is None else dict(gamma=conv.gamma)
    _, dw_size, _ = _magnitudes(conv.weight, alpha, grad_w_hat, **options)
    assert _within_rounding(traced_grad, eager_grad, dw_size, trained[0].numel(), torch.float64)
