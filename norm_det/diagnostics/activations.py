"""Per-layer activation mean and variance (the variance transmission the papers follow).

The PWS paper (eqs. 14-15) tracks ``Var[Y_l]`` layer by layer: without a normalization of the
outputs a shift of the filter means inflates it from layer to layer; BN and GN hold every
layer's output at zero mean and unit variance per channel (before their affine transform),
weight-only schemes (PWS, WS, CZM, ND) leave it to the weights.
"""

from __future__ import annotations

import torch

__all__ = ["activation_moments"]

# Elements converted to float64 at a time: the moments of a detector's largest feature maps
# (tens of millions of elements) without a float64 copy of the whole map.
_CHUNK = 1 << 22


def activation_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E[x], Var[x])`` over all elements of ``x`` (population variance): float64 scalars.

    Two passes in float64 (the mean, then the centred squares), so the variance does not cancel
    where the mean is large against the spread.
    """
    flat = x.detach().reshape(-1)
    chunks = flat.split(_CHUNK)
    count = max(flat.numel(), 1)
    mean = sum(chunk.sum(dtype=torch.float64) for chunk in chunks) / count
    squares = sum((chunk.double() - mean).square().sum() for chunk in chunks)
    mean = torch.as_tensor(mean, dtype=torch.float64)
    return mean, torch.as_tensor(squares / count, dtype=torch.float64)
