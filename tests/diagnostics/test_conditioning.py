"""ND++'s whitened covariance: the probe rebuilds exactly the statistics the layer uses."""

from __future__ import annotations

import pytest
import torch

from norm_det.diagnostics import (
    condition_number,
    deconv_covariance,
    deconv_whitening,
    whitened_covariance,
)
from norm_det.layers import DeconvConv2d

LAYERS = {
    "3x3 ND++, 2 groups of channels": dict(kernel_size=3, padding=1, block=4, sampling_stride=2),
    "1x1 ND++": dict(kernel_size=1, block=4, sampling_stride=2),
    "grouped conv": dict(kernel_size=3, padding=1, groups=2, sampling_stride=1),
    "ND, strided dilated": dict(
        kernel_size=3, padding=2, dilation=2, stride=2, block=8, scale_invariance="none"
    ),
}


@pytest.mark.parametrize("options", LAYERS.values(), ids=LAYERS.keys())
def test_covariance_gives_the_layers_own_whitening(options):
    # In float64 the layer's D and the probe's agree to rounding (~1e-16 of entries of order
    # 1-10 after T = 5 products); 1e-10 leaves a margin that no processor's rounding reaches.
    options = {"scale_invariance": "layernorm", "sampling_stride": 1, **options}
    layer = DeconvConv2d(8, 6, momentum=1.0, **options).double().train()  # running D = batch's
    scales = torch.linspace(0.5, 3.0, 8, dtype=torch.float64).view(1, 8, 1, 1)
    x = torch.randn(3, 8, 13, 11, dtype=torch.float64) * scales + 0.3
    layer(x)
    tracked = layer.num_batches_tracked.clone()
    cov = deconv_covariance(layer, x)
    assert cov.dtype == torch.float64
    torch.testing.assert_close(
        deconv_whitening(layer, cov), layer.running_deconv, atol=1e-10, rtol=0
    )
    assert torch.equal(layer.num_batches_tracked, tracked)  # the probe takes no training step


def _hadamard(order: int) -> torch.Tensor:
    """Sylvester's ``order x order`` matrix of +-1 with orthogonal columns (order a power of 2)."""
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < order:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)])
    return matrix


def _inverse_newton_scalar(value: float, iters: int) -> float:
    """``lambda x_T^2`` of the coupled inverse Newton iteration on a normalized eigenvalue."""
    m = value
    for _ in range(iters):
        m *= ((3.0 - m) / 2.0) ** 2
    return m


def test_condition_numbers_of_a_float32_layer_are_exact():
    """A large mean over a small spread, in a float32 layer: the probe's covariance is exact.

    The 16 pixels carry the channel vectors ``1024 + s_c h_c`` with ``h_c`` the columns 1..8 of a
    16 x 16 Hadamard matrix (zero mean, orthogonal) and ``s_c = 2^-c``: every value is a float32
    number, and the exact covariance is ``diag(s_c^2) + eps I``. Float32 moments cannot resolve
    it (``E[x^2] ~ 2^20``, whose float32 spacing 2^-3 exceeds ``s_7^2 = 2^-14``): they gave a
    wrong, possibly indefinite matrix, its condition number processor-dependent or inf. In float64
    the centred samples are exact and the two condition numbers have closed forms.
    """
    scales = 2.0 ** -torch.arange(8, dtype=torch.float64)
    pixels = 1024.0 + _hadamard(16)[:, 1:9] * scales  # (16 positions, 8 channels)
    x = pixels.T.reshape(1, 8, 4, 4).float()
    assert torch.equal(x.double().reshape(8, 16).T, pixels)  # exactly representable
    layer = DeconvConv2d(8, 4, 1, block=8, sampling_stride=1, scale_invariance="none").train()
    eps = layer.eps
    cov = deconv_covariance(layer, x)[0]
    expected = torch.diag(scales.square() + eps)
    torch.testing.assert_close(cov, expected, rtol=0, atol=1e-15)
    eigenvalues = (scales.square() + eps).tolist()
    assert float(condition_number(cov)) == pytest.approx(
        max(eigenvalues) / min(eigenvalues), rel=1e-12
    )
    # D Cov D: the scalar iteration on each eigenvalue over ||Cov||_F, times that norm.
    norm = sum(value**2 for value in eigenvalues) ** 0.5
    whitened = [_inverse_newton_scalar(value / norm, layer.iters) for value in eigenvalues]
    kappa = float(condition_number(whitened_covariance(cov, deconv_whitening(layer, cov))))
    assert kappa == pytest.approx(max(whitened) / min(whitened), rel=1e-9)


def test_covariance_of_a_1x1_layer_by_hand():
    """Block = all channels, every pixel sampled, no standardization: the channel covariance."""
    layer = DeconvConv2d(3, 2, 1, block=3, sampling_stride=1, scale_invariance="none", eps=1e-3)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    layer = layer.double()
    positions = x.permute(0, 2, 3, 1).reshape(-1, 3)
    expected = torch.cov(positions.T, correction=0) + 1e-3 * torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(deconv_covariance(layer, x)[0], expected)


def test_more_newton_steps_whiten_better():
    x = torch.randn(4, 8, 16, 16)
    x[:, 1] += 3 * x[:, 0]  # strongly correlated channels: an ill-conditioned covariance
    kappas = []
    for iters in (1, 5, 30):
        layer = DeconvConv2d(8, 8, 3, padding=1, block=8, iters=iters, sampling_stride=1).train()
        cov = deconv_covariance(layer, x)
        kappas.append(
            float(condition_number(whitened_covariance(cov, deconv_whitening(layer, cov))))
        )
    raw = float(condition_number(cov))
    assert raw > kappas[0] > kappas[1] > kappas[2]
    assert kappas[2] == pytest.approx(1.0, abs=1e-2)
