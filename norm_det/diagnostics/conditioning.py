"""Conditioning of a network-deconvolution layer's data before and after whitening (ND++).

Ye et al., "Exploiting Invariance in Training Deep Neural Networks" (ND++, AAAI 2022): real
features are correlated, their covariance ill-conditioned, and gradient descent zig-zags
(Figure 2); ``D ~ Cov^{-1/2}`` makes the loss landscape isotropic. With ``T`` coupled
inverse-Newton steps (5 by default) ``D`` is only approximate: large eigenvalues converge first,
so ``D Cov D`` is not exactly ``I``. The probe reports both condition numbers of a layer's batch
covariance: ``kappa(Cov)`` and ``kappa(D Cov D)`` (1 for perfect whitening). IterNorm's paper
(Figure 4a) uses the same measure of the normalized output.

Everything here is computed in float64, whatever the layer's dtype. ``Cov`` reaches a condition
number of ``1e7`` (eigenvalues down to ``eps``) and ``D Cov D`` one of ``2e5`` on the tiny test
detector: float32 moments, whose rounding is ``~1e-7`` of the largest eigenvalue per entry, can
make such a matrix look indefinite (``kappa = inf``) on one processor and not on another. In
float64 the covariance is the Gram matrix of the *centred* samples plus ``eps I``, positive
definite by construction: its rounding, ``~ S * 2^-53`` of the largest eigenvalue for ``S``
samples, is below ``1e-8`` for ND++'s standardized inputs (``S <= 1e5``, eigenvalues ``<= F``),
far below ``eps``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from norm_det.layers.deconv import DeconvConv2d, standardize
from norm_det.layers.isqrt import inverse_sqrt

__all__ = [
    "condition_number",
    "deconv_covariance",
    "deconv_whitening",
    "whitened_covariance",
]


def condition_number(matrix: torch.Tensor) -> torch.Tensor:
    """``lambda_max / lambda_min`` of symmetric ``(..., F, F)`` matrices: ``(...)``, float64.

    The eigenvalues are computed in float64. ``inf`` where the smallest is not positive.
    """
    eigenvalues = torch.linalg.eigvalsh(matrix.double())
    smallest, largest = eigenvalues[..., 0], eigenvalues[..., -1]
    ratio = largest / smallest
    return torch.where(smallest > 0, ratio, torch.full_like(ratio, float("inf")))


def whitened_covariance(cov: torch.Tensor, deconv: torch.Tensor) -> torch.Tensor:
    """``D Cov D^T``: the covariance of the whitened data ``X D^T``, ``(..., F, F)``, float64."""
    deconv = deconv.double()
    return deconv @ cov.double() @ deconv.transpose(-1, -2)


def _data_matrices(layer: DeconvConv2d, x: torch.Tensor) -> torch.Tensor:
    """The layer's sampled data matrices ``(mats, F, samples)`` of a standardized input."""
    n, channels = x.shape[:2]
    mats, features = layer.running_mean.shape
    strides = tuple(layer.sampling_stride * s for s in layer.stride)
    if layer.kernel_size == (1, 1):
        # Every (s_h * s_w)-th of the N*H*W positions.
        rows = x.permute(0, 2, 3, 1).reshape(-1, channels)[:: strides[0] * strides[1]]
        columns = rows.T.reshape(channels, 1, -1)  # (C, 1, M)
    else:
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
            x, padding = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode), 0
        else:
            padding = layer.padding
        patches = F.unfold(x, layer.kernel_size, layer.dilation, padding, strides)
        columns = patches.transpose(0, 1).reshape(patches.shape[1], n, -1)  # (C*k*k, N, L)
    if layer.groups > 1:
        # One matrix per convolution group: its channels' columns are contiguous.
        return columns.reshape(mats, features, -1)
    # Column j (unfold order) belongs to group j mod (C / B); the groups are extra samples.
    return columns.reshape(1, features, -1)


@torch.no_grad()
def deconv_covariance(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The covariance ``Cov + eps I`` a :class:`DeconvConv2d` estimates from input ``x``, float64.

    Built from the layer's definition (docs/whitening.md, DESIGN "Layer semantics"): each sample
    standardized as the layer does, im2col with the layer's kernel, dilation and padding at
    patch centres every ``sampling_stride * stride`` pixels, the ``C*k*k`` columns in ``C/B``
    interleaved groups of ``F = k*k*B`` features stacked as samples (one matrix per group of a
    grouped convolution). The layer's running statistics and step counter are not touched.
    Computed in float64 from the centred samples (the layer itself uses ``E[x x^T] - mu mu^T`` in
    its own dtype): the exact value of what the layer estimates, positive definite.

    Args:
        layer: a ``DeconvConv2d`` (ND or ND++).
        x: its input ``(N, C_in, H, W)``.

    Returns:
        ``(mats, F, F)`` float64: one covariance per whitening matrix of the layer.
    """
    if not isinstance(layer, DeconvConv2d):
        raise ValueError(f"deconv_covariance: expected a DeconvConv2d; got {type(layer).__name__}")
    data = _data_matrices(layer, standardize(x.double(), layer.scale_invariance, layer.eps))
    # Centred before the product: E[x x^T] - mu mu^T would cancel where |mu| >> spread.
    centred = data - data.mean(dim=-1, keepdim=True)
    cov = centred @ centred.transpose(-1, -2) / data.shape[-1]
    cov.diagonal(dim1=-2, dim2=-1).add_(layer.eps)
    return cov


def deconv_whitening(layer: nn.Module, cov: torch.Tensor) -> torch.Tensor:
    """The layer's ``D`` for ``cov``: its ``iters`` coupled inverse-Newton steps, in float64."""
    return inverse_sqrt(cov.double(), layer.iters, "inverse_newton", layer.isqrt_backend)
