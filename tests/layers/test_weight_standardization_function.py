"""FilterStandardization (the WS/PWS autograd function) against the composed tensor-op formulas."""

import math

import pytest
import torch
from torch.autograd import gradcheck

from norm_det.layers import PWSConv2d, WSConv2d
from norm_det.layers.weight_std import parametric_standardize_filters, standardize_filters


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


@pytest.mark.parametrize("shape", [(32, 16, 3, 3), (24, 8, 1, 1), (16, 3, 7, 7)])
def test_equals_the_composed_formulas_in_float32(shape):
    # No near-constant filter here: in float32 its few significant bits make both formulas
    # differ from exact arithmetic by ~1e-4 (WS), so they are compared in float64 below.
    w, alpha = _weights(shape, torch.float32, near_constant_row=False)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    cases = [
        (lambda w, a: standardize_filters(w, eps=1e-5), lambda w, a: _composed_ws(w, 1e-5)),
        (
            lambda w, a: parametric_standardize_filters(w, a, gamma=1e-4),
            lambda w, a: _composed_pws(w, a, 1e-4),
        ),
    ]
    for new, old in cases:
        y_new, y_old = new(w, alpha), old(w, alpha)
        assert y_new.shape == shape and y_new.dtype == torch.float32
        assert _relative_error(y_new, y_old) < 1e-5
        grads_new = torch.autograd.grad(y_new, (w, alpha), grad, allow_unused=True)
        grads_old = torch.autograd.grad(y_old, (w, alpha), grad, allow_unused=True)
        assert _relative_error(grads_new[0], grads_old[0]) < 1e-5
        # Row by row too, so that the filter with a large mean is checked on its own scale.
        for row_new, row_old in zip(grads_new[0], grads_old[0]):
            assert _relative_error(row_new, row_old) < 1e-5
        if grads_old[1] is None:
            assert grads_new[1] is None
        else:
            assert _relative_error(grads_new[1], grads_old[1]) < 1e-5


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
    conv = cls(4, 6, 3)
    trained = conv.standardized_weight()
    assert trained.grad_fn is not None
    with torch.no_grad():
        assert torch.equal(conv.standardized_weight(), trained)
    # Tracing (ONNX, TorchScript) records plain ops, which autograd still differentiates.
    x = torch.randn(1, 4, 6, 6)
    traced = torch.jit.trace(conv, (x,))
    assert torch.allclose(traced(x), conv(x), atol=1e-6)
    (traced_grad,) = torch.autograd.grad(traced(x).square().sum(), conv.weight)
    (eager_grad,) = torch.autograd.grad(conv(x).square().sum(), conv.weight)
    assert _relative_error(traced_grad, eager_grad) < 1e-5
